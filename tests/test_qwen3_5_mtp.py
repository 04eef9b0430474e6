"""MTP speculation for Qwen3.5-MoE (issue 19 point 7): the checkpoint's `mtp.*` layer traced into the
plan's draft function, and the Gated DeltaNet state rolled back to the last accepted token after every
verify step.

The tiny hybrid checkpoint of qwen3_5_fixtures gets a random MTP layer (transformers drops `mtp.*`, so
the draft is checked against one built from transformers' own decoder layer and norms, composed as
vLLM's Qwen3_5MultiTokenPredictor is). Greedy output with speculation equals greedy output without
(the target's tokens, HF-checked by test_qwen3_5_moe.py) for prompts batched together and longer than
the chunk: with the random head every draft is rejected; with drafts made right up to a varying point
("oracle" drafts: the target's own continuation, then a wrong token) acceptances of every length
happen, and the sequences' state rows equal a run without speculation at every common token count."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hf_fixtures import random_prompts
from mtp_fixtures import check_mtp_drafts
from nanoforge import LLM, SamplingParams
from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from qwen3_5_fixtures import VOCAB, add_mtp_layer, hf_qwen3_5, make_qwen3_5_checkpoint

LENGTHS = [4, 19, 45]  # batched together; two are longer than the 16-token prefill chunk
CHUNK = 16
NEW = 14
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return add_mtp_layer(make_qwen3_5_checkpoint(tmp_path_factory.mktemp("qwen3_5_mtp") / "ckpt"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(VOCAB, LENGTHS, seed=11)


@pytest.fixture(scope="module")
def want(ckpt, prompts) -> list[list[int]]:
    """Greedy tokens without speculation (the target's own, as HF's in test_qwen3_5_moe.py)."""
    return _greedy(LLM(ckpt, progress=False, max_prefill_chunk=CHUNK), prompts)


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_compile_traces_the_mtp_layer_and_inspect_says_state_rolls_back(ckpt, tmp_path, capsys, prompts, want):
    from nanoforge.cli import main

    plan_dir = tmp_path / "plan"
    assert main(["compile", str(ckpt), "-o", str(plan_dir), "--speculative", "mtp", "--num-speculative-tokens", "2",
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plan_dir)]) == 0
    out = capsys.readouterr().out
    assert "speculative  mtp: 2 drafts a step from the draft function, its KV in layer(s) 2" in out
    assert "4 recurrent layers roll back to the last accepted token" in out
    llm = LLM(str(plan_dir), progress=False, max_prefill_chunk=CHUNK)
    plan = llm.plan
    draft = plan.module.functions["draft"]
    assert [n.attrs["layer"] for n in draft.nodes if n.op == "attention"] == [2]  # after the model's 2 attention layers
    assert {"concat", "offset_rms_norm", "gated_qk_norm_rope", "sigmoid_mul", "moe", "lm_head"} <= \
        {n.op for n in draft.nodes} and not any(n.op == "gdn" for n in draft.nodes)
    keys = {k for n in draft.nodes for name in n.params.values() for k in plan.module.params[name].keys}
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.experts.5.down_proj.weight",
            "model.embed_tokens.weight", "lm_head.weight"} <= keys
    assert [x.layer for x in plan.kv_contract.layers] == [0, 1, 2] and len(plan.kv_contract.state) == 4
    assert _greedy(llm, prompts) == want  # the plan speculates by default


def _mtp_reference(ckpt: Path, tmp: Path):
    """logits(history, next_token) of the MTP head from transformers' own modules: the main model (hidden
    states after model.norm, embedding, lm_head), Qwen3_5MoeRMSNorm for the three (1 + w) norms, and a
    Qwen3_5MoeDecoderLayer of full attention holding mtp.layers.0 (loaded by transformers from a copy of
    the checkpoint whose layer 2, full attention, is the MTP layer's)."""
    from safetensors.torch import load_file, save_file
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm

    tensors = load_file(str(ckpt / "model.safetensors"))
    donor = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    donor.update({"model.layers.2." + k[len("mtp.layers.0."):]: v for k, v in tensors.items()
                  if k.startswith("mtp.layers.0.")})
    for f in ckpt.iterdir():
        if f.suffix == ".json":
            (tmp / f.name).write_bytes(f.read_bytes())
    save_file(donor, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf, block = hf_qwen3_5(ckpt), hf_qwen3_5(tmp).model.layers[2]
    c = hf.config
    norms = {}
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[name] = Qwen3_5MoeRMSNorm(c.hidden_size, c.rms_norm_eps)
        norms[name].weight.data.copy_(tensors[f"mtp.{name}.weight"])
    fc = tensors["mtp.fc.weight"]

    @torch.inference_mode()
    def logits(history: list[int], next_token: int) -> torch.Tensor:
        h = hf.model(input_ids=torch.tensor([history]), use_cache=False).last_hidden_state
        e = hf.model.embed_tokens(torch.tensor([history[1:] + [next_token]]))
        x = torch.cat([norms["pre_fc_norm_embedding"](e), norms["pre_fc_norm_hidden"](h)], dim=-1) @ fc.t()
        pos = torch.arange(len(history))[None]
        mask = create_causal_mask(config=c, inputs_embeds=x, attention_mask=None, past_key_values=None,
                                  position_ids=pos)
        x = block(x, position_embeddings=hf.model.rotary_emb(x, pos[None].expand(3, 1, -1)), attention_mask=mask,
                  position_ids=pos)
        return hf.lm_head(norms["norm"](x))[0].float()

    return logits


def test_each_draft_is_the_mtp_head_built_from_transformers_modules(ckpt, tmp_path):
    """After every step (prefill in chunks, then verify steps), the draft the runtime holds for a sequence
    is the argmax of the reference head over the sequence's whole history."""
    ref = _mtp_reference(ckpt, tmp_path)
    llm = LLM(ckpt, progress=False, speculative="mtp", num_speculative_tokens=1, max_prefill_chunk=8)
    assert check_mtp_drafts(llm, random_prompts(VOCAB, [19, 5], seed=2), ref, tie_margin=1e-4) >= 8


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_decoding_without_speculation_while_drafts_are_rejected(ckpt, prompts, want, k):
    llm = LLM(ckpt, progress=False, speculative="mtp", num_speculative_tokens=k, max_prefill_chunk=CHUNK)
    assert _greedy(llm, prompts) == want
    m = llm.metrics()["speculative"]
    assert m["verify_rows"] > 0 and m["drafts_proposed"] > m["drafts_accepted"]  # a random head: rejections
    llm.engine.blocks.check_invariants([])
    assert llm.engine.blocks.state.num_free == llm.engine.blocks.state.num_slots


def test_prompt_lookup_speculation_runs_on_the_hybrid_model(ckpt, prompts, want):
    llm = LLM(ckpt, progress=False, speculative="ngram", num_speculative_tokens=2, max_prefill_chunk=CHUNK)
    assert _greedy(llm, prompts) == want
    llm.engine.blocks.check_invariants([])


def _state_of(eng, seq) -> list[torch.Tensor]:
    return [t[seq.state_slot].clone() for tensors in eng.runner.state for t in tensors]


def _run_recording(llm: LLM, prompts, drafts=None) -> tuple[list[list[int]], list[dict[int, list]]]:
    """Step the engine through `prompts`; per sequence its state rows after every step, by num_computed.
    `drafts(seq, proposed) -> drafts` replaces the MTP head's proposals."""
    eng = llm.engine
    if drafts is not None:
        replace_drafts(eng, drafts)
    seqs = [eng.add_request(p, GREEDY) for p in prompts]
    states: list[dict[int, list]] = [{} for _ in seqs]
    while eng.has_work():
        eng.step()
        for seq, seen in zip(seqs, states):
            if seq.finish_reason is None and seq.num_computed:
                seen[seq.num_computed] = _state_of(eng, seq)
    return [s.output_ids for s in seqs], states


def replace_drafts(eng, drafts) -> None:
    """The engine's MTP head proposes as before (its chain runs), but `drafts(seq, proposed)` decides."""
    real = eng.spec.mtp.chain
    eng.spec.mtp.chain = lambda wanted: [drafts(seq, d) if d else d for (seq, _), d in zip(wanted, real(wanted))]


def oracle_drafts(prompts, want, seed: int):
    """Drafts right up to a random point, then one wrong token: the target's own continuation (`want`)."""
    full = {tuple(p): p + w for p, w in zip(prompts, want)}
    rng = random.Random(seed)

    def drafts(seq, proposed: list[int]) -> list[int]:
        truth = full[tuple(seq.token_ids[:seq.num_prompt])][len(seq.token_ids):len(seq.token_ids) + len(proposed)]
        good = rng.randint(0, len(truth))
        return truth[:good] + [(t + 1) % VOCAB for t in truth[good:good + 1]]

    return drafts


def compare_states(spec: list[dict[int, list]], plain: list[dict[int, list]], tol: float) -> int:
    """Assert each state tensor of `spec` is within tol x its largest magnitude of `plain`'s at every token
    count both recorded (verify rows batch the layers below differently: rounding, not rollback, differs);
    return how many (sequence, count) pairs were compared."""
    compared = 0
    for got, ref in zip(spec, plain):
        for count in sorted(set(got) & set(ref)):
            for a, b in zip(got[count], ref[count]):
                err, scale = (a - b).abs().max().item(), b.abs().max().item()
                assert err <= tol * scale, f"after {count} tokens: state differs by {err:.2e} (scale {scale:.2e})"
            compared += 1
    return compared


@pytest.fixture(scope="module")
def plain_states(ckpt, prompts, want) -> list[dict[int, list]]:
    tokens, states = _run_recording(LLM(ckpt, progress=False, max_prefill_chunk=CHUNK), prompts)
    assert tokens == want
    return states


@pytest.mark.parametrize("k", [1, 3])
def test_accepted_and_rejected_drafts_leave_the_state_of_decoding_without_speculation(ckpt, prompts, want,
                                                                                      plain_states, k):
    """Oracle drafts: acceptances of every length 0..K. Tokens equal decoding's, and at every token count
    both runs reach, each sequence's conv windows and delta states equal those of the run without
    speculation: the state never holds a rejected draft (rolled back to the accepted row's)."""
    llm = LLM(ckpt, progress=False, speculative="mtp", num_speculative_tokens=k, max_prefill_chunk=CHUNK)
    tokens, spec = _run_recording(llm, prompts, oracle_drafts(prompts, want, seed=k))
    assert tokens == want
    m = llm.metrics()["speculative"]
    assert 0 < m["drafts_accepted"] < m["drafts_proposed"] and 0 < m["acceptance_rate_per_position"][0] < 1, m
    assert compare_states(spec, plain_states, 1e-4) >= 3 * (NEW // (k + 1))
    llm.engine.blocks.check_invariants([])


def test_pd_decode_engine_speculates_on_the_migrated_state_row(ckpt, prompts, want):
    """PD by hand between two MTP engines: the prefill engine parks each prompt after its first token, its
    KV blocks and state row move to the decode engine, which verifies (oracle) drafts from there on."""
    from nanoforge.runtime.kv_transfer import gather_blocks, gather_state, scatter_blocks, scatter_state

    opts = dict(progress=False, num_blocks=64, speculative="mtp", num_speculative_tokens=2, max_prefill_chunk=CHUNK)
    a, b = LLM(ckpt, **opts), LLM(ckpt, **opts)
    replace_drafts(b.engine, oracle_drafts(prompts, want, seed=7))
    moved = []
    for p in prompts:
        seq = a.engine.add_request(p, GREEDY)
        while not seq.num_output:
            a.engine.step()
        a.engine.park(seq)
        into, _ = b.engine.add_migrated(seq.token_ids, seq.num_prompt, GREEDY, seq.num_computed)
        scatter_blocks(b.engine.runner.pool, into.block_table, gather_blocks(a.engine.runner.pool, seq.block_table))
        scatter_state(b.engine.runner.state, into.state_slot, gather_state(a.engine.runner.state, seq.state_slot))
        b.engine.resume_migrated(into, seq.num_computed)
        a.engine.release_parked(seq)
        moved.append(into)
    b.engine.run_until_done()
    assert [s.output_ids for s in moved] == want and b.metrics()["speculative"]["drafts_accepted"] > 0
    for llm in (a, b):
        llm.engine.blocks.check_invariants([])


def test_verify_rows_keep_each_rows_state_like_decode_steps():
    """The gdn op on a verify sequence (its token and 3 drafts) == 4 decode steps: same outputs, the slot
    ends at the state after the last row, history rows hold the states after rows 0..2; a prefill chunk
    and a decode row beside it are unaffected."""
    from nanoforge.kernels import torch_ref
    from nanoforge.kernels.context import allocate_state, make_context
    from nanoforge.kv_contract import KVContract, SequenceState

    g = torch.Generator().manual_seed(5)
    hk, hv, dk, dv, kern = 2, 4, 8, 6, 4
    conv = 2 * hk * dk + hv * dv
    params = dict(conv=torch.randn(conv, 1, kern, generator=g) / 2, dt_bias=torch.randn(hv, generator=g),
                  A_log=torch.randn(hv, generator=g), norm=1 + 0.1 * torch.randn(dv, generator=g))
    attrs = dict(layer=0, k_heads=hk, v_heads=hv, k_head_dim=dk, v_head_dim=dv, conv_kernel=kern, eps=1e-6)
    contract = KVContract(4, "f32", (), state=(SequenceState(0, "gdn", ((conv, kern - 1), (hv, dk, dv)), "f32"),))
    pool = allocate_state(contract, 10)
    for t in pool[0]:
        t.copy_(torch.randn(t.shape, generator=g))
    ref_pool = [tuple(t.clone() for t in pool[0])]
    seqs, slots = [(1, 9, [0]), (4, 20, [0]), (6, 6, [0])], [3, 1, 0]  # decode row, verify (1 + 3), a prompt
    n = sum(q for q, _, _ in seqs)
    x = [torch.randn(n, w, generator=g) for w in (conv, hv * dv, hv, hv)]
    ctx = make_context([], 64, seqs, state=(pool, slots))
    ctx.state_history = [-1, 6, -1]
    out = torch_ref.gdn(*x, ctx=ctx, **params, **attrs)
    steps = [(1, 9, [3], [0])] + [(1, 17 + j, [1], [1 + j]) for j in range(4)] + [(6, 6, [0], list(range(5, 11)))]
    for q, c, slot, rows in steps:
        want = torch_ref.gdn(*(t[rows] for t in x), ctx=make_context([], 64, [(q, c, [0])], state=(ref_pool, slot)),
                             **params, **attrs)
        torch.testing.assert_close(out[rows], want)
        if 1 <= rows[0] <= 3:  # after verify rows 0..2: history rows 6..8
            for ours, ref in zip(pool[0], ref_pool[0]):
                torch.testing.assert_close(ours[6 + rows[0] - 1], ref[1])
    for ours, ref in zip(pool[0], ref_pool[0]):
        torch.testing.assert_close(ours[:6], ref[:6])


def test_mtp_needs_the_mtp_weights(tmp_path):
    bare = make_qwen3_5_checkpoint(tmp_path / "bare", seed=4)
    with pytest.raises(NanoForgeError, match="checkpoint has no MTP layer"):
        compile_checkpoint(bare, CompileOptions(dtype="f32", speculative="mtp"))
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 1}))  # says so, ships none
    with pytest.raises(NanoForgeError, match="the checkpoint has none of its tensors \\(no 'mtp.fc.weight'"):
        compile_checkpoint(bare, CompileOptions(dtype="f32", speculative="mtp"))
    (bare / "config.json").write_text(json.dumps({**config, "mtp_num_hidden_layers": 2}))
    with pytest.raises(NanoForgeError, match="mtp_num_hidden_layers 2: drafting is built for one MTP layer"):
        compile_checkpoint(bare, CompileOptions(dtype="f32", speculative="mtp"))


def test_conditional_generation_checkpoint_traces_its_top_level_mtp_layer(tmp_path):
    ckpt = add_mtp_layer(make_qwen3_5_checkpoint(tmp_path / "cond", seed=3, conditional=True))
    plan = compile_checkpoint(ckpt, CompileOptions(dtype="f32", speculative="mtp", num_speculative_tokens=2))
    draft = plan.module.functions["draft"]
    keys = {k for n in draft.nodes for name in n.params.values() for k in plan.module.params[name].keys}
    assert "mtp.fc.weight" in keys and "model.language_model.embed_tokens.weight" in keys
    assert plan.speculative.draft_kv_layers == (2,)


# ---- on the GPU (`pytest -m gpu`): the Triton GDN kernels' verify chains, eager verify steps ----------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_speculation_keeps_greedy_tokens_and_rolls_the_state_back(ckpt, prompts):
    """On CUDA (f32, decode steps in CUDA graphs, verify steps eager through the Triton verify chains):
    greedy with MTP drafts (random head: all rejected; oracle drafts: partly accepted) equals greedy
    without, and the state rows equal the run without speculation at every common token count."""
    opts = dict(device="cuda", dtype="f32", progress=False, max_prefill_chunk=CHUNK, max_num_seqs=8,
                kv_cache_memory=64 << 20)
    plain_tokens, plain = _run_recording(LLM(ckpt, **opts), prompts)
    for k in (1, 3):
        llm = LLM(ckpt, speculative="mtp", num_speculative_tokens=k, **opts)
        assert _greedy(llm, prompts) == plain_tokens, k
        tokens, spec = _run_recording(llm, prompts, oracle_drafts(prompts, plain_tokens, seed=k))
        assert tokens == plain_tokens, k
        assert compare_states(spec, plain, 1e-3) >= 3 * (NEW // (k + 1)), k
        assert llm.engine.runner.verify_graphs is None  # verify steps of a plan with state run eagerly
        llm.engine.blocks.check_invariants([])

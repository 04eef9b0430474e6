"""Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention + MoE) against HF transformers on CPU: logits and
greedy tokens of prompts batched together, longer than the prefill chunk, with mixed decode + prefill
steps and preemption; the per-sequence state rows (admission, abort); prefix caching off and said so;
the conditional-generation checkpoint's text model; the gdn kernel's state carried across chunks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_fixtures import hf_greedy, hf_last_logits, random_prompts
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from qwen3_5_fixtures import VOCAB, hf_qwen3_5, make_qwen3_5_checkpoint

LENGTHS = [4, 19, 45]  # batched together; two are longer than a 16-token prefill chunk
NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_qwen3_5_checkpoint(tmp_path_factory.mktemp("qwen3_5") / "ckpt")


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_qwen3_5(ckpt)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(VOCAB, LENGTHS, seed=1)


@pytest.fixture(scope="module")
def hf_tokens(hf, prompts):
    return [hf_greedy(hf, p, NEW) for p in prompts]  # HF's own hybrid cache: chunked rule, then recurrent steps


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, progress=False)


def test_last_logits_of_a_flat_batch_match_hf(llm, hf, prompts):
    ours, ref = llm.last_logits(prompts), hf_last_logits(hf, prompts)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_greedy_batched_matches_hf(llm, prompts, hf_tokens):
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_tokens
    llm.engine.blocks.check_invariants([])


def test_chunk16_mixed_steps_and_preemption_match_hf(ckpt, prompts, hf_tokens):
    """Chunks of 16 carry the state across steps; decode rows and prefill chunks share steps; a pool of
    6 blocks preempts (state rows freed, prompts recomputed from a fresh state)."""
    llm = LLM(ckpt, progress=False, max_prefill_chunk=16, max_num_batched_tokens=24, num_blocks=6)
    eng, kinds = llm.engine, []
    schedule = eng.scheduler.schedule

    def recording():
        batch = schedule()
        kinds.append({"decode" if s.num_computed >= s.num_prompt else "prefill" for s, _ in batch.items})
        return batch

    eng.scheduler.schedule = recording
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_tokens
    assert {"decode", "prefill"} in kinds, "no step mixed decode rows with prefill chunks"
    assert eng.scheduler.num_preemptions > 0
    eng.blocks.check_invariants([])


def test_state_rows_gate_admission_and_come_back():
    from nanoforge.runtime.block_manager import BlockManager
    from nanoforge.runtime.scheduler import Scheduler, SchedulerConfig
    from nanoforge.runtime.sequence import Sequence

    blocks = BlockManager(64, 4, prefix_caching=False, state_slots=2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=8), blocks)
    seqs = [Sequence(i, list(range(1, 6)), GREEDY) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.seq_id for s, _ in batch.items] == [0, 1] and sched.waiting[0] is seqs[2]  # no third row
    assert sorted(s.state_slot for s in seqs[:2]) == [0, 1] and seqs[2].state_slot == -1
    blocks.check_invariants(seqs[:2])
    sched.finish(seqs[0], "abort")  # its row comes back and admits the waiting one
    seqs[1].num_computed += 5
    seqs[1].token_ids.append(7)  # sampled: seq 1 decodes next
    assert seqs[0].state_slot == -1 and [s.seq_id for s, _ in sched.schedule().items] == [1, 2]
    sched._preempt(seqs[2])
    assert seqs[2].state_slot == -1 and blocks.state.num_free == 1
    blocks.check_invariants([seqs[1]])
    with pytest.raises(AssertionError):
        BlockManager(8, 4, prefix_caching=True, state_slots=2)


def test_abort_frees_the_state_row(llm, prompts):
    eng = llm.engine
    seqs = [eng.add_request(p, GREEDY) for p in prompts[:2]]
    eng.step()
    assert all(s.state_slot >= 0 for s in seqs)
    eng.abort(seqs[0].seq_id)
    assert seqs[0].state_slot == -1
    eng.abort(seqs[1].seq_id)
    eng.blocks.check_invariants([])
    assert eng.blocks.state.num_free == eng.blocks.state.num_slots


def test_prefix_caching_is_off_and_says_so(llm, ckpt, prompts, tmp_path, capsys):
    from nanoforge.cli import main, startup_line

    eng = llm.engine
    note = eng.kv_cache["prefix_caching"]
    assert note.startswith("off: 4 recurrent layers") and not eng.blocks.prefix_caching
    first, again = (llm.generate([prompts[2]], GREEDY)[0] for _ in range(2))
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids  # recomputed, same answer
    assert eng.blocks.hits == 0
    assert f"prefix caching {note}" in startup_line("tiny", eng.kv_cache)
    plan = tmp_path / "plan"
    assert main(["compile", str(ckpt), "-o", str(plan), "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    kv = eng.kv_cache
    assert f"state        {kv['state_bytes_per_sequence']:,} B/sequence (4 recurrent layers: gdn" in out
    assert f"vs KV {kv['bytes_per_token']:,} B/token" in out
    assert "prefix cache off: 4 recurrent layers keep per-sequence state" in out


def test_what_state_cannot_do_yet_is_refused(ckpt, llm):
    from nanoforge.serving.engine_server import EngineServer

    gpu_engine = SimpleNamespace(kv_pool=lambda: [(torch.empty(1, device="meta"),)])  # PD of state: CPU only
    with pytest.raises(NanoForgeError, match="migrates with the KV on CPU only"):
        EngineServer(gpu_engine, "tcp://127.0.0.1:1", "tiny", llm.plan.kv_contract, role="prefill")


def test_conditional_generation_checkpoint_text_model_matches_hf(tmp_path, prompts):
    ckpt = make_qwen3_5_checkpoint(tmp_path / "cond", seed=3, conditional=True)
    ours = LLM(ckpt, progress=False).last_logits(prompts[1:])
    ref = hf_last_logits(hf_qwen3_5(ckpt, conditional=True), prompts[1:])
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def _gdn_inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hk, hv, dk, dv, kern = 2, 4, 8, 6, 4
    conv = 2 * hk * dk + hv * dv
    x = [torch.randn(n, w, generator=g) for w in (conv, hv * dv, hv, hv)]
    params = dict(conv=torch.randn(conv, 1, kern, generator=g) / 2, dt_bias=torch.randn(hv, generator=g),
                  A_log=torch.randn(hv, generator=g), norm=1 + 0.1 * torch.randn(dv, generator=g))
    attrs = dict(layer=0, k_heads=hk, v_heads=hv, k_head_dim=dk, v_head_dim=dv, conv_kernel=kern, eps=1e-6)
    return x, params, attrs


def test_gdn_state_carries_across_chunks_and_mixed_batches():
    """One prompt in one piece == the same prompt in chunks (state rows carried) == decode steps, and
    two sequences in one flat batch (one decoding, one prefilling) == each alone."""
    from nanoforge.kernels import torch_ref
    from nanoforge.kernels.context import allocate_state, make_context
    from nanoforge.kv_contract import KVContract, SequenceState

    (qkv, z, b, a), params, attrs = _gdn_inputs(75, seed=0)
    contract = KVContract(4, "f32", (), state=(SequenceState(0, "gdn", ((qkv.shape[1], 3), (4, 8, 6)), "f32"),))
    pool = allocate_state(contract, 3)

    def run(pieces: list[tuple[int, int]], slots: list[int]) -> torch.Tensor:
        """pieces: (first position, rows) of each sequence of one flat batch, its rows of the inputs."""
        seqs = [(n, start + n, [0]) for start, n in pieces]
        rows = torch.cat([torch.arange(start, start + n) for start, n in pieces])
        ctx = make_context([], 128, seqs, state=(pool, slots))  # no attention layers: no KV blocks
        return torch_ref.gdn(qkv[rows], z[rows], b[rows], a[rows], ctx=ctx, **params, **attrs)

    whole = run([(0, 75)], [2])
    pieces = [run([(s, min(16, 72 - s))], [0]) for s in range(0, 72, 16)]
    pieces += [run([(s, 1)], [0]) for s in range(72, 75)]  # decode steps: the recurrent form
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-4, atol=1e-5)
    (windows, states), = pool
    torch.testing.assert_close(states[0], states[2], rtol=1e-4, atol=1e-5)  # the same final state
    torch.testing.assert_close(windows[0], windows[2])
    assert states[1].abs().sum() == 0  # slot 1 untouched
    alone_b = run([(0, 20)], [1])
    run([(0, 30)], [0])  # sequence A's first 30 rows into slot 0
    mixed = run([(30, 1), (0, 20)], [0, 1])  # A decodes its row 30 while B starts afresh in slot 1
    torch.testing.assert_close(mixed[1:], alone_b)
    torch.testing.assert_close(mixed[:1], whole[30:31], rtol=1e-4, atol=1e-5)
    ctx = make_context([], 128, [(1, 5, [0])])  # a continuation without a state pool is an error, not a restart
    with pytest.raises(NanoForgeError, match="no per-sequence state pool"):
        torch_ref.gdn(qkv[:1], z[:1], b[:1], a[:1], ctx=ctx, **params, **attrs)


def test_cuda_plan_runs_gdn_on_triton_with_graphs(ckpt):
    """A --device cuda plan (compiled here, no GPU needed) runs gdn on the Triton decode kernels and plans
    decode graphs: nothing in it syncs with the host (the gated rope's frequencies are cached on the device)."""
    from nanoforge.compiler import CompileOptions, compile_checkpoint

    plan = compile_checkpoint(ckpt, CompileOptions(device="cuda"))
    assert {n.provider for _, n in plan.module.nodes() if n.op == "gdn"} == {"triton"}
    assert plan.cuda_graphs.reason is None and plan.cuda_graphs.sizes

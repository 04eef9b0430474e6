"""MTP speculation (issue 17): `compile --speculative mtp` attaches the checkpoint's MTP head as the
plan's draft function (attach_mtp), the runtime drafts with it and the target verifies.

The runtime's draft equals transformers' MtpModel's prediction at every step (random weights), and
greedy output equals decoding without speculation for K = 1, 2, 3. A checkpoint whose model is a
bigram table (every layer's output projections zeroed) makes the MTP head exact, so every draft is
accepted: that runs the accepted-rows paths (multi-row draft extends, chains of K) under chunked
prefill, preemption, prefix caching, aborts and PD, with no block leaked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_fixtures import random_prompts, tiny_config
from mtp_fixtures import check_mtp_drafts, hf_mtp_logits, hf_mtp_model, make_bigram_deepseek
from nanoforge import LLM, SamplingParams
from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from nanoforge.ir.printer import format_function
from nanoforge.plan import read_plan
from test_speculative import abort_half_and_check, prefill_then_migrate

VOCAB = tiny_config("deepseek_v3").vocab_size


@pytest.fixture(scope="module")
def bigram_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    return make_bigram_deepseek(tiny_ckpt("deepseek_v3"), tmp_path_factory.mktemp("bigram"))


def _greedy(llm: LLM, prompts, max_tokens=24) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


def test_compile_attaches_the_draft_function_and_its_kv(tiny_ckpt, tmp_path):
    path = tiny_ckpt("deepseek_v3")
    L = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    plan = compile_checkpoint(path, CompileOptions(dtype="f32", speculative="mtp", num_speculative_tokens=2))
    spec = plan.speculative
    assert (spec.method, spec.num_tokens, spec.draft_kv_layers) == ("mtp", 2, (L,))
    assert len(plan.module.functions["forward"].outputs) == 2  # logits and the hidden state the draft reads
    assert [layer.layer for layer in plan.kv_contract.layers] == list(range(L + 1))
    record = next(r for r in plan.passes if r["name"] == "attach_mtp")
    assert record["changes"] == 2 and record["options"] == {"num_tokens": 2}
    plan.save(tmp_path / "plan")
    again = read_plan(tmp_path / "plan")
    assert again.speculative == spec and "draft" in again.module.functions
    assert "mla" in format_function(again.module.functions["draft"])
    plain = compile_checkpoint(path, CompileOptions(dtype="f32"))
    assert plain.speculative is None and "draft" not in plain.module.functions
    cuda = compile_checkpoint(path, CompileOptions(dtype="bf16", device="cuda", speculative="mtp",
                                                   num_speculative_tokens=3, max_num_seqs=512))
    graphs = cuda.cuda_graphs  # plan_cuda_graphs plans the verify step too: 4 rows a sequence, <= 1024 rows
    assert graphs.sizes[-1] == 512 and graphs.verify_sizes == tuple(s for s in graphs.sizes if s <= 256)


def test_cli_compile_dumps_and_inspect_show_the_draft(tiny_ckpt, tmp_path, capsys):
    from nanoforge.cli import main

    plan, dumps = tmp_path / "plan", tmp_path / "dumps"
    assert main(["compile", str(tiny_ckpt("deepseek_v3")), "-o", str(plan), "--speculative", "mtp",
                 "--num-speculative-tokens", "2", "--dump-dir", str(dumps), "-q"]) == 0
    after = (dumps / "02_attach_mtp.ir").read_text()
    assert "draft(" in after and "speculative" in after
    capsys.readouterr()
    assert main(["inspect", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "function     draft:" in out and "speculative  mtp: 2 drafts a step" in out


@pytest.mark.parametrize("opts, msg", [
    (dict(speculative="mtp", tp=2), "--speculative mtp on a sharded plan"),
    (dict(speculative="mtp", num_speculative_tokens=0), "--num-speculative-tokens 0: must be at least 1"),
    (dict(speculative="eagle"), "--speculative 'eagle': choose mtp"),
    (dict(num_speculative_tokens=2), "--num-speculative-tokens needs --speculative"),
])
def test_bad_compile_flags_are_one_line_errors(tiny_ckpt, opts, msg):
    with pytest.raises(NanoForgeError, match=msg):
        compile_checkpoint(tiny_ckpt("deepseek_v3"), CompileOptions(dtype="f32", **opts))


def test_mtp_needs_mtp_weights_and_an_mtp_plan(tiny_ckpt, tmp_path):
    with pytest.raises(NanoForgeError, match="--speculative mtp: this .* has no MTP layer"):
        LLM(tiny_ckpt("qwen3"), progress=False, speculative="mtp")
    plan = compile_checkpoint(tiny_ckpt("deepseek_v3"), CompileOptions(dtype="f32"))
    plan.save(tmp_path / "plain")
    with pytest.raises(NanoForgeError, match="this plan has no MTP draft function; compile .* --speculative mtp"):
        LLM(str(tmp_path / "plain"), progress=False, speculative="mtp")


def test_each_draft_is_transformers_mtp_prediction(tiny_ckpt, hf_ref):
    """After every step (prefill in chunks, then decode steps), the draft the runtime holds for a
    sequence is the argmax of transformers' MtpModel over the sequence's whole history."""
    hf = hf_ref("deepseek_v3")
    mtp = hf_mtp_model(hf)
    llm = LLM(tiny_ckpt("deepseek_v3"), dtype="f32", progress=False, speculative="mtp", num_speculative_tokens=1,
              max_prefill_chunk=8)
    reference = lambda history, nxt: hf_mtp_logits(hf, mtp, history, nxt)  # noqa: E731
    assert check_mtp_drafts(llm, random_prompts(VOCAB, [19, 5], seed=2), reference) >= 8


def test_greedy_equals_decoding_without_speculation(tiny_ckpt):
    prompts = random_prompts(VOCAB, [5, 17, 30], seed=3)
    path = tiny_ckpt("deepseek_v3")
    want = _greedy(LLM(path, dtype="f32", progress=False), prompts, 16)
    for k in (1, 2, 3):
        spec = LLM(path, dtype="f32", progress=False, speculative="mtp", num_speculative_tokens=k)
        assert _greedy(spec, prompts, 16) == want, k
        m = spec.metrics()["speculative"]
        assert m["method"] == "mtp" and len(m["acceptance_rate_per_position"]) == k and m["verify_rows"] > 0
        spec.engine.blocks.check_invariants([])


def test_an_exact_head_has_every_draft_accepted(bigram_ckpt):
    prompts = random_prompts(VOCAB, [5, 17, 30], seed=4)
    want = _greedy(LLM(bigram_ckpt, dtype="f32", progress=False), prompts)
    for k in (1, 3):
        spec = LLM(bigram_ckpt, dtype="f32", progress=False, speculative="mtp", num_speculative_tokens=k)
        assert _greedy(spec, prompts) == want, k
        m = spec.metrics()["speculative"]
        assert m["acceptance_rate_per_position"] == [1.0] * k and m["mean_accepted_length"] > k
        spec.engine.blocks.check_invariants([])


def test_preemption_chunking_prefix_cache_and_aborts_keep_outputs_and_blocks(bigram_ckpt):
    prompts = random_prompts(VOCAB, [20, 7, 33], seed=5)
    prompts += [p[:] for p in prompts[:2]]  # repeats: prefix-cache hits
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = _greedy(LLM(bigram_ckpt, dtype="f32", progress=False), prompts, 16)
    llm = LLM(bigram_ckpt, dtype="f32", progress=False, speculative="mtp", num_speculative_tokens=3, num_blocks=14,
              max_prefill_chunk=16, max_num_batched_tokens=48, block_size=4)
    assert _greedy(llm, prompts, 16) == want
    m = llm.metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hit_tokens"] > 0 and m["speculative"]["drafts_accepted"] > 0
    abort_half_and_check(llm, prompts, sp, want)


def test_sampling_with_mtp_drafts_runs_and_stops_as_asked(bigram_ckpt):
    llm = LLM(bigram_ckpt, dtype="f32", progress=False, speculative="mtp", num_speculative_tokens=2)
    outs = llm.generate(random_prompts(VOCAB, [6, 11], seed=6),
                        SamplingParams(temperature=0.05, top_p=0.9, max_tokens=15, ignore_eos=True, seed=1))
    assert [len(o.token_ids) for o in outs] == [15, 15]
    assert llm.metrics()["speculative"]["drafts_accepted"] > 0
    llm.engine.blocks.check_invariants([])


def test_pd_the_draft_layer_kv_travels_with_the_kv(tiny_ckpt):
    """PD between two MTP engines: the prefill engine's draft head fills its own KV layer over the
    prompt, that layer moves with the others, and from the decode engine's first step on its drafts
    and states are those of one engine running the whole request."""
    path, prompt = tiny_ckpt("deepseek_v3"), random_prompts(VOCAB, [21], seed=7)[0]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    opts = dict(dtype="f32", progress=False, num_blocks=64, speculative="mtp", num_speculative_tokens=1)
    a, b, one = LLM(path, **opts), LLM(path, **opts), LLM(path, **opts)
    ref = one.engine.add_request(prompt, sp)
    states = {}
    while one.engine.has_work():
        one.engine.step()
        if ref.draft is not None:
            states[ref.draft.position] = (ref.draft.token, ref.draft.state.clone())
    seq, moved = prefill_then_migrate(a, b, prompt, sp)
    compared = 0
    while b.engine.has_work():
        b.engine.step()
        if moved.draft is not None:
            token, state = states[moved.draft.position]
            assert moved.draft.token == token
            torch.testing.assert_close(moved.draft.state, state, rtol=1e-4, atol=1e-5)
            compared += 1
    assert moved.output_ids == ref.output_ids and compared >= 5
    a.engine.release_parked(seq)
    b.engine.blocks.check_invariants([])

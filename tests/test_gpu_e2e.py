"""On the GPU: greedy tokens of the tiny checkpoints equal the CPU reference path's, through the
Triton providers, with and without CUDA graphs. Run with `pytest -m gpu` (bench/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

from hf_fixtures import ARCHS, random_prompts, tiny_config
from nanoforge import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
LENGTHS = [5, 17, 33, 2, 60, 9]
KV_BYTES = 256 << 20  # not the default 90% of the card: several engines live in one test process


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_greedy_equals_cpu_reference(arch, eager, tiny_ckpt):
    prompts = random_prompts(tiny_config(arch).vocab_size, LENGTHS, seed=21)
    cpu = LLM(tiny_ckpt(arch), progress=False).generate(prompts, GREEDY)
    gpu_llm = LLM(tiny_ckpt(arch), device="cuda", progress=False, enforce_eager=eager, max_num_seqs=16,
                  kv_cache_memory=KV_BYTES)
    providers = {n.provider for _, n in gpu_llm.plan.module.nodes() if n.op in ("attention", "rms_norm", "moe")}
    assert providers == {"triton"}, providers
    gpu = gpu_llm.generate(prompts, GREEDY)
    for c, g in zip(cpu, gpu):
        assert g.token_ids == c.token_ids
    batches = gpu_llm.metrics()["batches"]
    assert ("graph" in batches) != eager, batches
    gpu_llm.engine.blocks.check_invariants([])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_fp8_kv_greedy_equals_cpu_fp8_path(arch, eager, tiny_ckpt):
    """--kv-dtype fp8: the Triton store quantizes bitwise like the torch reference, so the GPU's greedy
    tokens are the CPU FP8 path's."""
    prompts = random_prompts(tiny_config(arch).vocab_size, LENGTHS, seed=21)
    cpu = LLM(tiny_ckpt(arch), progress=False, kv_dtype="fp8").generate(prompts, GREEDY)
    gpu_llm = LLM(tiny_ckpt(arch), device="cuda", progress=False, enforce_eager=eager, max_num_seqs=16,
                  kv_cache_memory=KV_BYTES, kv_dtype="fp8")
    assert {n.provider for _, n in gpu_llm.plan.module.nodes() if n.op == "attention"} == {"triton"}
    assert gpu_llm.engine.runner.pool[0][0].dtype == torch.float8_e4m3fn
    gpu = gpu_llm.generate(prompts, GREEDY)
    for c, g in zip(cpu, gpu):
        assert g.token_ids == c.token_ids
    assert ("graph" in gpu_llm.metrics()["batches"]) != eager


def test_graph_capture_reports_time_and_sizes(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), device="cuda", progress=False, max_num_seqs=64, kv_cache_memory=KV_BYTES)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graphs.capture_s < 10


def test_gpu_prompt_lookup_speculation_keeps_greedy_tokens(tiny_ckpt):
    """--speculative ngram on the GPU: verify steps (K + 1 query rows per sequence, replayed from verify
    graphs, or eager) through the Triton attention give decoding's tokens."""
    base = random_prompts(tiny_config("qwen3").vocab_size, [20, 7, 33, 12], seed=1)
    prompts = [p * 3 + p[:4] for p in base]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    opts = dict(device="cuda", progress=False, max_num_seqs=16, kv_cache_memory=KV_BYTES)
    want = [o.token_ids for o in LLM(tiny_ckpt("qwen3"), **opts).generate(prompts, sp)]
    for eager in (False, True):
        llm = LLM(tiny_ckpt("qwen3"), speculative="ngram", num_speculative_tokens=3, enforce_eager=eager, **opts)
        assert [o.token_ids for o in llm.generate(prompts, sp)] == want
        assert llm.metrics()["speculative"]["drafts_accepted"] > 0
        assert ("verify graph" in llm.metrics()["batches"]) != eager, llm.metrics()["batches"]
        llm.engine.blocks.check_invariants([])


def test_gpu_mtp_speculation_keeps_greedy_tokens(tiny_ckpt, tmp_path):
    """--speculative mtp on the GPU, K = 1, 2, 3, with verify graphs and eagerly: the tokens of decoding
    without speculation. On the random checkpoint drafts are mostly rejected; on its bigram variant
    (an exact head, mtp_fixtures.make_bigram_deepseek) every draft is accepted."""
    from mtp_fixtures import make_bigram_deepseek

    opts = dict(device="cuda", progress=False, max_num_seqs=16, kv_cache_memory=KV_BYTES)
    prompts = random_prompts(tiny_config("deepseek_v3").vocab_size, [20, 7, 33, 12], seed=1)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for path in (tiny_ckpt("deepseek_v3"), make_bigram_deepseek(tiny_ckpt("deepseek_v3"), tmp_path / "bigram")):
        want = [o.token_ids for o in LLM(path, **opts).generate(prompts, sp)]
        for k, eager in ((1, False), (2, False), (3, False), (3, True)):
            llm = LLM(path, speculative="mtp", num_speculative_tokens=k, enforce_eager=eager, **opts)
            assert [o.token_ids for o in llm.generate(prompts, sp)] == want, (path.name, k, eager)
            assert ("verify graph" in llm.metrics()["batches"]) != eager, llm.metrics()["batches"]
            m = llm.metrics()["speculative"]
            if k > 1:  # the draft head's chain steps replay their graphs
                assert ("graph" in m["draft_batches"]) != eager, m["draft_batches"]
            if path.name == "bigram":
                assert m["acceptance_rate_per_position"] == [1.0] * k
            llm.engine.blocks.check_invariants([])

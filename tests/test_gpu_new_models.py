"""On the GPU: the hybrid and sparse-attention models (issues 19 and 20) through the Triton provider's gdn,
indexer and sparse_mla kernels give the CPU reference path's greedy tokens, in f32, with CUDA graphs (the
gdn state rows and the indexer's top-k captured in them) and eagerly. Prompts of several lengths batched,
most longer than the DSA models' index_topk (a real top-k subset) and some than gdn's 64-token chunk.
Run with `pytest -m gpu` (bench/gpu_check.sh); every failure prints the plan's providers and graph
reason, the batch counts and the first differing token of each prompt."""
from __future__ import annotations

import collections

import pytest
import torch

from hf_fixtures import random_prompts
from nanoforge import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
KV_BYTES = 256 << 20  # several engines live in one test process
NEW_OPS = {"qwen3_5": ("gdn",), "deepseek_v32": ("indexer", "sparse_mla"), "glm_moe_dsa": ("indexer", "sparse_mla")}
LENGTHS = {"qwen3_5": [4, 19, 45, 70, 130], "deepseek_v32": [3, 9, 13, 29, 40, 70], "glm_moe_dsa": [3, 9, 13, 29, 40, 70]}
VOCAB = {"qwen3_5": 500, "deepseek_v32": 1000, "glm_moe_dsa": 1000}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from qwen3_5_fixtures import make_qwen3_5_checkpoint
    from test_deepseek_v32 import make_checkpoint

    root = tmp_path_factory.mktemp("new_models")
    return {"qwen3_5": make_qwen3_5_checkpoint(root / "qwen3_5"),
            "deepseek_v32": make_checkpoint("deepseek_v32", root / "deepseek_v32"),
            "glm_moe_dsa": make_checkpoint("glm_moe_dsa", root / "glm_moe_dsa")}


@pytest.fixture(scope="module")
def cpu_tokens(ckpts):
    """The CPU path's greedy tokens per arch (computed once, shared by the graphs and eager runs)."""
    cache: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in cache:
            prompts = random_prompts(VOCAB[arch], LENGTHS[arch], seed=21)
            cache[arch] = [o.token_ids for o in LLM(ckpts[arch], progress=False).generate(prompts, GREEDY)]
        return cache[arch]

    return get


def describe(llm: LLM) -> str:
    """Providers of the plan's ops, its graph plan and the runner's batch counts, for failure messages."""
    used = collections.Counter((n.op, n.provider) for _, n in llm.plan.module.nodes())
    return (f"providers {sorted(used.items())}\n  graphs planned {llm.plan.cuda_graphs}\n"
            f"  batches {dict(llm.metrics()['batches'])}")


def diff(cpu: list[list[int]], gpu: list[list[int]]) -> str:
    lines = []
    for i, (c, g) in enumerate(zip(cpu, gpu)):
        if c != g:
            at = next((j for j, (x, y) in enumerate(zip(c, g)) if x != y), min(len(c), len(g)))
            lines.append(f"prompt {i}: first difference at token {at}: cpu {c} gpu {g}")
    return "\n".join(lines)


def check(llm: LLM, arch: str, want: list[list[int]], eager: bool) -> None:
    prompts = random_prompts(VOCAB[arch], LENGTHS[arch], seed=21)
    providers = {n.provider for _, n in llm.plan.module.nodes() if n.op in NEW_OPS[arch]}
    assert providers == {"triton"}, describe(llm)
    if not eager:
        assert llm.plan.cuda_graphs.reason is None and llm.engine.runner.graphs is not None, describe(llm)
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    info = describe(llm)
    print(f"{arch} eager={eager}: {info}")
    assert got == want, f"{arch} eager={eager}: GPU tokens differ from the CPU path's\n{diff(want, got)}\n  {info}"
    batches = llm.metrics()["batches"]
    assert ("graph" in batches) != eager, info
    llm.engine.blocks.check_invariants([])


@pytest.mark.parametrize("arch", list(NEW_OPS))
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_greedy_equals_cpu_path(arch, eager, ckpts, cpu_tokens):
    llm = LLM(ckpts[arch], device="cuda", progress=False, enforce_eager=eager, max_num_seqs=16,
              kv_cache_memory=KV_BYTES)
    check(llm, arch, cpu_tokens(arch), eager)


def test_gpu_hybrid_chunk16_mixed_steps_with_graphs(ckpts, cpu_tokens):
    """Chunks of 16 carry the gdn state across steps; decode rows (the Triton step kernels) share steps with
    prefill chunks (the reference's chunked rule), and decode-only steps replay graphs."""
    llm = LLM(ckpts["qwen3_5"], device="cuda", progress=False, max_num_seqs=16, kv_cache_memory=KV_BYTES,
              max_prefill_chunk=16, max_num_batched_tokens=24)
    check(llm, "qwen3_5", cpu_tokens("qwen3_5"), eager=False)
    assert any(k.startswith("eager: the batch has prefill") for k in llm.metrics()["batches"]), describe(llm)


def test_gpu_hybrid_preemption_with_graphs(ckpts, cpu_tokens):
    """A pool of 12 blocks (16 tokens each) cannot hold the five prompts at once: sequences are preempted,
    their state rows freed and their prompts recomputed from a fresh state, with the same tokens."""
    llm = LLM(ckpts["qwen3_5"], device="cuda", progress=False, max_num_seqs=16, num_blocks=12,
              max_prefill_chunk=16, max_num_batched_tokens=24)
    assert llm.plan.kv_contract.block_size == 16, describe(llm)
    check(llm, "qwen3_5", cpu_tokens("qwen3_5"), eager=False)
    assert llm.engine.scheduler.num_preemptions > 0, describe(llm)

"""The Triton provider's gdn, indexer and sparse_mla kernels, registered for CUDA plans, run the tiny
Qwen3.5-MoE, DeepSeek-V3.2 and GLM-5 models end to end in Triton's interpreter on the CPU (the provider's
CUDA probe forced to pass for these three ops; the rest run on the cpu and torch providers): greedy tokens
equal the torch provider's, with prompts longer than the prefill chunk (mixed gdn steps) and than
index_topk (a real top-k subset). The GPU versions are tests/test_gpu_new_models.py."""
from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import torch

from hf_fixtures import random_prompts
from nanoforge import LLM, SamplingParams
from nanoforge.codegen.providers import TRITON_OPS

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="runs Triton kernels on CPU tensors")]
pytest.importorskip("triton")
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
NEW_OPS = ("gdn", "indexer", "sparse_mla")


@pytest.fixture
def triton_on_cpu(monkeypatch):
    from nanoforge.codegen import providers as P

    real = P.BY_NAME["triton"]
    tri = dataclasses.replace(real, probe=lambda target: None, ops=frozenset(NEW_OPS))  # the rest: cpu / torch
    at = P.PROVIDERS.index(real)
    monkeypatch.setitem(P.BY_NAME, "triton", tri)
    P.PROVIDERS[at] = tri
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        P.PROVIDERS[at] = real
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["qwen3_5", "deepseek_v32", "glm_moe_dsa"])
def test_triton_provider_tokens_equal_torch_provider(arch, tmp_path, triton_on_cpu):
    if arch == "qwen3_5":
        from qwen3_5_fixtures import VOCAB, make_qwen3_5_checkpoint

        path, vocab = make_qwen3_5_checkpoint(tmp_path / arch), VOCAB
    else:
        from test_deepseek_v32 import VOCAB, make_checkpoint

        path, vocab = make_checkpoint(arch, tmp_path / arch), VOCAB
    prompts = random_prompts(vocab, [5, 13, 29], seed=3)
    ref = LLM(path, progress=False, providers={op: "torch" for op in NEW_OPS})
    llm = LLM(path, progress=False, max_prefill_chunk=16, max_num_batched_tokens=24)
    used = collections.Counter((n.op, n.provider) for _, n in llm.plan.module.nodes() if n.op in NEW_OPS)
    assert used and {p for _, p in used} == {"triton"}, used
    assert set(NEW_OPS) <= TRITON_OPS  # registered for real CUDA plans too, not only by this fixture
    want = [o.token_ids for o in ref.generate(prompts, GREEDY)]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want

"""On the GPU: tiny block-FP8 DeepSeek-V3 and Kimi-K2 checkpoints give the CPU reference path's
greedy tokens through the Triton providers, with and without CUDA graphs, FP8 weights kept on the
device with their scales. A CUDA plan's FP8 linears quantize their activations (W8A8, the FP8 GEMM's
math: on 2026-12-06 an H100 run against the weight-only CPU path diverged at the second token), so
the reference is the CPU path compiled with the same act_quant. Run with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

from fp8_fixtures import make_fp8_checkpoint
from hf_fixtures import random_prompts
from nanoforge import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
KV_BYTES = 256 << 20


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_fp8_greedy_equals_cpu_reference(name, eager, tmp_path):
    ckpt = make_fp8_checkpoint(name, tmp_path / name)
    prompts = random_prompts(1000, [5, 17, 33, 2, 40], seed=22)
    cpu = LLM(ckpt, progress=False, fp8_activations="dynamic").generate(prompts, GREEDY)
    gpu_llm = LLM(ckpt, device="cuda", progress=False, enforce_eager=eager, max_num_seqs=16, kv_cache_memory=KV_BYTES)
    w = gpu_llm.plan.module.params["model.layers.1.self_attn.o_proj.weight"]
    assert w.type.dtype == "fp8_e4m3"
    assert all(n.attrs.get("act_quant") == 128 for _, n in gpu_llm.plan.module.nodes()
               if n.op == "linear" and "weight_scale_inv" in n.params)
    assert gpu_llm.engine.runner.params[w.name].dtype == torch.float8_e4m3fn
    gpu = gpu_llm.generate(prompts, GREEDY)
    for c, g in zip(cpu, gpu):
        assert g.token_ids == c.token_ids
    assert ("graph" in gpu_llm.metrics()["batches"]) != eager

"""On the GPU: tiny block-FP8 DeepSeek-V3 and Kimi-K2 checkpoints run as the CPU reference path
does, through the Triton providers (f32) and through DeepGEMM and FlashMLA (bf16), with and without
CUDA graphs, FP8 weights kept on the device with their scales. Run with `pytest -m gpu`.

Why a logit distance and not token equality: a CUDA plan's FP8 linears and experts quantize their
activations (W8A8, the FP8 GEMMs' math; the CPU reference is compiled with the same act_quant), and
an H100's FP8 tensor cores accumulate each 128-wide block in reduced precision (DeepSeek-V3's report
measures ~14 bits; the GEMMs promote to f32 between blocks). Any ~1e-4 difference moves some
activations to the next e4m3 code, and on these random tiny models that moves logits by tenths of a
nat (on the CPU alone: f32 against bf16 parts within the first 8 tokens; two correct attention
kernels in bf16 differ as much). So each run is measured against the f32 CPU path by the mean
logprob shift of its top-5 tokens at every position whose context is still the reference's, and
must stay within the shift of the CPU path itself run in bf16 (a noise level measured in the same
test, not a constant); a wrong kernel moves logits by whole nats. The kernels' own accuracy is
asserted op by op (tests/test_lib_*.py, test_triton_*.py)."""
from __future__ import annotations

import pytest
import torch

from fp8_fixtures import make_fp8_checkpoint
from hf_fixtures import random_prompts
from nanoforge import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
KV_BYTES = 256 << 20


def logprob_shift(ref, out) -> float:
    """Mean |logprob difference| over the tokens both runs put in their top 5, at every position up to
    and including each sequence's first divergence (where both still saw the same context)."""
    diffs = []
    for r, o in zip(ref, out):
        for i, (a, b) in enumerate(zip(r.token_ids, o.token_ids)):
            ra, ob = dict(r.logprobs[i]["top"]), dict(o.logprobs[i]["top"])
            diffs += [abs(ra[t] - ob[t]) for t in set(ra) & set(ob)]
            if a != b:
                break
    return sum(diffs) / len(diffs)


def _cpu_runs(ckpt, prompts):
    """The f32 CPU path (the reference) and the same in bf16 (the noise level), both W8A8."""
    ref = LLM(ckpt, dtype="f32", quantize="fp8", fp8_activations="dynamic", progress=False).generate(prompts, PARAMS)
    bf16 = LLM(ckpt, dtype="bf16", quantize="fp8", fp8_activations="dynamic", progress=False).generate(prompts, PARAMS)
    noise = logprob_shift(ref, bf16)
    assert 0 < noise < 1, noise  # the measure sees rounding, and the bf16 CPU path is sane
    return ref, noise


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_fp8_triton_f32_tracks_cpu_reference(name, eager, tmp_path):
    ckpt = make_fp8_checkpoint(name, tmp_path / name)
    prompts = random_prompts(1000, [5, 17, 33, 2, 40], seed=22)
    ref, noise = _cpu_runs(ckpt, prompts)
    gpu_llm = LLM(ckpt, device="cuda", dtype="f32", quantize="fp8", progress=False, enforce_eager=eager,
                  max_num_seqs=16, kv_cache_memory=KV_BYTES)
    w = gpu_llm.plan.module.params["model.layers.1.self_attn.o_proj.weight"]
    assert w.type.dtype == "fp8_e4m3"
    assert all(n.attrs.get("act_quant") == 128 for _, n in gpu_llm.plan.module.nodes()
               if n.op in ("linear", "moe") and any(k.endswith("_scale_inv") for k in n.params))
    assert gpu_llm.engine.runner.params[w.name].dtype == torch.float8_e4m3fn
    gpu = gpu_llm.generate(prompts, PARAMS)
    assert logprob_shift(ref, gpu) <= noise, (logprob_shift(ref, gpu), noise)
    assert ("graph" in gpu_llm.metrics()["batches"]) != eager


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_gpu_fp8_on_deep_gemm_and_flash_mla(eager, tmp_path):
    """The shapes the libraries take (latent 512, rope 64, bf16, dims in 128s): on an SM90 card with
    deep_gemm and flash_mla installed they run the FP8 linears and experts by default and MLA decode
    where asked (its default needs 64 heads), within twice the bf16 CPU path's shift of the f32 one."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("DeepGEMM and FlashMLA run on SM90")
    for lib in ("deep_gemm_ops", "flash_mla_decode"):
        pytest.importorskip(f"nanoforge.kernels.libs.{lib}", exc_type=ImportError)
    ckpt = make_fp8_checkpoint("deepseek_v3_flash", tmp_path / "flash")
    prompts = random_prompts(1000, [5, 17, 33, 2, 40, 70, 90, 9], seed=23)
    ref, noise = _cpu_runs(ckpt, prompts)
    llm = LLM(ckpt, device="cuda", progress=False, enforce_eager=eager, max_num_seqs=16, kv_cache_memory=KV_BYTES,
              providers={"attention": "flash_mla"})  # 4 heads: below FlashMLA's default rank (providers.py)
    used = {(n.op, n.provider) for _, n in llm.plan.module.nodes() if n.op in ("linear", "attention", "moe")}
    assert {("attention", "flash_mla"), ("linear", "deep_gemm"), ("moe", "deep_gemm")} <= used, used
    assert llm.plan.kv_contract.block_size == 64
    out = llm.generate(prompts, PARAMS)
    assert all(len(o.token_ids) == 16 for o in out)
    assert logprob_shift(ref, out) <= 2 * noise, (logprob_shift(ref, out), noise)
    assert ("graph" in llm.metrics()["batches"]) != eager

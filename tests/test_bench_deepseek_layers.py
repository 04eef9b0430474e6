"""bench/deepseek_layers.py on the CPU: the whole script at a tiny DeepSeek-V3 shape (every code
path but CUDA graphs and memory stats), and its parts that decide the GPU run: the layer fit at
real sizes, the retry after an OOM, the random shipped-FP8 checkpoint, the profiler parsing."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.deepseek_layers as dl  # noqa: E402
from nanoforge.models.weights import load_params  # noqa: E402

GB = 10**9


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def gemm_params_per_token(c: dict, moe_layers: int) -> int:
    """Weights one token multiplies in a prefill, written out from the config (not from the plan)."""
    h, heads, nope, rope, v = (c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"],
                               c["qk_rope_head_dim"], c["v_head_dim"])
    attn = (h * c["q_lora_rank"] + c["q_lora_rank"] * heads * (nope + rope) + h * (c["kv_lora_rank"] + rope)
            + c["kv_lora_rank"] * heads * (nope + v) + heads * v * h)
    expert = 3 * h * c["moe_intermediate_size"]
    moe = c["n_routed_experts"] * h + expert * (c["n_shared_experts"] + c["num_experts_per_tok"])
    return (attn + 3 * h * c["intermediate_size"]) + moe_layers * (attn + moe)


def test_whole_script_on_cpu(tmp_path):
    """Both models end to end; the JSON has every figure, finite and positive, and the ones that
    follow from the config alone (experts touched, GEMM FLOPs, FP8 reading fewer bytes) exact."""
    argv = [sys.executable, str(ROOT / "bench" / "deepseek_layers.py"), "--tiny", "--device", "cpu", "--batch", "1",
            "3", "--context", "40", "--prefill", "128", "--steps", "3", "--prefill-reps", "1", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: OpenMP spin-waits on a busy box cost 1000x
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FP8 speed-up per MoE layer, decode batch 3" in run.stdout
    (path,) = tmp_path.glob("deepseek_layers-*.json")
    doc = json.loads(path.read_text())
    cfg = doc["config"]["model"]
    assert doc["card"] == "cpu" and doc["versions"]["torch"] and doc["config"]["batches"] == [1, 3]
    assert finite_positive(doc["ceilings"]["copy_bytes_per_s"])
    for kind in ("fp8", "bf16"):
        m = doc["models"][kind]
        assert m["errors"] == [] and m["moe_layers"] == 2 and m["layers"] == 3
        assert m["providers"]["by_op"]["moe"] and m["providers"]["by_op"]["linear"]
        assert [r["batch"] for r in m["decode"]] == [1, 3]
        for r in m["decode"]:
            for key in ("step_s", "head_s", "layers_s", "floor_s", "bytes_read", "kv_bytes", "per_moe_layer_s",
                        "fraction_of_floor_step", "fraction_of_floor_layers", "context_mean"):
                assert finite_positive(r[key]), (kind, key, r[key])
            assert r["graph_replay_s"] is None and r["fraction_of_floor_graph"] is None  # CPU: no graphs
            assert r["context_mean"] >= 40 and r["head_s"] < r["step_s"]
            assert r["expected_distinct_experts_per_layer"] == pytest.approx(
                cfg["n_routed_experts"] * (1 - (1 - cfg["num_experts_per_tok"] / cfg["n_routed_experts"]) ** r["batch"]))
        assert m["decode"][0]["expected_distinct_experts_per_layer"] == pytest.approx(cfg["num_experts_per_tok"])
        p = m["prefill"]
        assert p["steps_per_prompt"] == 1 and finite_positive(p["step_s"]) and finite_positive(p["gemm_tflops_step"])
        assert p["gemm_flops"] == pytest.approx(2 * 128 * gemm_params_per_token(cfg, 2) + 2 * cfg["vocab_size"]
                                                * cfg["hidden_size"])
        prof = p["profile"]
        assert finite_positive(prof["gemm_s"]) and prof["top"]
        assert prof["gemm_s"] + prof["attention_s"] + prof["other_s"] == pytest.approx(prof["kernel_s"])
        probe = m["moe_op"]["tokens"]
        assert sorted(map(int, probe)) == [1, 3, 128] and all(finite_positive(x["op_s"]) for x in probe.values())
    fp8_b1, bf16_b1 = (doc["models"][k]["decode"][0] for k in ("fp8", "bf16"))
    assert fp8_b1["weight_bytes"] < bf16_b1["weight_bytes"]
    r = doc["ratios"]["decode_per_moe_layer"]
    assert set(r) == {"1", "3"} and all(finite_positive(x["fp8_speedup"]) and x["bytes_ratio"] > 1.5
                                        for x in r.values())
    assert finite_positive(doc["ratios"]["prefill_per_moe_layer"]["fp8_speedup"])
    assert set(doc["goals_check"]) == {"decode_b1_fraction_of_floor", "prefill_gemm_tflops"}
    assert doc["goals_check"]["decode_b1_fraction_of_floor"]["clock"] == "engine step" and doc["notes"]


def _plan2(kind: str, fp8_load: str = "shipped", cfg: dict | None = None):
    ckpt, quantize = dl.make_checkpoint(kind, {**(cfg or dl.DEEPSEEK_V3), "num_hidden_layers": 2}, "cpu", fp8_load)
    return dl.compile_plan(ckpt, quantize, "cpu", 128, 4096), ckpt, quantize


def test_layer_fit_at_real_sizes():
    """An H100 80GB (~82.3 GB usable after the margin): 6 FP8 MoE layers with graphs (5 if the
    plan's bytes grow a little), 3 bf16 (or 2: the third just fits), as many FP8 ones when quantized at
    load (one expert at a time in f32); an MoE op that widens its experts per call (60 GB a call) leaves 1
    layer without graphs; a failed probe assumes nothing fits."""
    avail, pool = int(82.35 * GB), 128 * 2400 + 4096
    probe = {"tokens": {"4096": {"transient_bytes": GB // 2}, "128": {"transient_bytes": GB // 20}}}
    fits = {}
    for kind, load in (("fp8", "shipped"), ("fp8", "quantize"), ("bf16", "shipped")):
        plan2, _, quantize = _plan2(kind, load)
        fits[kind, load] = dl.memory_fit(plan2, probe, avail, pool, 128, 4096, 4096, quantize == "fp8")
        terms = fits[kind, load][2]
        assert terms["moe_layer_bytes"] == pytest.approx((11.5 if kind == "fp8" else 23.0) * GB, rel=0.01)
    (n8, g8), (nq, gq), (n16, g16) = (fits[k][:2] for k in fits)
    assert n8 in (5, 6) and n16 in (2, 3) and n8 >= 2 * n16 - 1 and (nq, gq) == (n8, True) and g8 and g16
    plan2, _, _ = _plan2("fp8")
    wide = {"tokens": {"4096": {"transient_bytes": 60 * GB}, "128": {"transient_bytes": 60 * GB}}}
    assert dl.memory_fit(plan2, wide, avail, pool, 128, 4096, 4096, False)[:2] == (1, False)
    assert dl.memory_fit(plan2, {"error": "OOM", "tokens": {}}, avail, pool, 128, 4096, 4096, False)[:2] == (1, False)
    assert dl.memory_fit(plan2, {"skipped": "no moe"}, avail, pool, 128, 4096, 4096, False)[:2] == (n8, True)


def test_fit_layers():
    assert dl.fit_layers(100, 10, 20, 1, 5, 5, 0, 58) == (4, True)  # 10 + 4 * 20 + max(5, 5 + 5) = 100
    assert dl.fit_layers(100, 10, 20, 1, 5, 5, 30, 58) == (2, True)  # 10 + 2 * 20 + max(5, 3 + 5 + 30) = 88
    assert dl.fit_layers(200, 10, 20, 1, 5, 100, 80, 58) == (4, False)  # only without the graphs' pool beside
    assert dl.fit_layers(50, 10, 100, 1, 5, 5, 0, 58) == (1, False)  # nothing fits: one layer, eager
    assert dl.fit_layers(10**6, 10, 20, 1, 5, 5, 0, 58) == (58, True)  # the model has 58 MoE layers


def test_build_with_retry():
    calls, errors = [], []

    def build(n: int) -> str:
        calls.append(n)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB")
        return f"engine{n}"
    assert dl.build_with_retry(build, 3, "cpu", errors) == ("engine2", 2) and calls == [3, 2]
    assert len(errors) == 1 and "retried with 2" in errors[0]

    def never(n: int) -> str:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="out of memory with 2 MoE layers"):
        dl.build_with_retry(never, 3, "cpu", [])
    with pytest.raises(RuntimeError, match="with 1 MoE layers"):
        dl.build_with_retry(never, 1, "cpu", [])


def test_shipped_fp8_checkpoint_equals_quantize_at_load():
    """The random shipped-FP8 checkpoint (each tensor quantized alone) loads the very tensors that
    quantize='fp8' makes from the same random bf16 weights (blocks never cross experts); only
    kv_b_proj differs, FP8 as shipped (read widened) where quantize='fp8' leaves it bf16."""
    cfg = {**dl.DEEPSEEK_V3, **dl.TINY}
    shipped, ckpt_s, _ = _plan2("fp8", "shipped", cfg)
    at_load, ckpt_q, _ = _plan2("fp8", "quantize", cfg)
    assert dl.param_parts(shipped) == dl.param_parts(at_load)
    a = load_params(shipped.module, ckpt_s, progress=False)
    b = load_params(at_load.module, ckpt_q, progress=False)
    assert a.keys() == b.keys()
    assert a["model.layers.1.mlp.experts.gate_proj"].dtype == torch.float8_e4m3fn
    raw = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if "kv_b_proj" in k:  # shipped FP8 like every projection, widened at load: e4m3's rounding
            assert (a[k].float() - b[k].float()).abs().max() <= b[k].float().abs().max() / 16, k
        else:
            assert torch.equal(raw(a[k]), raw(b[k])), k
    assert ckpt_s._scales == {}  # every scale made with its weight was read


def test_random_param_and_profile_parsing():
    p = _plan2("fp8", cfg={**dl.DEEPSEEK_V3, **dl.TINY})[0].module.params["model.layers.1.mlp.experts.up_proj"]
    t = dl.random_param(p, torch.device("cpu"))
    assert t.dtype == torch.float8_e4m3fn and tuple(t.shape) == tuple(p.type.shape)
    assert torch.isfinite(t.float()).all() and t.float().abs().sum() > 0
    a = torch.randn(256, 256)
    prof = dl.profile_kernels(lambda: [a @ a for _ in range(3)], "cpu")
    assert prof["gemm_s"] > 0 and prof["top"][0]["class"] == "gemm"
    assert "error" in dl.profile_kernels(lambda: 1 / 0, "cpu")


def test_profile_counts_the_prefill_attention_kernels_as_attention():
    """MLA prefill chunks run torch SDPA's fused kernels (nanoforge/kernels/mla_prefill.py): the profile
    counts them as attention, the CUTLASS-built memory-efficient one included, and GEMMs as GEMMs."""
    from bench.deepseek_layers_fit import ATTENTION_KERNEL, GEMM_KERNEL

    attention = ["fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::"
                 "bfloat16_t, cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)",
                 "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<192, 128, 64, 8>>(Flash_fwd_params)",
                 "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0",
                 "_paged_attn_kernel", "flash_fwd_splitkv_mla_kernel"]
    gemm = ["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64",
            "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_64x64_64x4_tn_align8>(Params)"]
    assert [n for n in attention if not ATTENTION_KERNEL.search(n)] == []
    assert [n for n in gemm if ATTENTION_KERNEL.search(n) or not GEMM_KERNEL.search(n)] == []

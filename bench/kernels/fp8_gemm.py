"""GPU benchmark of the block-FP8 W8A8 GEMM (nanoforge/kernels/triton/fp8_gemm.py) on DeepSeek-V3's
linear shapes, against bf16 F.linear (cuBLAS) on the dequantized weight and DeepGEMM's fp8_gemm_nt
(when `import deep_gemm` works: tokenspeed-deepgemm 2.5.0.post20260424, sm90/sm100). From the repo root:

    python -m bench.kernels.fp8_gemm [--m 1 64 4096] [--shapes q_a kv_a ...] [--tune] [--out DIR]

Per (M, shape), median ms of triton.testing.do_bench (L2 flushed before every call, so the weights
come from HBM), with TFLOP/s (2*M*N*K) and GB/s (bytes a call must move):
  triton       block_fp8_linear end to end: activation quantization + GEMM (+ split-K reduce)
  triton_gemm  fp8_gemm alone, x quantized outside the timing (compare with deep_gemm)
  quant        quantize_activations alone
  torch_bf16   F.linear(x bf16, dequantized bf16 weight): cuBLAS
  deep_gemm    deep_gemm.fp8_gemm_nt((x_fp8, x_scale), (w, w_scale_inv), y bf16) on the same
               quantized operands; its result is checked against fp8_gemm's (deep_gemm_rel_diff);
               on a failure the row gets deep_gemm_error and the reason is printed
Bytes: fp8 path N*K + 4*ceil(N/128)*ceil(K/128) (weights, scales) + M*K*2 (bf16 x) + M*N*2 (bf16 y);
its GEMM alone reads M*K + 4*M*ceil(K/128) of quantized x instead; bf16 path 2*N*K + 2*M*K + 2*M*N.
--tune also times each of _TUNE_CFGS per (M, shape) and reports the best (tune_best, tune_ms) next
to the table's config, to refine fp8_gemm._BUCKETS by hand. --out writes
DIR/fp8_gemm-<date>.json (device, torch / triton / deep_gemm versions, rows).
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from nanoforge.kernels import fp8
from nanoforge.kernels.triton import fp8_gemm as G

SHAPES = {  # DeepSeek-V3 (N, K): MLA q_a / q_b / kv_a / o_proj, the shared expert's gate (= up) and down
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
    "gate_up": (2048, 7168), "down": (7168, 2048),
}
MS = (1, 64, 4096)

# (block_m, block_n, num_warps, num_stages, group_m, split_k): None split = the _split_k rule
_TUNE_CFGS = [
    (16, 64, 4, 4, 1, None), (16, 32, 4, 4, 1, None), (16, 128, 4, 4, 1, None), (16, 64, 4, 3, 1, 1),
    (32, 64, 4, 4, 1, None), (64, 64, 4, 4, 1, None), (64, 64, 4, 3, 8, 1), (64, 128, 4, 4, 8, 1),
    (64, 128, 4, 3, 8, 1), (128, 64, 4, 4, 8, 1), (128, 128, 8, 3, 8, 1), (128, 128, 8, 4, 8, 1),
    (128, 128, 4, 3, 8, 1), (64, 128, 8, 4, 8, 1),
]


@functools.cache
def _deep_gemm():
    """(module, None) or (None, why not); the adapter's import and version check (libs/__init__.py)."""
    try:
        from nanoforge.kernels.libs import DEEP_GEMM, import_library, version_error

        dg = import_library(DEEP_GEMM)
        err = version_error(DEEP_GEMM, getattr(dg, "__version__", None))
        if err is not None:
            return None, str(err)
        major, minor = torch.cuda.get_device_capability()
        if DEEP_GEMM.archs and major * 10 + minor not in DEEP_GEMM.archs:
            return None, f"deep_gemm needs sm{'/sm'.join(map(str, DEEP_GEMM.archs))}, this GPU is sm{major}{minor}"
        return dg, None
    except Exception as exc:  # noqa: BLE001 - a comparison only
        return None, f"{type(exc).__name__}: {exc}"[:300]


def _rate(flops, nbytes, ms):
    return flops / ms * 1e-9, nbytes / ms * 1e-6  # TFLOP/s, GB/s


def bench_fp8_gemm(m: int, n: int, k: int, *, tune: bool = False, seed: int = 0) -> dict:
    import triton
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(seed)
    w, s = fp8.quantize(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5, (128, 128))
    w_bf16 = fp8.dequantize(w, s, (128, 128), torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    xq, xs = G.quantize_activations(x)
    kb, nb = triton.cdiv(k, 128), triton.cdiv(n, 128)
    flops = 2.0 * m * n * k
    w_bytes = n * k + 4 * nb * kb
    cfg = G._config(m)
    split = G._split_k(cfg, m, n, k, G._num_sms(torch.cuda.current_device()))
    row = dict(M=m, N=n, K=k, config=cfg._asdict(), split_k=split)

    def fp8_e2e():
        return G.block_fp8_linear(x, w, s)

    def fp8_gemm_only():
        return G.fp8_gemm(xq, xs, w, s, None, torch.bfloat16)

    y_ref = torch.nn.functional.linear(x, w_bf16)
    y = fp8_e2e()
    torch.cuda.synchronize()
    row["triton_rel_diff_vs_bf16"] = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()

    timed = {
        "triton": (fp8_e2e, w_bytes + 2 * m * k + 2 * m * n),
        "triton_gemm": (fp8_gemm_only, w_bytes + m * k + 4 * m * kb + 2 * m * n),
        "quant": (lambda: G.quantize_activations(x), 2 * m * k + m * k + 4 * m * kb),
        "torch_bf16": (lambda: torch.nn.functional.linear(x, w_bf16), 2 * n * k + 2 * m * k + 2 * m * n),
    }
    for name, (fn, nbytes) in timed.items():
        ms = do_bench(fn, return_mode="median")
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"], row[f"{name}_gbps"] = _rate(flops if name != "quant" else 0.0, nbytes, ms)
    row["speedup_vs_bf16"] = row["torch_bf16_ms"] / row["triton_ms"]

    dg, why = _deep_gemm()
    if dg is None:
        row["deep_gemm_error"] = why
    else:
        try:
            d = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            # SM90 takes f32 scales as they are (1x128 for x, 128x128 for w); SM100 wants UE8M0
            # (power-of-two) scales, so there the cast below changes the math: timing only
            no_ue8m0 = torch.cuda.get_device_capability()[0] == 9

            def dg_fn():
                dg.fp8_gemm_nt((xq, xs), (w, s), d, disable_ue8m0_cast=no_ue8m0)

            dg_fn()  # JIT compile (seconds, cached on disk)
            torch.cuda.synchronize()
            ours = fp8_gemm_only().float()
            row["deep_gemm_rel_diff"] = ((d.float() - ours).norm() / ours.norm()).item()
            ms = do_bench(dg_fn, return_mode="median")
            row["deep_gemm_ms"] = ms
            row["deep_gemm_tflops"], row["deep_gemm_gbps"] = _rate(flops, w_bytes + m * k + 4 * m * kb + 2 * m * n, ms)
        except Exception as exc:  # noqa: BLE001 - a comparison only; say why it is missing
            row["deep_gemm_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  deep_gemm skipped (M={m}, N={n}, K={k}): {row['deep_gemm_error']}", flush=True)

    if tune:
        best = (float("inf"), None)
        for c in _TUNE_CFGS:
            c = G.Cfg(*c)
            try:
                ms = do_bench(lambda c=c: G.fp8_gemm(xq, xs, w, s, None, torch.bfloat16, c), return_mode="median")
            except Exception as exc:  # noqa: BLE001 - out of shared memory / registers: not a candidate
                print(f"  tune: {tuple(c)} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            best = min(best, (ms, c), key=lambda r: r[0])
        if best[1] is not None:
            row["tune_ms"], row["tune_best"] = best[0], best[1]._asdict()
            row["tune_best"]["split_k_used"] = G._split_k(best[1], m, n, k, G._num_sms(torch.cuda.current_device()))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=list(MS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--tune", action="store_true", help="also sweep _TUNE_CFGS per (M, shape)")
    ap.add_argument("--out", default=None, help="write fp8_gemm-<date>.json here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels/fp8_gemm.py needs a CUDA GPU")
    import triton

    dg, why = _deep_gemm()
    if dg is None:
        print(f"deep_gemm: not compared ({why})", flush=True)
    rows = []
    for m in a.m:
        for name in a.shapes:
            n, k = SHAPES[name]
            r = dict(shape=name, **bench_fp8_gemm(m, n, k, tune=a.tune))
            rows.append(r)
            dg_txt = (f" | deep_gemm {r['deep_gemm_ms'] * 1e3:8.1f} us {r['deep_gemm_tflops']:6.1f} TF/s "
                      f"(diff {r['deep_gemm_rel_diff']:.1e})" if "deep_gemm_ms" in r else "")
            tune_txt = (f" | tuned {r['tune_ms'] * 1e3:8.1f} us {tuple(r['tune_best'].values())}"
                        if "tune_ms" in r else "")
            print(f"M={m:5} {name:8} N={n:5} K={k:5} | triton {r['triton_ms'] * 1e3:8.1f} us "
                  f"{r['triton_tflops']:6.1f} TF/s {r['triton_gbps']:7.1f} GB/s "
                  f"(gemm {r['triton_gemm_ms'] * 1e3:8.1f} us, quant {r['quant_ms'] * 1e3:6.1f} us, "
                  f"split {r['split_k']}) | bf16 {r['torch_bf16_ms'] * 1e3:8.1f} us "
                  f"{r['torch_bf16_tflops']:6.1f} TF/s {r['torch_bf16_gbps']:7.1f} GB/s | "
                  f"x{r['speedup_vs_bf16']:.2f}" + dg_txt + tune_txt, flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": "fp8_gemm", "device": torch.cuda.get_device_name(),
               "capability": ".".join(map(str, torch.cuda.get_device_capability())),
               "torch": torch.__version__, "triton": triton.__version__,
               "deep_gemm": getattr(dg, "__version__", None) if dg is not None else None,
               "deep_gemm_error": why, "buckets": [(top, c._asdict()) for top, c in G._BUCKETS], "rows": rows}
        path = out / f"fp8_gemm-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(doc, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

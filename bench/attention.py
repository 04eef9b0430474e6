"""Paged decode attention micro-benchmark: effective TB/s (K+V bytes read / time) over contexts and
batch sizes, Qwen3-0.6B head shapes, against the copy bandwidth measured in this run. --kv-dtype fp8
reads e4m3 K/V plus f32 scales per (token, kv head) (bytes = values + scales); `both` times bf16, fp8
and fp8cast (Triton's e4m3 cast instead of the bit widening) at every (context, batch) in the same
run and records each one's speedup over bf16 (bf16 ms / its ms).

    python bench/attention.py --out bench/results
    python bench/attention.py --kv-dtype both --contexts 4096 --batches 32 64 128 --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for bench.kernels

from bench.kernels.attention import bench_paged_decode  # noqa: E402
A = importlib.import_module("nanoforge.kernels.triton.attention")  # the module (the package's `attention` is the op)
from nanoforge.tools.bench_offline import machine_info  # noqa: E402
from nanoforge.tools.roofline import measure_ceilings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-dtype", choices=["bf16", "fp8", "both"], default="bf16")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    # both: bf16, FP8 as the engine reads it (e4m3 widened by moving bits) and FP8 through Triton's cast
    kv_dtypes = ["bf16", "fp8", "fp8cast"] if a.kv_dtype == "both" else [a.kv_dtype]
    ceilings = measure_ceilings("cuda")
    rows, speedups = [], []
    for ctx in a.contexts:
        for b in a.batches:
            if b * ctx * 8 * 128 * 2 * 2 > 24 << 30:  # keep the KV under 24 GiB (at bf16)
                continue
            by_kv = {}
            for kv in kv_dtypes:
                A.FP8_WIDEN_BY_BITS = kv != "fp8cast"
                r = bench_paged_decode(b, ctx, block_size=a.block_size, kv_dtype="fp8" if kv.startswith("fp8") else kv)
                A.FP8_WIDEN_BY_BITS = True
                r.update(context=ctx, batch=b, kv_dtype=kv)
                rows.append(r)
                by_kv[kv] = r
                torch.cuda.empty_cache()
            line = " | ".join(f"{kv} {r['tb_s']:.2f} TB/s ({r['ms']:.3f} ms)" for kv, r in by_kv.items())
            if len(by_kv) > 1:
                sp = {f"{kv}_speedup": by_kv["bf16"]["ms"] / by_kv[kv]["ms"] for kv in by_kv if kv != "bf16"}
                speedups.append({"context": ctx, "batch": b, **sp,
                                 **{f"{kv}_{k}": r[k] for kv, r in by_kv.items() for k in ("ms", "tb_s")}})
                line += " | " + ", ".join(f"{k.removesuffix('_speedup')}/bf16 {v:.2f}x" for k, v in sp.items())
            print(f"ctx {ctx:>6} batch {b:>4}: {line}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if a.kv_dtype == "bf16" else f"-{a.kv_dtype}"
    (out / f"attention-decode{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
        {"benchmark": "paged_decode_attention", "machine": machine_info("cuda"), "ceilings": ceilings,
         "device": torch.cuda.get_device_name(), "kv_dtypes": kv_dtypes, "heads": 16, "kv_heads": 8,
         "head_dim": 128, "block_size": a.block_size, "rows": rows, "speedups": speedups}, indent=1))


if __name__ == "__main__":
    main()

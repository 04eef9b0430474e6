"""Paged decode attention micro-benchmark: effective TB/s (K+V bytes read / time) over contexts and
batch sizes, Qwen3-0.6B head shapes, bf16 KV, against the copy bandwidth measured in this run.

    python bench/attention.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for bench.kernels

from bench.kernels.attention import bench_paged_decode  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402
from nanoforge.tools.roofline import measure_ceilings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    ceilings = measure_ceilings("cuda")
    rows = []
    for ctx in a.contexts:
        for b in a.batches:
            if b * ctx * 8 * 128 * 2 * 2 > 24 << 30:  # keep the KV under 24 GiB
                continue
            r = bench_paged_decode(b, ctx, block_size=a.block_size)
            r.update(context=ctx, batch=b)
            rows.append(r)
            print(f"ctx {ctx:>6} batch {b:>4}: {r.get('tb_s', float('nan')):.2f} TB/s  ({r.get('ms', float('nan')):.3f} ms)")
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attention-decode-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
        {"benchmark": "paged_decode_attention", "machine": machine_info("cuda"), "ceilings": ceilings,
         "heads": 16, "kv_heads": 8, "head_dim": 128, "block_size": a.block_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

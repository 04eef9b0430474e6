"""Decode attention launch-order experiments on a GPU, one process, interleaved A/B:

  base          grid (B, kv_heads, S): a kv head's sequences side by side
  heads_first   grid (kv_heads, B, S): a sequence's heads side by side (DECODE_HEADS_FIRST)
  ordered       sequences launched longest context first (paged_attention's `order`)

at the offline workload's shapes (Qwen3-0.6B attention, block 16, max_context_len 2049 as the engine's
graphs), each timed twice per variant (bench_paged_decode: CUDA-graph replays, L2 flushed).
`--ncu B,CTX[,MIN]` instead runs the base kernel 3 times eagerly for `ncu` to read.

    python bench/decode_grid_ab.py --out DIR
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch

from bench.kernels.attention import bench_paged_decode

A = importlib.import_module("nanoforge.kernels.triton.attention")
VARIANTS = {"base": (False, False), "heads_first": (True, False), "ordered": (False, True),
            "heads_first+ordered": (True, True)}
SHAPES = [(256, 512, None), (256, 1600, 100), (128, 1600, 100), (64, 1600, 100), (16, 1600, 100), (256, 4096, None)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ncu", help="B,CTX[,MIN]: run the base kernel for ncu instead")
    a = ap.parse_args()
    if a.ncu:
        b, ctx, *lo = map(int, a.ncu.split(","))
        bench_paged_decode(b, ctx, min_ctx=lo[0] if lo else None, max_ctx=max(ctx, 2049), graph=False,
                           time_eager=False)
        torch.cuda.synchronize()
        return
    rows = []
    for batch, ctx, lo in SHAPES:
        for rep in range(2):
            for name, (hf, ordered) in VARIANTS.items():
                A.DECODE_HEADS_FIRST = hf
                r = bench_paged_decode(batch, ctx, min_ctx=lo, max_ctx=max(ctx, 2049), time_eager=False,
                                       order=ordered)
                r.update(variant=name, rep=rep)
                rows.append(r)
                print(f"decode grid b{batch} ctx {lo or ctx}..{ctx} {name:20s} rep {rep}: {r['ms'] * 1e3:7.1f} us "
                      f"{r['tb_s']:.2f} TB/s", flush=True)
    A.DECODE_HEADS_FIRST = False
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_grid_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Decode attention experiments on a GPU, one process, interleaved A/B:

  base          the default: grid (B, kv_heads, S), Triton's own pipelining (BLOCK_N 128, 4 warps, 2 stages)
  heads_first   grid (kv_heads, B, S): a sequence's heads side by side (DECODE_HEADS_FIRST)
  ordered       sequences launched longest context first (paged_attention's `order`)
  pf64/pf32/pf128w8   DECODE_PREFETCH: tile i + 1's K/V loaded into registers before tile i's math, with
                (BLOCK_N, warps, stages) = (64, 4, 1) / (32, 4, 1) / (128, 8, 1)

at the offline workload's shapes (Qwen3-0.6B attention, block 16, max_context_len 2049 as the engine's
graphs), each timed twice per variant (bench_paged_decode: CUDA-graph replays, L2 flushed). Writes
decode_grid_ab.json and prints `best: NAME` (the variant with the best mean bandwidth over the ragged
batch-256 and batch-64 shapes, if it beats base by 1%). `--set NAME` / `--ncu B,CTX[,MIN]`: see main().

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
VARIANTS = {"base": {}, "heads_first": {"DECODE_HEADS_FIRST": True}, "ordered": {"order": True},
            "pf64": {"DECODE_PREFETCH": True, "DECODE_PREFETCH_CFG": (64, 4, 1)},
            "pf32": {"DECODE_PREFETCH": True, "DECODE_PREFETCH_CFG": (32, 4, 1)},
            "pf128w8": {"DECODE_PREFETCH": True, "DECODE_PREFETCH_CFG": (128, 8, 1)}}
TIMED = ("base", "pf64", "pf32", "ordered")  # the variants the A/B times (heads_first, pf128w8: by name only)
SHAPES = [(256, 512, None), (256, 1600, 100), (64, 1600, 100), (16, 1600, 100), (256, 4096, None)]
DEFAULTS = {k: getattr(A, k) for k in ("DECODE_HEADS_FIRST", "DECODE_PREFETCH", "DECODE_PREFETCH_CFG")}


def use(name: str) -> bool:
    """Set the module knobs of variant `name`; returns whether it launches longest first."""
    for k, v in DEFAULTS.items():
        setattr(A, k, v)
    knobs = dict(VARIANTS[name])
    order = knobs.pop("order", False)
    for k, v in knobs.items():
        setattr(A, k, v)
    return order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ncu", help="B,CTX[,MIN]: run the decode kernel (variant --variant) eagerly once for ncu")
    ap.add_argument("--variant", default="base")
    a = ap.parse_args()
    if a.ncu:
        b, ctx, *lo = map(int, a.ncu.split(","))
        order = use(a.variant)
        bench_paged_decode(b, ctx, min_ctx=lo[0] if lo else None, max_ctx=max(ctx, 2049), graph=False,
                           time_eager=False, order=order)
        torch.cuda.synchronize()
        return
    rows = []
    for batch, ctx, lo in SHAPES:
        for rep in range(2):
            for name in TIMED:
                order = use(name)
                r = bench_paged_decode(batch, ctx, min_ctx=lo, max_ctx=max(ctx, 2049), time_eager=False, order=order)
                r.update(variant=name, rep=rep)
                rows.append(r)
                print(f"decode grid b{batch} ctx {lo or ctx}..{ctx} {name:12s} rep {rep}: {r['ms'] * 1e3:7.1f} us "
                      f"{r['tb_s']:.2f} TB/s", flush=True)
    use("base")
    score = {n: sum(r["tb_s"] for r in rows if r["variant"] == n and r["min_ctx"] and r["batch"] in (64, 256))
             for n in TIMED}
    best = max(score, key=score.get)
    best = best if score[best] > 1.01 * score["base"] else "base"
    print("best:", best, {n: round(v / score["base"], 4) for n, v in score.items()}, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_grid_ab.json").write_text(json.dumps({"rows": rows, "score_vs_base": score, "best": best}, indent=1))


if __name__ == "__main__":
    main()

"""DECODE_HEADS_FIRST (nanoforge/kernels/triton/attention.py) checked and timed on a GPU before it can
become the default. The decode grid launches (sequence, kv head, split) programs with the sequence
fastest, so the programs of one sequence's kv heads, which read the same pool rows (a position's
heads are adjacent, 256 bytes each at Qwen3-0.6B's shapes), run about a wave apart; heads-first
makes them neighbours. In order:

  1. decode attention alone at the offline workload's shapes (Qwen3-0.6B attention, block 16,
     max_context_len 2049 as the engine's graphs) and at uniform ones where the default reads slowly
     (batch 64 at 2048, batch 128 at 1024), base vs heads-first, twice each; heads-first wins if its
     mean bandwidth over the ragged batch-256 / 64 / 16 shapes beats base by 1%;
  2. if it wins, with it on: tests/test_gpu_e2e.py's greedy tests (HF's tokens) and the decode
     attention GPU tests;
  3. the reference offline workload, base / best / base / best, one process each (base
     twice when heads-first lost), each printing its step breakdown.

    python bench/decode_grid_ab.py --out DIR [--quick]  (bench/gpu_check.sh decode_grid; --quick: no tests, one
                                                        offline run of each variant)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.knob_ab import run_offline, run_tests, use as use_knob

VARIANTS = {"base": None, "heads_first": "decode_heads_first"}  # variant -> the knob it turns on (bench/knob_ab.py)
SHAPES = [(256, 512, None), (256, 1600, 100), (64, 1600, 100), (16, 1600, 100), (64, 2048, None), (128, 1024, None),
          (256, 4096, None)]


def use(name: str) -> None:
    """Set the attention module's knobs for variant `name` (in this process)."""
    use_knob("decode_heads_first", VARIANTS[name] is not None)


def time_kernels() -> tuple[list[dict], str]:
    from bench.kernels.attention import bench_paged_decode

    rows = []
    for batch, ctx, lo in SHAPES:
        for rep in range(2):
            for name in VARIANTS:
                use(name)
                r = bench_paged_decode(batch, ctx, min_ctx=lo, max_ctx=max(ctx, 2049), time_eager=False)
                r.update(variant=name, rep=rep)
                rows.append(r)
                print(f"decode grid b{batch} ctx {lo or ctx}..{ctx} {name:11s} rep {rep}: {r['ms'] * 1e3:7.1f} us "
                      f"{r['tb_s']:.2f} TB/s", flush=True)
    use("base")
    score = {n: sum(r["tb_s"] for r in rows if r["variant"] == n and r["min_ctx"] and r["batch"] in (16, 64, 256))
             for n in VARIANTS}
    best = max(score, key=score.get)
    print("decode grid: bandwidth vs base", {n: round(v / score["base"], 4) for n, v in score.items()}, flush=True)
    return rows, (best if score[best] > 1.01 * score["base"] else "base")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="no GPU tests; the offline workload once per variant")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, best = time_kernels()
    summary = {"kernel_rows": rows, "best": best}
    print("decode grid: best", best, flush=True)
    if best != "base" and not a.quick:
        summary["tests_rc"] = run_tests(VARIANTS[best])
        print(f"decode grid: GPU tests with {best}: rc={summary['tests_rc']}", flush=True)
    order = tuple(VARIANTS) if a.quick else ("base", best, "base", best) if best != "base" else ("base", "base")
    offline = run_offline([VARIANTS[n] for n in order], out)
    summary["offline"] = offline
    (out / "decode_grid_ab.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

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
import importlib
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {"base": False, "heads_first": True}
SHAPES = [(256, 512, None), (256, 1600, 100), (64, 1600, 100), (16, 1600, 100), (64, 2048, None), (128, 1024, None),
          (256, 4096, None)]


def use(name: str) -> None:
    """Set the attention module's knobs for variant `name` (in this process)."""
    A = importlib.import_module("nanoforge.kernels.triton.attention")
    A.DECODE_HEADS_FIRST = VARIANTS[name]


def start_with(name: str, code: str) -> subprocess.Popen:
    """`code` in a fresh process with variant `name` set."""
    pre = f"import sys; sys.path.insert(0, '.'); from bench.decode_grid_ab import use; use({name!r}); "
    return subprocess.Popen([sys.executable, "-c", pre + code])


def run_with(name: str, code: str) -> int:
    return start_with(name, code).wait()


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
        suites = (["tests/test_gpu_e2e.py", "-k", "greedy_equals_cpu"], ["tests/test_triton_attention.py"])
        procs = [start_with(best, f"import pytest; sys.exit(pytest.main(['-m', 'gpu', '-q', '-p', 'no:cacheprovider', "
                                  f"*{args!r}]))") for args in suites]  # side by side: Triton compiles on the CPUs
        summary["tests_rc"] = max(p.wait() for p in procs)
        print(f"decode grid: GPU tests with {best}: rc={summary['tests_rc']}", flush=True)
    offline = []
    order = tuple(VARIANTS) if a.quick else ("base", best, "base", best) if best != "base" else ("base", "base")
    for i, name in enumerate(order):
        d = out / f"offline-{name}-{i}"
        run_with(name, "from nanoforge.cli import main; sys.exit(main(['bench', 'offline', '--device', 'cuda', "
                       f"'--model', 'qwen3-0.6b', '--hf-num-prompts', '0', '--results-dir', '{d}']))")
        r = json.loads(sorted(d.glob("*.json"))[-1].read_text())["nanoforge"]
        offline.append({"variant": name, "output_tok_s": r["output_tok_s"],
                        "decode_only_step_s": r["engine"]["decode_only_step_s"]})
        print(f"decode grid: offline {name}: {r['output_tok_s']:.0f} tok/s", flush=True)
    summary["offline"] = offline
    (out / "decode_grid_ab.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

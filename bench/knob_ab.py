"""Off-by-default knobs, checked and timed on a GPU before they may become defaults. A knob is a module
constant that a fresh process sets before it compiles or runs anything, so the variants never share a
process (nor its Triton kernels or CUDA graphs). In order:

  1. unless --quick: the knob's GPU tests with it on, side by side (Triton compiles on the CPUs);
  2. the reference offline workload, base / knob / base / knob (--quick: base / knob), one process
     each, each printing its step breakdown; a summary in DIR/knob_ab.json;
  3. with --decode-step MODEL: that preset's decode step at batch 1 and 64, base / knob / base / knob
     (--quick: base / knob; --skip-offline leaves step 2 out).

    python bench/knob_ab.py KNOB --out DIR [--quick] [--decode-step qwen3-8b] [--skip-offline]
                                                          (bench/gpu_check.sh knob_ab, KNOB=..., KNOB_DECODE=...)
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Knob:
    module: str
    attr: str
    tests: tuple[tuple[str, ...], ...]  # pytest argument lists, run with `-m gpu` and the knob on


E2E = ("tests/test_gpu_e2e.py", "-k", "greedy")  # HF's tokens, CUDA graphs and eager
KNOBS = {
    "fuse_kv_store": Knob("nanoforge.passes.fuse_kv_store", "ENABLED",
                          (E2E, ("tests/test_triton_elementwise.py", "-k", "store"))),
    "decode_longest_first": Knob("nanoforge.kernels.context", "DECODE_LONGEST_FIRST",
                                 (E2E, ("tests/test_triton_attention.py", "-k", "graph"))),
    "pdl": Knob("nanoforge.kernels.triton.pdl", "ENABLED",
                (E2E, ("tests/test_triton_attention.py", "tests/test_triton_gemv.py", "-k", "graph or gpu_bf16"))),
    "prefill_longest_first": Knob("nanoforge.kernels.triton.attention", "PREFILL_LONGEST_FIRST",
                                  (E2E, ("tests/test_triton_attention.py",))),
}


def use(knob: str | None, on: bool = True) -> None:
    """Set `knob` (None: nothing) in this process."""
    if knob is not None:
        k = KNOBS[knob]
        setattr(importlib.import_module(k.module), k.attr, on)


def start_with(knob: str | None, code: str) -> subprocess.Popen:
    """`code` in a fresh process with `knob` on (None: the defaults)."""
    pre = f"import sys; sys.path.insert(0, '.'); from bench.knob_ab import use; use({knob!r}); "
    return subprocess.Popen([sys.executable, "-c", pre + code])


def run_tests(knob: str) -> int:
    procs = [start_with(knob, f"import pytest; sys.exit(pytest.main(['-m', 'gpu', '-q', '-p', 'no:cacheprovider', "
                              f"*{list(args)!r}]))") for args in KNOBS[knob].tests]
    return max(p.wait() for p in procs)


def run_offline(order: list[str | None], out: Path) -> list[dict]:
    """The reference workload once per entry of `order` (a knob, or None for the defaults)."""
    rows = []
    for i, knob in enumerate(order):
        name = knob or "base"
        d = out / f"offline-{name}-{i}"
        start_with(knob, "from nanoforge.cli import main; sys.exit(main(['bench', 'offline', '--device', 'cuda', "
                         f"'--model', 'qwen3-0.6b', '--hf-num-prompts', '0', '--results-dir', '{d}']))").wait()
        r = json.loads(sorted(d.glob("*.json"))[-1].read_text())
        rows.append({"variant": name, "output_tok_s": r["nanoforge"]["output_tok_s"],
                     "decode_only_step_s": r["nanoforge"]["engine"]["decode_only_step_s"],
                     "step_breakdown": r.get("step_breakdown"), "machine": r["machine"]})
        print(f"knob ab: offline {name}: {rows[-1]['output_tok_s']:.0f} tok/s", flush=True)
    return rows


def run_decode_step(order: list[str | None], model: str, out: Path) -> list[dict]:
    """bench/decode_step.py (batch 1 and 64 at 1024 tokens of context) once per entry of `order`: the
    decode step alone, where a knob that saves launches shows at small batches."""
    rows = []
    for i, knob in enumerate(order):
        name = knob or "base"
        d = out / f"decode_step-{name}-{i}"
        args = ["decode_step", "--model", model, "--batch", "1", "64", "--context", "1024", "--skip-prefill",
                "--out", str(d)]
        start_with(knob, f"import runpy; sys.argv = {args!r}; runpy.run_path('bench/decode_step.py', "
                         "run_name='__main__')").wait()
        r = json.loads(sorted(d.glob("*.json"))[-1].read_text())
        rows.append({"variant": name, "model": model, "machine": r["machine"],
                     "step_ms": {x["batch"]: 1000 * x["step_s"] for x in r["rows"] if "step_s" in x},
                     "graph_replay_ms": {x["batch"]: 1000 * x["graph_replay_s"] for x in r["rows"]
                                         if x.get("graph_replay_s")}})
        replay = rows[-1]["graph_replay_ms"]
        print(f"knob ab: decode step {name}: " + ", ".join(
            f"batch {b} {ms:.3f} ms (graph replay {replay.get(b, 0):.3f})" for b, ms in rows[-1]["step_ms"].items()),
            flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("knob", choices=sorted(KNOBS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="no GPU tests; the offline workload once per variant")
    ap.add_argument("--decode-step", metavar="MODEL", help="also time the decode step of this preset (e.g. "
                    "qwen3-8b) at batch 1 and 64, base / knob / base / knob (--quick: base / knob)")
    ap.add_argument("--skip-offline", action="store_true", help="no offline workload (with --decode-step)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"knob": a.knob}
    if not a.quick:
        summary["tests_rc"] = run_tests(a.knob)
        print(f"knob ab: GPU tests with {a.knob} on: rc={summary['tests_rc']}", flush=True)
    reps = 1 if a.quick else 2
    if not a.skip_offline:
        summary["offline"] = run_offline([None, a.knob] * reps, out)
        mean = {n: sum(r["output_tok_s"] for r in summary["offline"] if r["variant"] == n) / reps
                for n in ("base", a.knob)}
        summary["speedup"] = mean[a.knob] / mean["base"]
        print(f"knob ab: {a.knob} on / off: {summary['speedup']:.4f}x output tok/s", flush=True)
    if a.decode_step:
        rows = summary["decode_step"] = run_decode_step([None, a.knob] * reps, a.decode_step, out)
        for b in rows[0]["step_ms"]:
            ms = {n: sum(r["step_ms"][b] for r in rows if r["variant"] == n) / reps for n in ("base", a.knob)}
            summary[f"decode_step_speedup_batch_{b}"] = ms["base"] / ms[a.knob]
            print(f"knob ab: {a.knob} decode step at batch {b}: {ms['base']:.3f} -> {ms[a.knob]:.3f} ms "
                  f"({ms['base'] / ms[a.knob]:.4f}x)", flush=True)
    (out / "knob_ab.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

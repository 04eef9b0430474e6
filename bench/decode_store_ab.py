"""FUSE_DECODE_STORE (nanoforge/kernels/triton/attention.py: decode batches store their K/V inside the
attention kernel) checked and timed on a GPU before it becomes the default:

  1. tests/test_gpu_e2e.py's greedy-equals-CPU tests with it on (HF's tokens, graphs and eager);
  2. the reference offline workload, off / on / off / on, one process each (same machine, so drift shows);
  3. Qwen3-8B decode steps at batch 1 and 64, off / on.

    python bench/decode_store_ab.py --out DIR      (bench/gpu_check.sh decode_store)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

KNOB = ("import importlib, sys; A = importlib.import_module('nanoforge.kernels.triton.attention'); "
        "A.FUSE_DECODE_STORE = {on}; ")


def run(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code]).returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-tests", action="store_true", help="only the timings (the tokens were checked already)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"tests_rc": None}
    if not a.skip_tests:
        summary["tests_rc"] = run(KNOB.format(on=True) + "import pytest; sys.exit(pytest.main(['-m', 'gpu', '-q', "
                                  "'-p', 'no:cacheprovider', 'tests/test_gpu_e2e.py', '-k', 'greedy_equals_cpu']))")
        print(f"decode store: GPU e2e greedy tests with the store fused: rc={summary['tests_rc']}", flush=True)
    offline = []
    for i, on in enumerate((False, True, False, True)):
        d = out / f"offline-{on}-{i}"
        run(KNOB.format(on=on) + "from nanoforge.cli import main; sys.exit(main(['bench', 'offline', '--device', "
            f"'cuda', '--model', 'qwen3-0.6b', '--hf-num-prompts', '0', '--results-dir', '{d}']))")
        r = json.loads(sorted(d.glob("*.json"))[-1].read_text())["nanoforge"]
        offline.append({"fused": on, "output_tok_s": r["output_tok_s"],
                        "decode_only_step_s": r["engine"]["decode_only_step_s"]})
        print(f"decode store: offline fused={on}: {r['output_tok_s']:.0f} tok/s", flush=True)
    summary["offline"] = offline
    for on in (False, True):
        d = out / f"decode-{on}"
        run(KNOB.format(on=on) + "import runpy; sys.argv = ['decode_step.py', '--model', 'qwen3-8b', '--batch', "
            f"'1', '64', '--out', '{d}']; runpy.run_path('bench/decode_step.py', run_name='__main__')")
    (out / "decode_store_ab.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

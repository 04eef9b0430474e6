"""The decode attention kernel compiled for sm_90a on the CPU (Triton's bundled ptxas, no GPU): what
its speed on an H100 depends on, checked without one. Compiled in a child process: the tests run
Triton's interpreter, which cannot compile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def compiled(block_n: int, warps: int, stages: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.kernels.decode_sass", "--json", "--block-n", str(block_n), "--warps",
           str(warps), "--stages", str(stages)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_decode_kernel_copies_async_without_spills():
    k = compiled(128, 4, 2)
    assert k["resources"]["STACK"] == 0, "register spills"
    assert k["shared"] <= 227 * 1024
    assert any(kind == "LDGSTS" for kind, _ in k["runs"]), "K/V tiles no longer copied asynchronously"

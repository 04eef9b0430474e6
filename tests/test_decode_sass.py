"""The paged attention kernel (decode and prefill grids) compiled for sm_90a on the CPU (Triton's
bundled ptxas, no GPU): what its speed on an H100 depends on, checked without one. Compiled in a
child process: the tests run Triton's interpreter, which cannot compile."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compiled(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bench.kernels.decode_sass", "--json", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_decode_kernel_copies_async_without_spills():
    k = compiled("--block-n", "128", "--warps", "4", "--stages", "2")
    assert k["resources"]["STACK"] == 0, "register spills"
    assert k["shared"] <= 227 * 1024
    assert any(kind == "LDGSTS" for kind, _ in k["runs"]), "K/V tiles no longer copied asynchronously"


@pytest.mark.parametrize("max_q", [512, 4096])
def test_prefill_tiles_fit_registers(max_q):
    """The prefill grid's tile configs (short chunks, and 2048+ rows) at head dim 128 keep their f32
    accumulators in registers: 128 query rows on 4 warps spilled 168 bytes a thread and ran 9% slower
    than on 8 warps on an H100 (bench/results/prefill_varlen-20261207-224109.json, 1 x 4096)."""
    k = compiled("--prefill-max-q", str(max_q))
    assert k["resources"]["STACK"] == 0, "register spills"
    assert k["shared"] <= 227 * 1024


def test_pdl_decode_waits_before_it_reads():
    """A PDL launch (kernels/triton/pdl.py) may start while the previous kernel runs: the decode grid
    must wait for it before its first load or store, then let the next kernel launch; without PDL
    neither instruction is there."""
    order = compiled("--pdl")["ptx_order"]
    assert order[:2] == ["pdl wait", "pdl launch"], order
    assert "pdl wait" not in compiled()["ptx_order"]

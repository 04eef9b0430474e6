"""bench/dsa_decode.py and bench/gdn_kernels.py run end to end on the CPU (--smoke: tiny dims, the Triton
interpreter, a couple of reps) and write their JSON, so the GPU runs (bench/gpu_check.sh stages dsa_decode
and gdn_kernels) start from scripts that are known to run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def smoke(script: str, out: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (path,) = out.glob("*-smoke-*.json")
    return json.loads(path.read_text())


def test_dsa_decode_smoke(tmp_path):
    r = smoke("dsa_decode.py", tmp_path)
    assert r["smoke"] and [row["context"] for row in r["rows"]] == [12, 40]
    assert r["rows"][0]["max_abs_diff_sparse_vs_dense"] < 1e-4  # context <= top-k: sparse is dense MLA
    assert r["rows"][0]["max_abs_diff_sparse_fp8_index_vs_dense"] < 1e-4  # FP8 indexer keys too
    for row in r["rows"]:
        assert row["dense_mla_ms"] > 0 and row["sparse_ms"] > 0 and row["indexer_topk_ms"] > 0
        assert row["sparse_fp8_index_ms"] > 0 and row["speedup_sparse_fp8_index_over_dense"] > 0
    assert {"card", "versions", "config", "ratio", "machine"} <= set(r)


def test_gdn_kernels_smoke(tmp_path):
    r = smoke("gdn_kernels.py", tmp_path)
    assert r["smoke"] and [row["batch"] for row in r["decode"]] == [1, 4]
    assert all(row["max_rel_diff_vs_reference"] < 1e-4 and row["triton_us"] > 0 for row in r["decode"])
    ref, *triton_rows = r["prefill"]
    assert ref["kernel"] == "torch_ref" and ref["tokens_per_s"] > 0
    assert [(row["chunk"], row["block_v"]) for row in triton_rows] == [(16, 32), (32, 32), (64, 16)]
    assert all(row["max_rel_diff_vs_reference"] < 1e-4 and row["tokens_per_s"] > 0 for row in triton_rows)
    assert {"card", "versions", "config", "ratio", "machine"} <= set(r)

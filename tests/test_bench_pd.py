"""`nanoforge bench pd` on CPU at toy sizes: real engine processes (a prefill + a decode engine of
the qwen3-tiny preset, started with --model-preset, then one co-located engine), the same Poisson
workload through both; the JSON holds both deployments' TTFT / TPOT p50/p99 and throughput, their
ratios, the machine and the config; every request succeeded, every PD request's KV was migrated,
no block is left held, and PD's greedy tokens equal the co-located engine's."""
from __future__ import annotations

import json
import os
import re
import math
from pathlib import Path

import pytest

from nanoforge.errors import NanoForgeError
from nanoforge.tools.bench_migration import bench_migration
from nanoforge.tools.bench_pd import PDBenchConfig, bench_pd

pytestmark = pytest.mark.timeout(240)


def test_bench_pd_cpu_tiny_preset(tmp_path):
    cfg = PDBenchConfig("qwen3-tiny", "cpu", rates=[8.0], num_prompts=5, input_len=40, output_len=5, vocab=4096,
                        max_num_seqs=8, num_blocks=128, startup_timeout=180)
    lines: list[str] = []
    r = bench_pd(cfg, tmp_path, log=lines.append)
    saved = json.loads(Path(r["path"]).read_text())
    assert Path(r["path"]).parent == tmp_path and Path(r["path"]).name.startswith("pd-qwen3-tiny-cpu-")
    assert saved["benchmark"] == "pd" and saved["config"]["rates"] == [8.0] and saved["config"]["num_prompts"] == 5
    assert {"torch", "nanoforge", "python", "cpu"} <= set(saved["machine"])
    assert [e["role"] for e in saved["engines"]["pd"]] == ["prefill", "decode"]
    assert [e["role"] for e in saved["engines"]["colocated"]] == ["both"]
    assert saved["engines"]["pd"][0]["flags"]["model_preset"] == "qwen3-tiny"
    assert saved["engines"]["pd"][0]["flags"]["OMP_NUM_THREADS"] == str(max(1, saved["machine"]["cpu_count"] // 2))
    (rate,) = saved["rates"]
    for kind in ("pd", "colocated"):
        x = rate[kind]
        assert x["num_errors"] == 0 and x["completed"] == 5 and x["leaked_blocks"] == 0 and x["busy_after"] == 0
        assert x["output_tokens"] == 25 and x["output_tok_s"] > 0
        for key in ("ttft_s", "tpot_s"):
            assert 0 < x[key]["p50"] <= x[key]["p99"] and math.isfinite(x[key]["p99"])
    assert rate["pd"]["kv_migration"]["kv_migrations"] == 5 and rate["pd"]["kv_migration"]["kv_migration_bytes"] > 0
    assert rate["pd"]["kv_migration"]["kv_migration_fallbacks"] == 0
    assert rate["colocated"]["kv_migration"]["kv_migrations"] == 0
    assert rate["same_greedy_tokens"] == "5/5"
    ratio = rate["ratio_pd_over_colocated"]
    assert set(ratio) == {"ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "output_tok_s"}
    assert ratio["tpot_p99"] == pytest.approx(rate["pd"]["tpot_s"]["p99"] / rate["colocated"]["tpot_s"]["p99"])
    assert any("PD / co-located" in line for line in lines)


@pytest.mark.parametrize("kw, flag", [({"rates": []}, "--rate"), ({"rates": [0.0]}, "--rate"),
                                      ({"output_len": 1}, "--output-len"), ({"cores": 0}, "--cores"),
                                      ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization")])
def test_bench_pd_refuses_bad_flags_before_starting_engines(tmp_path, kw, flag):
    with pytest.raises(NanoForgeError, match=f"bench pd: {flag} must be") as e:
        bench_pd(PDBenchConfig("qwen3-tiny", **kw), tmp_path)
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kw, match", [({"mps_split": 50}, "--mps-split 50: MPS shares a GPU; it needs --device cuda"),
                                       ({"mps_split": 100, "device": "cuda"}, "--mps-split must be the prefill engine's "
                                        "percent of the SMs, 1..99; got 100")])
def test_bench_pd_refuses_a_bad_mps_split_before_starting_engines(tmp_path, kw, match):
    with pytest.raises(NanoForgeError, match=re.escape(match)):
        bench_pd(PDBenchConfig("qwen3-tiny", **kw), tmp_path)
    assert not list(tmp_path.iterdir())


def test_mps_daemon_without_the_control_binary_is_a_clear_error(monkeypatch):
    from nanoforge.tools import mps

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NanoForgeError, match="nvidia-cuda-mps-control is not on PATH"):
        with mps.mps_daemon():
            pass


def test_mps_daemon_is_told_to_quit_and_clients_get_their_share(monkeypatch, tmp_path):
    """A stand-in control binary records its calls: `-d` starts, `quit` on stdin at exit, the pipe
    directory private to the run and removed after."""
    from nanoforge.tools import mps

    log = tmp_path / "calls"
    fake = tmp_path / "bin" / mps.CONTROL
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$* $(/bin/cat -) $CUDA_MPS_PIPE_DIRECTORY" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with mps.mps_daemon() as env:
        pipe = env["CUDA_MPS_PIPE_DIRECTORY"]
        assert os.path.isdir(pipe) and mps.client_env(env, 30)["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    calls = log.read_text().splitlines()
    assert calls[0].split()[0] == "-d" and calls[0].split()[-1] == pipe
    assert calls[1].split()[:1] == ["quit"] and calls[1].split()[-1] == pipe
    assert not os.path.exists(pipe)


def test_bench_migration_ipc_needs_cuda(tmp_path):
    with pytest.raises(NanoForgeError, match="--transport ipc is a CUDA IPC device copy and needs --device cuda"):
        bench_migration(PDBenchConfig("qwen3-tiny"), ["tcp", "ipc"], 64, 1, tmp_path)

"""`nanoforge bench offline` on CPU: `--dtype auto` means f32 (CPU's fast dtype; bf16 is many
times slower there) for presets and checkpoints alike, and the HF baseline runs in that same dtype;
`--model` takes a plan dir (run with its checkpoint, in the plan's dtype) as its help says."""
from __future__ import annotations

import json

import pytest
import torch

from nanoforge.cli import main

TINY = ["--num-prompts", "2", "--min-input", "4", "--max-input", "8", "--min-output", "2", "--max-output", "4"]


def bench(tmp_path, model: str, *extra: str) -> dict:
    res = tmp_path / "res"
    assert main(["bench", "offline", "--model", model, *TINY, "--results-dir", str(res), *extra]) == 0
    (path,) = res.glob("offline-*.json")
    r = json.loads(path.read_text())
    path.unlink()
    return r


def test_preset_on_cpu_defaults_to_f32(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the random-weight checkpoint cache goes under ./.cache
    r = bench(tmp_path, "qwen3-tiny", "--hf-num-prompts", "0")
    assert r["engine_options"]["dtype"] == "f32" and r["dtype"] == "f32"
    assert r["nanoforge"]["output_tokens"] == r["requested_output_tokens"]


def test_bf16_checkpoint_on_cpu_defaults_to_f32_for_both_engines(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = bench(tmp_path, str(tiny_ckpt("llama", dtype=torch.bfloat16)), "--hf-num-prompts", "1")
    assert r["engine_options"]["dtype"] == "f32" and r["dtype"] == "f32" and r["hf"]["dtype"] == "f32"
    r = bench(tmp_path, str(tiny_ckpt("llama", dtype=torch.bfloat16)), "--hf-num-prompts", "0", "--dtype", "bf16")
    assert r["dtype"] == "bf16"  # asked for: kept


def test_plan_dir_runs_with_its_checkpoint(tmp_path, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_ckpt("llama")
    plan = tmp_path / "plan"
    assert main(["compile", str(ckpt), "-o", str(plan), "--dtype", "f32", "-q"]) == 0
    r = bench(tmp_path, str(plan), "--hf-num-prompts", "1")
    assert r["dtype"] == "f32" and r["model"] == str(plan)
    assert r["nanoforge"]["output_tokens"] == r["requested_output_tokens"]
    assert r["hf"]["num_prompts"] == 1 and r["hf"]["output_tokens"] > 0 and r["hf"]["dtype"] == "f32"
    capsys.readouterr()
    # a --dtype the plan was not compiled for: one clear line, not a silent other dtype
    argv = ["bench", "offline", "--model", str(plan), *TINY, "--dtype", "bf16", "--hf-num-prompts", "0",
            "--results-dir", str(tmp_path / "res")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plan" in err and "f32" in err and "bf16" in err


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    argv = ["bench", "offline", "--model", str(tmp_path / "nope"), *TINY, "--results-dir", str(tmp_path / "res")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "plan" in err


def test_gguf_hf_baseline_without_accelerate_fails_before_the_run(tmp_path, capsys):
    import importlib.util

    from test_gguf_truncated import _write

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed: transformers can load the GGUF")
    g = _write(tmp_path / "m.gguf")
    argv = ["bench", "offline", "--model", str(g), *TINY, "--results-dir", str(tmp_path / "res")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "m.gguf" in err and "accelerate" in err and "--hf-num-prompts 0" in err


def test_repeats_alternate_and_report_the_median(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = bench(tmp_path, "llama-tiny", "--repeats", "3", "--threads", str(torch.get_num_threads()), "--min-input",
              "40", "--max-input", "48")
    for engine in ("nanoforge", "hf"):
        runs = r[engine]["runs"]
        assert len(runs) == 3 and all(x["time_s"] > 0 and x["others_cores"] >= 0 for x in runs)
        assert r[engine]["time_s"] == sorted(x["time_s"] for x in runs)[1]
    assert r["ratio_nanoforge_over_hf"] == pytest.approx(r["nanoforge"]["output_tok_s"] / r["hf"]["output_tok_s"])
    assert r["weights"].startswith("random") and r["machine"]["torch_threads"] >= 1
    assert r["nanoforge"]["engine"]["prefix_cache_hit_tokens"] == 0  # a repeat recomputes its prompts


def test_cpu_suite_writes_each_workload_and_a_summary(tmp_path, monkeypatch, capsys):
    from nanoforge.tools import bench_offline as bo

    monkeypatch.chdir(tmp_path)
    tiny = bo.OfflineWorkload(2, 4, 8, 2, 3)
    monkeypatch.setattr(bo, "CPU_SUITE", [("uniform-llama-tiny", "llama-tiny", tiny, 2),
                                          ("ragged-qwen3-tiny", "qwen3-tiny", tiny, 1)])
    res = tmp_path / "res"
    assert main(["bench", "offline", "--suite", "cpu", "--repeats", "2", "--results-dir", str(res)]) == 0
    (path,) = res.glob("offline-cpu-suite-*.json")
    s = json.loads(path.read_text())
    assert list(s["workloads"]) == ["uniform-llama-tiny", "ragged-qwen3-tiny"] and s["repeats"] == 2
    for row in s["workloads"].values():
        assert row["ratio"] > 0 and len(row["ratio_per_repeat"]) == 2 and (res / row["result"]).is_file()
    assert "ragged-qwen3-tiny" in capsys.readouterr().out


def test_roofline_decode_is_bound_by_bandwidth_or_matmuls_whichever_is_slower():
    """A small batch reads the weights once per step (bandwidth); 32 rows of a 135M-parameter model
    on a CPU are 8.6 GFLOP a step, far slower than reading 540 MB at 32 GB/s."""
    from nanoforge.tools.roofline import simulate_ceiling

    def decode_s(batch: int) -> float:
        return simulate_ceiling([64] * batch, [10] * batch, weight_bytes=540e6, kv_bytes_per_token=0,
                                flops_per_token=270e6, bandwidth=32e9, flops=174e9, max_num_seqs=256)["decode_s"]

    assert decode_s(1) == pytest.approx(10 * 540e6 / 32e9)
    assert decode_s(32) == pytest.approx(10 * 32 * 270e6 / 174e9)


def test_cpu_runs_keep_4096_tokens_a_step_and_report_gc_pauses(tmp_path, monkeypatch):
    """CUDA runs take the engine's default (8192 on a big card); a CPU run keeps 4096 (its figures'
    setting), says which step it ran, and what the garbage collector's pauses took, with --gc-freeze
    recorded when asked for."""
    monkeypatch.chdir(tmp_path)
    r = bench(tmp_path, "qwen3-tiny", "--hf-num-prompts", "0", "--gc-freeze")
    assert r["engine_options"]["max_num_batched_tokens"] == 4096 and r["gc_freeze"] is True
    assert r["step_tokens"] == {"max_num_batched_tokens": 4096, "max_prefill_chunk": 4096}
    nf = r["nanoforge"]
    assert nf["gc_pauses"] >= 0 and nf["gc_s"] >= 0 and nf["gc_max_ms"] >= 0
    assert (nf["gc_pauses"] == 0) == (nf["gc_s"] == 0)


def test_timed_counts_the_collectors_pauses():
    import gc

    from nanoforge.tools.bench_offline import timed

    out = timed(lambda: [gc.collect() for _ in range(3)])
    assert out["gc_pauses"] >= 3 and 0 < out["gc_s"] <= out["time_s"] and out["gc_max_ms"] > 0

"""The offline benchmark runs end to end at toy sizes and writes its JSON with both engines."""
from __future__ import annotations

import json

from nanoforge.cli import main


def test_bench_offline_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the random-weight checkpoint cache goes under ./.cache
    argv = ["bench", "offline", "--model", "qwen3-tiny", "--num-prompts", "6", "--min-input", "8", "--max-input", "24",
            "--min-output", "4", "--max-output", "12", "--dtype", "f32", "--results-dir", str(tmp_path / "res")]
    assert main(argv) == 0
    assert "ratio nanoforge / HF" in capsys.readouterr().out
    (result,) = (tmp_path / "res").glob("offline-qwen3-tiny-cpu-*.json")
    r = json.loads(result.read_text())
    assert r["nanoforge"]["output_tokens"] == r["requested_output_tokens"] == r["hf"]["output_tokens"]
    assert r["nanoforge"]["output_tok_s"] > 0 and r["ratio_nanoforge_over_hf"] > 0
    assert r["machine"]["torch"] and r["workload"]["num_prompts"] == 6


def test_moe_parallel_smoke_deepseek_on_real_ranks(tmp_path):
    """bench/moe_parallel.py end to end on the CPU (--smoke: tiny DeepSeek-V3 config, gloo): each
    layout in its own process, tp=1's greedy tokens from attention-DP x EP ranks with either exchange
    (MLA, shared expert and group-limited routing across real processes)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, str(root / "bench" / "moe_parallel.py"), "--smoke", "--model", "deepseek-v3", "--layers",
            "2", "--batch", "3", "--prompt-len", "6", "--out-len", "3", "--layouts", "tp1", "ep2", "ep2-a2a",
            "--timeout", "240", "--out", str(tmp_path)]
    subprocess.run(argv, check=True, timeout=600, capture_output=True)
    (result,) = tmp_path.glob("moe_parallel-*.json")
    r = json.loads(result.read_text())["results"]
    assert [r[k].get("same_greedy_tokens_as_tp1") for k in ("tp1", "ep2", "ep2-a2a")] == [True] * 3, r
    assert "moe_dispatch=allgather" in r["ep2"]["providers"] and "moe_dispatch=torch" in r["ep2-a2a"]["providers"]
    assert all(len(r[k]["runs"]) == 1 for k in r)  # one timed batch size each


def test_speculative_bench_on_a_random_preset_writes_json(tmp_path):
    """bench/speculative.py --model-preset: the GPU run's form (the real SmolLM2 GGUF cannot travel there),
    tiny here; greedy tokens with and without prompt lookup must be identical."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, str(root / "bench" / "speculative.py"), "--model-preset", "llama-tiny", "--prompts", "2",
            "--batches", "2", "--k", "2", "--max-tokens", "12", "--out", str(tmp_path)]
    subprocess.run(argv, check=True, timeout=600, capture_output=True)
    (path,) = tmp_path.glob("speculative-llama-tiny-cpu-*.json")
    doc = json.loads(path.read_text())
    row = doc["rows"][0]
    assert doc["model"] == "llama-tiny (random weights)" and row["batch"] == 2
    assert row["ngram_k2"]["identical_tokens"] and row["baseline"]["output_tokens"] == 24


def test_bench_offline_disable_pass_and_knobs(tmp_path, monkeypatch, capsys):
    """`--disable-pass` reaches the compile (an unknown name is refused, naming it), outputs shorter than
    the warm-up's 4 tokens fit max_model_len, and every knob bench/knob_ab.py turns on exists and is off
    by default."""
    import importlib
    import sys

    monkeypatch.chdir(tmp_path)
    base = ["bench", "offline", "--model", "qwen3-tiny", "--num-prompts", "2", "--min-input", "8", "--max-input", "8",
            "--min-output", "2", "--max-output", "2", "--dtype", "f32", "--hf-num-prompts", "0",
            "--results-dir", str(tmp_path / "res")]
    assert main(base + ["--disable-pass", "fuse_elementwise"]) == 0
    (result,) = (tmp_path / "res").glob("offline-qwen3-tiny-cpu-*.json")
    assert json.loads(result.read_text())["engine_options"]["disable_passes"] == ["fuse_elementwise"]
    assert main(base + ["--disable-pass", "fuse_everything"]) != 0
    assert "unknown pass 'fuse_everything'" in capsys.readouterr().err
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from bench.knob_ab import KNOBS

    for knob in KNOBS.values():
        assert getattr(importlib.import_module(knob.module), knob.attr) is False

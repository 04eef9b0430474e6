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

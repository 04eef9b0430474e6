"""Tokens a step when the user sets none: 8192 (and no per-sequence chunk cap) on a card of 70 GiB
or more, as the H100 offline runs measured; 2048 / 512 on the CPU and on smaller cards, whose memory
goes to the KV cache. compile records the same figure for the target device."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from nanoforge import defaults
from nanoforge.cli import main
from nanoforge.runtime.engine_config import EngineConfig, with_step_tokens
from test_cli import QWEN3_8B


def _card(monkeypatch, gib: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib << 30))


def test_big_cards_take_8192_tokens_a_step_and_small_ones_2048(monkeypatch):
    _card(monkeypatch, 80)
    cfg = with_step_tokens(EngineConfig(device="cuda"))
    assert (cfg.max_num_batched_tokens, cfg.max_prefill_chunk) == (8192, 8192)
    _card(monkeypatch, 24)
    cfg = with_step_tokens(EngineConfig(device="cuda"))
    assert (cfg.max_num_batched_tokens, cfg.max_prefill_chunk) == (2048, 512)
    cfg = with_step_tokens(EngineConfig())
    assert (cfg.max_num_batched_tokens, cfg.max_prefill_chunk) == (2048, 512)


def test_what_the_user_sets_wins_and_the_chunk_stays_within_the_step(monkeypatch):
    _card(monkeypatch, 80)
    cfg = with_step_tokens(EngineConfig(device="cuda", max_num_batched_tokens=4096))
    assert (cfg.max_num_batched_tokens, cfg.max_prefill_chunk) == (4096, 4096)
    cfg = with_step_tokens(EngineConfig(device="cuda", max_prefill_chunk=1024))
    assert (cfg.max_num_batched_tokens, cfg.max_prefill_chunk) == (8192, 1024)
    cfg = with_step_tokens(EngineConfig(max_num_batched_tokens=256))
    assert (cfg.max_num_batched_tokens, cfg.max_prefill_chunk) == (256, 256)


def test_an_engine_reports_the_step_it_runs(tiny_ckpt):
    from nanoforge import LLM

    llm = LLM(tiny_ckpt("llama"), progress=False, num_blocks=64)
    assert (llm.engine.cfg.max_num_batched_tokens, llm.engine.cfg.max_prefill_chunk) == \
        (defaults.MAX_NUM_BATCHED_TOKENS, defaults.MAX_PREFILL_CHUNK)


def test_compile_plans_the_activation_peak_for_its_devices_default_step(tmp_path):
    ckpt = tmp_path / "qwen3-8b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(QWEN3_8B))
    steps = {}
    for device in ("cpu", "cuda"):
        assert main(["compile", str(ckpt), "-o", str(tmp_path / device), "--config-only", "--device", device]) == 0
        steps[device] = json.loads((tmp_path / device / "plan.json").read_text())["memory"]["max_num_batched_tokens"]
    assert steps == {"cpu": 2048, "cuda": 8192}
    assert main(["compile", str(ckpt), "-o", str(tmp_path / "n"), "--config-only",
                 "--max-num-batched-tokens", "300"]) == 0
    assert json.loads((tmp_path / "n" / "plan.json").read_text())["memory"]["max_num_batched_tokens"] == 300

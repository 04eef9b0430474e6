"""The per-step records behind `bench offline`'s step breakdown: every step the engine runs (the
chained decode steps left in flight included) records its rows and the context positions it
attends, and the breakdown charges each group of steps the floor simulate_ceiling would."""
from __future__ import annotations

import pytest

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.runtime.engine_config import EngineMetrics
from nanoforge.tools.roofline import step_breakdown


@pytest.mark.parametrize("overlap", [True, False])
def test_every_step_records_its_rows_and_the_context_it_attends(tiny_ckpt, overlap):
    llm = LLM(tiny_ckpt("qwen3"), progress=False, overlap_decode=overlap)
    prompts = random_prompts(tiny_config("qwen3").vocab_size, [5, 9], seed=1)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    m = llm.engine.metrics
    assert len(m.rows_per_step) == len(m.kv_per_step) == len(m.step_times) == len(m.decode_flags) == m.steps
    # one step prefills both prompts (5 + 9 positions), then three decode steps each add one per row
    assert m.rows_per_step == [2, 2, 2, 2]
    assert m.kv_per_step == [14, 16, 18, 20]
    assert m.decode_flags == [False, True, True, True]


def test_breakdown_groups_decode_steps_by_rows_against_their_floors():
    m = EngineMetrics()
    # (seconds, tokens, rows, kv positions, decode only)
    for t, tok, rows, kv, dec in [(0.010, 1000, 4, 1000, False), (0.002, 1, 1, 100, True),
                                  (0.003, 20, 20, 4000, True), (0.005, 20, 20, 6000, True)]:
        m.step_times.append(t)
        m.tokens_per_step.append(tok)
        m.rows_per_step.append(rows)
        m.kv_per_step.append(kv)
        m.decode_flags.append(dec)
    costs = dict(weight_bytes=1000, kv_bytes_per_token=10, flops_per_token=1e3, bandwidth=1e7, flops=1e8)
    b = step_breakdown(m, **costs)
    one, twenty = b["decode"]
    assert (one["rows"], one["steps"]) == ("1", 1) and (twenty["rows"], twenty["steps"]) == ("17-32", 2)
    assert one["floor_s"] == pytest.approx((1000 + 100 * 10) / 1e7)  # bytes bound
    assert twenty["floor_s"] == pytest.approx((2000 + 10_000 * 10) / 1e7)
    assert twenty["mean_ms"] == pytest.approx(4.0) and twenty["mean_kv_positions"] == 5000
    assert twenty["fraction_of_floor"] == pytest.approx(twenty["floor_s"] / 0.008)
    mixed = b["mixed"]
    assert mixed["steps"] == 1 and mixed["floor_s"] == pytest.approx(1000 * 1e3 / 1e8)  # FLOP bound
    assert b["all"]["seconds"] == pytest.approx(0.020)
    # since: the warm-up's steps are left out
    assert step_breakdown(m, since=1, **costs)["mixed"] is None

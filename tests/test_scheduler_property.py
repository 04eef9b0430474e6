"""Property test of block manager + scheduler + engine bookkeeping (hypothesis): random arrivals,
prompt lengths, shared prefixes, aborts and pool sizes. A fake model runner returns random logits,
so thousands of steps run in seconds; the invariants are checked after every step."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoforge.compiler import CompileOptions, compile_checkpoint
from nanoforge.errors import NanoForgeError
from nanoforge.runtime.engine import Engine, EngineConfig
from nanoforge.runtime.sampling_params import SamplingParams
from nanoforge.runtime.scheduler import ScheduledBatch
from nanoforge.runtime.sequence import Status

BLOCK = 4
VOCAB = 64
PREFIXES = [[7] * 9, list(range(12)), [3, 1, 4, 1, 5, 9, 2, 6]]


class FakeRunner:
    """Random logits for the rows that sample; the KV pool is not needed for bookkeeping."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def execute(self, batch: ScheduledBatch, device_tokens=None):
        rows = batch.sample_indices() if device_tokens is None else list(range(len(batch.items)))
        return torch.randn(len(rows), VOCAB, generator=self.g), rows


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "torch_dtype": "float32"}))
    return compile_checkpoint(d, CompileOptions(config_only=True, block_size=BLOCK))


event = st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(PREFIXES)), st.integers(1, 40), st.integers(1, 12)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_blocks=st.integers(4, 40), max_seqs=st.integers(1, 6), budget=st.integers(4, 48),
       chunk=st.integers(1, 24), caching=st.booleans(), seed=st.integers(0, 2**16),
       events=st.lists(event, max_size=40))
def test_engine_bookkeeping_invariants(plan, num_blocks, max_seqs, budget, chunk, caching, seed, events):
    cfg = EngineConfig(num_blocks=num_blocks, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                       max_prefill_chunk=chunk, prefix_caching=caching)  # max_model_len: what the pool holds
    eng = Engine(plan, None, None, cfg, runner=FakeRunner(seed))
    rng = torch.Generator().manual_seed(seed)
    submitted, rejected = [], 0

    def step_and_check():
        eng.step()
        live = [s for s in submitted if s.status is not Status.FINISHED]
        eng.blocks.check_invariants(live)
        for s in live:
            assert len(s.block_table) * BLOCK >= s.num_computed
            assert s.status is Status.RUNNING or not s.block_table  # waiting sequences hold nothing
        assert len(eng.scheduler.running) <= max_seqs

    for ev in events:
        if ev[0] == "add":
            _, prefix, length, max_tokens = ev
            body = torch.randint(0, 4, (length,), generator=rng).tolist()  # small alphabet: shared blocks
            prompt = (PREFIXES[prefix - 1] if prefix else []) + body
            try:
                submitted.append(eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                        ignore_eos=True)))
            except NanoForgeError as e:
                assert "max_model_len" in str(e)
                rejected += 1
        elif ev[0] == "step":
            for _ in range(ev[1]):
                step_and_check()
        elif submitted:
            eng.abort(submitted[ev[1] % len(submitted)].seq_id)
    for _ in range(5000):
        if not eng.has_work():
            break
        step_and_check()
    assert not eng.has_work(), "engine did not drain: livelock"
    for s in submitted:
        assert s.status is Status.FINISHED and s.finish_reason in ("length", "abort")
        if s.finish_reason == "length":
            assert len(s.output_ids) == s.params.max_tokens  # admitted requests fit max_model_len
    eng.blocks.check_invariants([])
    assert eng.blocks.num_free == num_blocks


def test_small_pool_scenario_preempts_and_hits_the_cache(plan):
    """The deterministic corner the property test must also be able to reach."""
    eng = Engine(plan, None, None, EngineConfig(num_blocks=7, max_num_seqs=3, max_prefill_chunk=4), runner=FakeRunner(0))
    seqs = [eng.add_request(PREFIXES[0] + [i], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
            for i in range(3)]
    eng.run_until_done()
    assert eng.scheduler.num_preemptions > 0 and eng.blocks.hits > 0
    assert all(len(s.output_ids) == 9 for s in seqs)
    eng.blocks.check_invariants([])


def test_a_pool_of_millions_of_blocks_builds_nothing_per_block_and_keeps_the_lru_order():
    """A tiny model's 1 GiB CPU pool is millions of blocks: none gets an object before it is handed
    out, and blocks never handed out still go before freed ones (which stay findable longest)."""
    from nanoforge.runtime.block_manager import BlockManager
    from nanoforge.runtime.sequence import Sequence

    big = BlockManager(10_000_000, 16)
    assert big.num_free == 10_000_000 and not big.blocks and not big.free
    bm = BlockManager(4, 2, prefix_caching=False)
    a, b = Sequence(0, [1] * 4, SamplingParams()), Sequence(1, [2] * 6, SamplingParams())
    bm.grow(a, 4)
    assert a.block_table == [0, 1] and bm.num_free == 2
    bm.release(a)  # tail first: block 1 is evicted before block 0
    bm.grow(b, 6)
    assert b.block_table == [2, 3, 1] and bm.num_free == 1
    bm.check_invariants([b])
    bm.release(b)
    assert bm.num_free == 4
    bm.check_invariants([])

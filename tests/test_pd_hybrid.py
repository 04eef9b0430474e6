"""PD with a hybrid model (Qwen3.5-MoE: Gated DeltaNet + attention) on CPU: the parked sequence's
state row (every GDN layer's conv window and delta-rule state) travels with its KV blocks, in the
same kv_data message, into the row the decode engine's BlockManager gives the migrated sequence.
In-process (EngineLoop.read_parked -> scatter) and through engine-server processes and the Router:
the decode engine's greedy tokens equal one engine's, and every block and state row is free on both
sides afterwards. Prompts are longer than the GDN chunk (64), and one's last prefill chunk is a
single token (a decode-shaped step, which overlapped decode must not chain past the parked token)."""
from __future__ import annotations

import asyncio
import time

import pytest

from hf_fixtures import random_prompts
from nanoforge import LLM, SamplingParams
from nanoforge.runtime.kv_transfer import scatter_blocks, scatter_state
from nanoforge.serving.engine_loop import EngineLoop
from nanoforge.serving.protocol import GenerateRequest, TokenDelta
from qwen3_5_fixtures import VOCAB, make_qwen3_5_checkpoint

pytestmark = pytest.mark.timeout(120)
LENGTHS = [4, 17, 70, 129]  # 17 = a 16-token chunk + a 1-token step; 70 and 129 span GDN chunks of 64
NEW = 8
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_qwen3_5_checkpoint(tmp_path_factory.mktemp("qwen3_5_pd") / "ckpt")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(VOCAB, LENGTHS, seed=5)


@pytest.fixture(scope="module")
def want(ckpt, prompts):
    ref = LLM(ckpt, progress=False)
    return [o.token_ids for o in ref.generate(prompts, SamplingParams(max_tokens=NEW, **GREEDY))]


def _wait(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    assert cond()


def test_state_row_migrates_with_the_kv_in_process(ckpt, prompts, want):
    a = LLM(ckpt, progress=False, max_prefill_chunk=16, max_num_batched_tokens=64)
    b = LLM(ckpt, progress=False)
    ea, eb = a.engine, b.engine
    sp = SamplingParams(max_tokens=NEW, **GREEDY)
    deltas: list[TokenDelta] = []
    loop = EngineLoop(ea, deltas.extend, kv_park_timeout=30).start()
    moved = []
    try:
        for i, p in enumerate(prompts):  # batched together on the prefill engine
            loop.submit(GenerateRequest(f"r{i}", p, {"max_tokens": NEW, **GREEDY}, {"phase": "prefill"}))
        _wait(lambda: len(deltas) == len(prompts))
        first = {d.request_id: d for d in deltas}
        for i, p in enumerate(prompts):
            d = first[f"r{i}"]
            assert d.finish_reason == "prefilled" and d.token_ids == want[i][:1] and d.kv["num_tokens"] == len(p)
            header, bufs = loop.read_parked(f"r{i}", 0)
            n = header["state_frames"]
            assert n == sum(len(layer) for layer in eb.runner.state) == 2 * 4  # conv + delta state, 4 GDN layers
            seq, at = eb.add_migrated(p + d.token_ids, len(p), sp, len(p))
            assert at == 0 and seq.state_slot >= 0
            assert scatter_blocks(eb.runner.pool, seq.block_table, bufs[:-n]) + \
                scatter_state(eb.runner.state, seq.state_slot, bufs[-n:]) == header["nbytes"]
            loop.release(f"r{i}")
            eb.resume_migrated(seq, len(p))
            moved.append(seq)
        eb.run_until_done()
        assert [s.output_ids for s in moved] == want
        _wait(lambda: not loop.stats()["kv_parked"])
        s = loop.stats()
        assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["state_slots_free"] == s["state_slots_total"]
    finally:
        loop.stop()
    ea.blocks.check_invariants([])
    eb.blocks.check_invariants([])
    st = eb.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"] and st["state_slots_free"] == st["state_slots_total"]


def test_state_row_migrates_over_dlslime_in_process(ckpt, prompts, want):
    """--kv-transport dlslime: the decode side reads the blocks and the state row out of the prefill
    engine's registered regions (dlslime's TCP mode on loopback), one batch per request."""
    try:
        from nanoforge.runtime.kv_dlslime import KVExport, KVReader, load
        load()
    except Exception as e:  # noqa: BLE001 - no wheel, or no libibverbs
        pytest.skip(str(e))
    a = LLM(ckpt, progress=False, max_prefill_chunk=16, max_num_batched_tokens=64)
    b = LLM(ckpt, progress=False)
    ea, eb = a.engine, b.engine
    export = KVExport(ea.kv_pool(), ea.kv_store().state, "127.0.0.1")
    reader = KVReader(eb.kv_pool(), eb.kv_store().state)
    sp = SamplingParams(max_tokens=NEW, **GREEDY)
    deltas: list[TokenDelta] = []
    loop = EngineLoop(ea, deltas.extend, kv_park_timeout=30).start()
    moved = []
    try:
        answer = export.answer(reader.offer())
        assert [n for n, _ in answer["regions"]][-9:] == ["kv.3"] + [f"state.{i}" for i in range(8)]
        reader.connect(answer)
        for i, p in enumerate(prompts):
            loop.submit(GenerateRequest(f"r{i}", p, {"max_tokens": NEW, **GREEDY}, {"phase": "prefill"}))
        _wait(lambda: len(deltas) == len(prompts))
        first = {d.request_id: d for d in deltas}
        for i, p in enumerate(prompts):
            d = first[f"r{i}"]
            header, bufs = loop.read_parked(f"r{i}", 0, with_data=False, state_data=False)
            assert bufs == [] and header["state_frames"] == 0 and header["state_slot"] >= 0
            seq, at = eb.add_migrated(p + d.token_ids, len(p), sp, len(p))
            assert reader.read(header["block_ids"], seq.block_table, header["state_slot"], seq.state_slot,
                               time.monotonic() + 10) == header["nbytes"] > 0
            loop.release(f"r{i}")
            eb.resume_migrated(seq, len(p))
            moved.append(seq)
        eb.run_until_done()
        assert [s.output_ids for s in moved] == want
        _wait(lambda: not loop.stats()["kv_parked"])
    finally:
        loop.stop()
        reader.close()
        export.close()
    st = eb.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"] and st["state_slots_free"] == st["state_slots_total"]


def test_pd_through_engine_servers_and_the_router_equals_one_engine(ckpt, prompts, want):
    from nanoforge.serving.engine_server import start_engine_server, stop_engine_server, wait_engine_ready
    from nanoforge.serving.router import Router
    from nanoforge.serving.zmq_client import ZmqEngineClient

    procs = {"prefill": start_engine_server(ckpt, role="prefill", model_name="tiny", max_num_batched_tokens=16),
             "decode": start_engine_server(ckpt, role="decode", model_name="tiny")}
    try:
        for proc, addr in procs.values():
            wait_engine_ready(proc, addr, timeout=120)
        pre, dec = procs["prefill"][1], procs["decode"][1]

        async def stats(addr: str) -> dict:
            c = await ZmqEngineClient.connect(addr, timeout=5)
            try:
                return await c.stats()
            finally:
                c.close()

        async def one(router, rid: str, prompt: list[int]) -> tuple[list[int], TokenDelta]:
            tokens, last = [], None
            async for d in router.generate(GenerateRequest(rid, prompt, {"max_tokens": NEW, **GREEDY})):
                tokens += d.token_ids
                last = d
            return tokens, last

        async def main():
            router = await Router.connect([pre], [dec])
            try:
                outs = await asyncio.gather(*[one(router, f"h{i}", p) for i, p in enumerate(prompts)])
            finally:
                router.close()
            end = time.monotonic() + 10
            while True:  # the prefill side frees at the decode engine's ack
                s = {k: await stats(a) for k, a in (("prefill", pre), ("decode", dec))}
                idle = all(x["kv_blocks_free"] == x["kv_blocks_total"] and x["kv_parked"] == 0 and
                           x["state_slots_free"] == x["state_slots_total"] for x in s.values())
                if idle or time.monotonic() > end:
                    return outs, s
                await asyncio.sleep(0.1)

        outs, s = asyncio.run(main())
        assert [t for t, _ in outs] == want and all(last.finish_reason == "length" for _, last in outs)
        for x in s.values():
            assert x["kv_blocks_free"] == x["kv_blocks_total"] and x["kv_parked"] == 0 and x["num_running"] == 0
            assert x["state_slots_free"] == x["state_slots_total"]
        d = s["decode"]
        assert d["kv_migrations"] == len(prompts) and d["kv_migration_fallbacks"] == 0
        assert s["prefill"]["kv_served_bytes"] == d["kv_migration_bytes"] > 0
    finally:
        for proc, _ in procs.values():
            stop_engine_server(proc, timeout=10)

"""PD with `--kv-transport dlslime` on real processes, in dlslime's TCP mode (CPU hosts have no RDMA
NIC): test_pd.py's main tests run against a dlslime prefill/decode pair (greedy and seeded streams
equal one engine's, every block freed on both sides, a killed decode engine ends its streams while
the prefill engine frees the KV), and dlslime's own faults fall back to recompute like the other
transports': a read that stalls (the prefill process stopped mid-read) or fails (the prefill killed
mid-read) still gives one engine's tokens, and the next pull reconnects. A reader's batched reads
land the same bytes as the host-staged kv_pull; a header naming blocks outside the prefill
engine's regions is refused before anything is read. Host staging (a CUDA pool in TCP mode; forced
on CPU here by NANOFORGE_DLSLIME_STAGE=1): staged prefill and decode engines give one engine's
tokens and free every block and staging span; a request the prefill engine's staging cannot hold
now is recomputed; a reader lands the staged bytes whichever side stages, a staged span outside
the staging region is refused, and an abort frees the span; a hybrid model's state row is staged
with its blocks. Skipped when dlslime does not import, except the startup checks (a missing
wheel, a prefill engine that does not export), which run everywhere."""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import zmq

import test_pd
from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from nanoforge.runtime import kv_dlslime
from nanoforge.serving.engine_loop import EngineLoop
from nanoforge.serving.engine_server import start_engine_server, stop_engine_server, wait_engine_ready
from nanoforge.serving.kv_migration import DlslimeReads, MigrationWorker
from nanoforge.serving.protocol import GenerateRequest, TokenDelta
from nanoforge.serving.wire import PROTOCOL_VERSION, pack, unpack

pytestmark = pytest.mark.timeout(150)
GREEDY = {"temperature": 0, "ignore_eos": True}
VOCAB = tiny_config("qwen3").vocab_size
STAGE = {"NANOFORGE_DLSLIME_STAGE": "1"}  # host-stage the CPU pools, as CUDA pools are in TCP mode
SMALL_STAGING_MIB = 0.2  # three 60 KiB blocks of the tiny model
try:
    import dlslime  # noqa: F401
    WHY_NOT = None
except Exception as e:  # ImportError, or OSError without libibverbs
    WHY_NOT = f"dlslime does not import ({e}): pip install dlslime==0.1.23 and apt-get install libibverbs1"
needs_dlslime = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def pd(tiny_ckpt):
    """A dlslime prefill engine, a dlslime decode engine, a decode engine the killed-decode test
    kills, a second prefill engine the failed-read test kills, and host-staging ones: a prefill
    and a decode engine, and a prefill engine with little staging."""
    ckpt = tiny_ckpt("qwen3")
    common = {"role": "decode", "model_name": "tiny", "kv_transport": "dlslime", "max_num_seqs": 16}
    procs = {"prefill": start_engine_server(ckpt, role="prefill", model_name="tiny", kv_transport="dlslime",
                                            num_blocks=256, max_num_seqs=16, kv_park_timeout=6),
             "decode": start_engine_server(ckpt, num_blocks=256, **common),
             "victim": start_engine_server(ckpt, num_blocks=512, **common),
             "doomed": start_engine_server(ckpt, role="prefill", model_name="tiny", kv_transport="dlslime",
                                           num_blocks=64),
             "staged_prefill": start_engine_server(ckpt, env=STAGE, role="prefill", model_name="tiny",
                                                   kv_transport="dlslime", num_blocks=256, max_num_seqs=16),
             "staged_decode": start_engine_server(ckpt, env=STAGE, num_blocks=256, **common),
             "small_prefill": start_engine_server(ckpt, env=STAGE, role="prefill", model_name="tiny",
                                                  kv_transport="dlslime", num_blocks=64,
                                                  kv_staging_mib=SMALL_STAGING_MIB)}
    try:
        ref = LLM(ckpt, progress=False)  # built while the servers start
        hello = {k: wait_engine_ready(proc, addr, timeout=120) for k, (proc, addr) in procs.items()}
        yield SimpleNamespace(ckpt=ckpt, ref=ref, procs=procs, hello=hello, registry=None,
                              **{k: addr for k, (_, addr) in procs.items()})
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            stop_engine_server(proc, timeout=10)


# -- test_pd.py's tests, over dlslime ------------------------------------------------------------
@needs_dlslime
def test_pd_over_dlslime_gives_one_engines_greedy_tokens_and_frees_every_block(pd):
    test_pd.test_pd_greedy_streams_equal_one_engine_and_free_every_block(pd)
    log = Path(pd.procs["decode"][0].log_path).read_text()
    assert ": dlslime transport" in log, log[-2000:]


@needs_dlslime
def test_pd_over_dlslime_seeded_sampling_and_logprobs_equal_one_engine(pd):
    test_pd.test_pd_seeded_sampling_logprobs_and_one_token_requests_equal_one_engine(pd)


@needs_dlslime
def test_pd_over_dlslime_killed_decode_engine_ends_streams_and_frees_prefill_kv(pd):
    test_pd.test_a_killed_decode_engine_ends_its_streams_and_the_prefill_engine_frees_the_kv(pd)


# -- host staging (a CUDA pool in TCP mode; forced on CPU here) ------------------------------------
@needs_dlslime
def test_staged_pd_over_dlslime_gives_one_engines_greedy_tokens_and_frees_every_block_and_span(pd):
    staged = SimpleNamespace(ref=pd.ref, prefill=pd.staged_prefill, decode=pd.staged_decode)
    test_pd.test_pd_greedy_streams_equal_one_engine_and_free_every_block(staged)
    p = test_pd._wait_idle(pd.staged_prefill)
    assert p["kv_staged"] == 32 and p["kv_staging_held"] == 0 and p["kv_staging_full"] == 0
    assert p["kv_staging_bytes"] == 256 * 61440  # the pool's size, under 1 GiB
    from nanoforge.serving.metrics import ServerMetrics
    text = ServerMetrics("tiny").render(p)  # /metrics shows them
    for name, value in (("kv_staged_total", 32), ("kv_staging_full_total", 0), ("kv_staging_held", 0),
                        ("kv_staging_bytes", 256 * 61440)):
        assert f'nanoforge_{name}{{model_name="tiny"}} {value}' in text.splitlines(), name
    for role in ("staged_prefill", "staged_decode"):
        assert "host-staged in dlslime's TCP mode" in Path(pd.procs[role][0].log_path).read_text()


@needs_dlslime
def test_a_request_the_staging_cannot_hold_now_is_recomputed(pd):
    import asyncio

    from nanoforge.serving.router import Router

    prompts = random_prompts(VOCAB, [30, 70], seed=51)  # 2 blocks fit the small staging, 5 do not
    want = [o.token_ids for o in pd.ref.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))]
    before = test_pd._stats(pd.staged_decode)

    async def main():
        router = await Router.connect([pd.small_prefill], [pd.staged_decode])
        try:
            return [await test_pd._run(router, f"small{i}", p, max_tokens=8, **GREEDY) for i, p in enumerate(prompts)]
        finally:
            router.close()

    outs = asyncio.run(main())
    assert [t for t, _ in outs] == want and all(last.finish_reason == "length" for _, last in outs)
    d, p = test_pd._wait_idle(pd.staged_decode), test_pd._wait_idle(pd.small_prefill)
    assert d["kv_migrations"] - before["kv_migrations"] == 1
    assert d["kv_migration_fallbacks"] - before["kv_migration_fallbacks"] == 1
    assert p["kv_staged"] == 1 and p["kv_staging_full"] == 1 and p["kv_staging_held"] == 0
    assert p["kv_blocks_free"] == p["kv_blocks_total"] and p["kv_parked"] == 0


# -- a reader against the real prefill engine ----------------------------------------------------
def _park(addr: str, rid: str, prompt: list[int], max_tokens: int = 8) -> TokenDelta:
    """Prefill `prompt` on the engine at addr with phase "prefill": its KV stays parked."""
    import asyncio

    from nanoforge.serving.zmq_client import ZmqEngineClient

    async def main():
        c = await ZmqEngineClient.connect(addr, timeout=5)
        try:
            return [d async for d in c.generate(GenerateRequest(rid, prompt, {"max_tokens": max_tokens, **GREEDY},
                                                                {"phase": "prefill"}))]
        finally:
            c.close()

    (d,) = asyncio.run(main())
    assert d.finish_reason == "prefilled"
    return d


class _Dealer:
    def __init__(self, addr: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)

    def ask(self, msg: dict) -> list[bytes]:
        self.sock.send(pack(msg))
        assert self.sock.poll(5000), "no reply"
        return self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@needs_dlslime
def test_a_readers_batched_reads_land_the_host_staged_bytes_and_stay_inside_the_regions(pd):
    prompt = random_prompts(VOCAB, [75], seed=31)[0]
    _park(pd.prefill, "read-me", prompt)
    local = LLM(pd.ckpt, progress=False, num_blocks=16).engine
    pool = local.kv_pool()
    for t in (t for layer in pool for t in layer):
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(5)))  # not zeros: every byte counts
    reader = kv_dlslime.KVReader(pool, [])
    dealer = _Dealer(pd.prefill)
    try:
        hello = unpack(dealer.ask({"type": "hello", "protocol_version": PROTOCOL_VERSION, "id": 1,
                                   "kv_dlslime": reader.offer()})[0])
        answer = hello["kv_dlslime"]
        assert answer["kind"] == "tcp" and answer["endpoint"]["host"] == "127.0.0.1"  # the engine's own host
        assert [n for n, _ in answer["regions"]] == [f"kv.{i}" for i in range(6)]
        reader.connect(answer)
        head, *frames = dealer.ask({"type": "kv_pull", "id": 2, "request_id": "read-me", "mode": "tcp"})
        staged = unpack(head)
        head, *none = dealer.ask({"type": "kv_pull", "id": 3, "request_id": "read-me", "mode": "dlslime"})
        h = unpack(head)
        assert not none and h["block_ids"] == staged["block_ids"] and len(h["block_ids"]) == 5
        assert h["nbytes"] == staged["nbytes"] == sum(len(f) for f in frames) and h["state_slot"] == -1
        dst = [3, 4, 9, 10, 11]  # two runs here, however the prefill engine's blocks lie
        untouched = [t[[0, 1, 15]].clone() for layer in pool for t in layer]
        assert reader.read(h["block_ids"], dst, -1, -1, time.monotonic() + 10) == h["nbytes"]
        for t, f, keep in zip((t for layer in pool for t in layer), frames, untouched):
            assert t[dst].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() == f
            assert torch.equal(t[[0, 1, 15]], keep)
        # block ids outside the prefill engine's regions: refused before any byte moves
        with pytest.raises(NanoForgeError, match=r"rows 256\.\.256 -> 0\.\.0 are outside region kv\.0 \(256 rows "
                                                 r"there, 16 here\)"):
            reader.read([256], [0], -1, -1, time.monotonic() + 10)
        with pytest.raises(NanoForgeError, match="outside region kv.0"):
            reader.read([h["block_ids"][0]], [16], -1, -1, time.monotonic() + 10)
        assert reader.broken is None  # a refused header is not a broken connection
        assert unpack(dealer.ask({"type": "kv_ack", "id": 4, "request_id": "read-me"})[0])["type"] == "kv_released"
    finally:
        dealer.close()
        reader.close()
    s = test_pd._wait_idle(pd.prefill)
    assert s["kv_parked"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]


@needs_dlslime
@pytest.mark.parametrize("source, stage_here", [("staged_prefill", False), ("prefill", True)],
                         ids=["staged-there", "staged-here"])
def test_a_reader_lands_the_bytes_whichever_side_stages(pd, monkeypatch, source, stage_here):
    addr, rid = getattr(pd, source), f"stage-{source}"
    _park(addr, rid, random_prompts(VOCAB, [75], seed=33)[0])
    if stage_here:
        monkeypatch.setenv("NANOFORGE_DLSLIME_STAGE", "1")
    pool = LLM(pd.ckpt, progress=False, num_blocks=16).engine.kv_pool()
    for t in (t for layer in pool for t in layer):
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(6)))
    reader = kv_dlslime.KVReader(pool, [])
    dealer = _Dealer(addr)
    try:
        answer = unpack(dealer.ask({"type": "hello", "protocol_version": PROTOCOL_VERSION, "id": 1,
                                    "kv_dlslime": reader.offer()})[0])["kv_dlslime"]
        reader.connect(answer)
        assert (reader.remote_stage is not None) == (source == "staged_prefill") == ("regions" not in answer)
        assert (reader.staging is not None) == stage_here
        head, *frames = dealer.ask({"type": "kv_pull", "id": 2, "request_id": rid, "mode": "tcp"})
        want = unpack(head)
        head, *none = dealer.ask({"type": "kv_pull", "id": 3, "request_id": rid, "mode": "dlslime",
                                  "staged": reader.remote_stage is not None})
        h = unpack(head)
        span = h.get("staged")
        assert not none and h["block_ids"] == want["block_ids"] and (span is not None) == (not stage_here)
        dst = [3, 4, 9, 10, 11]
        untouched = [t[[0, 1, 15]].clone() for layer in pool for t in layer]
        assert reader.read(h["block_ids"], dst, -1, -1, time.monotonic() + 10, span) == h["nbytes"]
        for t, f, keep in zip((t for layer in pool for t in layer), frames, untouched):
            assert t[dst].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() == f
            assert torch.equal(t[[0, 1, 15]], keep)
        if span is None:
            assert unpack(dealer.ask({"type": "kv_ack", "id": 4, "request_id": rid})[0])["type"] == "kv_released"
        else:  # a span outside the staging region, or not the request's size: refused before any byte moves
            end = answer["staged"]["length"]
            with pytest.raises(NanoForgeError, match=r"staged bytes .* are outside the prefill engine's staging "):
                reader.read(h["block_ids"], dst, -1, -1, time.monotonic() + 10, {**span, "offset": end - 8})
            with pytest.raises(NanoForgeError, match="wanted"):
                reader.read(h["block_ids"][:1], dst[:1], -1, -1, time.monotonic() + 10, span)
            assert reader.broken is None and test_pd._stats(addr)["kv_staging_held"] == 1
            dealer.sock.send(pack({"type": "abort", "request_id": rid}))  # the span goes with the parked KV
    finally:
        dealer.close()
        reader.close()
    s = test_pd._wait_idle(addr)
    assert s["kv_parked"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] and s.get("kv_staging_held", 0) == 0


@needs_dlslime
def test_a_hybrid_models_state_row_is_staged_with_its_blocks(tmp_path, monkeypatch):
    from qwen3_5_fixtures import VOCAB as VOCAB_3_5, make_qwen3_5_checkpoint

    ckpt = make_qwen3_5_checkpoint(tmp_path / "ckpt")
    prompts = random_prompts(VOCAB_3_5, [17, 70], seed=5)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    want = [o.token_ids for o in LLM(ckpt, progress=False).generate(prompts, sp)]
    monkeypatch.setenv("NANOFORGE_DLSLIME_STAGE", "1")
    ea, eb = LLM(ckpt, progress=False, max_prefill_chunk=16).engine, LLM(ckpt, progress=False).engine
    export = kv_dlslime.KVExport(ea.kv_pool(), ea.kv_store().state, "127.0.0.1")
    reader = kv_dlslime.KVReader(eb.kv_pool(), eb.kv_store().state)
    deltas: list[TokenDelta] = []
    loop = EngineLoop(ea, deltas.extend, kv_park_timeout=30)
    loop.on_unpark = export.unstage  # as EngineServer wires it
    loop.start()
    moved = []
    try:
        answer = export.answer(reader.offer())
        assert "regions" not in answer and answer["layout"][-1][0] == "state.7"
        reader.connect(answer)
        for i, p in enumerate(prompts):
            loop.submit(GenerateRequest(f"h{i}", p, {"max_tokens": 8, **GREEDY}, {"phase": "prefill"}))
        end = time.monotonic() + 20
        while len(deltas) < len(prompts) and time.monotonic() < end:
            time.sleep(0.01)
        first = {d.request_id: d for d in deltas}
        for i, p in enumerate(prompts):
            h, _ = loop.read_parked(f"h{i}", 0, with_data=False, state_data=False, stage=export.stage)
            assert h["state_slot"] >= 0 and h["staged"]["length"] == h["nbytes"]
            seq, _ = eb.add_migrated(p + first[f"h{i}"].token_ids, len(p), sp, len(p))
            assert reader.read(h["block_ids"], seq.block_table, h["state_slot"], seq.state_slot,
                               time.monotonic() + 10, h["staged"]) == h["nbytes"]
            loop.release(f"h{i}")
            eb.resume_migrated(seq, len(p))
            moved.append(seq)
        eb.run_until_done()
        assert [s.output_ids for s in moved] == want
        end = time.monotonic() + 5
        while loop.stats()["kv_parked"] and time.monotonic() < end:
            time.sleep(0.01)
        assert export.stats() == {"kv_staging_bytes": export.staging.spans.size, "kv_staging_held": 0,
                                  "kv_staging_full": 0, "kv_staged": 2}
    finally:
        loop.stop()
        reader.close()
        export.close()
    st = eb.stats()
    assert st["kv_blocks_free"] == st["kv_blocks_total"] and st["state_slots_free"] == st["state_slots_total"]


# -- faults: a stalled or failed read is recomputed ----------------------------------------------
def _stop(pid: int) -> None:
    """SIGSTOP, and wait until the process is stopped (delivery is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    end = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T" and time.monotonic() < end:
        time.sleep(0.001)


def _decode_here(ckpt, pull_timeout: float):
    """A decode engine in this process: EngineLoop + a dlslime MigrationWorker, as EngineServer wires them."""
    eng = LLM(ckpt, progress=False, num_blocks=64).engine
    out: list[TokenDelta] = []
    loop = EngineLoop(eng, out.extend)
    store = eng.kv_store()
    worker = MigrationWorker(eng.kv_pool(), store.contract, loop.migrated, "dlslime", pull_timeout, store=store)
    loop.migrate = worker.submit
    return eng, loop.start(), worker, out


def _decode(loop: EngineLoop, out: list[TokenDelta], rid: str, source: str, prompt: list[int],
            first: TokenDelta) -> tuple[list[int], float]:
    t0 = time.monotonic()
    pd = {"phase": "decode", "source": source, "source_request_id": first.request_id, "num_prompt": len(prompt),
          "num_tokens": len(prompt)}
    loop.submit(GenerateRequest(rid, prompt + first.token_ids, {"max_tokens": 8, **GREEDY}, pd))
    end = time.monotonic() + 30
    while not any(d.request_id == rid and d.finish_reason for d in out) and time.monotonic() < end:
        time.sleep(0.01)
    last = [d for d in out if d.request_id == rid][-1]
    assert last.finish_reason == "length", last
    return first.token_ids + [t for d in out if d.request_id == rid for t in d.token_ids], time.monotonic() - t0


@needs_dlslime
def test_a_stalled_dlslime_read_is_recomputed_and_the_next_pull_reconnects(pd, monkeypatch):
    prompts = random_prompts(VOCAB, [40, 23], seed=41)
    want = [o.token_ids for o in pd.ref.generate(prompts, SamplingParams(max_tokens=8, **GREEDY))]
    pid = pd.procs["prefill"][0].pid
    real = DlslimeReads.receive

    def stalled(self, *a, **kw):  # the prefill process stops after answering kv_pull, before the read
        _stop(pid)
        try:
            return real(self, *a, **kw)
        finally:
            os.kill(pid, signal.SIGCONT)

    eng, loop, worker, out = _decode_here(pd.ckpt, pull_timeout=1.0)
    try:
        first = _park(pd.prefill, "stall-0", prompts[0])
        monkeypatch.setattr(DlslimeReads, "receive", stalled)
        tokens, took = _decode(loop, out, "s0", pd.prefill, prompts[0], first)
        assert tokens == want[0] and 1.0 <= took < 10
        s = loop.stats()
        assert s["kv_migration_fallbacks"] == 1 and s["kv_migrations"] == 0
        assert not worker.peers  # its reader broke: the source is forgotten, the next pull says hello anew
        monkeypatch.setattr(DlslimeReads, "receive", real)
        first = _park(pd.prefill, "stall-1", prompts[1])  # a new reader, on a new socket
        assert _decode(loop, out, "s1", pd.prefill, prompts[1], first)[0] == want[1]
        s = loop.stats()
        assert s["kv_migration_fallbacks"] == 1 and s["kv_migrations"] == 1 and s["kv_migration_bytes"] > 0
        assert len(worker.peers) == 1 and next(iter(worker.peers.values())).transport.broken is False
        end = time.monotonic() + 5
        while loop.stats()["kv_blocks_free"] != s["kv_blocks_total"] and time.monotonic() < end:
            time.sleep(0.01)
        assert loop.stats()["kv_blocks_free"] == s["kv_blocks_total"]
    finally:
        loop.stop()
        worker.stop()
    p = test_pd._wait_idle(pd.prefill)  # the stalled pull's ack reached it once it ran again
    assert p["kv_parked"] == 0 and p["kv_blocks_free"] == p["kv_blocks_total"] and p["kv_park_expired"] == 0


@needs_dlslime
def test_a_failed_dlslime_read_is_recomputed(pd, monkeypatch):
    prompt = random_prompts(VOCAB, [52], seed=43)[0]
    want = pd.ref.generate([prompt], SamplingParams(max_tokens=8, **GREEDY))[0].token_ids
    doomed = pd.procs["doomed"][0]
    real = DlslimeReads.receive

    def killed(self, *a, **kw):  # the prefill process dies after answering kv_pull, before the read
        doomed.kill()
        doomed.wait()
        return real(self, *a, **kw)

    eng, loop, worker, out = _decode_here(pd.ckpt, pull_timeout=5.0)
    try:
        first = _park(pd.doomed, "doomed-0", prompt)
        monkeypatch.setattr(DlslimeReads, "receive", killed)
        tokens, took = _decode(loop, out, "f0", pd.doomed, prompt, first)
        assert tokens == want and took < 5  # failed at once, not at the deadline
        s = loop.stats()
        assert s["kv_migration_fallbacks"] == 1 and s["kv_migrations"] == 0
        assert s["kv_blocks_free"] == s["kv_blocks_total"]
    finally:
        loop.stop()
        worker.stop()


# -- startup and refusals (no dlslime needed) ----------------------------------------------------
def test_a_missing_dlslime_fails_at_startup_with_how_to_install(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from nanoforge.serving import engine_server

    fake = tmp_path / "dlslime"  # what a wheel without libibverbs raises on import
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libibverbs.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dlslime", raising=False)
    monkeypatch.setattr("nanoforge.llm.LLM", None)  # fails before the model loads
    t0 = time.monotonic()
    assert engine_server.main([str(tiny_ckpt("qwen3")), "--role", "decode", "--kv-transport", "dlslime"]) == 1
    assert capsys.readouterr().err == (
        "error: --kv-transport dlslime: dlslime does not import (libibverbs.so.1: cannot open shared object file); "
        "install it: pip install dlslime==0.1.23 (it needs libibverbs1 and libnuma1: apt-get install libibverbs1 "
        "libnuma1)\n")
    assert time.monotonic() - t0 < 5


@needs_dlslime
def test_startup_says_how_dlslime_moves_the_pool_and_a_cuda_pool_is_host_staged(monkeypatch):
    cpu, cuda = [(torch.zeros(2, 16, 2, 8),)], [(torch.empty(4096, 16, 2, 8, device="meta"),)]
    monkeypatch.setattr(kv_dlslime, "rdma_nics", lambda dl: [])
    assert kv_dlslime.check_usable(cpu, []) == "dlslime's TCP mode, the host pool read in place"
    staged = ("host-staged in dlslime's TCP mode (a prefill engine through {} MiB of pinned memory, "
              "--kv-staging-mib; a decode engine's grows to the largest request)")
    assert kv_dlslime.check_usable(cuda, []) == staged.format(4)  # the pool's size
    assert kv_dlslime.check_usable(cuda, [], 3 << 20) == staged.format(3)
    monkeypatch.setattr(kv_dlslime, "rdma_nics", lambda dl: ["mlx5_0"])
    assert kv_dlslime.check_usable(cpu, []) == "RDMA over mlx5_0"
    assert kv_dlslime.check_usable(cuda, []) == f"RDMA over mlx5_0 (peers without a NIC: {staged.format(4)})"


@needs_dlslime
def test_a_prefill_engine_without_dlslime_does_not_export_and_the_decode_engine_says_so(tiny_ckpt):
    from nanoforge.serving.engine_server import EngineServer, free_tcp_addr

    ckpt = tiny_ckpt("qwen3")
    llm = LLM(ckpt, progress=False, num_blocks=16)
    store = llm.engine.kv_store()
    addr = free_tcp_addr()
    server = EngineServer(llm.engine, addr, "tiny", store.contract, "prefill", kv_transport="tcp")
    try:
        assert server._dlslime({"kind": "tcp", "id": "x"}) == {
            "error": f"the prefill engine at {addr} does not export its KV pool over dlslime (start it with "
                     "--kv-transport dlslime too)"}
    finally:
        server._close()
    with pytest.raises(NanoForgeError, match=r"^--kv-transport dlslime: this engine's KV is split over its ranks "
                                             r"\(tp=2\); use tcp$"):
        MigrationWorker(llm.engine.kv_pool(), store.contract, print, "dlslime",
                        store=replace(store, layout="tp=2", sharded=True))
    worker = MigrationWorker(llm.engine.kv_pool(), store.contract, print, "dlslime", store=store)
    try:
        from nanoforge.serving.kv_migration import _Peer

        peer = _Peer("tcp://127.0.0.1:9", None, 1, reader=kv_dlslime.KVReader(llm.engine.kv_pool(), []))
        with pytest.raises(NanoForgeError, match="does not export its KV pool over dlslime"):
            worker._dlslime(peer, {"kv_dlslime": {"error": "the prefill engine at tcp://127.0.0.1:9 does not export "
                                                           "its KV pool over dlslime"}})
        peer.reader.close()
    finally:
        worker.stop()


def test_staging_spans_are_first_fit_aligned_and_freed_per_request():
    from nanoforge.runtime.kv_staging import ALIGN, Spans

    spans = Spans(4 * ALIGN)
    assert [spans.take("a", 10), spans.take("b", ALIGN), spans.take("c", 2 * ALIGN)] == [0, ALIGN, 2 * ALIGN]
    assert spans.take("d", 1) is None  # full
    assert spans.free("b") and not spans.free("b")
    assert spans.take("d", ALIGN + 1) is None and spans.take("d", ALIGN) == ALIGN  # the first gap that fits
    assert spans.take("a", 20) == 0 and len(spans.held) == 3  # a request staged again: its old span goes first


# -- GPU (bench/gpu_check.sh): RDMA where the host has a NIC, else host-staged TCP mode -------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_dlslime
def test_dlslime_on_gpu_equals_one_engine_over_rdma_or_host_staged(tiny_ckpt, monkeypatch):
    import test_gpu_pd

    test_gpu_pd.test_pd_on_gpu_equals_one_engine("dlslime", "auto", None, tiny_ckpt, monkeypatch)

"""Engine server process + ZmqEngineClient: concurrent greedy streams equal LLM.generate, step
deltas share a frame, several tokens a delta add up, aborts free blocks, bad frames (raw bytes,
unknown types, pickle) get an error reply while the server keeps serving, and a killed, stopped or
absent engine ends streams (or connect) with an error instead of a hang."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
import zmq.asyncio

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from nanoforge.serving.engine_server import free_tcp_addr, start_engine_server, wait_engine_ready
from nanoforge.serving.protocol import GenerateRequest, TokenDelta
from nanoforge.serving.wire import pack, unpack
from nanoforge.serving.zmq_client import EngineUnreachable, ZmqEngineClient
from test_serving_loop import _collect

pytestmark = pytest.mark.timeout(180)
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def env(tiny_ckpt):
    """Three engine processes started at once (startup is mostly `import torch`): `main` serves the
    module, `kill` and `term` are stopped mid-stream by their tests."""
    ckpt = tiny_ckpt("qwen3")
    procs = {k: start_engine_server(ckpt, num_blocks=256, max_num_seqs=16, model_name="tiny")
             for k in ("main", "kill", "term")}
    try:
        ref = LLM(ckpt, progress=False)  # built while the servers start
        for proc, addr in procs.values():
            wait_engine_ready(proc, addr, timeout=120)
        yield SimpleNamespace(ref=ref, procs=procs, addr=procs["main"][1])

        async def stop():  # the "shutdown" message stops the main server cleanly
            c = await ZmqEngineClient.connect(procs["main"][1], timeout=5)
            await c.shutdown()
            c.close()

        asyncio.run(stop())
        assert procs["main"][0].wait(timeout=15) == 0
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            Path(proc.log_path).unlink(missing_ok=True)




def _with_client(addr, body, **kw):
    async def main():
        c = await ZmqEngineClient.connect(addr, timeout=5, **kw)
        try:
            return await body(c)
        finally:
            c.close()

    return asyncio.run(main())


def test_hello_carries_model_info_and_kv_contract(env):
    async def body(c):
        return c, await c.stats()

    c, stats = _with_client(env.addr, body)
    assert c.model_name == "tiny" and c.max_model_len == env.ref.engine.max_model_len
    assert c.kv_contract == env.ref.plan.kv_contract and len(c.kv_contract.layers) == 3
    assert c.info["protocol_version"] == 1 and c.info["pid"] == env.procs["main"][0].pid
    assert stats["kv_contract"] == c.kv_contract.to_json() and stats["kv_blocks_total"] == 256 and stats["role"] == "both"


def test_connect_refuses_an_incompatible_kv_layout(env, tiny_ckpt):
    """A peer that must exchange KV blocks (PD) names the first difference at connect time."""
    other = LLM(tiny_ckpt("deepseek_v3"), progress=False).plan.kv_contract
    same = env.ref.plan.kv_contract

    async def main():
        ok = await ZmqEngineClient.connect(env.addr, timeout=5, expect_kv_contract=same)
        ok.close()
        with pytest.raises(NanoForgeError, match=r"incompatible KV cache layout: .*layer 0: mla"):
            await ZmqEngineClient.connect(env.addr, timeout=5, expect_kv_contract=other)
        with pytest.raises(NanoForgeError, match="block_size: 32 vs 16"):
            await ZmqEngineClient.connect(env.addr, timeout=5, expect_kv_contract=dataclasses.replace(same, block_size=32))

    asyncio.run(main())


def test_concurrent_greedy_streams_equal_offline_generate(env):
    prompts = random_prompts(tiny_config("qwen3").vocab_size, [5, 17, 9, 30, 3, 22, 12, 40], seed=11)
    ref = env.ref.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))

    async def body(c):
        outs = await asyncio.gather(*[_collect(c, f"r{i}", p, max_tokens=12, **GREEDY)
                                      for i, p in enumerate(prompts)])
        return outs, c.max_items_per_frame

    outs, most_items = _with_client(env.addr, body)
    for (tokens, deltas, last), r in zip(outs, ref):
        assert tokens == r.token_ids and last.finish_reason == "length" and deltas >= 2
        assert last.num_prompt_tokens == len(r.prompt_token_ids)
    assert most_items > 1  # the deltas of one step travel in one frame


def test_logprobs_survive_the_wire(env):
    ref = env.ref.generate([[5, 6, 7]], SamplingParams(max_tokens=4, logprobs=2, **GREEDY))[0]

    async def body(c):
        lps = []
        async for d in c.generate(GenerateRequest("lp", [5, 6, 7], {"max_tokens": 4, "logprobs": 2, **GREEDY})):
            lps += d.logprobs or []
        return lps

    lps = _with_client(env.addr, body)
    assert len(lps) == 4 and all(len(e["top"]) == 2 for e in lps)
    for got, want in zip(lps, ref.logprobs):
        assert got["token"] == pytest.approx(want["token"], abs=1e-5)
        assert [t[0] for t in got["top"]] == [t[0] for t in want["top"]]


class FakeEngine:
    """A ROUTER in this process that plays the engine, so tests can send what a real one rarely does."""

    def __init__(self):
        self.ctx = zmq.asyncio.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.addr = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.ident = b""

    async def recv(self) -> dict:
        self.ident, frame = await self.router.recv_multipart()
        return unpack(frame)

    async def send(self, msg: dict) -> None:
        await self.router.send_multipart([self.ident, pack(msg)])

    async def hello(self, instance: str = "one") -> None:
        msg = await self.recv()
        await self.send({"type": "hello", "id": msg["id"], "model_name": "fake", "max_model_len": 64,
                         "kv_contract": {"block_size": 16, "dtype": "f32", "layers": []}, "protocol_version": 1, "instance": instance})

    def close(self) -> None:
        self.router.close(linger=0)
        self.ctx.term()


def test_several_tokens_per_delta_and_deltas_of_two_requests_per_frame():
    async def main():
        fake = FakeEngine()

        async def play():
            await fake.hello()
            a, b = (await fake.recv())["request_id"], (await fake.recv())["request_id"]
            for items in ([TokenDelta(a, [1, 2, 3]), TokenDelta(b, [7])],
                          [TokenDelta(a, [4, 5], finish_reason="length"), TokenDelta(b, [8, 9], finish_reason="stop")]):
                await fake.send({"type": "deltas", "items": [d.to_wire() for d in items]})
            return a, b

        task = asyncio.create_task(play())
        c = await ZmqEngineClient.connect(fake.addr, timeout=5)
        outs = dict(zip(["x", "y"], await asyncio.gather(_collect(c, "x", [1]), _collect(c, "y", [2]))))
        first, second = await task
        c.close()
        fake.close()
        return outs, first, second

    outs, first, second = asyncio.run(main())
    assert outs[first][0] == [1, 2, 3, 4, 5] and outs[first][1] == 2 and outs[first][2].finish_reason == "length"
    assert outs[second][0] == [7, 8, 9] and outs[second][2].finish_reason == "stop"


def test_a_restarted_engine_ends_streams_that_ran_on_the_old_one():
    """Health replies from a new engine instance at the same address: the old requests are lost."""
    async def main():
        fake = FakeEngine()

        async def play():
            await fake.hello("one")
            rid = (await fake.recv())["request_id"]
            await fake.send({"type": "deltas", "items": [TokenDelta(rid, [1]).to_wire()]})
            while (msg := await fake.recv())["type"] != "health":
                pass
            await fake.send({"type": "health", "id": msg["id"], "instance": "two"})

        task = asyncio.create_task(play())
        c = await ZmqEngineClient.connect(fake.addr, timeout=5, ping_every=0.1)
        out = await _collect(c, "x", [1])
        await task
        c.close()
        fake.close()
        return out

    tokens, _, last = asyncio.run(main())
    assert tokens == [1] and last.finish_reason == "error" and "restarted" in last.error


def test_abort_and_early_close_free_blocks(env):
    async def body(c):
        stream = c.generate(GenerateRequest("closed", list(range(1, 40)), {"max_tokens": 500, **GREEDY}))
        async for d in stream:
            if d.token_ids:
                break
        await stream.aclose()  # sends abort
        last, got = None, 0
        async for d in c.generate(GenerateRequest("aborted", list(range(2, 50)), {"max_tokens": 500, **GREEDY})):
            got += len(d.token_ids)
            last = d
            if got >= 2 and d.token_ids and d.finish_reason is None:
                await c.abort("aborted")  # the stream then ends with an "abort" delta
        for _ in range(100):
            stats = await c.stats()
            if stats["num_running"] == stats["num_waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        return last, stats

    last, stats = _with_client(env.addr, body)
    assert last.finish_reason == "abort"
    assert stats["num_running"] == stats["num_waiting"] == 0 and stats["aborted"] >= 2
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_malformed_frames_get_an_error_reply_and_the_server_keeps_serving(env, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(env.addr)

    def ask(*frames: bytes) -> dict:
        sock.send_multipart(list(frames))
        assert sock.poll(5000), "no reply"
        return unpack(sock.recv())

    try:
        cases = {b"\xc1 not msgpack": "not msgpack", pickle.dumps({"type": "hello"}): "not msgpack",
                 pickle.dumps(Evil()): "not msgpack", pack([1, 2]): "msgpack map",
                 pack({"type": "frobnicate", "id": 3}): "unknown message type",
                 pack({"type": "generate", "id": 4}): "request_id",
                 pack({"type": "generate", "request_id": "r", "prompt_ids": ["a"]}): "prompt_ids",
                 pack({"type": "generate", "request_id": "r", "prompt_ids": [1], "params": {"temperature": "hot"}}):
                     "temperature",
                 pack({"type": "abort"}): "request_id", pack({"type": "hello", "protocol_version": 99}): "version"}
        for frame, why in cases.items():
            reply = ask(frame)
            assert reply["type"] == "error" and why in reply["error"], (frame, reply)
        assert ask(pack({"type": "generate", "id": 4}))["id"] == 4
        assert ask(pack({"type": "hello"}), b"extra")["type"] == "error"
        assert ask(pack({"type": "hello", "id": 9}))["model_name"] == "tiny"
        assert not marker.exists()
    finally:
        sock.close()
        ctx.term()

    async def body(c):
        bad = await _collect(c, "bad", [1, 2, 3], max_tokens=-1)
        typed = await _collect(c, "typed", [1, 2, 3], temperature="hot")
        good = await _collect(c, "good", [1, 2, 3], max_tokens=3, **GREEDY)
        return bad, typed, good

    bad, typed, good = _with_client(env.addr, body)
    assert bad[2].finish_reason == "error" and "max_tokens" in bad[2].error
    assert typed[2].finish_reason == "error" and "temperature" in typed[2].error
    assert len(good[0]) == 3 and good[2].finish_reason == "length"


def test_serving_modules_never_use_pickle():
    import nanoforge.serving as serving

    root = Path(serving.__file__).parent
    for name in ("engine_server.py", "zmq_client.py", "wire.py"):
        src = (root / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b|\bpickle\.|_pyobj", src, re.M), name


def _stream_then(addr: str, act) -> tuple[TokenDelta, float]:
    """Stream a long request, call act() after 3 tokens; the last delta and the seconds since act()."""
    async def body(c):
        got, acted, last = 0, None, None
        async for d in c.generate(GenerateRequest("long", [1, 2, 3], {"max_tokens": 900, **GREEDY})):
            got += len(d.token_ids)
            last = d
            if got >= 3 and acted is None:
                act()
                acted = time.monotonic()
        return last, time.monotonic() - acted

    return _with_client(addr, body, request_timeout=1.0)


def test_killed_engine_ends_the_stream_with_an_error(env):
    proc, addr = env.procs["kill"]
    last, waited = _stream_then(addr, lambda: os.kill(proc.pid, signal.SIGKILL))
    assert last.finish_reason == "error" and "unreachable" in last.error and addr in last.error
    assert waited < 6.0

    with pytest.raises(EngineUnreachable, match=re.escape(addr)):
        asyncio.run(ZmqEngineClient.connect(addr, timeout=0.5))


def test_sigterm_fails_running_requests_and_exits_cleanly(env):
    proc, addr = env.procs["term"]
    last, waited = _stream_then(addr, lambda: proc.send_signal(signal.SIGTERM))
    assert last.finish_reason == "error" and "shutting down" in last.error and waited < 3.0
    assert proc.wait(timeout=15) == 0


def test_connecting_to_no_engine_fails_fast_naming_the_address():
    addr = free_tcp_addr()
    start = time.monotonic()
    with pytest.raises(NanoForgeError, match=re.escape(addr)):
        asyncio.run(ZmqEngineClient.connect(addr, timeout=1.0))
    assert time.monotonic() - start < 3.0
    with pytest.raises(NanoForgeError, match="bad engine address"):
        asyncio.run(ZmqEngineClient.connect("nonsense", timeout=1.0))


def test_an_engine_without_a_registry_needs_no_redis_package(tmp_path):
    """The GPU machines have no `redis` package: an engine server that is not asked to register must
    get as far as loading its model without importing it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['redis'] = None\n"
            "from nanoforge.errors import NanoForgeError\n"
            "from nanoforge.serving.engine_server import serve_engine\n"
            "try:\n"
            f"    serve_engine({str(tmp_path / 'missing')!r}, 'tcp://127.0.0.1:0')\n"
            "except NanoForgeError as e:\n"
            "    print('loaded model first:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "loaded model first:" in run.stdout, run.stderr[-2000:]


def test_free_ports_stay_clear_of_the_kernels_ephemeral_range_and_never_repeat():
    """The ports tests and benches hand to servers they start: a TCPStore's or gloo's bind(0), or
    any outgoing connection, cannot take one before its server binds it (the flake that broke CI)."""
    from nanoforge.serving.sockets import _ephemeral_low, free_tcp_port

    ports = [free_tcp_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(1024 < p < _ephemeral_low() for p in ports)


def test_a_taken_address_fails_before_the_model_loads(tmp_path):
    """serve_engine binds first: the user learns the port is taken in a second, not after loading."""
    import zmq

    from nanoforge.serving.engine_server import serve_engine

    addr, ctx = free_tcp_addr(), zmq.Context()
    holder = ctx.socket(zmq.ROUTER)
    holder.bind(addr)
    try:
        with pytest.raises(NanoForgeError, match=f"cannot bind {re.escape(addr)}"):
            serve_engine(tmp_path / "missing", addr)  # a missing model would fail later, naming the path
    finally:
        ctx.destroy(linger=0)

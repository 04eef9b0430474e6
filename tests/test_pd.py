"""Prefill/decode disaggregation across processes (the engine-level path: test_pd_engine.py): a
prefill engine parks each request's KV after its first token, a decode engine pulls it (host-staged
over ZMQ here) and continues; the Router streams both halves as one. Greedy outputs equal one
engine's, every block is free afterwards, migration counters reach /metrics; a killed decode engine
ends its streams with an error while the prefill engine frees the KV; a lapsed registry heartbeat
takes an engine out of routing; an engine with another KV layout is refused at connect, naming the
difference. Engine processes are shared by the module."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import zmq

from hf_fixtures import random_prompts, tiny_config
from serving_fixtures import engine_stats as _stats, http_router
from nanoforge import LLM, SamplingParams, cli
from nanoforge.errors import NanoForgeError
from nanoforge.serving.engine_server import free_tcp_addr, start_engine_server, wait_engine_ready
from nanoforge.serving.protocol import GenerateRequest, TokenDelta
from nanoforge.serving.router import Router
from nanoforge.serving.wire import pack, unpack
from nanoforge.serving.zmq_client import ZmqEngineClient

pytestmark = pytest.mark.timeout(120)
GREEDY = {"temperature": 0, "ignore_eos": True}
VOCAB = tiny_config("qwen3").vocab_size


def _have_redis() -> bool:
    return shutil.which("redis-server") is not None and os.environ.get("NANOFORGE_SKIP_REDIS") != "1"


def _start_cli_engine(ckpt: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`nanoforge serve CKPT --addr ADDR ...` (the CLI's engine-server mode), not waited for."""
    addr = free_tcp_addr()
    log = tempfile.NamedTemporaryFile("wb", prefix="nanoforge-pd-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge.cli", "serve", str(ckpt), "--addr", addr, *flags],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc, addr


@pytest.fixture(scope="module")
def pd(tiny_ckpt, request):
    """prefill (started through the CLI), decode, a second decode engine that the fault tests stop
    and kill (registered in Redis when there is one), and a decode engine with 32-token blocks."""
    ckpt = tiny_ckpt("qwen3")
    registry = None
    if _have_redis():
        registry = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/5"  # a db of its own
    common = {"num_blocks": 256, "max_num_seqs": 16}
    procs = {"prefill": _start_cli_engine(ckpt, "--role", "prefill", "--num-blocks", "256", "--max-num-seqs", "16",
                                          "--kv-park-timeout", "4", "--served-model-name", "tiny"),
             "decode": start_engine_server(ckpt, role="decode", model_name="tiny", **common),
             "victim": start_engine_server(ckpt, role="decode", model_name="tiny", registry=registry,
                                           num_blocks=512, max_num_seqs=16),
             "other": start_engine_server(ckpt, role="decode", model_name="tiny", block_size=32, num_blocks=64)}
    try:
        ref = LLM(ckpt, progress=False)  # built while the servers start
        hello = {k: wait_engine_ready(proc, addr, timeout=120) for k, (proc, addr) in procs.items()}
        yield SimpleNamespace(ckpt=ckpt, ref=ref, procs=procs, hello=hello, registry=registry,
                              **{k: addr for k, (_, addr) in procs.items()})
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
            Path(proc.log_path).unlink(missing_ok=True)


def _wait_idle(addr: str, timeout: float = 8.0) -> dict:
    """The engine's stats once every block is free and nothing is parked (or the time is up)."""
    end = time.monotonic() + timeout
    while True:
        s = _stats(addr)
        if (s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0) or time.monotonic() > end:
            return s
        time.sleep(0.1)


async def _run(router, rid: str, prompt: list[int], **params) -> tuple[list[int], TokenDelta]:
    tokens, last = [], None
    async for d in router.generate(GenerateRequest(rid, prompt, params)):
        tokens += d.token_ids
        last = d
    return tokens, last


# -- (a) 32 concurrent requests through the router -----------------------------------------------
def test_pd_greedy_streams_equal_one_engine_and_free_every_block(pd):
    lengths = [3 + (i * 7) % 61 for i in range(32)]
    prompts = random_prompts(VOCAB, lengths, seed=7)
    shared = random_prompts(VOCAB, [32], seed=8)[0]
    for i in range(0, 32, 4):  # some share a prefix of two full blocks (prefix cache on both sides)
        prompts[i] = shared + prompts[i]
    want = pd.ref.generate(prompts, SamplingParams(max_tokens=9, **GREEDY))
    before = _stats(pd.decode)

    async def main():
        router = await Router.connect([pd.prefill], [pd.decode], strategy="prefix-aware")
        try:
            return await asyncio.gather(*[_run(router, f"a{i}", p, max_tokens=9, **GREEDY)
                                          for i, p in enumerate(prompts)]), await router.stats()
        finally:
            router.close()

    outs, stats = asyncio.run(main())
    for (tokens, last), w in zip(outs, want):
        assert tokens == w.token_ids and last.finish_reason == "length"
        assert last.num_prompt_tokens == len(w.prompt_token_ids)
    p, d = _wait_idle(pd.prefill), _wait_idle(pd.decode)
    for s in (p, d):
        assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0 and s["num_running"] == 0
    assert d["kv_migrations"] - before["kv_migrations"] == 32 and d["kv_migration_fallbacks"] == 0
    assert d["kv_migration_bytes"] > before["kv_migration_bytes"] and d["kv_migration_seconds"] > 0
    assert p["kv_served_bytes"] >= d["kv_migration_bytes"] - before["kv_migration_bytes"]
    assert stats["router_pd_requests"] == 32 and {e["role"] for e in stats["engines"]} == {"prefill", "decode"}


def test_pd_seeded_sampling_logprobs_and_one_token_requests_equal_one_engine(pd):
    """The decode engine gets the prefill engine's RNG state with the KV, and the first token counts
    as output there (max_tokens, penalties), so even sampled requests match one engine."""
    prompts = random_prompts(VOCAB, [10, 25], seed=1)
    cases = [{"temperature": 0.8, "seed": 5, "max_tokens": 6}, {"temperature": 0, "logprobs": 2, "max_tokens": 4},
             {"temperature": 0.9, "top_k": 20, "seed": 11, "max_tokens": 5, "repetition_penalty": 1.3},
             {"temperature": 0, "max_tokens": 1}]
    want = [pd.ref.generate(prompts, SamplingParams(ignore_eos=True, **c)) for c in cases]

    async def one(router, rid, prompt, params):
        tokens, lps, last = [], [], None
        async for d in router.generate(GenerateRequest(rid, prompt, {"ignore_eos": True, **params})):
            tokens, lps, last = tokens + d.token_ids, lps + (d.logprobs or []), d
        return tokens, lps, last

    async def main():
        router = await Router.connect([pd.prefill], [pd.decode])
        try:
            return await asyncio.gather(*[one(router, f"s{i}-{j}", p, c) for i, c in enumerate(cases)
                                          for j, p in enumerate(prompts)])
        finally:
            router.close()

    outs = iter(asyncio.run(main()))
    for c, w in zip(cases, want):
        for r in w:
            tokens, lps, last = next(outs)
            assert tokens == r.token_ids and last.finish_reason == "length", c
            if c.get("logprobs"):
                assert [e["token"] for e in lps] == pytest.approx([e["token"] for e in r.logprobs], abs=1e-4)
                assert [[t[0] for t in e["top"]] for e in lps] == [[t[0] for t in e["top"]] for e in r.logprobs]


def test_kv_pull_protocol_of_the_prefill_engine(pd):
    """kv_pull answers with the blocks' bytes (tcp) or their ids (ipc), kv_ack frees them, and an
    unknown request or a bad field gets an error naming it."""
    prompt = random_prompts(VOCAB, [40], seed=21)[0]

    async def prefill():
        c = await ZmqEngineClient.connect(pd.prefill, timeout=5)
        try:
            return [d async for d in c.generate(GenerateRequest("pull-me", prompt, {"max_tokens": 5, **GREEDY},
                                                                {"phase": "prefill"}))]
        finally:
            c.close()

    (d,) = asyncio.run(prefill())
    assert d.finish_reason == "prefilled" and len(d.token_ids) == 1
    assert d.kv == {"num_tokens": 40, "block_size": 16, "instance": pd.hello["prefill"]["instance"]}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pd.prefill)

    def ask(msg: dict) -> list[bytes]:
        sock.send(pack(msg))
        assert sock.poll(5000), "no reply"
        return sock.recv_multipart()

    try:
        head, *frames = ask({"type": "kv_pull", "id": 1, "request_id": "pull-me", "first_block": 1, "mode": "tcp"})
        h = unpack(head)
        assert h["type"] == "kv_data" and h["id"] == 1 and h["num_tokens"] == 40 and len(h["block_ids"]) == 2
        assert len(frames) == 6 and all(len(f) == 2 * 16 * 2 * 80 * 4 for f in frames) and h["nbytes"] == 6 * len(frames[0])
        head, *frames = ask({"type": "kv_pull", "id": 2, "request_id": "pull-me", "mode": "ipc"})
        assert unpack(head)["block_ids"][1:] == h["block_ids"] and not frames
        bad = unpack(ask({"type": "kv_pull", "id": 3, "request_id": "pull-me", "first_block": -1})[0])
        assert bad["type"] == "error" and "first_block" in bad["error"] and bad["id"] == 3
        assert unpack(ask({"type": "kv_ack", "id": 4, "request_id": "pull-me"})[0])["type"] == "kv_released"
        gone = unpack(ask({"type": "kv_pull", "id": 5, "request_id": "pull-me"})[0])
        assert gone["type"] == "error" and "no parked KV for request 'pull-me'" in gone["error"]
    finally:
        sock.close()
        ctx.term()
    s = _wait_idle(pd.prefill)
    assert s["kv_parked"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]


def test_whole_requests_go_to_engines_listed_with_engine(pd):
    prompt = random_prompts(VOCAB, [12], seed=9)[0]
    want = pd.ref.generate([prompt], SamplingParams(max_tokens=5, **GREEDY))[0].token_ids

    async def main():
        router = await Router.connect(engines=[pd.decode])
        try:
            return await _run(router, "whole", prompt, max_tokens=5, **GREEDY), await router.stats()
        finally:
            router.close()

    (tokens, last), stats = asyncio.run(main())
    assert tokens == want and last.finish_reason == "length" and stats["router_plain_requests"] == 1


# -- (b) the OpenAI API over the router ----------------------------------------------------------
def test_openai_chat_through_the_router_and_migration_metrics(pd):
    openai = pytest.importorskip("openai")  # here, not at import: the GPU machines (no openai, fastapi or
    # uvicorn there) run this file's PD tests through test_pd_dlslime
    from nanoforge.serving.openai_api import build_app
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    want = pd.ref.chat(messages, SamplingParams(temperature=0, max_tokens=12))[0]
    with http_router(lambda router: build_app(router, router.tokenizer, "tiny", api_key="k"),
                     prefill=[pd.prefill], decode=[pd.decode]) as url:
        oa = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30)
        r = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
        metrics = httpx.get(url + "/metrics").text
        long = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=600, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
        for _, _ in zip(range(4), long):
            pass
        long.close()  # the client goes away mid-stream: both halves of the request are aborted
        d, p = _wait_idle(pd.decode), _wait_idle(pd.prefill)
        assert d["kv_blocks_free"] == d["kv_blocks_total"] and p["kv_blocks_free"] == p["kv_blocks_total"]
        assert d["aborted"] >= 1 and p["kv_parked"] == 0 and p["kv_park_expired"] == 0
        assert d["kv_migration_fallbacks"] == 0  # the repeated prompt: all its blocks cached, none pulled
    assert r.choices[0].message.content == want.text == streamed
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == len(want.token_ids)
    got = {m[0]: float(m[1]) for m in re.findall(r"^(nanoforge_kv_migration\w*_total)\{[^}]*\} (\S+)$", metrics, re.M)}
    assert got["nanoforge_kv_migrations_total"] >= 2 and got["nanoforge_kv_migration_bytes_total"] > 0
    assert got["nanoforge_kv_migration_seconds_total"] > 0
    assert re.search(r'^nanoforge_engine_up\{engine="[^"]+",role="decode"\} 1$', metrics, re.M)


# -- (d) an engine with another KV layout ----------------------------------------------------------
def test_an_engine_with_another_kv_layout_is_refused_with_the_difference(pd, capsys):
    with pytest.raises(NanoForgeError) as e:
        asyncio.run(Router.connect([pd.prefill], [pd.other]))
    msg = str(e.value)
    assert pd.other in msg and pd.prefill in msg and "block_size: 16 vs 32" in msg

    async def direct():  # the decode engine checks too, before it pulls anything
        c = await ZmqEngineClient.connect(pd.other, timeout=5)
        try:
            pdd = {"phase": "decode", "source": pd.prefill, "source_request_id": "nope", "num_prompt": 5,
                   "num_tokens": 5}
            outs = []
            for rid in ("x", "y"):  # the second asks the source again, with the same answer
                outs.append([d async for d in c.generate(GenerateRequest(rid, [1, 2, 3, 4, 5, 6], {"max_tokens": 3},
                                                                           pdd))])
            return outs
        finally:
            c.close()

    for out in asyncio.run(direct()):
        assert out[-1].finish_reason == "error" and "incompatible KV cache layout" in out[-1].error
        assert "block_size: 16 vs 32" in out[-1].error and pd.prefill in out[-1].error
    assert _wait_idle(pd.other)["kv_blocks_free"] == 64

    for argv, why in ((["--prefill", pd.prefill, "--decode", pd.other], "block_size: 16 vs 32"),
                      ([], "no engines"), (["--engine", "nonsense"], "bad engine address 'nonsense'"),
                      (["--engine", pd.decode, "--strategy", "fastest"], "unknown routing strategy 'fastest'"),
                      (["--prefill", pd.prefill], "needs both --prefill and --decode")):
        assert cli.main(["route", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and why in err and "\n" not in err, err


# -- (e) the registry: a lapsed heartbeat takes an engine out of routing ---------------------------
def test_a_lapsed_heartbeat_removes_an_engine_from_routing(pd):
    if pd.registry is None:
        pytest.skip("no redis-server (run make setup)")
    from nanoforge.serving.registry import EngineRecord, RegistryPublisher

    pubs = [RegistryPublisher(pd.registry, EngineRecord.from_hello(pd.hello[k], getattr(pd, k)))
            for k in ("prefill", "decode")]  # the victim engine publishes itself (--registry)
    for p in pubs:
        p.start()
    victim = pd.procs["victim"][0]
    prompts = random_prompts(VOCAB, [9, 30, 17, 5], seed=13)
    want = [o.token_ids for o in pd.ref.generate(prompts, SamplingParams(max_tokens=4, **GREEDY))]
    before = _stats(pd.decode)["kv_migrations"]

    async def main():
        router = await Router.connect(registry_url=pd.registry, strategy="round-robin", timeout=5)
        try:
            end = time.monotonic() + 10
            while len(router.engines) < 3 and time.monotonic() < end:
                await asyncio.sleep(0.05)
            assert sorted(e.role for e in router.engines.values()) == ["decode", "decode", "prefill"]
            os.kill(victim.pid, signal.SIGSTOP)  # hung: its heartbeat thread stops too
            start = time.monotonic()
            while pd.victim in router.engines and time.monotonic() - start < 10:
                await asyncio.sleep(0.05)
            lapsed = time.monotonic() - start
            outs = await asyncio.gather(*[_run(router, f"e{i}", p, max_tokens=4, **GREEDY)
                                          for i, p in enumerate(prompts)])
            return lapsed, outs
        finally:
            os.kill(victim.pid, signal.SIGCONT)
            router.close()

    try:
        lapsed, outs = asyncio.run(main())
    finally:
        for p in pubs:
            p.stop()
    assert lapsed < 5.0, f"the stopped engine stayed in routing for {lapsed:.1f}s"
    assert [t for t, _ in outs] == want and all(last.finish_reason == "length" for _, last in outs)
    assert _stats(pd.decode)["kv_migrations"] - before == 4  # all on the engine that kept beating


# -- (c) a decode engine killed mid-stream ---------------------------------------------------------
def test_a_killed_decode_engine_ends_its_streams_and_the_prefill_engine_frees_the_kv(pd):
    victim = pd.procs["victim"][0]
    prompts = random_prompts(VOCAB, [20, 33, 8, 17, 41, 25], seed=17)
    late = random_prompts(VOCAB, [14, 19], seed=18)

    async def main():
        router = await Router.connect([pd.prefill], [pd.victim], timeout=5)
        started = asyncio.Event()
        counts = [0] * len(prompts)
        killed_at: list[float] = []

        async def stream(i: int, p: list[int]):
            last = None
            async for d in router.generate(GenerateRequest(f"c{i}", p, {"max_tokens": 900, **GREEDY})):
                counts[i] += len(d.token_ids)
                last = d
                if min(counts) >= 3:
                    started.set()
            return last, time.monotonic()

        async def killer():
            await asyncio.wait_for(started.wait(), 30)
            victim.kill()
            killed_at.append(time.monotonic())
            # requests that arrive now are prefilled and parked, then their decode half fails
            return await asyncio.gather(*[stream_late(i, p) for i, p in enumerate(late)])

        async def stream_late(i: int, p: list[int]):
            return await _run(router, f"late{i}", p, max_tokens=900, **GREEDY)

        try:
            outs, late_outs = await asyncio.gather(asyncio.gather(*[stream(i, p) for i, p in enumerate(prompts)]),
                                                   killer())
        finally:
            router.close()
        return outs, late_outs, killed_at[0]

    outs, late_outs, killed_at = asyncio.run(main())
    for last, when in outs:
        assert last.finish_reason == "error" and pd.victim in last.error, last
        assert when - killed_at < 6.0
    for tokens, last in late_outs:
        assert last.finish_reason == "error" and len(tokens) == 1  # the first token came from prefill
    s = _wait_idle(pd.prefill)
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["kv_parked"] == 0 and s["num_running"] == 0


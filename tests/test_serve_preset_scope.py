"""`nanoforge serve --model-preset` (random weights of a known config, no checkpoint) and
`--registry-scope` (deployments sharing one Redis), with real engine processes started through the
CLI: scope A holds a prefill and a decode engine of the qwen3-tiny preset, scope B one co-located
engine of it. A router of either scope routes only to its own engines (PD in A, whole requests in
B), their greedy tokens equal an in-process engine of the preset, and a router of a third scope
or of none finds no engine. Bad flags are one-line errors before anything loads."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import uuid
from types import SimpleNamespace

import pytest

from nanoforge import LLM, SamplingParams, cli
from nanoforge.errors import NanoForgeError
from nanoforge.models.presets import PRESETS
from nanoforge.models.random_checkpoint import preset_checkpoint
from nanoforge.serving.engine_server import free_tcp_addr, stop_engine_server, wait_engine_ready
from nanoforge.serving.protocol import GenerateRequest
from nanoforge.serving.router import Router
from nanoforge.serving.zmq_client import ZmqEngineClient

pytestmark = pytest.mark.timeout(180)
GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 6}


def _serve(*flags: str) -> tuple[subprocess.Popen, str]:
    addr = free_tcp_addr()
    log = tempfile.NamedTemporaryFile("wb", prefix="nanoforge-scope-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge.cli", "serve", "--model-preset", "qwen3-tiny",
                             "--addr", addr, "--num-blocks", "64", "--max-num-seqs", "8", *flags],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc, addr


@pytest.fixture(scope="module")
def scopes(redis_url):
    a, b = f"pd-{uuid.uuid4().hex[:6]}", f"co-{uuid.uuid4().hex[:6]}"
    reg = ["--registry", redis_url]
    procs = {"prefill": _serve("--role", "prefill", *reg, "--registry-scope", a),
             "decode": _serve("--role", "decode", *reg, "--registry-scope", a),
             "both": _serve(*reg, "--registry-scope", b)}
    try:
        ref = LLM(preset_checkpoint("qwen3-tiny"), progress=False, num_blocks=64)  # while the servers start
        hello = {k: wait_engine_ready(p, addr, timeout=150) for k, (p, addr) in procs.items()}
        yield SimpleNamespace(a=a, b=b, url=redis_url, ref=ref, hello=hello,
                              **{k: addr for k, (_, addr) in procs.items()})
    finally:
        for p, _ in procs.values():
            stop_engine_server(p, timeout=20)


async def _requests(addr: str) -> int:
    c = await ZmqEngineClient.connect(addr, timeout=5)
    try:
        return (await c.stats())["requests"]
    finally:
        c.close()


def test_engines_in_two_scopes_never_route_to_each_other(scopes):
    prompts = [[(7 * i + j) % 4096 for j in range(20 + 3 * i)] for i in range(4)]
    want = [o.token_ids for o in scopes.ref.generate(prompts, SamplingParams(**GREEDY))]
    assert scopes.hello["prefill"]["model_name"] == "qwen3-tiny" and scopes.hello["both"]["checkpoint_kind"] == "random"

    async def main():
        before = {k: await _requests(getattr(scopes, k)) for k in ("prefill", "decode", "both")}
        ra = await Router.connect(registry_url=scopes.url, registry_scope=scopes.a, wait_for_engines=20)
        rb = await Router.connect(registry_url=scopes.url, registry_scope=scopes.b, wait_for_engines=20)
        try:
            await asyncio.sleep(1.2)  # a few more registry polls: nothing of the other scope shows up
            assert {a: e.role for a, e in ra.engines.items()} == {scopes.prefill: "prefill", scopes.decode: "decode"}
            assert {a: e.role for a, e in rb.engines.items()} == {scopes.both: "both"}

            async def run(router, rid, prompt):
                return [t async for d in router.generate(GenerateRequest(rid, prompt, GREEDY)) for t in d.token_ids]

            got_a = await asyncio.gather(*(run(ra, f"a{i}", p) for i, p in enumerate(prompts)))
            got_b = await asyncio.gather(*(run(rb, f"b{i}", p) for i, p in enumerate(prompts)))
            counters = (ra.counters, rb.counters)
        finally:
            ra.close()
            rb.close()
        after = {k: await _requests(getattr(scopes, k)) for k in ("prefill", "decode", "both")}
        return got_a, got_b, counters, {k: after[k] - before[k] for k in after}

    got_a, got_b, (ca, cb), served = asyncio.run(main())
    assert got_a == want and got_b == want  # the preset's weights are the same in every process
    assert ca["pd_requests"] == 4 and ca["plain_requests"] == 0 and cb["plain_requests"] == 4
    assert served == {"prefill": 4, "decode": 4, "both": 4}


def test_a_router_of_another_scope_or_none_finds_no_engine(scopes):
    for scope, where in ((f"none-{uuid.uuid4().hex[:6]}", " in scope"), (None, "")):
        with pytest.raises(NanoForgeError, match=f"no engine registered at {scopes.url}{where}"):
            asyncio.run(Router.connect(registry_url=scopes.url, registry_scope=scope, wait_for_engines=1.0))


@pytest.mark.parametrize("argv, msg", [
    (["serve", "--model-preset", "nope", "--addr", "tcp://127.0.0.1:1"],
     "--model-preset 'nope': not a preset; known: " + ", ".join(PRESETS)),
    (["serve", "--model-preset", "nope"], "--model-preset 'nope': not a preset; known: qwen3-0.6b"),
    (["serve", "some/ckpt", "--model-preset", "qwen3-tiny"], "give MODEL (some/ckpt) or --model-preset qwen3-tiny, "
                                                             "not both"),
    (["serve", "--role", "prefill"], "give MODEL (a plan dir or checkpoint) or --model-preset NAME"),
    (["serve", "--model-preset", "qwen3-tiny", "--addr", "tcp://127.0.0.1:1", "--registry", "redis://127.0.0.1:1",
      "--registry-scope", "a b"], "--registry-scope 'a b': expected 1-64 letters"),
    (["serve", "--model-preset", "qwen3-tiny", "--role", "decode", "--registry-scope", "a"],
     "--registry-scope needs --registry"),
    (["serve", "--model-preset", "qwen3-tiny", "--registry-scope", "a"], "--registry, --registry-scope and "
                                                                         "--advertise-addr are for engine servers"),
    (["route", "--registry-scope", "a"], "--registry-scope needs --registry"),
    (["route", "--registry", "redis://127.0.0.1:1", "--registry-scope", "a:b"], "--registry-scope 'a:b': expected"),
])
def test_bad_preset_and_scope_flags_are_one_line_errors(argv, msg, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err

"""Router: one EngineClient over several engine servers, so `nanoforge route` serves the same
OpenAI API as `nanoforge serve`. With prefill and decode engines, a request is prefilled on one
(which samples its first token and parks the KV), streamed its first token, then continued on a
decode engine that pulls the KV from the prefill engine (serving/kv_migration.py); with only
"both" engines, whole requests are routed. EPD: with encode engines (encode_server.py), a request that
carries images has them encoded there first and goes on with the embeddings instead (so no prefill engine
runs its vision tower); text-only requests skip them, and a dead encode engine fails image requests only.
Engines come from address lists or a Redis registry
(added when they appear, dropped when their heartbeat lapses). Every engine must serve the same
checkpoint with the same KV contract: checked at connect, naming both engines and the difference.
Needs no torch: it only moves token ids and msgpack frames."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from ..errors import NanoForgeError
from ..kv_contract import KVContract
from .protocol import GenerateRequest, TokenDelta
from .routing import EngineLoad, make_strategy
from .zmq_client import ZmqEngineClient

log = logging.getLogger("nanoforge.serving")
ROLES = ("both", "prefill", "decode", "encode")
ENCODE_TIMEOUT = 120.0  # seconds one request's images may take on an encode engine that still answers pings
# engine stats that add up over engines
SUM_KEYS = ("num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free", "prefix_cache_queries",
            "prefix_cache_hits", "prompt_tokens", "generated_tokens", "steps", "preemptions", "requests", "finished",
            "aborted", "rejected", "errors", "kv_migrations", "kv_migration_bytes", "kv_migration_seconds",
            "kv_migration_fallbacks", "kv_parked", "kv_served_bytes", "kv_park_expired", "images_encoded",
            "image_cache_hits", "kv_staged", "kv_staging_full", "kv_staging_held", "kv_staging_bytes")
PER_ENGINE_KEYS = ("kv_usage", "num_running", "num_waiting", "kv_blocks_free", "kv_blocks_total", "kv_parked",
                   "kv_migrations", "kv_migration_bytes")


@dataclass
class _Engine:
    client: ZmqEngineClient
    role: str
    load: EngineLoad

    @property
    def addr(self) -> str:
        return self.client.addr


class Router:
    def __init__(self, strategy: str = "round-robin", model_name: str | None = None, connect_timeout: float = 10.0):
        make_strategy(strategy)  # an unknown name fails here, naming the choices
        self.strategy, self.connect_timeout = strategy, connect_timeout
        self.model_name, self.max_model_len, self.tokenizer = model_name or "", 0, None
        self.engines: dict[str, _Engine] = {}  # by address
        self.strategies: dict[str, Any] = {}  # one per pool ("prefill", "decode", "both", "any")
        self.ref: tuple[str, dict[str, Any]] | None = None  # the first engine's hello: all must match it
        self.fingerprint: tuple[str, Any, Any] | None = None  # (addr, checkpoint, fingerprint) of the first encode engine
        self.requests: dict[str, list[_Engine]] = {}  # request id -> engines it is running on
        self.counters = {"pd_requests": 0, "plain_requests": 0, "engines_removed": 0, "encode_requests": 0,
                         "encode_failures": 0}
        self.watcher: Any = None
        self._watch: asyncio.Task | None = None

    @classmethod
    async def connect(cls, prefill: list[str] = (), decode: list[str] = (), engines: list[str] = (),  # type: ignore[assignment]
                      *, encode: list[str] = (), registry_url: str | None = None,  # type: ignore[assignment]
                      strategy: str = "round-robin", model_name: str | None = None, timeout: float = 10.0, wait_for_engines: float = 10.0,
                      registry_scope: str | None = None) -> "Router":
        """Connect to every listed engine (and those the registry holds in `registry_scope`; None:
        the unscoped ones), or raise naming what is wrong."""
        if registry_scope is not None:  # a bad scope fails before any connection
            from .registry import check_scope

            if check_scope(registry_scope) and not registry_url:
                raise NanoForgeError("--registry-scope needs --registry redis://HOST:PORT")
        self = cls(strategy, model_name, timeout)
        try:
            if bool(prefill) != bool(decode):
                raise NanoForgeError("PD routing needs both --prefill and --decode engines "
                                     f"(got {len(prefill)} prefill, {len(decode)} decode)")
            for role, addrs in (("prefill", prefill), ("decode", decode), ("both", engines), ("encode", encode)):
                for addr in addrs:
                    await self.add_engine(addr, role)
            if registry_url:
                await self._start_registry(registry_url, wait_for_engines, registry_scope)
            if not self._pool("any"):
                raise NanoForgeError("no engines: give --prefill and --decode addresses, --engine, or --registry"
                                     + (" (encode engines only encode images; requests need one of those)"
                                        if self.engines else ""))
        except BaseException:
            self.close()
            raise
        return self

    # -- membership ------------------------------------------------------------------------------
    async def add_engine(self, addr: str, role: str | None = None, instance: str | None = None) -> None:
        """Connect to an engine server, check it matches the others, and route to it; role None
        takes the engine's own."""
        if addr in self.engines:
            raise NanoForgeError(f"engine at {addr} is listed twice")
        client = await ZmqEngineClient.connect(addr, timeout=self.connect_timeout, load_tokenizer=self.tokenizer is None)
        hello = client.info
        role = role or hello.get("role", "both")
        problem = None if role in ROLES else f"engine at {addr}: role {role!r} is not one of {', '.join(ROLES)}"
        problem = problem or self._incompatible(addr, hello) or (
            f"engine at {addr} is a new instance" if instance not in (None, hello.get("instance")) else None)
        if problem:
            client.close()
            raise NanoForgeError(problem)
        if (role == "encode") != (hello.get("role") == "encode"):  # one runs the vision tower only
            client.close()
            raise NanoForgeError(f"engine at {addr} is a{'n' if hello.get('role', 'both') == 'encode' else ''} "
                                 f"{hello.get('role', 'both')} engine; it cannot be routed as {role}")
        if hello.get("role", "both") not in (role, "both"):
            log.warning("engine at %s says it is a %s engine; routing it as %s", addr, hello.get("role"), role)
        if role == "encode":
            self.fingerprint = self.fingerprint or (addr, hello.get("checkpoint_path"), hello.get("model_fingerprint"))
        else:
            if self.ref is None:
                self.ref = (addr, hello)
                self.model_name = self.model_name or client.model_name
            self.max_model_len = min(self.max_model_len or client.max_model_len, client.max_model_len)
        self.tokenizer = self.tokenizer or client.tokenizer
        self.engines[addr] = _Engine(client, role, EngineLoad(addr))
        log.info("routing to the %s engine at %s", role, addr)

    def _incompatible(self, addr: str, hello: dict[str, Any]) -> str | None:
        """Why an engine cannot join the others: another checkpoint, or (not for an encode engine, which
        keeps no KV) another KV cache layout."""
        first = self.fingerprint if self.ref is None else \
            (self.ref[0], self.ref[1].get("checkpoint_path"), self.ref[1].get("model_fingerprint"))
        if first is not None and first[2] and hello.get("model_fingerprint") and \
                first[2] != hello.get("model_fingerprint"):
            return (f"engine at {addr} serves another checkpoint than the engine at {first[0]} "
                    f"({hello.get('checkpoint_path')} vs {first[1]})")
        if self.ref is None or hello.get("role") == "encode":
            return None
        ref_addr, ref = self.ref
        diff = KVContract.from_json(ref["kv_contract"], f"engine at {ref_addr}: kv_contract").mismatches(
            KVContract.from_json(hello["kv_contract"], f"engine at {addr}: kv_contract"))
        if diff:
            return (f"engine at {addr} ({hello.get('kv_layout', 'one rank')}) is incompatible with the engine at "
                    f"{ref_addr} ({ref.get('kv_layout', 'one rank')}): their KV cache layouts differ and cannot be "
                    f"re-split ({'; '.join(diff)}; listed as {ref_addr} vs {addr})")
        return None

    def remove_engine(self, addr: str, why: str) -> None:
        """Stop routing to an engine; its running streams end with an error saying why."""
        e = self.engines.pop(addr, None)
        if e is None:
            return
        for s in self.strategies.values():
            s.forget(addr)
        self.counters["engines_removed"] += 1
        log.warning("not routing to the engine at %s any more: %s", addr, why)
        e.client.close(why=f"engine at {addr} {why}")

    async def _start_registry(self, url: str, wait: float, scope: str | None = None) -> None:
        from .registry import RegistryWatcher

        self.watcher = RegistryWatcher(url, scope=scope)
        self._watch = asyncio.get_running_loop().create_task(self.watcher.watch(self._on_registry))
        deadline = time.monotonic() + wait
        while not self.engines and time.monotonic() < deadline:
            if self._watch.done():
                self._watch.result()  # the first snapshot failed: Redis unreachable, say so
            await asyncio.sleep(0.05)
        if not self.engines:
            where = f" in scope {scope!r}" if scope is not None else ""
            raise NanoForgeError(f"no engine registered at {url}{where} within {wait:g}s")

    async def _on_registry(self, added: list[Any], removed: list[Any]) -> None:
        for r in removed:
            e = self.engines.get(r.addr)
            if e is not None and e.client.info.get("instance") == r.instance:
                self.remove_engine(r.addr, "left the registry (its heartbeat lapsed)")

        async def add(r: Any) -> None:
            try:
                await self.add_engine(r.addr, r.role, r.instance)
            except NanoForgeError as e:
                log.error("registry: not routing to %s: %s", r.addr, e)

        await asyncio.gather(*(add(r) for r in added if r.addr not in self.engines))

    # -- the EngineClient protocol -----------------------------------------------------------------
    def _pool(self, role: str) -> list[_Engine]:
        """The engines of a role; "any": every engine that serves requests (not the encode engines)."""
        return [e for e in self.engines.values() if e.role == role or (role == "any" and e.role != "encode")]

    def _choose(self, pool: str, prompt: list[int]) -> _Engine | None:
        engines = self._pool(pool)
        if not engines:
            return None
        if pool not in self.strategies:
            bs = {"block_size": self.ref[1]["kv_contract"]["block_size"]} if self.ref else {}
            self.strategies[pool] = make_strategy(self.strategy, **(bs if self.strategy == "prefix-aware" else {}))
        chosen = self.strategies[pool].choose([e.load for e in engines], prompt)
        return next(e for e in engines if e.load is chosen)

    @contextlib.contextmanager
    def _on(self, rid: str, e: _Engine):
        e.load.in_flight += 1
        self.requests.setdefault(rid, []).append(e)
        try:
            yield
        finally:
            e.load.in_flight -= 1
            with contextlib.suppress(ValueError):
                self.requests.get(rid, []).remove(e)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        rid = request.request_id
        if rid in self.requests:
            yield TokenDelta(rid, finish_reason="error", error="duplicate request id")
            return
        self.requests[rid] = []
        try:
            if request.images and self._pool("encode"):  # EPD: the images' embeddings travel instead
                embeds, failed = await self._encode(request)
                if failed is not None:
                    yield failed
                    return
                request = replace(request, images=None, image_embeds=embeds)
            if self._pool("prefill") and self._pool("decode"):
                self.counters["pd_requests"] += 1
                async with contextlib.aclosing(self._generate_pd(request)) as stream:
                    async for d in stream:
                        yield d
                return
            self.counters["plain_requests"] += 1
            e = self._choose("both", request.prompt_ids) or self._choose("any", request.prompt_ids)
            if e is None:
                yield TokenDelta(rid, finish_reason="error", num_prompt_tokens=len(request.prompt_ids),
                                 error="no engine available (none registered, or all left)")
                return
            with self._on(rid, e):
                async with contextlib.aclosing(e.client.generate(request)) as stream:  # closing us aborts it
                    async for d in stream:
                        yield d
        finally:
            self.requests.pop(rid, None)

    async def _encode(self, req: GenerateRequest) -> tuple[list[dict] | None, TokenDelta | None]:
        """(the encode engine's map per image, None), or (None, the error delta ending the request): an
        image it cannot read is the client's fault (a 400); an encode engine that is gone or failed is
        the service's ("engine unavailable": a 503), named."""
        rid, n, images = req.request_id, len(req.prompt_ids), list(req.images or ())
        e: _Engine = self._choose("encode", req.prompt_ids)  # type: ignore[assignment]
        self.counters["encode_requests"] += 1
        with self._on(rid, e):
            try:
                reply = await e.client.encode(images, ENCODE_TIMEOUT)
            except NanoForgeError as ex:
                self.counters["encode_failures"] += 1
                return None, TokenDelta(rid, finish_reason="error", num_prompt_tokens=n,
                                        error=f"engine unavailable: the encode engine at {e.addr} did not encode "
                                              f"the request's images ({ex})")
        items = reply.get("items")
        if reply.get("error") or not isinstance(items, list) or len(items) != len(images):
            why = reply.get("error") or f"the encode engine at {e.addr} answered {len(items or [])} of {len(images)} images"
            return None, TokenDelta(rid, finish_reason="error", num_prompt_tokens=n, error=str(why))
        return items, None

    async def _generate_pd(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        rid, prompt, n = req.request_id, list(req.prompt_ids), len(req.prompt_ids)
        p = self._choose("prefill", prompt)
        media = {"images": req.images, "image_embeds": req.image_embeds, "fit_max_tokens": req.fit_max_tokens}
        first: TokenDelta | None = None
        with self._on(rid, p):  # type: ignore[arg-type]
            stream = p.client.generate(GenerateRequest(rid, prompt, req.params, {"phase": "prefill"}, **media))  # type: ignore[union-attr]
            async with contextlib.aclosing(stream):
                async for d in stream:
                    if d.finish_reason == "prefilled":
                        first = d
                    else:  # finished at its first token, failed, or an engine that knows no PD streams on
                        yield d
        if first is not None and not (first.kv or {}).get("num_tokens"):
            yield TokenDelta(rid, finish_reason="error", num_prompt_tokens=n,
                             error=f"prefill engine at {p.addr} parked the request without KV details")  # type: ignore[union-attr]
            return
        if first is None:
            return
        ended = False
        n = first.num_prompt_tokens or n  # with images: the prompt as the prefill engine expanded it
        try:
            yield TokenDelta(rid, first.token_ids, first.logprobs, None, n, first.num_cached_tokens)
            dec = self._choose("decode", prompt)
            if dec is None:
                yield TokenDelta(rid, finish_reason="error", num_prompt_tokens=n, error="no decode engine available")
                return
            # num_prompt: the prompt sent (a decode engine expands its image placeholders as the prefill one did)
            pd = {"phase": "decode", "source": p.addr, "source_request_id": rid, "num_prompt": len(prompt),  # type: ignore[union-attr]
                  "num_tokens": first.kv["num_tokens"]}  # type: ignore[index]
            with self._on(rid, dec):
                stream = dec.client.generate(GenerateRequest(rid, prompt + first.token_ids, req.params, pd, **media))
                async with contextlib.aclosing(stream):
                    async for d in stream:
                        d.num_prompt_tokens, d.num_cached_tokens = n, first.num_cached_tokens
                        ended = d.finish_reason in ("stop", "length")
                        yield d
        finally:
            if not ended and not p.client.closed:  # type: ignore[union-attr]
                await p.client.abort(rid)  # type: ignore[union-attr]  # frees the parked KV if never pulled

    async def abort(self, request_id: str) -> None:
        for e in list(self.requests.get(request_id, [])):
            await e.client.abort(request_id)

    async def stats(self) -> dict[str, Any]:
        """The engines' counters summed, KV usage over all pools, and one entry per engine."""
        engines = list(self.engines.values())
        results = await asyncio.gather(*(e.client.stats() for e in engines), return_exceptions=True)
        total: dict[str, Any] = {k: 0 for k in SUM_KEYS}
        per = []
        for e, r in zip(engines, results):
            up = isinstance(r, dict)
            if up:
                for k in SUM_KEYS:
                    total[k] += r.get(k, 0)
                e.load.kv_usage, e.load.num_waiting = r.get("kv_usage", 0.0), r.get("num_waiting", 0)
            per.append({"addr": e.addr, "role": e.role, "up": up, "in_flight": e.load.in_flight,
                        **({k: r[k] for k in PER_ENGINE_KEYS if k in r} if up else {})})  # type: ignore[index]
        if not any(x["up"] for x in per):
            raise NanoForgeError("no engine answered: " + ("; ".join(str(r) for r in results) or "none connected"))
        total["kv_usage"] = 1 - total["kv_blocks_free"] / max(total["kv_blocks_total"], 1)
        return {**total, "engines": per, **{f"router_{k}": v for k, v in self.counters.items()}}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.watcher is not None:
            self.watcher.close()
        for addr in list(self.engines):
            self.engines.pop(addr).client.close(why="router is closed")

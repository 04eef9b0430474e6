"""ZmqEngineClient: an EngineClient for an engine server in another process (engine_server.py).
One DEALER socket per client, used only from the event loop that connected it; one reader task
routes "deltas" frames to per-request queues and replies to waiting futures. A watchdog pings the
engine while requests are in flight and, when it hears nothing for `dead_after` seconds, ends every
stream with an error delta, so a dead or hung engine never leaves a front end waiting."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from ..errors import NanoForgeError
from ..kv_contract import KVContract
from .protocol import GenerateRequest, TokenDelta
from .wire import PROTOCOL_VERSION, pack, unpack

log = logging.getLogger("nanoforge.serving")
_REPLY_KEYS = ("type", "id")


class EngineUnreachable(NanoForgeError):
    """No reply from the engine in time (it died, hangs, or never ran at that address)."""


class ZmqEngineClient:
    def __init__(self, addr: str, *, dead_after: float = 3.0, ping_every: float = 0.5,
                 request_timeout: float = 5.0):
        self.addr, self.request_timeout = addr, request_timeout
        self.dead_after, self.ping_every = dead_after, ping_every  # seconds of silence: fail streams / ping
        self.model_name, self.max_model_len = "", 0
        self.kv_contract: KVContract | None = None
        self.info: dict[str, Any] = {}  # the hello reply
        self.tokenizer: Any = None  # loaded by connect(load_tokenizer=True)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        # a fixed identity: after a dropped connection the server routes our streams to the new one
        self.sock.setsockopt(zmq.ROUTING_ID, b"nf-" + uuid.uuid4().hex.encode())
        for opt, v in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            self.sock.setsockopt(opt, v)
        self.queues: dict[str, asyncio.Queue[TokenDelta]] = {}
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.watched: set[int] = set()  # pending calls the watchdog guards as it guards streams (encode)
        self._ids = itertools.count(1)
        self._heard = time.monotonic()  # last frame from the engine, or when requests started waiting
        self._tasks: list[asyncio.Task] = []
        self.closed = False
        self.frames = self.max_items_per_frame = 0  # observability (tests check step batching)

    @classmethod
    async def connect(cls, addr: str, timeout: float = 10.0, load_tokenizer: bool = False,
                      expect_kv_contract: KVContract | None = None, **kw: Any) -> "ZmqEngineClient":
        """Connect and handshake; a wrong address, no engine answering within `timeout`, or (with
        `expect_kv_contract`) an engine whose KV layout differs from the caller's raises."""
        self = cls(addr, **kw)
        try:
            self.sock.connect(addr)
        except zmq.ZMQError as e:
            self.close()
            raise NanoForgeError(f"bad engine address {addr!r}: {e}") from None
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader()), loop.create_task(self._watchdog())]
        try:
            hello = await self._request({"type": "hello", "protocol_version": PROTOCOL_VERSION}, timeout)
        except EngineUnreachable:
            self.close()
            raise EngineUnreachable(f"no engine answered at {addr} within {timeout:g}s (is the engine server "
                                    "running there?)") from None
        except NanoForgeError:
            self.close()
            raise
        if hello.get("protocol_version") != PROTOCOL_VERSION:
            self.close()
            raise NanoForgeError(f"engine at {addr} speaks protocol {hello.get('protocol_version')!r}, this client "
                                 f"{PROTOCOL_VERSION}; upgrade one side")
        self.info = hello
        self.model_name, self.max_model_len = hello["model_name"], hello["max_model_len"]
        try:
            self.kv_contract = KVContract.from_json(hello.get("kv_contract"), f"engine at {addr}: kv_contract")
        except NanoForgeError:
            self.close()
            raise
        if expect_kv_contract is not None:
            diff = expect_kv_contract.mismatches(self.kv_contract)
            if diff:
                self.close()
                raise NanoForgeError(f"engine at {addr} has an incompatible KV cache layout: {'; '.join(diff)}")
        if load_tokenizer and hello.get("checkpoint_path") and hello.get("checkpoint_kind") != "random":  # a preset
            self.tokenizer = _load_tokenizer(hello["checkpoint_path"])
        return self

    # -- the EngineClient protocol -------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        rid = request.request_id
        try:
            msg = {"type": "generate", "request_id": rid, "prompt_ids": list(request.prompt_ids),
                   "params": dict(request.params)}
            if request.pd is not None:
                msg["pd"] = dict(request.pd)
            if request.images:  # msgpack bin, never pickle
                msg["images"] = [bytes(b) for b in request.images]
            if request.image_embeds:  # an encode engine's maps, passed on as they came
                msg["image_embeds"] = list(request.image_embeds)
            if request.media:
                msg["fit_max_tokens"] = request.fit_max_tokens
            frame = pack(msg)
            why = "client is closed" if self.closed else "duplicate request id" if rid in self.queues else None
        except (TypeError, ValueError, OverflowError) as e:  # as the engine loop would answer a bad value
            why = f"request cannot be sent: {e}"
        if why is not None:
            yield TokenDelta(rid, finish_reason="error", num_prompt_tokens=len(request.prompt_ids), error=why)
            return
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()
        if not self.queues:  # silence while nothing was in flight is not a failure
            self._heard = max(self._heard, time.monotonic())
        self.queues[rid] = q
        finished = False
        try:
            self._post(frame)
            while not finished:
                d = await q.get()
                finished = d.finish_reason is not None
                yield d
        finally:
            self.queues.pop(rid, None)
            if not finished and not self.closed:
                self._post({"type": "abort", "request_id": rid})

    async def abort(self, request_id: str) -> None:
        self._post({"type": "abort", "request_id": request_id})

    async def stats(self) -> dict[str, Any]:
        reply = await self._request({"type": "stats"}, self.request_timeout)
        return {k: v for k, v in reply.items() if k not in _REPLY_KEYS}

    async def encode(self, images: list[bytes], timeout: float = 120.0) -> dict[str, Any]:
        """An encode engine's answer for these images (encode_server.py): {"items": [one map per image]},
        or {"error": why} for an image it cannot read. A dead engine raises, as a silent one does after
        dead_after seconds (the watchdog pings while it encodes), or one that takes over `timeout`."""
        if not self.queues and not self.watched:
            self._heard = max(self._heard, time.monotonic())
        reply = await self._request({"type": "encode", "images": [bytes(b) for b in images]}, timeout, watch=True)
        return {k: v for k, v in reply.items() if k not in _REPLY_KEYS}

    async def shutdown(self) -> None:
        """Ask the engine server to stop (it fails its running requests first)."""
        await self._request({"type": "shutdown"}, self.request_timeout)

    def close(self, why: str = "client is closed") -> None:
        """End every stream and pending call (with `why`), stop the tasks, close the socket."""
        if self.closed:
            return
        self.closed = True
        self._fail_all(why)
        for t in self._tasks:
            t.cancel()
        self.sock.close(linger=0)
        self.ctx.term()

    # -- internals -------------------------------------------------------------------------------
    def _post(self, msg: dict[str, Any] | bytes) -> None:
        """Send without waiting: with no HWM the send completes at once (queued until connected)."""
        if self.closed:
            return
        fut = self.sock.send(msg if isinstance(msg, bytes) else pack(msg))
        if not fut.done():
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _request(self, msg: dict[str, Any], timeout: float, watch: bool = False) -> dict[str, Any]:
        """The reply to `msg`; with `watch`, the watchdog fails it too once the engine is silent too long."""
        if self.closed:
            raise NanoForgeError(f"client for {self.addr} is closed")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        if watch:
            self.watched.add(rid)
        try:
            self._post({**msg, "id": rid})
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise EngineUnreachable(f"engine at {self.addr} unreachable: no reply to {msg['type']} within "
                                    f"{timeout:g}s") from None
        finally:
            self.pending.pop(rid, None)
            self.watched.discard(rid)

    async def _reader(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            self._heard = time.monotonic()
            try:
                self._dispatch(unpack(frames[-1]))
            except Exception as e:  # a bad frame must not kill the reader (and hang every stream)
                log.warning("engine at %s sent a bad frame: %s", self.addr, e)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind, instance = msg["type"], msg.get("instance")
        if instance is not None and self.info.get("instance") not in (None, instance):
            # a new engine process at the same address answers: what ran on the old one is lost
            self.info["instance"] = instance
            self._fail_all(f"engine at {self.addr} restarted; its running requests are lost", futures=False)
        if kind == "deltas":
            items = msg.get("items") or []
            self.frames += 1
            self.max_items_per_frame = max(self.max_items_per_frame, len(items))
            for item in items:
                d = TokenDelta.from_wire(item)
                q = self.queues.get(d.request_id)
                if q is not None:
                    q.put_nowait(d)
            return
        fut = self.pending.get(msg.get("id"))  # type: ignore[arg-type]
        if kind == "error":
            err = f"engine at {self.addr}: {msg.get('error')}"
            q = self.queues.get(msg.get("request_id"))  # type: ignore[arg-type]
            if q is not None:
                q.put_nowait(TokenDelta(msg["request_id"], finish_reason="error", error=err))
            if fut is not None and not fut.done():
                fut.set_exception(NanoForgeError(err))
            if q is None and fut is None:
                log.warning("%s", err)
        elif fut is not None and not fut.done():
            fut.set_result(msg)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(min(self.ping_every, self.dead_after / 4))
            if not self.queues and not self.watched:
                continue
            silent = time.monotonic() - self._heard
            if silent >= self.dead_after:
                log.error("engine at %s unreachable for %.1fs; failing %d requests", self.addr, silent,
                          len(self.queues) + len(self.watched))
                self._fail_all(f"engine at {self.addr} unreachable (no answer for {silent:.1f}s)")
                self._heard = time.monotonic()
            elif silent >= self.ping_every:
                self._post({"type": "health", "id": next(self._ids)})  # any reply refreshes _heard

    def _fail_all(self, why: str, futures: bool = True) -> None:
        for rid, q in list(self.queues.items()):
            q.put_nowait(TokenDelta(rid, finish_reason="error", error=why))
        for fut in self.pending.values() if futures else ():
            if not fut.done():
                fut.set_exception(NanoForgeError(why))


def _load_tokenizer(path: str) -> Any:
    """The engine's tokenizer, when its checkpoint is readable from here (same host or shared disk)."""
    from ..models.checkpoint import open_checkpoint
    from ..runtime.tokenizer import Tokenizer

    try:
        return Tokenizer.from_checkpoint(open_checkpoint(path))
    except (NanoForgeError, OSError) as e:
        log.warning("no tokenizer from %s: %s", path, e)
        return None

"""The encode engine of EPD (`nanoforge serve MODEL --addr ADDR --role encode`): a process that loads only a
vision-language plan's `encode` function (the vision tower's params, no language model, no KV pool) and turns
images into embeddings for the prefill engines, which then never run their own tower for them.

It speaks the engine servers' wire (ZMQ ROUTER, one msgpack map a frame, never pickle):

  in:  hello {protocol_version?}   encode {id, images: [bin, ...]}   stats | health   shutdown
  out: hello {model_name, role: "encode", kv_contract, model_fingerprint, instance, ...}
       encoded {id, items: [runtime/image_embeds.py map per image]} or encoded {id, error} (an image it
       cannot read: the client's fault)   stats | health {counters}   error {id, error}

The router (router.py) sends a request's images here first and passes the maps on with the request. Images are
encoded on a worker thread, so the I/O loop keeps answering the router's health pings while it works: a silent
encode engine is a dead one. The encoder's cache by image hash means a repeated image is encoded once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from ..errors import NanoForgeError
from .sockets import bind_router, run_loop, wake_pair
from .wire import PROTOCOL_VERSION, Malformed, error_reply, pack, unpack_body

log = logging.getLogger("nanoforge.serving")


def model_fingerprint(plan: Any) -> str:
    """Short hash of the plan's checkpoint fingerprint: engines of one model agree on it (router checks)."""
    return hashlib.blake2b(json.dumps(plan.checkpoint.fingerprint, sort_keys=True).encode(), digest_size=8).hexdigest()


class EncodeServer:
    """`encoder` has encode(list[bytes]) -> list[dict] (raising NanoForgeError naming a bad image) and
    stats() -> dict: runtime/image_embeds.ImageEncoder."""

    def __init__(self, encoder: Any, addr: str, info: dict[str, Any], *, registry: str | None = None,
                 advertise_addr: str | None = None, registry_scope: str | None = None):
        self.encoder, self.addr, self.stopping = encoder, addr, False
        self.info = {"pid": os.getpid(), "instance": uuid.uuid4().hex, "role": "encode", "host": socket.gethostname(),
                     "protocol_version": PROTOCOL_VERSION, **info}
        self.counters = {"requests": 0, "errors": 0, "rejected": 0}
        self.started_at = time.time()
        self.publisher = None
        if registry:
            from .registry import EngineRecord, RegistryPublisher

            where = advertise_addr or addr
            if any(w in where for w in ("*", "0.0.0.0", "[::]")):
                raise NanoForgeError(f"--registry: routers cannot reach the bind address {where}; give "
                                     "--advertise-addr")
            self.publisher = RegistryPublisher(registry, EngineRecord.from_hello(self.info, where, self.info["host"]),
                                               scope=registry_scope)
        self.ctx = zmq.Context()
        self.sock = bind_router(self.ctx, addr, "encode server")
        self.wake_rx, self.wake_tx = wake_pair(self.ctx, f"encode-wake-{id(self)}")  # wake_tx: the worker's
        self.jobs: queue.Queue[tuple[bytes, Any, list[bytes]] | None] = queue.Queue()
        self.replies: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="nanoforge-encode", daemon=True)

    def serve(self) -> None:
        """Run the I/O loop until a "shutdown" message or request_stop() (signals)."""
        self.worker.start()
        if self.publisher is not None:
            self.publisher.start()
        log.info("encode server %s ready at %s (pid %d)", self.info.get("model_name"), self.addr, os.getpid())
        try:
            run_loop(self.sock, self.wake_rx, lambda: self.stopping, self._flush_replies, self._handle)
        finally:
            self._close()

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def _flush_replies(self) -> None:
        """Send what the worker thread finished."""
        while True:
            try:
                ident, msg = self.replies.get_nowait()
            except queue.Empty:
                return
            self.sock.send_multipart([ident, pack(msg)])

    def stats(self) -> dict[str, Any]:
        return {**self.encoder.stats(), **self.counters, "num_waiting": self.jobs.qsize(),
                "uptime_s": time.time() - self.started_at}

    def _handle(self, ident: bytes, body: list[bytes]) -> None:
        msg: dict[str, Any] = {}
        try:
            msg = unpack_body(body)
            kind = msg["type"]
            if kind == "encode":
                images = msg.get("images")
                if not isinstance(images, list) or not images or not all(isinstance(b, bytes) for b in images):
                    raise Malformed("encode needs images: a non-empty list of binary strings (encoded images)")
                self.counters["requests"] += 1
                self.jobs.put((ident, msg.get("id"), images))
            elif kind in ("stats", "health"):
                self._reply(ident, {**self.stats(), **self.info, "type": kind, "id": msg.get("id")})
            elif kind == "hello":
                v = msg.get("protocol_version", PROTOCOL_VERSION)
                if v != PROTOCOL_VERSION:
                    raise Malformed(f"protocol version {v!r} is not supported (this engine speaks {PROTOCOL_VERSION})")
                self._reply(ident, {**self.info, "type": "hello", "id": msg.get("id")})
            elif kind == "shutdown":
                self._reply(ident, {"type": "shutdown", "id": msg.get("id"), "ok": True})
                self.stopping = True
            elif kind == "abort":
                pass  # a router's abort of a request that was encoded here: the encoding runs out, unread
            elif kind in ("generate", "kv_pull"):
                raise Malformed(f"this is an encode engine: it runs the vision tower only (no {kind}); send "
                                "requests to a prefill or both engine")
            else:
                raise Malformed(f"unknown message type {kind!r}")
        except Exception as e:  # a bad frame gets an answer, never the server's life
            if not isinstance(e, (Malformed, NanoForgeError)):
                log.exception("failed to handle a %r message", msg.get("type"))
            self._reply(ident, error_reply(e, msg))

    def _reply(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, pack(msg)])

    def _work(self) -> None:  # the worker thread: encode, hand the reply to the I/O loop
        while True:
            job = self.jobs.get()
            if job is None:
                return
            ident, mid, images = job
            try:
                reply = {"type": "encoded", "id": mid, "items": self.encoder.encode(images)}
            except NanoForgeError as e:  # an image it cannot read (or too many): the client's fault
                self.counters["rejected"] += 1
                reply = {"type": "encoded", "id": mid, "error": str(e)}
            except Exception as e:  # noqa: BLE001 - the server's fault: said so, and it keeps serving
                log.exception("encoding %d images failed", len(images))
                self.counters["errors"] += 1
                reply = {"type": "error", "id": mid, "error": f"encoding failed: {type(e).__name__}: {e}"}
            self.replies.put((ident, reply))
            try:
                self.wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the loop is shutting down or already awake

    def _close(self) -> None:
        if self.publisher is not None:  # routers drop this engine now rather than at the TTL
            self.publisher.stop()
        self.jobs.put(None)
        self.worker.join(timeout=10)
        self.sock.close()
        self.wake_rx.close()
        if self.worker.is_alive():  # an encode that won't end still owns wake_tx: leave it (and the context)
            log.warning("encode worker did not stop; leaving its socket open")
            return
        self.wake_tx.close()
        self.ctx.term()
        log.info("encode server at %s stopped", self.addr)


IGNORED = ("num_blocks", "max_num_seqs", "max_model_len", "max_num_batched_tokens", "gpu_memory_utilization",
           "enforce_eager", "kv_dtype", "index_kv_dtype", "speculative", "num_speculative_tokens")


def serve_encoder(model: Any, addr: str, *, model_name: str | None = None, device: str | None = None,
                  registry: str | None = None, advertise_addr: str | None = None, registry_scope: str | None = None,
                  **engine_opts: Any) -> None:
    """Load `model`'s vision encoder (plan dir or checkpoint; engine_opts: dtype, quantize, block_size as LLM
    takes them, the KV and batching ones are logged and ignored) and serve it at `addr` until shutdown."""
    import signal

    from ..compiler import CompileOptions
    from ..llm import open_model
    from ..runtime.image_embeds import ImageEncoder

    unused = sorted(k for k in engine_opts if k in IGNORED)
    unknown = sorted(k for k in engine_opts if k not in IGNORED + ("dtype", "quantize", "block_size"))
    if unknown:
        raise NanoForgeError(f"--role encode does not take {', '.join('--' + k.replace('_', '-') for k in unknown)}")
    if unused:
        log.info("--role encode: %s ignored (an encode engine keeps no KV cache)", ", ".join(unused))
    opts = CompileOptions(dtype=engine_opts.get("dtype") or "auto", quantize=engine_opts.get("quantize") or "auto",
                          device=device or "cpu", block_size=engine_opts.get("block_size"))
    plan, ckpt = open_model(model, None, device, opts)
    encoder = ImageEncoder.load(plan, ckpt, plan.target.device)
    name = model_name or Path(model if isinstance(model, (str, Path)) else ckpt.path).name
    info = {"model_name": name, "max_model_len": plan.model.max_position_embeddings,
            "kv_contract": plan.kv_contract.to_json(), "checkpoint_path": str(ckpt.path),
            "checkpoint_kind": getattr(ckpt, "kind", ""), "model_fingerprint": model_fingerprint(plan)}
    server = EncodeServer(encoder, addr, info, registry=registry, advertise_addr=advertise_addr,
                          registry_scope=registry_scope)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, server.request_stop)
        signal.signal(signal.SIGINT, server.request_stop)
    server.serve()

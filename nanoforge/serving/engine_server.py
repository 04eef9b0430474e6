"""The engine server: one runtime engine in its own process, behind a ZMQ ROUTER socket that speaks
msgpack maps only (never pickle, so a peer can't make it run code). Front ends connect DEALER
sockets (ZmqEngineClient); each message is one frame, a map with a "type" key:

  in:  hello {protocol_version?, kv_ipc?}
       generate {request_id, prompt_ids, params, pd?, images? | image_embeds?, fit_max_tokens?}
       abort {request_id}  stats | health  shutdown  kv_pull {request_id, first_block, mode}  kv_ack {request_id}
  out: hello {protocol_version, model_name, max_model_len, kv_contract, pid, instance, role, host, ...}
       deltas {items: [TokenDelta.to_wire(), ...]}   stats | health {EngineLoop.stats(), model info}
       shutdown {ok}   error {error, request_id?}   kv_released {request_id}
       kv_data {num_tokens, block_ids, nbytes, ...} + one raw frame per KV pool tensor (the one
       multipart reply: the blocks' bytes, host-staged; none for mode "ipc" or "dlslime")
  dlslime (--kv-transport dlslime): a decode engine's hello carries kv_dlslime {kind, id, endpoint?}; the
       reply's kv_dlslime says where it reads this pool's registered regions (or {error}), and a
       kv_pull of mode "dlslime" names the blocks and the state row ("state_slot") it then reads; a
       CUDA pool in dlslime's TCP mode answers with a staging buffer instead, and a kv_pull with
       staged: true copies the request there first (kv_data's "staged": {offset, length}; held
       until the request is freed: kv_ack, abort, park timeout)
Requests that expect a reply may carry an "id"; the reply echoes it. ZMQ sockets are not thread-safe,
so only the I/O loop (the main thread) touches the ROUTER: the engine thread hands its deltas over
through a queue and wakes the loop through an inproc PAIR socket of its own. PD: see engine_loop.py
(parking, migrating) and kv_migration.py (the decode engine's pulls)."""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from ..errors import NanoForgeError
from ..kv_contract import KVContract
from ..runtime.kv_dlslime import KVExport, check_usable
from ..runtime.kv_transfer import export_ipc, pool_device
from .engine_loop import EngineLoop
from .kv_migration import TRANSPORTS, MigrationWorker
from .protocol import GenerateRequest, TokenDelta
from .sockets import bind_router, free_tcp_addr, run_loop, wake_pair
from .wire import PROTOCOL_VERSION, Malformed, error_reply, pack, unpack, unpack_body

log = logging.getLogger("nanoforge.serving")
ROLES = ("both", "prefill", "decode")
# what each SamplingParams field may hold on the wire: a wrong type would otherwise fail a whole
# engine step (and every request in it) instead of the one request
_NUM, _OPT_INT = (int, float), (int, type(None))
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": _NUM, "top_k": (int,), "top_p": _NUM, "min_p": _NUM, "seed": _OPT_INT, "max_tokens": (int,),
    "min_tokens": (int,), "stop": (str, list), "stop_token_ids": (list,), "ignore_eos": (bool,),
    "logprobs": _OPT_INT, "repetition_penalty": _NUM, "presence_penalty": _NUM, "frequency_penalty": _NUM}


def parse_generate(msg: dict[str, Any]) -> GenerateRequest:
    rid, prompt, params = msg.get("request_id"), msg.get("prompt_ids"), msg.get("params") or {}
    if not isinstance(rid, str) or not rid:
        raise Malformed("generate needs request_id: a non-empty string")
    if not isinstance(prompt, list) or not all(type(t) is int for t in prompt):
        raise Malformed("generate needs prompt_ids: a list of ints")
    if not isinstance(params, dict):
        raise Malformed("generate params must be a map")
    for k, v in params.items():
        if k in PARAM_TYPES and (not isinstance(v, PARAM_TYPES[k]) or (isinstance(v, bool) and bool not in
                                                                         PARAM_TYPES[k])):
            raise Malformed(f"generate param {k} has the wrong type ({type(v).__name__})")
    if not all(type(t) is int for t in params.get("stop_token_ids", [])):
        raise Malformed("generate param stop_token_ids must be a list of ints")
    images, embeds = msg.get("images"), msg.get("image_embeds")
    if images is not None and not (isinstance(images, list) and all(isinstance(b, bytes) for b in images)):
        raise Malformed("generate images must be a list of binary strings (encoded images)")
    if embeds is not None and not (isinstance(embeds, list) and all(isinstance(e, dict) for e in embeds)):
        raise Malformed("generate image_embeds must be a list of maps (an encode engine's answer)")
    if images and embeds:
        raise Malformed("generate takes images or image_embeds, not both")
    return GenerateRequest(rid, prompt, params, parse_pd(msg.get("pd")), images or None,
                           msg.get("fit_max_tokens") is True, embeds or None)


def parse_pd(pd: Any) -> dict[str, Any] | None:
    if pd is None:
        return None
    if not isinstance(pd, dict) or pd.get("phase") not in ("prefill", "decode"):
        raise Malformed("generate pd must be a map with phase 'prefill' or 'decode'")
    if pd["phase"] == "decode":
        for k, t in (("source", str), ("source_request_id", str), ("num_prompt", int), ("num_tokens", int)):
            if not isinstance(pd.get(k), t) or isinstance(pd.get(k), bool):
                raise Malformed(f"generate pd (decode) needs {k}: {'a string' if t is str else 'an int'}")
    return pd


class EngineServer:
    def __init__(self, engine: Any, addr: str, model_name: str, kv_contract: KVContract, role: str = "both",
                 info: dict[str, Any] | None = None, *, kv_park_timeout: float = 30.0, kv_transport: str = "auto",
                 registry: str | None = None, advertise_addr: str | None = None, registry_scope: str | None = None,
                 kv_pull_timeout: float = 5.0, kv_staging_bytes: int | None = None, sock: zmq.Socket | None = None):
        """kv_staging_bytes: host staging of a CUDA pool for dlslime's TCP mode (None: min(1 GiB,
        the pool's size)). sock: a ROUTER already bound at `addr` (serve_engine binds before loading)."""
        if role not in ROLES:
            raise NanoForgeError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        if role != "both" and kv_contract.state and pool_device(engine.kv_pool()).type != "cpu":
            raise NanoForgeError(f"--role {role}: this model's {len(kv_contract.state)} recurrent layers keep per-"
                                 "sequence state, which migrates with the KV on CPU only yet; serve it with --role both")
        if kv_transport not in TRANSPORTS or (kv_transport == "ipc" and pool_device(engine.kv_pool()).type != "cuda"):
            raise NanoForgeError(f"--kv-transport {kv_transport!r}: choose one of {', '.join(TRANSPORTS)} (ipc needs "
                                 "a KV pool on CUDA)")
        if kv_park_timeout <= 0 or kv_pull_timeout <= 0:
            raise NanoForgeError(f"--kv-park-timeout and --kv-pull-timeout must be > 0 seconds; got {kv_park_timeout} "
                                 f"and {kv_pull_timeout}")
        if kv_staging_bytes is not None and kv_staging_bytes < 0:
            raise NanoForgeError(f"--kv-staging-mib must be >= 0; got {kv_staging_bytes / 2**20:g}")
        if kv_transport == "dlslime":  # dlslime imports; how it moves this pool
            log.info("--kv-transport dlslime: %s", check_usable(engine.kv_pool(), engine.kv_store().state,
                                                                 kv_staging_bytes))
        self.addr, self.stopping = addr, False
        self.kv_contract = kv_contract
        self.info = {"model_name": model_name, "max_model_len": engine.max_model_len, "kv_contract": kv_contract.to_json(),
                     "pid": os.getpid(), "instance": uuid.uuid4().hex, "role": role, "host": socket.gethostname(),
                     "protocol_version": PROTOCOL_VERSION, **(info or {})}
        self.publisher = self._publisher(registry, advertise_addr or addr, registry_scope) if registry else None
        self.kv_transport, self.migrator, self.ipc = kv_transport, None, None
        self.kv_pull_timeout, self.dlslime = kv_pull_timeout, None  # dlslime: KVExport, at the first offer
        self.kv_staging_bytes = kv_staging_bytes
        self.ctx = sock.context if sock is not None else zmq.Context()
        self.sock = sock if sock is not None else bind_router(self.ctx, addr, "engine server")
        self.wake_rx, self.wake_tx = wake_pair(self.ctx, f"wake-{id(self)}")  # wake_tx: the engine thread's
        self.outbox: queue.Queue[list[TokenDelta]] = queue.Queue()
        self.routes: dict[str, bytes] = {}  # live request id -> the front end that sent it
        self.loop = EngineLoop(engine, self._on_deltas, kv_park_timeout)
        self.loop.migrate = self._migrate
        self.loop.on_unpark = self._unstage

    def _publisher(self, url: str, addr: str, scope: str | None) -> Any:
        from .registry import EngineRecord, RegistryPublisher

        if any(w in addr for w in ("*", "0.0.0.0", "[::]")):
            raise NanoForgeError(f"--registry: routers cannot reach the bind address {addr}; give --advertise-addr")
        return RegistryPublisher(url, EngineRecord.from_hello(self.info, addr, host=self.info["host"]), scope=scope)

    def _migrate(self, job: dict[str, Any]) -> None:  # engine thread: the worker starts with the first pull
        if self.migrator is None:
            eng = self.loop.engine
            store = eng.kv_store()
            self.migrator = MigrationWorker(eng.kv_pool(), store.contract, self.loop.migrated, self.kv_transport,
                                            self.kv_pull_timeout, store=store)
        self.migrator.submit(job)

    def _on_deltas(self, deltas: list[TokenDelta]) -> None:  # engine thread
        self.outbox.put(deltas)
        try:
            self.wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the loop is shutting down or already awake

    def serve(self) -> None:
        """Run the I/O loop until a "shutdown" message or request_stop() (signals)."""
        self.loop.start()
        if self.publisher is not None:
            self.publisher.start()
        log.info("engine server %s ready at %s (pid %d), prefix caching %s", self.info["model_name"], self.addr,
                 os.getpid(), getattr(self.loop.engine, "kv_cache", {}).get("prefix_caching", "on"))
        try:
            run_loop(self.sock, self.wake_rx, lambda: self.stopping, self._send_deltas, self._handle)
        finally:
            self._close()

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def _reply(self, ident: bytes, msg: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, pack(msg)])

    def _send_deltas(self) -> None:
        frames: dict[bytes, list[dict[str, Any]]] = {}
        while True:
            try:
                deltas = self.outbox.get_nowait()
            except queue.Empty:
                break
            for d in deltas:
                ident = self.routes.pop(d.request_id, None) if d.finish_reason else self.routes.get(d.request_id)
                if d.kv is not None:  # the decode engine will pull from this instance
                    d.kv["instance"] = self.info["instance"]
                if ident is not None:
                    frames.setdefault(ident, []).append(d.to_wire())
        for ident, items in frames.items():
            self._reply(ident, {"type": "deltas", "items": items})

    def _handle(self, ident: bytes, body: list[bytes]) -> None:
        msg: dict[str, Any] = {}
        try:
            msg = unpack_body(body)
            kind = msg["type"]
            if kind == "generate":
                req = parse_generate(msg)
                if req.request_id in self.routes:
                    d = TokenDelta(req.request_id, finish_reason="error", num_prompt_tokens=len(req.prompt_ids),
                                   error=f"request id {req.request_id!r} is already running")
                    self._reply(ident, {"type": "deltas", "items": [d.to_wire()]})
                    return
                self.routes[req.request_id] = ident
                self.loop.submit(req)
            elif kind == "abort":
                rid = msg.get("request_id")
                if not isinstance(rid, str):
                    raise Malformed("abort needs request_id: a string")
                if self.routes.get(rid) == ident or rid in self.loop.parked:  # a front end aborts only its
                    self.loop.abort(rid)                                       # own requests (or frees a parked KV)
            elif kind in ("stats", "health"):
                staging = self.dlslime.stats() if self.dlslime is not None else {}
                self._reply(ident, {**self.loop.stats(), **staging, **self.info, "type": kind, "id": msg.get("id")})
            elif kind == "hello":
                v = msg.get("protocol_version", PROTOCOL_VERSION)
                if v != PROTOCOL_VERSION:
                    raise Malformed(f"protocol version {v!r} is not supported (this engine speaks {PROTOCOL_VERSION})")
                extra = {"kv_ipc": self._ipc()} if msg.get("kv_ipc") else {}
                if msg.get("kv_dlslime") is not None:
                    extra["kv_dlslime"] = self._dlslime(msg["kv_dlslime"])
                self._reply(ident, {**self.info, **extra, "type": "hello", "id": msg.get("id")})
            elif kind == "kv_pull":
                self._kv_pull(ident, msg)
            elif kind == "kv_ack":
                rid = msg.get("request_id")
                if not isinstance(rid, str):
                    raise Malformed("kv_ack needs request_id: a string")
                self.loop.release(rid)
                self._reply(ident, {"type": "kv_released", "id": msg.get("id"), "request_id": rid})
            elif kind == "shutdown":
                self._reply(ident, {"type": "shutdown", "id": msg.get("id"), "ok": True})
                self.stopping = True
            else:
                raise Malformed(f"unknown message type {kind!r}")
        except Exception as e:  # a bad frame gets an answer, never the server's life
            if not isinstance(e, (Malformed, NanoForgeError)):
                log.exception("failed to handle a %r message", msg.get("type"))
            self._reply(ident, error_reply(e, msg))

    def _kv_pull(self, ident: bytes, msg: dict[str, Any]) -> None:
        rid, first, mode = msg.get("request_id"), msg.get("first_block", 0), msg.get("mode", "tcp")
        if not isinstance(rid, str) or type(first) is not int or first < 0 or mode not in ("tcp", "ipc", "dlslime"):
            raise Malformed("kv_pull needs request_id: a string, first_block: an int >= 0, mode: 'tcp', 'ipc' or "
                            "'dlslime'")
        stage = None
        if mode == "dlslime" and msg.get("staged") is True:  # a CUDA pool, read in dlslime's TCP mode
            if self.dlslime is None or self.dlslime.staging is None:
                raise NanoForgeError(f"the prefill engine at {self.addr} stages no KV for dlslime")
            stage = self.dlslime.stage
        header, bufs = self.loop.read_parked(rid, first, with_data=mode == "tcp", state_data=mode != "dlslime",
                                             stage=stage)
        header.update(type="kv_data", id=msg.get("id"), request_id=rid)
        self.sock.send_multipart([ident, pack(header), *bufs], copy=False)

    def _ipc(self) -> dict[str, Any] | None:
        """The pool's CUDA IPC handles, exported once, for a decode engine on this host to map."""
        if self.ipc is None and pool_device(self.loop.engine.kv_pool()).type == "cuda" and \
                not self.loop.engine.kv_store().sharded:  # rank 0's pool is a part of the KV: pulled over tcp
            try:
                self.ipc = export_ipc(self.loop.engine.kv_pool())
            except Exception as e:  # decode engines pull over TCP instead (or say why not, with ipc forced)
                log.warning("cannot export the KV pool for CUDA IPC: %s", e)
        return self.ipc

    def _dlslime(self, offer: Any) -> dict[str, Any]:
        """Where a decode engine reads this pool over dlslime (registered at the first offer), or
        {error}. Only with --kv-transport dlslime: dlslime's TCP endpoint serves raw memory."""
        if self.kv_transport != "dlslime":
            return {"error": f"the prefill engine at {self.addr} does not export its KV pool over dlslime (start it "
                             "with --kv-transport dlslime too)"}
        try:
            if self.dlslime is None:
                eng = self.loop.engine
                self.dlslime = KVExport(eng.kv_pool(), eng.kv_store().state, dlslime_host(self.addr),
                                        self.kv_staging_bytes)
            return self.dlslime.answer(offer)
        except Exception as e:  # the decode engine fails the requests with it
            log.warning("dlslime offer refused: %s", e)
            return {"error": f"prefill engine at {self.addr}: {e}"}

    def _unstage(self, rid: str) -> None:  # engine thread: a parked request is freed, its staged span too
        if self.dlslime is not None:
            self.dlslime.unstage(rid)

    def _close(self) -> None:
        """Stop the engine, flush what it produced, fail what is still running, close the sockets."""
        if self.publisher is not None:  # routers drop this engine now rather than at the TTL
            self.publisher.stop()
        self.loop.stop()
        if self.migrator is not None:  # after the engine thread, its only caller
            self.migrator.stop()
        if self.dlslime is not None:
            self.dlslime.close()
        self._send_deltas()
        for rid, ident in list(self.routes.items()):
            d = TokenDelta(rid, finish_reason="error", error=f"engine at {self.addr} is shutting down")
            self._reply(ident, {"type": "deltas", "items": [d.to_wire()]})
        self.routes.clear()
        self.sock.close()
        self.wake_rx.close()
        if self.loop.thread.is_alive():  # a step that won't end still owns wake_tx: leave it (and the context)
            log.warning("engine thread did not stop; leaving its socket open")
            return
        self.wake_tx.close()
        self.ctx.term()
        log.info("engine server at %s stopped", self.addr)


def serve_engine(model: Any, addr: str, *, model_name: str | None = None, role: str = "both",
                 device: str | None = None, kv_park_timeout: float = 30.0, kv_transport: str = "auto",
                 registry: str | None = None, advertise_addr: str | None = None, registry_scope: str | None = None,
                 kv_pull_timeout: float = 5.0, kv_staging_bytes: int | None = None, **engine_opts: Any) -> None:
    """Load `model` (plan dir, checkpoint, or a Checkpoint object such as a preset's random
    weights) and serve it at `addr` until shutdown; engine_opts are LLM keyword arguments
    (EngineConfig fields, dtype, block_size). With `registry` (a Redis URL) the engine heartbeats
    its record there, in `registry_scope`, under `advertise_addr` (default: addr). Role "encode": the
    vision tower alone (encode_server.py)."""
    from ..llm import LLM
    from .encode_server import model_fingerprint, serve_encoder

    if registry_scope is not None:  # before minutes of loading (registry.py needs redis: only then)
        from .registry import check_scope

        if check_scope(registry_scope) is not None and not registry:
            raise NanoForgeError("--registry-scope needs --registry redis://HOST:PORT")
    if kv_transport == "dlslime":  # a missing wheel fails now, not after loading the model
        from ..runtime.kv_dlslime import load

        load()
    if role == "encode":
        return serve_encoder(model, addr, model_name=model_name, device=device, registry=registry,
                             advertise_addr=advertise_addr, registry_scope=registry_scope, **engine_opts)
    ctx = zmq.Context()  # bound before minutes of loading: a taken address fails now, and stays ours
    sock = bind_router(ctx, addr, "engine server")
    try:
        llm = LLM(model, device=device, progress=False, **engine_opts)
    except BaseException:
        ctx.destroy(linger=0)
        raise
    info = {"checkpoint_path": str(llm.checkpoint.path), "checkpoint_kind": getattr(llm.checkpoint, "kind", ""),
            "max_num_seqs": llm.engine.cfg.max_num_seqs,
            "block_size": llm.engine.block_size,
            "model_fingerprint": model_fingerprint(llm.plan)}
    name = model_name or Path(model if isinstance(model, (str, Path)) else llm.checkpoint.path).name
    store = llm.engine.kv_store()  # PD pairs engines by the one-rank contract, whatever their layouts
    if kv_transport in ("ipc", "dlslime") and store.sharded:
        llm.close()
        ctx.destroy(linger=0)
        raise NanoForgeError(f"--kv-transport {kv_transport}: the KV of this engine is split over its ranks "
                             f"({store.layout}); use tcp (or auto)")
    info["kv_layout"] = store.layout
    server = EngineServer(llm.engine, addr, name, store.contract, role, info, kv_park_timeout=kv_park_timeout,
                          kv_transport=kv_transport, registry=registry, advertise_addr=advertise_addr,
                          registry_scope=registry_scope, kv_pull_timeout=kv_pull_timeout,
                          kv_staging_bytes=kv_staging_bytes, sock=sock)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, server.request_stop)
        signal.signal(signal.SIGINT, server.request_stop)
    server.serve()


def dlslime_host(addr: str) -> str:
    """The IP dlslime's TCP endpoint binds beside the engine's ZMQ address: the same host (so an
    engine bound to 127.0.0.1 keeps its raw-memory port on loopback too)."""
    if addr.startswith("tcp://"):
        host = addr[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if host in ("*", "0.0.0.0", "::"):
            return "0.0.0.0"
        try:
            return socket.gethostbyname(host)
        except OSError as e:
            raise NanoForgeError(f"--kv-transport dlslime: cannot resolve the host of {addr}: {e}") from None
    return "127.0.0.1"  # ipc:// and inproc:// engines: local peers only


def stop_engine_server(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (the server stops its engine and says goodbye to its streams), then SIGKILL after
    `timeout`; the log start_engine_server wrote goes too."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if getattr(proc, "log_path", None):
        Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]


def start_engine_server(model: str | Path | None, addr: str | None = None, env: dict[str, str] | None = None,
                        **opts: Any) -> tuple[subprocess.Popen, str]:
    """Start `python -m nanoforge.serving.engine_server` without waiting for it; opts are its flags
    (max_num_seqs=8 -> --max-num-seqs 8, enforce_eager=True -> --enforce-eager; model None with
    model_preset=NAME), env is added to this process's environment. Its stderr goes to proc.log_path."""
    addr = addr or free_tcp_addr()
    cmd = [sys.executable, "-m", "nanoforge.serving.engine_server", *([str(model)] if model is not None else []),
           "--addr", addr]
    for k, v in opts.items():
        if v is not None and v is not False:
            cmd += [f"--{k.replace('_', '-')}", *([] if v is True else [str(v)])]
    log_file = tempfile.NamedTemporaryFile("wb", prefix="nanoforge-engine-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, **env} if env else None)
    log_file.close()
    proc.log_path = log_file.name  # type: ignore[attr-defined]
    return proc, addr


def wait_engine_ready(proc: subprocess.Popen, addr: str, timeout: float = 120.0) -> dict[str, Any]:
    """Block until the server at `addr` answers hello (returned); if it exits or the time runs out,
    stop it and raise with the tail of its log."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sock.send(pack({"type": "hello", "protocol_version": PROTOCOL_VERSION}))  # queued until it binds
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if sock.poll(200):
                reply = unpack(sock.recv())
                if reply.get("pid") == proc.pid:
                    return reply
                time.sleep(0.2)  # another process holds addr: ours will fail to bind and exit
                sock.send(pack({"type": "hello", "protocol_version": PROTOCOL_VERSION}))
        why = f"exited with code {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:g}s"
        proc.kill()
        tail = Path(getattr(proc, "log_path", os.devnull)).read_text(errors="replace")[-2000:]
        raise NanoForgeError(f"engine server for {addr} {why}: {tail.strip()}")
    finally:
        sock.close()
        ctx.term()


def spawn_engine_server(model: str | Path | None, addr: str | None = None, timeout: float = 120.0,
                        **opts: Any) -> tuple[subprocess.Popen, str]:
    """Start an engine server process and wait until it answers; returns (process, address)."""
    proc, addr = start_engine_server(model, addr, **opts)
    wait_engine_ready(proc, addr, timeout)
    return proc, addr


def main(argv: list[str] | None = None) -> int:
    from .engine_flags import (add_engine_flags, add_engine_server_flags, add_model_preset_flag, engine_options,
                               add_kv_staging_flag, model_source, staging_bytes)

    p = argparse.ArgumentParser(prog="python -m nanoforge.serving.engine_server", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="plan dir or checkpoint (or --model-preset)")
    add_model_preset_flag(p)
    p.add_argument("--addr", default="tcp://127.0.0.1:5555", help="ZMQ address to bind (default %(default)s)")
    add_engine_flags(p)
    p.add_argument("--block-size", type=int, default=None, help="KV block size when compiling a checkpoint")
    add_engine_server_flags(p)
    add_kv_staging_flag(p)
    p.add_argument("--model-name", default=None, help="name in hello (default: the model path's last part)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = engine_options(a)
    if a.block_size is not None:
        opts["block_size"] = a.block_size
    try:
        model, name = model_source(a.model, a.model_preset, opts)
        device = opts.pop("device", None)
        serve_engine(model, a.addr, model_name=a.model_name or name, role=a.role, device=device,
                     kv_park_timeout=a.kv_park_timeout, kv_transport=a.kv_transport, registry=a.registry,
                     advertise_addr=a.advertise_addr, registry_scope=a.registry_scope,
                     kv_pull_timeout=a.kv_pull_timeout, kv_staging_bytes=staging_bytes(a.kv_staging_mib), **opts)
    except NanoForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

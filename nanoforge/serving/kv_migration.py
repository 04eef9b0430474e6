"""PD KV migration, the decode side: a thread that pulls prefilled requests' KV from prefill
engines into this engine's pool, over DEALER sockets of its own (one per source, made lazily;
msgpack frames, never pickle). On the prefill engine's ROUTER (engine_server.py):

  kv_pull {id, request_id, first_block, mode}  ->  kv_data {id, num_tokens, block_ids, nbytes, ...}
                                                   + one raw frame per pool tensor (mode "tcp")
                                                   + one per state tensor (`state_frames`, any mode)
  kv_ack {request_id}                          ->  kv_released  (the prefill engine frees the blocks)

Before the first pull from a source the worker says hello and compares KV contracts: a mismatch
fails the request with the difference ("fatal": recomputing would hide a misconfiguration). Any
other failure (source gone, no reply within `timeout`, an error reply) is reported as not ok and
the engine recomputes the prompt itself. Transports differ only in how kv_data lands in the pool:
host-staged bytes (tcp), a device copy from the source pool mapped by CUDA IPC (ipc, same host), or
reads of the source pool's dlslime regions (dlslime: RDMA, or dlslime's TCP mode; the offer and
the answer ride in the hello, runtime/kv_dlslime.py; a CUDA pool in TCP mode is host-staged, and
its kv_pull says `staged`: the source copies the request into its staging buffer). A dlslime read
that fails or passes the deadline breaks its reader: that request is recomputed and the next one
says hello anew (on a new socket; the old one stays until its pulls in flight are answered).
Sharded engines on either side move KV in the one-rank layout (runtime/kv_shards.py), so prefill
and decode layouts differ freely (tcp only); contracts are compared in that layout and a mismatch
names both layouts.
Hybrid models' per-sequence state row travels as bytes in the same kv_data message, written into
the row the job names (`state_slot`)."""
from __future__ import annotations

import itertools
import logging
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import zmq

from ..errors import NanoForgeError
from ..kv_contract import KVContract
from ..runtime.kv_dlslime import KVReader, load as load_dlslime
from ..runtime.kv_transfer import (KVStore, Pool, block_nbytes, copy_blocks, open_ipc, pool_device, scatter_blocks,
                                     scatter_state)
from .engine_flags import KV_TRANSPORTS as TRANSPORTS
from .sockets import wake_pair
from .wire import PROTOCOL_VERSION, pack, unpack

log = logging.getLogger("nanoforge.serving")
SLOWEST_BYTES_PER_S = 5e8  # a pull may take timeout + its bytes at this rate before it is given up


class KVTransport(Protocol):
    """How pulled KV reaches this engine's pool; the pull protocol is the same for every one
    (HostStaged, CudaIpc, DlslimeReads). `deadline` (time.monotonic()) bounds a transport that
    waits on the network; `state_slot` is this engine's state row for a transport that reads it."""
    mode: str

    def receive(self, header: dict[str, Any], frames: list[Any], dst_ids: list[int], replica: int = 0, *,
                deadline: float = math.inf, state_slot: int = -1) -> int: ...


class HostStaged:
    """The blocks' bytes travel in the kv_data frames (ZMQ over TCP), staged in host memory, in the
    one-rank layout: `store` writes them to the ranks of a sharded engine (the job's replica)."""
    mode = "tcp"

    def __init__(self, pool: Pool, store: KVStore | None = None):
        self.pool, self.store = pool, store

    def receive(self, header: dict[str, Any], frames: list[Any], dst_ids: list[int], replica: int = 0, *,
                deadline: float = math.inf, state_slot: int = -1) -> int:
        if self.store is not None:
            return self.store.write(replica, dst_ids, frames)
        return scatter_blocks(self.pool, dst_ids, frames)


class CudaIpc:
    """Same host, both pools on CUDA: kv_data names the source blocks and they are copied device to
    device (a peer copy when the engines use two GPUs) out of the source pool mapped once by IPC."""
    mode = "ipc"

    def __init__(self, pool: Pool, src: Pool):
        self.pool, self.src = pool, src

    def receive(self, header: dict[str, Any], frames: list[Any], dst_ids: list[int], replica: int = 0, *,
                deadline: float = math.inf, state_slot: int = -1) -> int:
        return copy_blocks(self.src, header["block_ids"], self.pool, dst_ids)


class DlslimeReads:
    """dlslime: kv_data names the source blocks and state row, and the reader pulls them out of
    the prefill pool's registered regions into this pool (one batch of reads per request), by the
    job's deadline; `broken` once a read failed or stalled (its endpoint is shut down)."""
    mode = "dlslime"

    def __init__(self, reader: KVReader):
        self.reader = reader

    @property
    def broken(self) -> bool:
        return self.reader.broken is not None

    @property
    def staged(self) -> bool:
        """The source stages its pool: each kv_pull asks it to copy the request out first."""
        return self.reader.remote_stage is not None

    def receive(self, header: dict[str, Any], frames: list[Any], dst_ids: list[int], replica: int = 0, *,
                deadline: float = math.inf, state_slot: int = -1) -> int:
        src_slot = header.get("state_slot", -1)
        if not isinstance(header.get("block_ids"), list) or type(src_slot) is not int:
            raise NanoForgeError("kv_data for a dlslime pull needs block_ids: a list and state_slot: an int")
        return self.reader.read(header["block_ids"], dst_ids, src_slot, state_slot, deadline, header.get("staged"))


def choose_transport(kind: str, pool: Pool, hello: dict[str, Any], addr: str,
                     store: KVStore | None = None) -> KVTransport:
    """auto: ipc when both pools are on CUDA on one host (and mapping works), else tcp. A sharded
    engine on either side moves KV through its ranks: tcp."""
    ipc = hello.get("kv_ipc")
    here, there = socket.gethostname(), hello.get("host")
    sharded = store is not None and store.sharded
    why_not = (f"this engine's KV is split over its ranks ({store.layout})" if sharded else  # type: ignore[union-attr]
               "this engine's KV pool is not on CUDA" if pool_device(pool).type != "cuda" else
               f"the prefill engine at {addr} exports no CUDA pool" if not ipc else
               f"the prefill engine at {addr} runs on host {there!r}, this one on {here!r}" if there != here else None)
    if kind == "tcp" or (kind == "auto" and why_not is not None):
        return HostStaged(pool, store)
    if why_not is not None:
        raise NanoForgeError(f"--kv-transport ipc: {why_not}")
    try:
        return CudaIpc(pool, open_ipc(ipc))
    except Exception as e:  # e.g. containers that share a hostname but not the GPU driver
        if kind == "ipc":
            raise NanoForgeError(f"--kv-transport ipc: cannot map the KV pool of {addr}: {e}") from None
        log.warning("CUDA IPC with %s failed (%s); pulling its KV over TCP", addr, e)
        return HostStaged(pool, store)


@dataclass
class _Peer:
    addr: str
    sock: zmq.Socket
    hello_id: int
    transport: KVTransport | None = None  # set by the hello reply
    error: str | None = None  # fatal for every request from this source
    reader: KVReader | None = None  # dlslime: made before the hello, which carries its offer
    waiting: list[dict[str, Any]] = field(default_factory=list)  # jobs that arrived before the hello reply


class MigrationWorker:
    """submit(job) from the engine thread; results go to `report` (EngineLoop.migrated). A job:
    {request_id, source, source_request_id, num_tokens, first_block, block_ids} or, to only let
    the source free the KV, {..., release_only: True}."""

    def __init__(self, pool: Pool, kv_contract: KVContract, report: Callable[[dict[str, Any]], None],
                 transport: str = "auto", timeout: float = 5.0, store: KVStore | None = None):
        """`store`: the engine's KVStore (Engine.kv_store()); its contract and layout are what a
        source's hello is checked against. Without it, `pool` of `kv_contract` is written directly."""
        if transport not in TRANSPORTS:
            raise NanoForgeError(f"--kv-transport must be one of {', '.join(TRANSPORTS)}; got {transport!r}")
        if store is not None and store.sharded and transport == "ipc":
            raise NanoForgeError(f"--kv-transport ipc: this engine's KV is split over its ranks ({store.layout}); "
                                 "use tcp")
        if transport == "ipc" and pool_device(pool).type != "cuda":
            raise NanoForgeError("--kv-transport ipc needs the engine's KV pool on a CUDA device")
        if transport == "dlslime":
            if store is not None and store.sharded:
                raise NanoForgeError(f"--kv-transport dlslime: this engine's KV is split over its ranks "
                                     f"({store.layout}); use tcp")
            load_dlslime()
        self.pool, self.contract, self.report, self.store = pool, kv_contract, report, store
        self.state = store.state if store is not None else []  # a migrated sequence's state row lands here
        self.layout = store.layout if store is not None else "one rank"
        self.kind, self.timeout = transport, timeout
        self.jobs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ctx = zmq.Context()
        self.wake_rx, self.wake_tx = wake_pair(self.ctx, f"migrate-{id(self)}")
        self.wake_lock = threading.Lock()
        self.poller = zmq.Poller()  # the worker thread's
        self.poller.register(self.wake_rx, zmq.POLLIN)
        self.block_bytes = kv_contract.bytes_per_token() * kv_contract.block_size if store else block_nbytes(pool)
        self.peers: dict[str, _Peer] = {}
        self.inflight: dict[int, tuple[_Peer, dict[str, Any]]] = {}  # kv_pull id -> (peer, job)
        self._ids = itertools.count(1)
        self.running = True
        self.thread = threading.Thread(target=self._run, name="nanoforge-kv-migration", daemon=True)
        self.thread.start()

    def submit(self, job: dict[str, Any]) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.timeout + len(job.get("block_ids", ())) * self.block_bytes / SLOWEST_BYTES_PER_S
        self.jobs.put({**job, "t0": t0, "deadline": deadline})
        with self.wake_lock:
            self.wake_tx.send(b"", zmq.NOBLOCK)

    def stop(self) -> None:
        self.running = False
        with self.wake_lock:
            self.wake_tx.send(b"", zmq.NOBLOCK)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            for peer in self.peers.values():
                if peer.reader is not None:
                    peer.reader.close()
            self.ctx.destroy(linger=0)

    # -- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while self.running:
            for sock, _ in self.poller.poll(100):
                if sock is self.wake_rx:
                    while self.wake_rx.poll(0):
                        self.wake_rx.recv()
                    continue
                while not sock.closed and sock.poll(0):  # a refused source's socket closes meanwhile
                    try:
                        self._on_reply(sock.recv_multipart(copy=False))
                    except Exception:  # one bad reply must not stop every migration
                        log.exception("KV migration: bad reply")
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                self._start(job)
            self._expire()

    def _peer(self, addr: str) -> _Peer:
        peer = self.peers.get(addr)
        if peer is None:
            sock = self.ctx.socket(zmq.DEALER)
            for opt, v in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
                sock.setsockopt(opt, v)
            peer = _Peer(addr, sock, next(self._ids))
            try:
                sock.connect(addr)
            except zmq.ZMQError as e:
                peer.error = f"bad prefill engine address {addr!r}: {e}"
            else:
                want_ipc = self.kind in ("auto", "ipc") and pool_device(self.pool).type == "cuda" and \
                    not (self.store is not None and self.store.sharded)
                hello = {"type": "hello", "protocol_version": PROTOCOL_VERSION, "id": peer.hello_id, "kv_ipc": want_ipc}
                try:
                    if self.kind == "dlslime":  # our end first: an RDMA offer carries its queue pair
                        peer.reader = KVReader(self.pool, self.state)
                        hello["kv_dlslime"] = peer.reader.offer()
                except Exception as e:
                    peer.error = f"--kv-transport dlslime: cannot open a dlslime endpoint: {e}"
                else:
                    sock.send(pack(hello))
            self.poller.register(sock, zmq.POLLIN)
            self.peers[addr] = peer
        return peer

    def _drop(self, peer: _Peer) -> None:
        """Forget a source that stopped answering or was refused; a later request reconnects."""
        if self.peers.get(peer.addr) is peer:
            del self.peers[peer.addr]
        self.poller.unregister(peer.sock)
        peer.sock.close(linger=0)
        if peer.reader is not None:
            peer.reader.close()

    def _retire(self, peer: _Peer) -> None:
        """A source whose transport broke: later requests say hello anew on a socket of their own;
        this one closes once its pulls in flight are answered or expired (their acks sent)."""
        if self.peers.get(peer.addr) is peer:
            del self.peers[peer.addr]
        if not any(p is peer for p, _ in self.inflight.values()) and not peer.sock.closed:
            self.poller.unregister(peer.sock)
            peer.sock.close(linger=1000)  # the kv_acks just sent still go out

    def _start(self, job: dict[str, Any]) -> None:
        peer = self._peer(job["source"])
        if job.get("release_only"):
            peer.sock.send(pack({"type": "kv_ack", "request_id": job["source_request_id"]}))
        elif peer.error is not None:
            self._done(job, error=peer.error, fatal=True)
        elif peer.transport is None:
            peer.waiting.append(job)
        else:
            self._pull(peer, job)

    def _pull(self, peer: _Peer, job: dict[str, Any]) -> None:
        mid = next(self._ids)
        self.inflight[mid] = (peer, job)
        job["t_pull"] = time.monotonic()
        staged = {"staged": True} if getattr(peer.transport, "staged", False) else {}
        peer.sock.send(pack({"type": "kv_pull", "id": mid, "request_id": job["source_request_id"],
                             "first_block": job["first_block"], "mode": peer.transport.mode,  # type: ignore[union-attr]
                             **staged}))

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        msg = unpack(frames[0].bytes)
        kind, mid = msg["type"], msg.get("id")
        peer = next((p for p in self.peers.values() if p.hello_id == mid), None) if kind in ("hello", "error") else None
        if peer is not None:
            self._on_hello(peer, msg)
            return
        if mid not in self.inflight:  # kv_released, or the answer to a pull that timed out
            return
        peer, job = self.inflight.pop(mid)
        if kind == "error":  # the prompt is recomputed here: let the source free the KV if it has it
            peer.sock.send(pack({"type": "kv_ack", "request_id": job["source_request_id"]}))
            self._done(job, error=f"prefill engine at {peer.addr}: {msg.get('error')}")
            return
        try:
            if kind != "kv_data" or msg.get("num_tokens") != job["num_tokens"] or \
                    len(msg.get("block_ids", ())) != len(job["block_ids"]):
                raise NanoForgeError(f"unexpected reply {kind!r} to kv_pull (num_tokens {msg.get('num_tokens')}, "
                                     f"{len(msg.get('block_ids', ()))} blocks; wanted {job['num_tokens']}, "
                                     f"{len(job['block_ids'])})")
            kv, state = self._split(msg, [f.buffer for f in frames[1:]])
            transport: KVTransport = peer.transport  # type: ignore[assignment]
            nbytes = transport.receive(msg, kv, job["block_ids"], job.get("replica", 0), deadline=job["deadline"],
                                       state_slot=job.get("state_slot", -1))
            if "state_slot" not in msg:  # the row came as bytes (tcp, ipc); dlslime read it with the blocks
                nbytes += scatter_state(self.state, job.get("state_slot", -1), state)
        except Exception as e:
            self._done(job, error=f"KV from {peer.addr}: {e}")
            peer.sock.send(pack({"type": "kv_ack", "request_id": job["source_request_id"]}))
            if getattr(peer.transport, "broken", False):
                self._retire(peer)
            return
        peer.sock.send(pack({"type": "kv_ack", "request_id": job["source_request_id"]}))
        self._done(job, nbytes=nbytes, generator_state=msg.get("generator_state"))
        if self.peers.get(peer.addr) is not peer:  # retired: close once idle
            self._retire(peer)

    def _split(self, msg: dict[str, Any], bufs: list[Any]) -> tuple[list[Any], list[Any]]:
        """kv_data's frames: the KV blocks', then `state_frames` of the sequence's state row."""
        n = msg.get("state_frames", 0)
        if type(n) is not int or not 0 <= n <= len(bufs):
            raise NanoForgeError(f"kv_data with a bad state_frames {n!r}")
        return bufs[:len(bufs) - n], bufs[len(bufs) - n:]

    def _on_hello(self, peer: _Peer, msg: dict[str, Any]) -> None:
        try:
            if msg["type"] == "error":
                raise NanoForgeError(f"prefill engine at {peer.addr} refused hello: {msg.get('error')}")
            diff = KVContract.from_json(msg.get("kv_contract"), f"hello from {peer.addr}: kv_contract").mismatches(
                self.contract)
            if diff:
                raise NanoForgeError(f"prefill engine at {peer.addr} ({msg.get('kv_layout', 'one rank')}) has an "
                                     f"incompatible KV cache layout with this engine ({self.layout}), which cannot "
                                     "be re-split: " + "; ".join(diff))
            peer.transport = self._dlslime(peer, msg) if self.kind == "dlslime" else \
                choose_transport(self.kind, self.pool, msg, peer.addr, self.store)
            log.info("KV migration from %s: %s transport", peer.addr, peer.transport.mode)
        except NanoForgeError as e:
            peer.error = str(e)
            log.error("%s", e)
        waiting, peer.waiting = peer.waiting, []
        for job in waiting:
            if peer.error is not None:
                self._done(job, error=peer.error, fatal=True)
            else:
                self._pull(peer, job)
        if peer.error is not None:  # jobs already queued fail with it; a later one asks again
            self._drop(peer)

    def _dlslime(self, peer: _Peer, hello: dict[str, Any]) -> KVTransport:
        """Connect the peer's reader to the prefill engine's answer (its regions, where to read)."""
        answer = hello.get("kv_dlslime")
        if answer is None or peer.reader is None:
            raise NanoForgeError(f"--kv-transport dlslime: the prefill engine at {peer.addr} does not offer its KV "
                                 "pool over dlslime (an older engine?)")
        if isinstance(answer, dict) and answer.get("error"):
            raise NanoForgeError(f"--kv-transport dlslime: {answer['error']}")
        host = peer.addr[len("tcp://"):].rsplit(":", 1)[0].strip("[]") if peer.addr.startswith("tcp://") else None
        try:
            peer.reader.connect(answer, host)
        except Exception as e:  # dlslime's own errors too: the requests from this source fail with it
            raise NanoForgeError(f"--kv-transport dlslime with the prefill engine at {peer.addr}: {e}") from None
        return DlslimeReads(peer.reader)

    def _expire(self) -> None:
        now = time.monotonic()
        late = [mid for mid, (_, job) in self.inflight.items() if now > job["deadline"]]
        dead: dict[int, _Peer] = {}
        for mid in late:
            peer, job = self.inflight.pop(mid)
            self._done(job, error=f"no KV from the prefill engine at {peer.addr} within "
                                  f"{job['deadline'] - job['t0']:.1f}s")
            peer.sock.send(pack({"type": "kv_ack", "request_id": job["source_request_id"]}))  # if it comes back
            dead[id(peer)] = peer
        for peer in list(self.peers.values()):
            expired = [j for j in peer.waiting if now > j["deadline"]]
            if expired:
                peer.waiting = [j for j in peer.waiting if j not in expired]
                for job in expired:
                    self._done(job, error=f"the prefill engine at {peer.addr} did not answer hello within "
                                          f"{self.timeout:g}s")
                dead[id(peer)] = peer
        for peer in dead.values():
            if self.peers.get(peer.addr) is not peer:  # retired after a broken read: close once idle
                self._retire(peer)
            elif not peer.waiting and not any(p is peer for p, _ in self.inflight.values()):
                self._drop(peer)

    def _done(self, job: dict[str, Any], nbytes: int = 0, error: str | None = None, fatal: bool = False,
              generator_state: bytes | None = None) -> None:
        self.report({"request_id": job["request_id"], "ok": error is None, "num_tokens": job["num_tokens"],
                     "bytes": nbytes, "seconds": time.monotonic() - job.get("t_pull", job["t0"]), "error": error,
                     "fatal": fatal,
                     "generator_state": generator_state, "source": job["source"]})

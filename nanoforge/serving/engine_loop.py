"""EngineLoop: one runtime engine stepping in its own thread. Requests and aborts arrive through
a thread-safe inbox; after every step the new tokens of every request go out as TokenDeltas
through one callback (the in-process client and the ZMQ engine server both sit on this).

PD disaggregation: a request with pd phase "prefill" is parked after its first token (blocks
kept, `parked`, read by the server's I/O thread under `parked_lock`) until a decode engine acks
its pull, the front end aborts it, or kv_park_timeout passes. One with phase "decode" gets blocks
here and waits in `migrating` while `migrate` (the server's migration worker) pulls its KV; the
worker's ("migrated", result) message puts it in the queue, or, when the pull failed, it is
recomputed (the blocks being written stay allocated until then, even if it is aborted)."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import NanoForgeError
from ..runtime.engine import Engine
from ..runtime.kv_transfer import gather_state, generator_state, set_generator_state
from ..runtime.sequence import Sequence
from .protocol import GenerateRequest, TokenDelta

log = logging.getLogger("nanoforge.serving")


@dataclass
class Parked:
    seq: Sequence
    deadline: float  # time.monotonic() after which the blocks are freed unpulled
    ready: Any  # CUDA event of the KV writes, or None
    num_tokens: int  # tokens whose KV is kept


class EngineLoop:
    def __init__(self, engine: Engine, on_deltas: Callable[[list[TokenDelta]], None], kv_park_timeout: float = 30.0):
        self.engine, self.on_deltas = engine, on_deltas
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.live: dict[str, Sequence] = {}
        self.sent: dict[str, int] = {}  # request id -> output tokens already sent
        self.thread = threading.Thread(target=self._run, name="nanoforge-engine", daemon=True)
        self.running = False
        self.started_at = time.time()
        self.counters = {"requests": 0, "finished": 0, "aborted": 0, "rejected": 0, "errors": 0,
                         "kv_migrations": 0,
                         "kv_migration_bytes": 0, "kv_migration_seconds": 0.0, "kv_migration_fallbacks": 0,
                         "kv_served_bytes": 0, "kv_park_expired": 0}
        self.kv_park_timeout = kv_park_timeout
        self.migrate: Callable[[dict[str, Any]], None] | None = None  # hands a KV pull to a worker
        self.prefill_only: set[str] = set()  # live PD prefill requests, parked at their first token
        self.parked: dict[str, Parked] = {}
        self.parked_lock = threading.Lock()
        self.on_unpark: Callable[[str], None] | None = None  # a parked request is freed (under parked_lock)
        self.migrating: dict[str, Sequence] = {}

    def start(self) -> "EngineLoop":
        self.running = True
        self.thread.start()
        return self

    def stop(self) -> None:
        self.running = False
        self.inbox.put(("wake", None))
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, request: GenerateRequest) -> None:
        self.inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def release(self, request_id: str) -> None:
        """A decode engine has the parked request's KV (kv_ack): free its blocks."""
        self.inbox.put(("kv_release", request_id))

    def migrated(self, result: dict[str, Any]) -> None:
        """The migration worker's report: {request_id, ok, num_tokens, bytes, seconds, error, ...}."""
        self.inbox.put(("migrated", result))

    def read_parked(self, request_id: str, first_block: int, with_data: bool = True, state_data: bool = True,
                    stage: Callable[[str, list[int], int], dict] | None = None) -> tuple[dict, list]:
        """(header, buffers) answering a kv_pull, from the I/O thread: the parked request's blocks
        from first_block on, copied to host bytes unless the puller maps our pool itself (IPC) or
        reads it (dlslime, which reads the state row too: state_data False, the header names it).
        `stage(request_id, block_ids, state_slot)`: dlslime's host staging of a CUDA pool, whose
        answer goes in the header as "staged" (held until on_unpark). Holding parked_lock keeps
        the engine thread from freeing (and reusing) the blocks meanwhile."""
        with self.parked_lock:
            p = self.parked.get(request_id)
            if p is None:
                raise NanoForgeError(f"no parked KV for request {request_id!r} here (never prefilled here, already "
                                     f"released, or expired after {self.kv_park_timeout:g}s)")
            ids = self.engine.kv_block_ids(p.seq, first_block, p.num_tokens)
            store = self.engine.kv_store()
            if store.state and p.seq.num_computed != p.num_tokens:  # the row cannot go back to num_tokens
                raise NanoForgeError(f"request {request_id!r}: its state row holds {p.seq.num_computed} tokens, "
                                     f"not the {p.num_tokens} offered; recompute it")
            if with_data:  # in the one-rank layout, from every rank of a sharded engine
                bufs = store.read(self.engine.kv_replica(p.seq), ids, p.ready)
            else:  # the puller copies out of our pool itself: the writes must be done
                bufs = []
                if p.ready is not None:
                    p.ready.synchronize()
            state_bufs = gather_state(store.state, p.seq.state_slot, p.ready) if state_data else []
            state = generator_state(p.seq.generator)
            slot = p.seq.state_slot if store.state else -1
            staged = {"staged": stage(request_id, ids, slot)} if stage is not None else {}
        nbytes = sum(b.nbytes for b in bufs) if with_data else \
            len(ids) * store.contract.bytes_per_token() * store.contract.block_size  # what the puller copies or reads
        nbytes += sum(b.nbytes for b in state_bufs) if state_data else store.contract.bytes_per_sequence() * (slot >= 0)
        self.counters["kv_served_bytes"] += nbytes
        extra = {**({} if state_data else {"state_slot": slot}), **staged}
        return {"num_tokens": p.num_tokens, "block_size": self.engine.block_size, "first_block": first_block,
                "block_ids": ids, "nbytes": nbytes, "generator_state": state,
                "state_frames": len(state_bufs), **extra}, bufs + state_bufs

    def stats(self) -> dict[str, Any]:
        return {**self.engine.stats(), "uptime_s": time.time() - self.started_at, "kv_parked": len(self.parked),
                "kv_migrating": len(self.migrating), **self.counters}

    # -- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        while self.running:
            self._drain(block=not self.engine.has_work())
            if not self.running:
                break
            if self.parked:
                self._expire_parked()
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as e:  # a failed step fails its requests, not the server
                    log.exception("engine step failed")
                    self._fail_all(f"engine step failed: {e}")
                    continue
                self._flush()

    def _drain(self, block: bool) -> None:
        deltas: list[TokenDelta] = []
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                kind, arg = item
                handler = {"add": self._add, "abort": self._abort, "kv_release": self._release,
                           "migrated": self._migrated}.get(kind)
                d = handler(arg) if handler is not None else None  # "wake": nothing to do
                if d is not None:
                    deltas.append(d)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        if deltas:
            self.on_deltas(deltas)

    def _add(self, req: GenerateRequest) -> TokenDelta | None:
        self.counters["requests"] += 1
        rid, pd = req.request_id, req.pd or {}
        if rid in self.live or rid in self.parked or rid in self.migrating:
            return self._reject(req, f"request id {rid!r} is already running")
        try:
            if pd.get("phase") == "decode":
                return self._add_migrated(req, pd)
            seq = self.engine.add_request(list(req.prompt_ids), req.sampling_params(), images=req.media,
                                          fit_max_tokens=req.fit_max_tokens)
        except (NanoForgeError, TypeError, ValueError) as e:
            return self._reject(req, str(e))
        self.live[rid] = seq
        self.sent[rid] = 0
        if pd.get("phase") == "prefill":
            self.prefill_only.add(rid)
        return None

    def _add_migrated(self, req: GenerateRequest, pd: dict[str, Any]) -> None:
        rid, n_kv = req.request_id, pd["num_tokens"]
        seq, first = self.engine.add_migrated(list(req.prompt_ids), pd["num_prompt"], req.sampling_params(), n_kv,
                                              images=req.media, fit_max_tokens=req.fit_max_tokens)
        self.live[rid], self.sent[rid] = seq, seq.num_output  # the prefill engine sent those tokens
        job = {"request_id": rid, "source": pd["source"], "source_request_id": pd["source_request_id"],
               "num_tokens": n_kv}
        why = "the KV pool is full" if first is None else "this engine has no migration worker"
        if first is not None and self.migrate is not None:
            try:
                self.migrate({**job, "first_block": first, "replica": self.engine.kv_replica(seq),
                              "block_ids": self.engine.kv_block_ids(seq, first, n_kv), "state_slot": seq.state_slot})
                self.migrating[rid] = seq
                return None
            except Exception as e:  # noqa: BLE001 - the request still runs, recomputed
                why = f"the migration worker failed: {e}"
        log.warning("request %s: its prefill KV is not pulled (%s); recomputing its prompt here", rid, why)
        self.counters["kv_migration_fallbacks"] += 1
        if first is not None:
            self.engine.resume_migrated(seq, 0)
        if self.migrate is not None:  # the prefill engine may free the KV now (else at its park timeout)
            with contextlib.suppress(Exception):
                self.migrate({**job, "release_only": True})
        return None

    def _migrated(self, res: dict[str, Any]) -> TokenDelta | None:
        rid = res["request_id"]
        seq = self.migrating.pop(rid, None)
        if seq is None:
            return None
        if self.live.get(rid) is not seq:  # aborted while its KV was arriving
            self.engine.release_parked(seq)
            return None
        if res["ok"]:
            c = self.counters
            c["kv_migrations"] += 1
            c["kv_migration_bytes"] += res["bytes"]
            c["kv_migration_seconds"] += res["seconds"]
            set_generator_state(seq.generator, res.get("generator_state"))
            self.engine.resume_migrated(seq, res["num_tokens"])
            return None
        if res.get("fatal"):  # e.g. incompatible KV layouts: recomputing would hide a misconfiguration
            self.engine.release_parked(seq)
            del self.live[rid], self.sent[rid]
            self.counters["errors"] += 1
            return TokenDelta(rid, finish_reason="error", num_prompt_tokens=seq.num_prompt, error=res["error"])
        log.warning("request %s: KV pull failed (%s); recomputing its prompt here", rid, res["error"])
        self.counters["kv_migration_fallbacks"] += 1
        self.engine.resume_migrated(seq, 0)
        return None

    def _release(self, request_id: str) -> None:
        with self.parked_lock:
            p = self.parked.pop(request_id, None)
            if p is not None:
                self._unpark(request_id, p)

    def _unpark(self, request_id: str, p: Parked) -> None:
        """Free a parked request's blocks (and what on_unpark holds for it); under parked_lock."""
        self.engine.release_parked(p.seq)
        if self.on_unpark is not None:
            try:
                self.on_unpark(request_id)
            except Exception:  # noqa: BLE001 - the blocks are free either way
                log.exception("request %s: freeing what its KV pull held failed", request_id)

    def _expire_parked(self) -> None:
        now = time.monotonic()
        with self.parked_lock:
            gone = [rid for rid, p in self.parked.items() if p.deadline <= now]
            for rid in gone:
                self._unpark(rid, self.parked.pop(rid))
        for rid in gone:
            log.warning("request %s: parked KV not pulled within %gs; freed", rid, self.kv_park_timeout)
        self.counters["kv_park_expired"] += len(gone)

    def _reject(self, req: GenerateRequest, why: str) -> TokenDelta:
        """A request refused at admission (its ids, length or parameters): the client's fault, not an error."""
        self.counters["rejected"] += 1
        return TokenDelta(req.request_id, finish_reason="error", num_prompt_tokens=len(req.prompt_ids), error=why)

    def _abort(self, request_id: str) -> TokenDelta | None:
        if request_id in self.parked:  # a PD prefill whose KV no decode engine will pull
            self._release(request_id)
            return None
        seq = self.live.pop(request_id, None)
        if seq is None:
            return None
        self.prefill_only.discard(request_id)
        if request_id not in self.migrating:  # else its blocks are freed when the pull ends
            self.engine.abort(seq.seq_id)
        self.counters["aborted"] += 1
        self.sent.pop(request_id, None)
        return TokenDelta(request_id, finish_reason="abort", num_prompt_tokens=seq.num_prompt,
                          num_cached_tokens=seq.num_cached)

    def _flush(self) -> None:
        deltas = []
        for rid, seq in list(self.live.items()):
            n = self.sent[rid]
            kv = self._park(rid, seq) if rid in self.prefill_only and seq.num_output else None
            if seq.num_output == n and seq.finish_reason is None:
                continue
            lps = seq.logprobs[n:] if seq.params.logprobs is not None else None
            deltas.append(TokenDelta(rid, seq.output_ids[n:], lps, seq.finish_reason, seq.num_prompt, seq.num_cached,
                                     kv=kv))
            self.sent[rid] = seq.num_output
            if seq.finish_reason is not None:
                del self.live[rid], self.sent[rid]
                self.prefill_only.discard(rid)
                self.engine.forget(seq)
                self.counters["finished"] += 1
        if deltas:
            self.on_deltas(deltas)

    def _park(self, rid: str, seq: Sequence) -> dict[str, Any] | None:
        """At its first token, a PD prefill request leaves the scheduler keeping its KV blocks
        (unless that token finished it); returns what its last delta tells the front end."""
        self.prefill_only.discard(rid)
        if seq.finish_reason is not None:
            return None
        ready = self.engine.park(seq)
        # a decode step chained onto the one that sampled the token (overlapped decode) may have
        # computed that token's KV too: the decode engine computes it again, so offer the prompt's
        num_tokens = min(seq.num_computed, seq.num_tokens - 1)
        with self.parked_lock:
            self.parked[rid] = Parked(seq, time.monotonic() + self.kv_park_timeout, ready, num_tokens)
        return {"num_tokens": num_tokens, "block_size": self.engine.block_size}

    def _fail_all(self, why: str) -> None:
        deltas = []
        self.prefill_only.clear()
        for rid, seq in list(self.live.items()):
            if rid not in self.migrating:
                self.engine.abort(seq.seq_id)
            deltas.append(TokenDelta(rid, finish_reason="error", num_prompt_tokens=seq.num_prompt, error=why))
        self.counters["errors"] += len(deltas)
        self.live.clear()
        self.sent.clear()
        if deltas:
            self.on_deltas(deltas)

"""EngineLoop: one runtime engine stepping in its own thread. Requests and aborts arrive through
a thread-safe inbox; after every step the new tokens of every request go out as TokenDeltas
through one callback (the in-process client and the ZMQ engine server both sit on this)."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from ..errors import NanoForgeError
from ..runtime.engine import Engine
from ..runtime.sequence import Sequence
from .protocol import GenerateRequest, TokenDelta

log = logging.getLogger("nanoforge.serving")


class EngineLoop:
    def __init__(self, engine: Engine, on_deltas: Callable[[list[TokenDelta]], None]):
        self.engine, self.on_deltas = engine, on_deltas
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.live: dict[str, Sequence] = {}
        self.sent: dict[str, int] = {}  # request id -> output tokens already sent
        self.thread = threading.Thread(target=self._run, name="nanoforge-engine", daemon=True)
        self.running = False
        self.started_at = time.time()
        self.counters = {"requests": 0, "finished": 0, "aborted": 0, "errors": 0}

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

    def stats(self) -> dict[str, Any]:
        eng = self.engine
        total = len(eng.blocks.blocks)
        free = eng.blocks.num_free
        return {"num_running": len(eng.scheduler.running), "num_waiting": len(eng.scheduler.waiting),
                "kv_blocks_total": total, "kv_blocks_free": free, "kv_usage": 1 - free / max(total, 1),
                "prefix_cache_queries": eng.blocks.queries, "prefix_cache_hits": eng.blocks.hits,
                "prompt_tokens": eng.metrics.prompt_tokens, "generated_tokens": eng.metrics.generated_tokens,
                "steps": eng.metrics.steps, "preemptions": eng.scheduler.num_preemptions,
                "uptime_s": time.time() - self.started_at, **self.counters}

    # -- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        while self.running:
            self._drain(block=not self.engine.has_work())
            if not self.running:
                break
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
                if kind == "add":
                    d = self._add(arg)
                    if d is not None:
                        deltas.append(d)
                elif kind == "abort":
                    d = self._abort(arg)
                    if d is not None:
                        deltas.append(d)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass
        if deltas:
            self.on_deltas(deltas)

    def _add(self, req: GenerateRequest) -> TokenDelta | None:
        self.counters["requests"] += 1
        if req.request_id in self.live:
            return self._error(req, f"request id {req.request_id!r} is already running")
        try:
            seq = self.engine.add_request(list(req.prompt_ids), req.sampling_params())
        except (NanoForgeError, TypeError, ValueError) as e:
            return self._error(req, str(e))
        self.live[req.request_id] = seq
        self.sent[req.request_id] = 0
        return None

    def _error(self, req: GenerateRequest, why: str) -> TokenDelta:
        self.counters["errors"] += 1
        return TokenDelta(req.request_id, finish_reason="error", num_prompt_tokens=len(req.prompt_ids), error=why)

    def _abort(self, request_id: str) -> TokenDelta | None:
        seq = self.live.pop(request_id, None)
        if seq is None:
            return None
        self.engine.abort(seq.seq_id)
        self.counters["aborted"] += 1
        self.sent.pop(request_id, None)
        return TokenDelta(request_id, finish_reason="abort", num_prompt_tokens=seq.num_prompt,
                          num_cached_tokens=seq.num_cached)

    def _flush(self) -> None:
        deltas = []
        for rid, seq in list(self.live.items()):
            n = self.sent[rid]
            if seq.num_output == n and seq.finish_reason is None:
                continue
            lps = seq.logprobs[n:] if seq.params.logprobs is not None else None
            deltas.append(TokenDelta(rid, seq.output_ids[n:], lps, seq.finish_reason, seq.num_prompt, seq.num_cached))
            self.sent[rid] = seq.num_output
            if seq.finish_reason is not None:
                del self.live[rid], self.sent[rid]
                self.engine.seqs.pop(seq.seq_id, None)
                self.counters["finished"] += 1
        if deltas:
            self.on_deltas(deltas)

    def _fail_all(self, why: str) -> None:
        deltas = []
        for rid, seq in list(self.live.items()):
            self.engine.abort(seq.seq_id)
            deltas.append(TokenDelta(rid, finish_reason="error", num_prompt_tokens=seq.num_prompt, error=why))
        self.live.clear()
        self.sent.clear()
        if deltas:
            self.on_deltas(deltas)

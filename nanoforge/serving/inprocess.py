"""InProcessClient: an EngineClient over an EngineLoop in this process (tests, single-process
`nanoforge serve`). Deltas cross from the engine thread to asyncio with call_soon_threadsafe;
closing a generate() stream early (client gone) aborts the request and frees its blocks."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from ..runtime.engine import Engine
from .engine_loop import EngineLoop
from .protocol import GenerateRequest, TokenDelta


class InProcessClient:
    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.loop = EngineLoop(engine, self._on_deltas).start()

    def _on_deltas(self, deltas: list[TokenDelta]) -> None:  # engine thread
        for d in deltas:
            target = self.queues.get(d.request_id)
            if target is not None:
                aloop, q = target
                aloop.call_soon_threadsafe(q.put_nowait, d)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if request.request_id in self.queues:
            yield TokenDelta(request.request_id, finish_reason="error", error="duplicate request id")
            return
        q: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self.queues[request.request_id] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            self.loop.submit(request)
            while not finished:
                d = await q.get()
                finished = d.finish_reason is not None
                yield d
        finally:
            self.queues.pop(request.request_id, None)
            if not finished:
                self.loop.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def stats(self) -> dict[str, Any]:
        return self.loop.stats()

    def close(self) -> None:
        self.loop.stop()

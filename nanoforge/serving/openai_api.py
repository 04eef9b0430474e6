"""The OpenAI-compatible HTTP front end: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics over any EngineClient. One engine request per choice; their deltas are merged by a task
each (Fanout), so a client that goes away — mid-stream or while a non-streaming request is still
generating — cancels those tasks, which closes the client's generate() streams and aborts the
requests in the engine (their KV blocks are freed). Request bodies are read with json only."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.chat_images import check_media_dir
from .metrics import ServerMetrics
from .openai_output import ChoiceStream, TokenNames, Update, chat_logprobs, completion_logprobs
from .openai_request import APIError, ParsedRequest, check_model, load_body, parse_chat, parse_completion
from .protocol import EngineClient, GenerateRequest, TokenDelta

log = logging.getLogger("nanoforge.serving")
ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client closes the connection (the request body was already read, so the
    next ASGI message can only be http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _race(work: Awaitable[Any], receive: Callable[[], Awaitable[dict]]) -> Any:
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


class Fanout:
    """Several engine streams merged into one queue; close() cancels the pumps, and a cancelled
    pump's generate() stream is closed mid-await, which aborts its request in the engine."""

    def __init__(self, client: EngineClient, requests: list[GenerateRequest]):
        self.client, self.q = client, asyncio.Queue()
        self.tasks = [asyncio.ensure_future(self._pump(i, r)) for i, r in enumerate(requests)]

    async def _pump(self, i: int, req: GenerateRequest) -> None:
        finished = False
        try:
            async for d in self.client.generate(req):
                finished = d.finish_reason is not None
                self.q.put_nowait((i, d))
        except Exception as e:  # an engine client that failed (e.g. remote engine gone): that choice fails
            log.exception("engine stream %s failed", req.request_id)
            self.q.put_nowait((i, TokenDelta(req.request_id, finish_reason="error", error=f"engine unavailable: {e}")))
            return
        if not finished:
            self.q.put_nowait((i, TokenDelta(req.request_id, finish_reason="error", error="engine stream ended early")))

    async def next(self) -> tuple[int, TokenDelta]:
        return await self.q.get()

    def stop(self, i: int) -> None:
        self.tasks[i].cancel()

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and run on_close, as soon as the client disconnects — also
    while waiting for the engine, when nothing is being sent (Starlette would only notice on send);
    on_disconnect runs too when the client went away before the last event."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None],
                 on_disconnect: Callable[[], None] = lambda: None):
        super().__init__(body, media_type="text/event-stream", headers={"cache-control": "no-cache",
                                                                        "x-accel-buffering": "no"})
        self.body_gen, self.on_close, self.on_disconnect = body, on_close, on_disconnect

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def pump() -> None:
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for event in self.body_gen:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                await self.body_gen.aclose()

        task, watch = asyncio.ensure_future(pump()), asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            task.cancel()
            self.on_close()
        error = task.exception() if task.done() and not task.cancelled() else None
        if not task.done() or task.cancelled() or isinstance(error, OSError):  # OSError: a send to a closed socket
            self.on_disconnect()
        elif error is not None:
            log.error("SSE stream failed", exc_info=error)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_status(cs: ChoiceStream) -> APIError:
    """An engine error before any token is the request's fault (bad parameter, too big for the KV
    pool); a failed step or a lost engine is the server's."""
    why = cs.error or "request aborted by the engine"
    if cs.num_tokens == 0 and cs.error and not why.startswith(("engine step failed", "engine unavailable")):
        return APIError(400, why)
    if cs.error and not why.startswith("engine unavailable"):
        return APIError(500, why, "server_error")
    return APIError(503, why, "service_unavailable")  # aborted, or an engine (e.g. an encode engine) gone


class _CountRequests:
    """Pure ASGI middleware (BaseHTTPMiddleware would get between streaming and disconnects)."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_)
        finally:
            path = scope.get("path", "")
            self.metrics.requests[(path if path in ENDPOINTS else "other", status[0])] += 1


class OpenAIServer:
    def __init__(self, client: EngineClient, tokenizer: Any, model_name: str, api_key: str | None):
        self.client, self.tok, self.model, self.api_key = client, tokenizer, model_name, api_key
        self.names, self.metrics, self.created = TokenNames(tokenizer), ServerMetrics(model_name), int(time.time())

    def auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        h = request.headers.get("authorization", "")
        token = h[7:].strip() if h[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        self.auth(request)
        body = load_body(await request.body())
        check_model(body, self.model)
        return body

    # --- one request: n choices per prompt -----------------------------------------------------
    def _start(self, req: ParsedRequest, rid: str) -> tuple[Fanout, list[ChoiceStream]]:
        gens, streams = [], []
        for p, ids in enumerate(req.prompts):
            for j in range(req.n):
                k = p * req.n + j
                params = dict(req.params)
                if params.get("seed") is not None:
                    params["seed"] += j  # n samples of one seeded request differ, and repeat
                gens.append(GenerateRequest(f"{rid}-{k}", list(ids), params, images=req.images,
                                            fit_max_tokens=req.fit_max_tokens))
                streams.append(ChoiceStream(k, self.tok, params.get("stop", []), req.parse_tools))
        return Fanout(self.client, gens), streams

    def _step(self, fan: Fanout, streams: list[ChoiceStream], i: int, d: TokenDelta, clock: dict) -> Update | None:
        cs = streams[i]
        if cs.finished:
            return None
        if d.token_ids:
            now, k = time.perf_counter(), len(d.token_ids)
            self.metrics.generation_tokens += k
            last = clock.get(i)
            if last is None:
                self.metrics.ttft.observe(now - clock["t0"])
            else:
                for _ in range(k):
                    self.metrics.itl.observe((now - last) / k)
            clock[i] = now
        up = cs.push(d)
        if cs.finished and d.finish_reason is None:
            fan.stop(i)  # a stop string the engine has not acted on yet
        return up

    def _usage(self, req: ParsedRequest, streams: list[ChoiceStream]) -> dict[str, Any]:
        prompt = sum(streams[p * req.n].num_prompt or len(ids) for p, ids in enumerate(req.prompts))  # images expanded
        done = sum(cs.num_tokens for cs in streams)
        cached = sum(streams[p * req.n].num_cached for p in range(len(req.prompts)))
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def run(self, request: Request, req: ParsedRequest, chat: bool) -> Response:
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        clock = {"t0": time.perf_counter()}
        fan, streams = self._start(req, rid)
        base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model}
        handed_over = False
        try:
            if req.stream:
                first = await _race(self._first_deltas(fan, len(streams)), request.receive)
                for i, d in first:
                    if d.finish_reason in ("error", "abort") and not d.token_ids and not streams[i].num_tokens:
                        streams[i].push(d)
                        raise self._failed(req, streams[i])
                handed_over = True
                self._served(req)
                return SSEResponse(self._stream(fan, streams, req, base, chat, first, clock), fan.close,
                                   on_disconnect=self._client_gone)
            acc = await _race(self._collect(fan, streams, clock), request.receive)
        except ClientGone:
            self._served(req)  # the engine worked on the prompt until the client left
            self._client_gone()
            return Response(status_code=499)
        finally:
            if not handed_over:
                fan.close()
        for cs in streams:
            if cs.finish_reason in ("error", "abort"):
                raise self._failed(req, cs)
        self._served(req)
        self.metrics.e2e.observe(time.perf_counter() - clock["t0"])
        choices = [self._final_choice(cs, up, req, chat) for cs, up in zip(streams, acc)]
        return JSONResponse({**base, "choices": choices, "usage": self._usage(req, streams)})

    def _served(self, req: ParsedRequest) -> None:
        self.metrics.prompt_tokens += sum(len(p) for p in req.prompts)

    def _client_gone(self) -> None:
        self.metrics.aborted_by_client += 1

    def _failed(self, req: ParsedRequest, cs: ChoiceStream) -> APIError:
        """The error a failed choice fails its request with; a request refused as the client's
        fault (400) served nothing, so its prompt tokens are not counted."""
        err = _error_status(cs)
        if err.status != 400:
            self._served(req)
        return err

    async def _first_deltas(self, fan: Fanout, n: int) -> list[tuple[int, TokenDelta]]:
        """Wait for every choice's first delta so that a request the engine refuses gets a proper
        HTTP error instead of a 200 stream that carries one."""
        got, seen = [], set()
        while len(seen) < n:
            i, d = await fan.next()
            got.append((i, d))
            seen.add(i)
        return got

    async def _collect(self, fan: Fanout, streams: list[ChoiceStream], clock: dict) -> list[Update]:
        acc = [Update() for _ in streams]
        while not all(cs.finished for cs in streams):
            i, d = await fan.next()
            up = self._step(fan, streams, i, d, clock)
            if up is not None:
                a = acc[i]
                a.content += up.content
                a.tool_calls += up.tool_calls
                a.logprobs += up.logprobs
                a.finish_reason = up.finish_reason or a.finish_reason
        return acc

    def _final_choice(self, cs: ChoiceStream, up: Update, req: ParsedRequest, chat: bool) -> dict[str, Any]:
        lp = None
        if req.logprobs is not None:
            lp = chat_logprobs(up.logprobs, self.names) if chat else completion_logprobs(up.logprobs, self.names)
        if not chat:
            return {"index": cs.index, "text": up.content, "logprobs": lp, "finish_reason": cs.finish_reason}
        msg: dict[str, Any] = {"role": "assistant", "content": up.content, "refusal": None}
        if up.tool_calls:
            msg["content"] = up.content.strip() or None
            msg["tool_calls"] = up.tool_calls
        return {"index": cs.index, "message": msg, "logprobs": lp, "finish_reason": cs.finish_reason}

    async def _stream(self, fan: Fanout, streams: list[ChoiceStream], req: ParsedRequest, base: dict, chat: bool,
                      first: list[tuple[int, TokenDelta]], clock: dict) -> AsyncIterator[str]:
        base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if req.include_usage else {}
        calls_sent, offsets = [0] * len(streams), [0] * len(streams)

        def chunk(i: int, up: Update) -> str | None:
            if not up:
                return None
            lp = None
            if req.logprobs is not None and up.logprobs:
                if chat:
                    lp = chat_logprobs(up.logprobs, self.names)
                else:
                    lp = completion_logprobs(up.logprobs, self.names, offsets[i])
                    offsets[i] += sum(len(t) for t in lp["tokens"])
            if not chat:
                c = {"index": i, "text": up.content, "logprobs": lp, "finish_reason": up.finish_reason}
                return sse({**base, "choices": [c], **extra})
            delta: dict[str, Any] = {}
            if up.content or not up.tool_calls:
                delta["content"] = up.content
            if up.tool_calls:
                delta["tool_calls"] = [{"index": calls_sent[i] + k, **c} for k, c in enumerate(up.tool_calls)]
                calls_sent[i] += len(up.tool_calls)
            c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": up.finish_reason}
            return sse({**base, "choices": [c], **extra})

        if chat:
            for i in range(len(streams)):
                c = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                yield sse({**base, "choices": [c], **extra})
        pending = list(first)
        while not all(cs.finished for cs in streams):
            i, d = pending.pop(0) if pending else await fan.next()
            up = self._step(fan, streams, i, d, clock)
            if up is None:
                continue
            if streams[i].finish_reason in ("error", "abort"):
                yield sse(_error_status(streams[i]).body())
                break
            if (event := chunk(i, up)) is not None:
                yield event
        self.metrics.e2e.observe(time.perf_counter() - clock["t0"])
        if req.include_usage:
            yield sse({**base, "choices": [], "usage": self._usage(req, streams)})
        yield "data: [DONE]\n\n"


def build_app(client: EngineClient, tokenizer: Any, model_name: str, api_key: str | None = None,
              allowed_local_media_path: str | Path | None = None) -> FastAPI:
    """The app over `client`; `tokenizer` renders chat templates and decodes output (text prompts
    and chat need one). With api_key set, /v1/* wants `Authorization: Bearer <api_key>`. With
    allowed_local_media_path, chat image_url parts may be file:// URLs or paths of files under it."""
    media_dir = check_media_dir(allowed_local_media_path)
    app = FastAPI(title="NanoForge", docs_url=None, redoc_url=None, openapi_url=None)
    srv = app.state.server = OpenAIServer(client, tokenizer, model_name, api_key)
    app.add_middleware(_CountRequests, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {e.errors()!s:.500}").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, "internal server error", "server_error").body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await srv.body(request)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so chat is not available", param="messages")
        return await srv.run(request, parse_chat(body, tokenizer, client.max_model_len, media_dir), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await srv.body(request)
        return await srv.run(request, parse_completion(body, tokenizer, client.max_model_len), chat=False)

    def _card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": srv.created, "owned_by": "nanoforge",
                "max_model_len": client.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        srv.auth(request)
        return {"object": "list", "data": [_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict:
        srv.auth(request)
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return _card()

    @app.get("/health")
    async def health() -> Response:
        try:
            await client.stats()
        except Exception as e:  # the engine (or the link to it) is down
            return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        try:
            stats = await client.stats()
        except Exception:
            stats = None
        return PlainTextResponse(srv.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

"""`nanoforge bench serve`: a load generator for any OpenAI-compatible completions endpoint.

Requests arrive as a Poisson process at `rate` per second (inf = all at once), each a prompt of
random token ids (sent as a token list, so no tokenizer round trip skews lengths) asking for
exactly `output_len` tokens (ignore_eos). Every request streams; per request we record the time
to first token (TTFT), the gaps between later chunks (ITL) and the time per output token after
the first (TPOT). The summary has p50/p99 of each, output tok/s and the error count.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NanoForgeError


@dataclass
class ServeWorkload:
    num_prompts: int = 64
    rate: float = float("inf")  # requests per second
    input_len: int = 128
    output_len: int = 64
    vocab: int = 1000  # prompt token ids are drawn below this
    seed: int = 0


@dataclass
class RequestTiming:
    ok: bool = False
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    output_tokens: int = 0
    error: str = ""


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "mean": sum(s) / len(s)}


async def _one(client: Any, url: str, model: str, prompt: list[int], out_len: int, headers: dict) -> RequestTiming:
    t = RequestTiming()
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                t.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return t
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    t.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if t.ttft_s == 0.0:
                    t.ttft_s = now - start
                else:
                    t.itl_s.append(now - last)
                last = now
        t.latency_s = time.perf_counter() - start
        t.ok = t.ttft_s > 0
        if not t.ok:
            t.error = "no tokens streamed"
    except Exception as e:  # a benchmark reports failures, it does not stop at the first
        t.error = f"{type(e).__name__}: {e}"
    return t


async def run_load(url: str, model: str, w: ServeWorkload, api_key: str | None = None) -> dict[str, Any]:
    import httpx

    rng = random.Random(w.seed)
    prompts = [[rng.randrange(w.vocab) for _ in range(w.input_len)] for _ in range(w.num_prompts)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(600.0, connect=10.0)
    limits = httpx.Limits(max_connections=w.num_prompts + 8, max_keepalive_connections=w.num_prompts + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for p in prompts:
            tasks.append(asyncio.create_task(_one(client, url.rstrip("/"), model, p, w.output_len, headers)))
            if w.rate != float("inf"):
                await asyncio.sleep(rng.expovariate(w.rate))
        timings = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ok = [t for t in timings if t.ok]
    out_tokens = sum(t.output_tokens or (len(t.itl_s) + 1) for t in ok)
    tpot = [(t.latency_s - t.ttft_s) / max(t.output_tokens - 1, 1) for t in ok if t.output_tokens > 1]
    return {"requests": len(timings), "completed": len(ok), "errors": [t.error for t in timings if not t.ok][:10],
            "num_errors": len(timings) - len(ok), "duration_s": elapsed, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / elapsed, "request_rate": len(ok) / elapsed,
            "ttft_s": _percentiles([t.ttft_s for t in ok]), "tpot_s": _percentiles(tpot),
            "itl_s": _percentiles([x for t in ok for x in t.itl_s])}


def bench_serve(url: str, model: str, w: ServeWorkload, results_dir: Path, api_key: str | None = None) -> dict:
    if w.num_prompts < 1 or w.input_len < 1 or w.output_len < 1 or not w.rate > 0:
        raise NanoForgeError("bench serve: need --num-prompts, --input-len, --output-len >= 1 and --rate > 0")
    workload = {**asdict(w), "rate": None if w.rate == float("inf") else w.rate}  # None: all at once
    result = {"benchmark": "serve", "url": url, "model": model, "workload": workload,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              **asyncio.run(run_load(url, model, w, api_key))}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"serve-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    result["path"] = str(path)
    return result

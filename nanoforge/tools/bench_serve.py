"""`nanoforge bench serve`: a load generator for any OpenAI-compatible completions endpoint.

Two modes. Poisson (open loop): `num_prompts` requests arrive as a Poisson process at `rate` per
second (inf = all at once). Closed loop: `concurrency` clients each send a request, wait for it to
finish and send the next, until `duration` seconds are over (requests in flight then may finish);
this is the steady-load test: the server sees exactly `concurrency` streams the whole time.

Every request is a prompt of random token ids (sent as a token list, so no tokenizer round trip
skews lengths) asking for exactly `output_len` tokens (ignore_eos), streamed; per request we record
the time to first token (TTFT), the gaps between later chunks (ITL) and the time per output token
after the first (TPOT). A request counts as an error on an HTTP error, an error event in the
stream, a connection failure, or a stream that ends without a finish_reason and [DONE].

Leak check: the server's engine gauges (GET /metrics) are read before and after the run; after it
we wait a few seconds for the engine to go idle and every block free before the run to be free
again, and report `leaked_blocks` (None when the server does not export those gauges).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..errors import NanoForgeError

GAUGES = {"running": "nanoforge_num_requests_running", "waiting": "nanoforge_num_requests_waiting",
          "free": "nanoforge_kv_cache_blocks_free", "total": "nanoforge_kv_cache_blocks_total"}
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


@dataclass
class ServeWorkload:
    num_prompts: int = 64
    rate: float = float("inf")  # requests per second
    input_len: int = 128
    output_len: int = 64
    vocab: int = 1000  # prompt token ids are drawn below this
    seed: int = 0
    concurrency: int | None = None  # closed loop: this many clients, one request in flight each,
    duration: float | None = None   # sending new requests for this many seconds

    @property
    def mode(self) -> str:
        return "closed-loop" if self.concurrency is not None or self.duration is not None else "poisson"

    def validate(self) -> None:
        """One NanoForgeError line naming the first bad flag, before any request is sent."""
        checks: list[tuple[str, Any, bool, str]] = [
            ("--input-len", self.input_len, _int(self.input_len) and self.input_len >= 1, "an integer >= 1"),
            ("--output-len", self.output_len, _int(self.output_len) and self.output_len >= 1, "an integer >= 1"),
            ("--vocab", self.vocab, _int(self.vocab) and self.vocab >= 1, "an integer >= 1")]
        if self.mode == "closed-loop":
            if self.concurrency is None or self.duration is None:
                missing = "--duration" if self.duration is None else "--concurrency"
                raise NanoForgeError(f"bench serve: closed-loop mode needs both --concurrency and --duration "
                                     f"({missing} missing)")
            checks += [("--concurrency", self.concurrency, _int(self.concurrency) and self.concurrency >= 1,
                        "an integer >= 1"),
                       ("--duration", self.duration, 0 < self.duration < math.inf, "a finite number of seconds > 0")]
        else:
            checks += [("--num-prompts", self.num_prompts, _int(self.num_prompts) and self.num_prompts >= 1,
                        "an integer >= 1"), ("--rate", self.rate, self.rate > 0, "> 0 requests/s (inf: all at once)")]
        for flag, value, ok, need in checks:
            if not ok:
                raise NanoForgeError(f"bench serve: {flag} must be {need}, got {value}")


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def workload_from_flags(*, rate: float | None, num_prompts: int | None, concurrency: int | None,
                        duration: float | None, input_len: int, output_len: int, vocab: int, seed: int) -> ServeWorkload:
    """CLI flags -> a validated workload. Flags left unset are None, so that mixing the two modes'
    flags is caught rather than silently ignored."""
    if (concurrency is not None or duration is not None) and (rate is not None or num_prompts is not None):
        raise NanoForgeError("bench serve: --rate/--num-prompts (Poisson) and --concurrency/--duration "
                             "(closed loop) exclude each other")
    w = ServeWorkload(64 if num_prompts is None else num_prompts, float("inf") if rate is None else rate,
                      input_len, output_len, vocab, seed, concurrency, duration)
    w.validate()
    return w


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
    finished = done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                t.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return t
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or done:
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # the server's in-stream failure event
                    t.error = f"error event: {str(chunk['error'].get('message', chunk['error']))[:200]}"
                    return t
                if chunk.get("usage"):
                    t.output_tokens = chunk["usage"]["completion_tokens"]
                finished |= any(c.get("finish_reason") for c in chunk.get("choices", []))
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if t.ttft_s == 0.0:
                    t.ttft_s = now - start
                else:
                    t.itl_s.append(now - last)
                last = now
        t.latency_s = time.perf_counter() - start
        t.error = ("no tokens streamed" if t.ttft_s == 0 else "stream ended without a finish_reason" if not finished
                   else "stream ended without [DONE]" if not done else "")
        t.ok = not t.error
    except Exception as e:  # a benchmark reports failures, it does not stop at the first
        t.error = f"{type(e).__name__}: {e}"
    return t


async def _gauges(client: Any, url: str) -> dict[str, float] | None:
    """The engine gauges of GET /metrics (summed over label sets); None if unreachable or incomplete."""
    try:
        r = await client.get(url + "/metrics", timeout=10.0)
    except Exception:
        return None
    if r.status_code != 200:
        return None
    by_name: dict[str, float] = {}
    for line in r.text.splitlines():
        if (m := _SAMPLE.match(line)) and m.group(1) in GAUGES.values():
            by_name[m.group(1)] = by_name.get(m.group(1), 0.0) + float(m.group(2))
    out = {k: by_name[v] for k, v in GAUGES.items() if v in by_name}
    return out if len(out) == len(GAUGES) else None


async def _leak_check(client: Any, url: str, before: dict[str, float] | None, wait_s: float) -> dict[str, Any]:
    """Blocks free before the run that are still not free once the engine is idle (waiting up to wait_s)."""
    if before is None:
        return {"leaked_blocks": None, "kv_blocks": None,
                "leak_note": f"GET /metrics lacks the gauges {', '.join(GAUGES.values())}: leak check skipped"}
    end = time.perf_counter() + wait_s
    while True:
        after = await _gauges(client, url)
        if after is None:
            return {"leaked_blocks": None, "kv_blocks": {"before": before, "after": None},
                    "leak_note": "GET /metrics failed after the run: leak check skipped"}
        idle = after["running"] + after["waiting"] == 0
        if (idle and after["free"] >= min(before["free"], after["total"])) or time.perf_counter() > end:
            break
        await asyncio.sleep(0.05)
    res: dict[str, Any] = {"leaked_blocks": max(0, int(before["free"] - after["free"])),
                           "kv_blocks": {"before": before, "after": after}}
    if not idle:
        res["leak_note"] = (f"server not idle {wait_s:.0f} s after the run ({after['running']:.0f} running, "
                            f"{after['waiting']:.0f} waiting)")
    return res


def _prompt(rng: random.Random, w: ServeWorkload) -> list[int]:
    return [rng.randrange(w.vocab) for _ in range(w.input_len)]


async def poisson_arrivals(w: ServeWorkload, send: Callable[[list[int]], Awaitable[RequestTiming]]
                           ) -> list[RequestTiming]:
    """`send` each of the workload's prompts, the gaps between them exponential at w.rate; the same
    seed gives the same prompts and gaps (so `bench pd` offers two deployments one workload)."""
    rng = random.Random(w.seed)
    prompts = [_prompt(rng, w) for _ in range(w.num_prompts)]
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(send(p)))
        if w.rate != float("inf"):
            await asyncio.sleep(rng.expovariate(w.rate))
    return list(await asyncio.gather(*tasks))


async def _poisson(client: Any, url: str, model: str, w: ServeWorkload, headers: dict) -> list[RequestTiming]:
    return await poisson_arrivals(w, lambda p: _one(client, url, model, p, w.output_len, headers))


async def _closed_loop(client: Any, url: str, model: str, w: ServeWorkload, headers: dict) -> list[RequestTiming]:
    deadline = time.perf_counter() + float(w.duration or 0)

    async def worker(k: int) -> list[RequestTiming]:
        rng, out = random.Random(f"{w.seed}/{k}"), []
        while time.perf_counter() < deadline:
            out.append(t := await _one(client, url, model, _prompt(rng, w), w.output_len, headers))
            if not t.ok:  # a failing server is counted, not hammered in a tight loop
                await asyncio.sleep(0.05)
        return out

    return [t for ts in await asyncio.gather(*(worker(k) for k in range(int(w.concurrency or 0)))) for t in ts]


async def run_load(url: str, model: str, w: ServeWorkload, api_key: str | None = None,
                   leak_wait_s: float = 5.0) -> dict[str, Any]:
    import httpx

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(600.0, connect=10.0)
    conns = (w.concurrency if w.mode == "closed-loop" else w.num_prompts) + 8
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        before = await _gauges(client, url)
        start = time.perf_counter()
        run = _closed_loop if w.mode == "closed-loop" else _poisson
        timings = await run(client, url, model, w, headers)
        elapsed = time.perf_counter() - start
        leak = await _leak_check(client, url, before, leak_wait_s)
    return {**summarize(timings, elapsed), **leak}


def summarize(timings: list[RequestTiming], elapsed: float) -> dict[str, Any]:
    """Counts, throughput and TTFT / TPOT / ITL percentiles of a run that took `elapsed` seconds."""
    ok = [t for t in timings if t.ok]
    out_tokens = sum(t.output_tokens or (len(t.itl_s) + 1) for t in ok)
    tpot = [(t.latency_s - t.ttft_s) / max(t.output_tokens - 1, 1) for t in ok if t.output_tokens > 1]
    return {"requests": len(timings), "completed": len(ok), "errors": [t.error for t in timings if not t.ok][:10],
            "num_errors": len(timings) - len(ok), "duration_s": elapsed, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / elapsed, "request_rate": len(ok) / elapsed,
            "ttft_s": _percentiles([t.ttft_s for t in ok]), "tpot_s": _percentiles(tpot),
            "itl_s": _percentiles([x for t in ok for x in t.itl_s])}


def _machine() -> dict[str, Any]:
    try:
        import torch

        from .bench_offline import machine_info
        return machine_info("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:  # the load generator must not need the engine's stack to run
        import platform
        return {"platform": platform.platform(), "python": platform.python_version(), "note": str(e)}


def bench_serve(url: str, model: str, w: ServeWorkload, results_dir: Path, api_key: str | None = None,
                leak_wait_s: float = 5.0) -> dict:
    w.validate()
    workload = {**asdict(w), "rate": None if w.rate == float("inf") else w.rate}  # None: all at once
    if w.mode == "closed-loop":
        workload["rate"] = workload["num_prompts"] = None
    result = {"benchmark": "serve", "mode": w.mode, "url": url, "model": model, "concurrency": w.concurrency,
              "duration": w.duration, "workload": workload, "machine": _machine(),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              **asyncio.run(run_load(url, model, w, api_key, leak_wait_s))}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"serve-{w.mode}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    result["path"] = str(path)
    return result


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The human summary shared by the CLI and bench/serve_load.py."""
    ms = lambda d: f"p50 {1000 * d['p50']:.1f} ms  p99 {1000 * d['p99']:.1f} ms"  # noqa: E731
    how = (f"closed loop, {r['concurrency']} clients for {r['duration']:g} s" if r.get("mode") == "closed-loop"
           else "Poisson arrivals")
    lines = [f"{how}: {r['completed']}/{r['requests']} requests in {r['duration_s']:.1f} s, {r['num_errors']} errors, "
             f"{r['output_tok_s']:.1f} output tok/s",
             f"TTFT {ms(r['ttft_s'])}", f"TPOT {ms(r['tpot_s'])}", f"ITL  {ms(r['itl_s'])}",
             *(f"  error: {e}" for e in r["errors"][:3]),
             f"leaked_blocks {r['leaked_blocks']}" + (f" ({r['leak_note']})" if r.get("leak_note") else "")]
    return lines


def cmd_bench_serve(a: argparse.Namespace) -> int:
    w = workload_from_flags(rate=a.rate, num_prompts=a.num_prompts, concurrency=a.concurrency, duration=a.duration,
                            input_len=a.input_len, output_len=a.output_len, vocab=a.vocab, seed=a.seed)
    r = bench_serve(a.url, a.model, w, Path(a.results_dir), a.api_key)
    print("\n".join(summary_lines(r)) + f"\nwrote {r['path']}")
    return 0 if r["num_errors"] == 0 and r["leaked_blocks"] in (0, None) else 1


def add_bench_serve_parser(bsub: Any) -> None:
    """`nanoforge bench serve` (cli.py registers it here, to stay small)."""
    v = bsub.add_parser("serve", help="load test of a running OpenAI-compatible server (Poisson arrivals, "
                        "or closed loop with --concurrency/--duration)")
    v.add_argument("--url", default="http://127.0.0.1:8000")
    v.add_argument("--model", required=True, help="the served model name")
    v.add_argument("--rate", type=float, help="Poisson: requests per second (default: all at once)")
    v.add_argument("--num-prompts", type=int, help="Poisson: number of requests (default 64)")
    v.add_argument("--concurrency", type=int, help="closed loop: clients, each with one request in flight")
    v.add_argument("--duration", type=float, help="closed loop: seconds to keep sending (in-flight requests finish)")
    v.add_argument("--input-len", type=int, default=128)
    v.add_argument("--output-len", type=int, default=64)
    v.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--api-key")
    v.add_argument("--results-dir", default="bench/results")
    v.set_defaults(run=cmd_bench_serve)

"""`nanoforge bench pd` (NanoDeploy's disagg.py): one Poisson workload, at several request rates,
through a PD deployment (a prefill engine and a decode engine, each its own process, the KV pulled
from one to the other) and through one co-located engine; TTFT and TPOT (p50 / p99) and throughput
of both, and PD over co-located, written as JSON to bench/results/pd/.

Both deployments are real engine servers (serving/engine_server.py) behind a Router in this
process, so they share the client path, and a rate's prompts and arrival gaps are the same for both
(bench serve's seeded Poisson generator, `bench_serve.poisson_arrivals`); greedy, so their tokens
can be compared too. Each deployment starts fresh and runs the rates in order, with new prompts per
rate (no prefix-cache hits across rates). On one GPU the PD engines share the card: the prefill
engine starts first with half of --gpu-memory-utilization, then the decode engine with all of it
(the runner's budget counts what others already hold), so each has about half; the co-located
engine gets all. On CPU --cores is split the same way (OMP threads): all for the co-located
engine, half for each PD engine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from .. import defaults
from ..errors import NanoForgeError
from .bench_serve import RequestTiming, ServeWorkload, poisson_arrivals, summarize
from .mps import check_split, client_env, mps_daemon

RATIO_KEYS = (("ttft_s", "p50"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99"))


@dataclass
class PDBenchConfig:
    model: str = "qwen3-0.6b"  # a preset (random weights), a checkpoint or a plan dir
    device: str = "cpu"
    rates: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # requests per second
    num_prompts: int = 32  # per rate
    input_len: int = 512
    output_len: int = 64
    vocab: int = 1000  # prompt token ids are drawn below this
    seed: int = 0
    dtype: str | None = None  # the engines' --dtype (a preset: f32 on CPU, bf16 on CUDA)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_blocks: int | None = None  # per engine (default: sized from memory)
    gpu_memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION  # a deployment's share of the card
    kv_transport: str = "auto"
    cores: int | None = None  # CPU: a deployment's threads (default: every core)
    enforce_eager: bool = False
    startup_timeout: float = 600.0
    mps_split: int | None = None  # CUDA: PD engines under a private MPS daemon, prefill on this % of SMs (tools/mps.py)

    def validate(self) -> None:
        checks = [("--rate", self.rates, bool(self.rates) and all(0 < r for r in self.rates), "one or more rates > 0"),
                  ("--num-prompts", self.num_prompts, self.num_prompts >= 1, "an integer >= 1"),
                  ("--input-len", self.input_len, self.input_len >= 1, "an integer >= 1"),
                  ("--output-len", self.output_len, self.output_len >= 2, "an integer >= 2 (TPOT needs two tokens)"),
                  ("--vocab", self.vocab, self.vocab >= 1, "an integer >= 1"),
                  ("--gpu-memory-utilization", self.gpu_memory_utilization, 0 < self.gpu_memory_utilization <= 1,
                   "in (0, 1]"),
                  ("--cores", self.cores, self.cores is None or self.cores >= 1, "an integer >= 1")]
        for flag, value, ok, need in checks:
            if not ok:
                raise NanoForgeError(f"bench pd: {flag} must be {need}, got {value}")
        check_split(self.mps_split, self.device)

    def threads(self, share: float) -> int:
        return max(1, int((self.cores or os.cpu_count() or 1) * share))


@dataclass
class EngineProc:
    role: str
    proc: subprocess.Popen
    addr: str
    hello: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        from ..kv_contract import KVContract

        h = self.hello
        kv = KVContract.from_json(h["kv_contract"], f"engine at {self.addr}: kv_contract")
        return {"role": self.role, "addr": self.addr, "pid": h.get("pid"), "max_num_seqs": h.get("max_num_seqs"),
                "max_model_len": h.get("max_model_len"), "block_size": kv.block_size, "kv_dtype": kv.dtype,
                "kv_bytes_per_token": kv.bytes_per_token(), "flags": getattr(self.proc, "flags", {})}


def engine_flags(cfg: PDBenchConfig, role: str, mem: float, kv_transport: str | None = None) -> dict[str, Any]:
    """start_engine_server's options for one engine: the model (a preset by name), the shared
    engine flags, and on CUDA its memory share (cumulative: see the module docstring)."""
    from ..models.presets import PRESETS

    flags = {"model_preset": cfg.model if cfg.model in PRESETS else None, "role": role, "device": cfg.device,
             "dtype": cfg.dtype, "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
             "num_blocks": cfg.num_blocks, "enforce_eager": cfg.enforce_eager}
    if role == "decode" or (kv_transport or cfg.kv_transport) == "dlslime":  # dlslime: both ends register the pool
        flags["kv_transport"] = kv_transport or cfg.kv_transport
    if cfg.device == "cuda":
        flags["gpu_memory_utilization"] = round(mem, 4)
    return flags


def _start(cfg: PDBenchConfig, role: str, flags: dict[str, Any], threads: float, addr: str | None,
           env: dict[str, str] | None = None) -> EngineProc:
    from ..models.presets import PRESETS
    from ..serving.engine_server import start_engine_server

    env = {"OMP_NUM_THREADS": str(cfg.threads(threads))} if cfg.device == "cpu" else env
    proc, addr = start_engine_server(None if cfg.model in PRESETS else cfg.model, addr, env=env, **flags)
    proc.flags = {**{k: v for k, v in flags.items() if v is not None}, **(env or {})}  # type: ignore[attr-defined]
    return EngineProc(role, proc, addr)


def _ready(cfg: PDBenchConfig, e: EngineProc) -> None:
    from ..serving.engine_server import wait_engine_ready

    e.hello = wait_engine_ready(e.proc, e.addr, cfg.startup_timeout)


@contextlib.contextmanager
def deployment(cfg: PDBenchConfig, kind: str, kv_transport: str | None = None,
               addrs: dict[str, str] | None = None) -> Iterator[list[EngineProc]]:
    """Start the engines of `kind` ("pd": prefill + decode, "colocated": one engine of role both)
    and stop them on exit; `addrs` may give each role's ZMQ address (default: a free TCP port)."""
    engines: list[EngineProc] = []
    addrs = addrs or {}
    with contextlib.ExitStack() as stack:
        mps = stack.enter_context(mps_daemon()) if kind == "pd" and cfg.mps_split else None
        env = {r: client_env(mps, p) for r, p in (("prefill", cfg.mps_split), ("decode", 100 - cfg.mps_split))} \
            if mps is not None and cfg.mps_split else {}
        try:
            if kind == "colocated":
                engines.append(_start(cfg, "both", engine_flags(cfg, "both", cfg.gpu_memory_utilization), 1.0,
                                      addrs.get("both")))
            else:
                half = cfg.gpu_memory_utilization / 2
                engines.append(_start(cfg, "prefill", engine_flags(cfg, "prefill", half, kv_transport), 0.5,
                                      addrs.get("prefill"), env.get("prefill")))
                if cfg.device == "cuda":  # its memory is taken before the decode engine sizes its own
                    _ready(cfg, engines[0])
                engines.append(_start(cfg, "decode", engine_flags(cfg, "decode", cfg.gpu_memory_utilization,
                                                                  kv_transport), 0.5, addrs.get("decode"),
                                      env.get("decode")))
            for e in engines:
                if not e.hello:
                    _ready(cfg, e)
            yield engines
        finally:  # before the MPS daemon (if any) is told to quit
            from ..serving.engine_server import stop_engine_server

            for e in engines:
                stop_engine_server(e.proc)


async def connect_router(engines: list[EngineProc]) -> Any:
    from ..serving.router import Router

    by_role = {r: [e.addr for e in engines if e.role == r] for r in ("prefill", "decode", "both")}
    return await Router.connect(by_role["prefill"], by_role["decode"], by_role["both"])


async def one_request(router: Any, rid: str, prompt: list[int], out_len: int,
                      tokens: list[int] | None = None) -> RequestTiming:
    """One greedy request of exactly out_len tokens through the router, timed as bench serve times
    an HTTP stream; the tokens go to `tokens`."""
    from ..serving.protocol import GenerateRequest

    t, got, finish = RequestTiming(), tokens if tokens is not None else [], None
    params = {"max_tokens": out_len, "temperature": 0, "ignore_eos": True}
    start = last = time.perf_counter()
    try:
        async for d in router.generate(GenerateRequest(rid, list(prompt), params)):
            if d.token_ids:
                now = time.perf_counter()
                if not got:
                    t.ttft_s = now - start
                else:
                    t.itl_s.append(now - last)
                last = now
                got += d.token_ids
            if d.finish_reason:
                finish = d.finish_reason
                if finish == "error":
                    t.error = f"error: {d.error}"
    except Exception as e:  # a benchmark counts failures, it does not stop at the first
        t.error = f"{type(e).__name__}: {e}"
    t.latency_s, t.output_tokens = time.perf_counter() - start, len(got)
    if not t.error and (finish not in ("length", "stop") or len(got) != out_len):
        t.error = f"finish_reason {finish!r} after {len(got)} of {out_len} tokens"
    t.ok = not t.error
    return t


async def wait_idle(router: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Once nothing runs, waits or is parked on any engine (or at the timeout): the blocks not free."""
    end = time.monotonic() + timeout
    while True:
        s = await router.stats()
        busy = sum(e.get("num_running", 0) + e.get("num_waiting", 0) + e.get("kv_parked", 0) for e in s["engines"])
        leaked = sum(e.get("kv_blocks_total", 0) - e.get("kv_blocks_free", 0) for e in s["engines"])
        if (not busy and not leaked) or time.monotonic() > end:
            return {"leaked_blocks": leaked, "busy_after": busy, "stats": s}
        await asyncio.sleep(0.1)


MIGRATION_KEYS = ("kv_migrations", "kv_migration_bytes", "kv_migration_seconds", "kv_migration_fallbacks")


async def run_deployment(cfg: PDBenchConfig, kind: str, engines: list[EngineProc],
                         log: Any = print) -> list[dict[str, Any]]:
    """Every rate of the workload through one deployment: a summary per rate, with its tokens."""
    router = await connect_router(engines)
    try:
        warm = ServeWorkload(2, float("inf"), min(cfg.input_len, 64), 4, cfg.vocab, cfg.seed + 10_000)
        await poisson_arrivals(warm, lambda p: one_request(router, f"warm-{p[0]}-{time.monotonic_ns()}", p, 4))
        await wait_idle(router)
        out = []
        for i, rate in enumerate(cfg.rates):
            w = ServeWorkload(cfg.num_prompts, rate, cfg.input_len, cfg.output_len, cfg.vocab, cfg.seed + i)
            ids, tokens = itertools.count(), [[] for _ in range(cfg.num_prompts)]

            def send(p: list[int], ids: Any = ids, tokens: list = tokens, i: int = i) -> Any:
                k = next(ids)
                return one_request(router, f"{kind}-{i}-{k}", p, cfg.output_len, tokens[k])

            before = await router.stats()
            start = time.perf_counter()
            timings = await poisson_arrivals(w, send)
            elapsed = time.perf_counter() - start
            idle = await wait_idle(router)
            after = idle.pop("stats")
            r = {"rate": rate, **summarize(timings, elapsed), **idle, "loadavg_1m": os.getloadavg()[0],
                 "kv_migration": {k: after.get(k, 0) - before.get(k, 0) for k in MIGRATION_KEYS}, "tokens": tokens}
            log(f"{kind:<10} rate {rate:g}/s: " + line(r))
            out.append(r)
        return out
    finally:
        router.close()


def line(r: dict[str, Any]) -> str:
    ms = lambda d, q: f"{1000 * d[q]:.1f}"  # noqa: E731
    return (f"{r['completed']}/{r['requests']} ok, TTFT p50/p99 {ms(r['ttft_s'], 'p50')}/{ms(r['ttft_s'], 'p99')} ms, "
            f"TPOT p50/p99 {ms(r['tpot_s'], 'p50')}/{ms(r['tpot_s'], 'p99')} ms, {r['output_tok_s']:.1f} output tok/s, "
            f"leaked blocks {r['leaked_blocks']}, load {r['loadavg_1m']:.1f}")


def compare(pd: dict[str, Any], co: dict[str, Any]) -> dict[str, Any]:
    """PD over co-located per figure (< 1: PD is faster, except throughput), and how many
    requests got the same greedy tokens from both."""
    ratio = {f"{k.removesuffix('_s')}_{q}": pd[k][q] / co[k][q] if co[k][q] else None for k, q in RATIO_KEYS}
    ratio["output_tok_s"] = pd["output_tok_s"] / co["output_tok_s"] if co["output_tok_s"] else None
    same = sum(a == b and len(a) > 0 for a, b in zip(pd["tokens"], co["tokens"]))
    return {"ratio_pd_over_colocated": ratio, "same_greedy_tokens": f"{same}/{len(pd['tokens'])}"}


def bench_pd(cfg: PDBenchConfig, results_dir: Path, log: Any = print) -> dict[str, Any]:
    from .bench_offline import machine_info

    cfg.validate()
    runs: dict[str, list[dict[str, Any]]] = {}
    engines: dict[str, list[dict[str, Any]]] = {}
    for kind in ("pd", "colocated"):
        t0 = time.perf_counter()
        with deployment(cfg, kind) as procs:
            log(f"{kind}: {len(procs)} engine(s) up in {time.perf_counter() - t0:.1f} s")
            engines[kind] = [e.describe() for e in procs]
            runs[kind] = asyncio.run(run_deployment(cfg, kind, procs, log))
    rates = []
    for pd, co in zip(runs["pd"], runs["colocated"]):
        c = compare(pd, co)
        log(f"rate {pd['rate']:g}/s: PD / co-located  " + ", ".join(
            f"{k} {v:.2f}" for k, v in c["ratio_pd_over_colocated"].items() if v is not None)
            + f"; same greedy tokens {c['same_greedy_tokens']}")
        rates.append({"rate": pd["rate"], **c, "pd": _strip(pd), "colocated": _strip(co)})
    result = {"benchmark": "pd", "model": cfg.model, "device": cfg.device, "config": asdict(cfg),
              "machine": machine_info(cfg.device),  # after the engines: CUDA in this process would take memory
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "engines": engines,
              "rates": rates}
    from ..models.presets import PRESETS

    if cfg.model in PRESETS:
        result["weights"] = "random (the preset's config; the work does not depend on the values)"
    return write_result(result, results_dir, f"pd-{_label(cfg.model)}-{cfg.device}")


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "tokens"}


def _label(model: str) -> str:
    return Path(model).name or model


def write_result(result: dict[str, Any], results_dir: Path, stem: str) -> dict[str, Any]:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    result["path"] = str(path)
    return result


def config_from_args(a: argparse.Namespace) -> PDBenchConfig:
    """The flags of bench pd / bench migration that are PDBenchConfig fields (--rate: rates)."""
    names = {f.name for f in fields(PDBenchConfig)}
    given = {("rates" if k == "rate" else k): v for k, v in vars(a).items()}
    return PDBenchConfig(**{k: v for k, v in given.items() if k in names})


def cmd_bench_pd(a: argparse.Namespace) -> int:
    r = bench_pd(config_from_args(a), Path(a.results_dir))
    print(f"wrote {r['path']}")
    bad = [f"{kind} at {x['rate']:g}/s: {x[kind]['num_errors']} errors, {x[kind]['leaked_blocks']} blocks not freed"
           for x in r["rates"] for kind in ("pd", "colocated") if x[kind]["num_errors"] or x[kind]["leaked_blocks"]]
    for b in bad:
        print(f"FAIL: {b}")
    return 1 if bad else 0


def add_engine_bench_flags(p: argparse.ArgumentParser) -> None:
    """What bench pd and bench migration share: the model and how its engines are built."""
    p.add_argument("--model", default="qwen3-0.6b", help="preset (random weights), checkpoint, or plan dir")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: both PD engines share one GPU")
    p.add_argument("--dtype", choices=["auto", "f32", "bf16", "f16"], help="the engines' dtype (a preset: f32 on CPU, "
                   "bf16 on CUDA)")
    p.add_argument("--max-num-seqs", type=int, metavar="N")
    p.add_argument("--max-num-batched-tokens", type=int, metavar="N")
    p.add_argument("--num-blocks", type=int, metavar="N", help="KV blocks per engine (default: sized from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=defaults.GPU_MEMORY_UTILIZATION, metavar="F",
                   help="a deployment's share of the GPU: each PD engine gets about half (default %(default)s)")
    p.add_argument("--cores", type=int, metavar="N", help="CPU: a deployment's threads; each PD engine gets half "
                   "(default: every core)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--startup-timeout", type=float, default=600.0, metavar="S", help="seconds an engine may take to "
                   "start (default %(default)s)")
    p.add_argument("--results-dir", default="bench/results/pd")


def add_bench_pd_parser(bsub: Any) -> None:
    """`nanoforge bench pd` (cli.py registers it here, to stay small)."""
    from ..serving.engine_flags import KV_TRANSPORTS

    p = bsub.add_parser("pd", help="PD (prefill + decode engine processes) vs one co-located engine: the same "
                        "Poisson workload, TTFT / TPOT p50/p99 and throughput of both")
    add_engine_bench_flags(p)
    p.add_argument("--rate", type=float, nargs="+", default=[1.0, 2.0, 4.0], metavar="R",
                   help="Poisson request rates per second, each run in turn (default 1 2 4)")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per rate (default %(default)s)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto", help="how the decode engine pulls KV")
    p.add_argument("--mps-split", type=int, metavar="P", help="CUDA: run the PD engines under a private MPS daemon, "
                   "the prefill engine on P%% of the SMs and the decode engine on the rest, so decode steps do not "
                   "wait for the prefill engine's time slice (default: no MPS, time-sliced)")
    p.set_defaults(run=cmd_bench_pd)

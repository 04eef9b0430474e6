"""Prometheus text exposition (format 0.0.4) written by hand: a few counters and histograms kept by
the HTTP front end, plus gauges read from the engine's stats() at scrape time. No client library:
the format is a dozen lines of text and the server should not grow a dependency for it."""
from __future__ import annotations

import bisect
import math
from collections import Counter
from typing import Any

PREFIX = "nanoforge"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last: above every bound (+Inf only)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.bounds, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}",
                f"{name}_count {self.count}"]
        return out


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return repr(v) if isinstance(v, float) else str(v)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """Mutated only from the event loop thread (no locks needed)."""

    def __init__(self, model_name: str):
        self.model = model_name
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, HTTP status)
        self.prompt_tokens = self.generation_tokens = 0
        self.aborted_by_client = 0
        self.ttft, self.itl, self.e2e = Histogram(), Histogram(), Histogram()

    def render(self, stats: dict[str, Any] | None) -> str:
        m, lines = PREFIX, []

        def metric(name: str, kind: str, help_: str, body: list[str]) -> None:
            name += "_total" if kind == "counter" else ""  # text format 0.0.4: TYPE names the samples
            lines.extend([f"# HELP {m}_{name} {help_}", f"# TYPE {m}_{name} {kind}", *body])

        model = f'model_name="{_label(self.model)}"'
        metric("requests", "counter", "HTTP requests by endpoint and status code.",
               [f'{m}_requests_total{{endpoint="{_label(e)}",status="{s}"}} {c}'
                for (e, s), c in sorted(self.requests.items())])
        metric("prompt_tokens", "counter", "Prompt tokens of served requests.",
               [f"{m}_prompt_tokens_total{{{model}}} {self.prompt_tokens}"])
        metric("generation_tokens", "counter", "Tokens generated for served requests.",
               [f"{m}_generation_tokens_total{{{model}}} {self.generation_tokens}"])
        metric("client_disconnects", "counter", "Requests aborted because the client went away.",
               [f"{m}_client_disconnects_total {self.aborted_by_client}"])
        for name, h, help_ in (("time_to_first_token_seconds", self.ttft, "Request arrival to first token."),
                               ("inter_token_latency_seconds", self.itl, "Time between tokens of a stream."),
                               ("e2e_request_latency_seconds", self.e2e, "Request arrival to last token.")):
            metric(name, "histogram", help_, h.lines(f"{m}_{name}"))
        if stats:
            q = stats.get("prefix_cache_queries", 0)
            gauges = {"num_requests_running": ("num_running", "Sequences being stepped."),
                      "num_requests_waiting": ("num_waiting", "Sequences queued for admission."),
                      "kv_cache_usage_ratio": ("kv_usage", "Share of KV blocks in use (0..1)."),
                      "kv_cache_blocks_total": ("kv_blocks_total", "KV blocks in the pool."),
                      "kv_cache_tokens_total": ("kv_tokens_total", "Tokens the KV pool holds (blocks x block size)."),
                      "kv_cache_blocks_free": ("kv_blocks_free", "KV blocks free (prefix-cached ones included).")}
            for name, (key, help_) in gauges.items():
                if key in stats:
                    metric(name, "gauge", help_, [f"{m}_{name}{{{model}}} {_num(stats[key])}"])
            rate = stats.get("prefix_cache_hits", 0) / q if q else 0.0
            metric("prefix_cache_hit_rate", "gauge", "Prefix-cache hits / queries since start.",
                   [f"{m}_prefix_cache_hit_rate{{{model}}} {_num(rate)}"])
            counters = {"prefix_cache_queries": "Prefix-cache lookups.", "prefix_cache_hits": "Prefix-cache hits.",
                        "preemptions": "Sequences preempted for lack of KV blocks.", "steps": "Engine steps.",
                        "aborted": "Requests aborted in the engine.",
                        "rejected": "Requests the engine refused as invalid (the client's fault: answered HTTP 400).",
                        "errors": "Requests failed in the engine (a failed step, a lost KV pull), not refused ones.",
                        "images_encoded": "Images run through a vision tower (an encode engine's or the engine's own).",
                        "image_cache_hits": "Images an encode engine had encoded before (its cache by image hash)."}
            for key, help_ in counters.items():
                if key in stats:
                    metric(f"engine_{key}", "counter", help_, [f"{m}_engine_{key}_total{{{model}}} {_num(stats[key])}"])
            pd = {"kv_migrations": "Requests whose prompt KV a decode engine pulled from a prefill engine.",
                  "kv_migration_bytes": "Bytes of KV pulled by decode engines.",
                  "kv_migration_seconds": "Seconds decode engines spent pulling KV.",
                  "kv_migration_fallbacks": "Pulls that failed or did not fit, so the prompt was recomputed.",
                  "kv_served_bytes": "Bytes of KV prefill engines sent to decode engines.",
                  "kv_park_expired": "Prefilled KV freed because no decode engine pulled it in time.",
                  "kv_staged": "Requests a prefill engine copied into its dlslime host staging for a pull.",
                  "kv_staging_full": "dlslime pulls refused for want of host staging room (then recomputed)."}
            spec = {"spec_drafts_proposed": "Speculative draft tokens proposed.",
                    "spec_drafts_accepted": "Speculative draft tokens the target accepted.",
                    "spec_verify_rows": "Sequence-steps that verified drafts.",
                    "spec_emitted_tokens": "Tokens those verify rows produced (accepted drafts + one each)."}
            for key, help_ in {**pd, **spec}.items():
                if key in stats:
                    metric(key, "counter", help_, [f"{m}_{key}_total{{{model}}} {_num(stats[key])}"])
            for j, rate in enumerate(stats.get("spec_acceptance_rate_per_position") or []):
                if j == 0:
                    lines.extend([f"# HELP {m}_spec_acceptance_rate Share of drafts accepted, per draft position.",
                                  f"# TYPE {m}_spec_acceptance_rate gauge"])
                lines.append(f'{m}_spec_acceptance_rate{{{model},position="{j}"}} {_num(rate)}')
            if "kv_parked" in stats:
                metric("kv_parked", "gauge", "Prefilled requests whose KV waits to be pulled.",
                       [f"{m}_kv_parked{{{model}}} {_num(stats['kv_parked'])}"])
            for key, help_ in (("kv_staging_held", "Requests holding a span of the dlslime host staging now."),
                               ("kv_staging_bytes", "Bytes of dlslime host staging (--kv-staging-mib).")):
                if key in stats:
                    metric(key, "gauge", help_, [f"{m}_{key}{{{model}}} {_num(stats[key])}"])
            engines = stats.get("engines") or []  # a router: one series per engine
            for key, help_ in (("up", "Engine answered the last stats call (1) or not (0)."),
                               ("in_flight", "Requests the router has outstanding on the engine."),
                               ("kv_usage", "Share of the engine's KV blocks in use (0..1)."),
                               ("kv_parked", "Prefilled requests parked on the engine.")):
                body = [f'{m}_engine_{key}{{engine="{_label(e["addr"])}",role="{_label(e["role"])}"}} {_num(e[key])}'
                        for e in engines if key in e]
                if body:
                    metric(f"engine_{key}", "gauge", help_, body)
        return "\n".join(lines) + "\n"

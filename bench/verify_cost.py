"""What a speculative verify step costs on DeepSeek-V3-shaped layers (random FP8 weights, real dims:
acceptance is meaningless there, so only the step time is measured): CUDA-graph replay time of a
verify step with K = 1, 2, 3 drafts a sequence against a plain decode step, at batch 1 and 32 and
2k context, and the per-position acceptance rate at which speculation breaks even (expected tokens
per verify step, 1 + a + a^2 + ... + a^K, equal to verify time / decode time).

    python bench/verify_cost.py --out bench/results/speculative
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.deepseek_layers import DEEPSEEK_V3, compile_plan, make_checkpoint  # noqa: E402
from bench.kv_fp8_accuracy import write_result  # noqa: E402
from nanoforge.runtime.cuda_graphs import DecodeGraphs  # noqa: E402
from nanoforge.runtime.engine import Engine, EngineConfig  # noqa: E402
from nanoforge.tools.bench_offline import machine_info  # noqa: E402


def replay_s(graphs: DecodeGraphs, batch: int, context: int, reps: int) -> float:
    """GPU seconds of one replay: `batch` sequences at `context` tokens, each with its own blocks."""
    bs, q = graphs.block_size, graphs.q
    per = -(-(context + q) // bs)
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(batch)]
    graphs._replay(np.full(batch, context, np.int64), [0] * (batch * q), tables, None)
    graph = graphs.graphs[graphs.sizes[graphs.sizes.index(batch)]][0]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def break_even(ratio: float, k: int) -> float | None:
    """Per-position acceptance a with 1 + a + ... + a^k = ratio (None: not reachable)."""
    if ratio <= 1:
        return 0.0
    if ratio > k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** i for i in range(k + 1)) < ratio else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--moe-layers", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="bench/results/speculative")
    a = ap.parse_args()
    cfg = {**DEEPSEEK_V3, "num_hidden_layers": 1 + a.moe_layers}
    ckpt, quantize = make_checkpoint("fp8", cfg, "cuda", "shipped")
    batches = sorted(a.batch)
    plan = compile_plan(ckpt, quantize, "cuda", batches[-1], 4096)
    need = batches[-1] * (-(-(a.context + max(a.k) + 1) // plan.kv_contract.block_size)) + 2
    eng = Engine(plan, ckpt, None, EngineConfig(device="cuda", num_blocks=need, max_num_seqs=batches[-1],
                                                 max_model_len=a.context + 64, max_num_batched_tokens=4096), False)
    r = eng.runner
    make = lambda q: DecodeGraphs(r.forward, r.params, r.pool, r.block_size, batches,  # noqa: E731
                                  max_model_len=a.context + 64, device=r.device, q_per_seq=q)
    plain = make(1)
    rows = []
    for b in batches:
        base = replay_s(plain, b, a.context, a.reps)
        row = {"batch": b, "decode_s": base}
        for k in a.k:
            t = replay_s(make(k + 1), b, a.context, a.reps)
            row[f"verify_k{k}"] = {"s": t, "ratio_to_decode": t / base, "break_even_acceptance": break_even(t / base, k)}
            print(f"batch {b:>3}: decode {1e3 * base:.3f} ms, verify K={k} {1e3 * t:.3f} ms ({t / base:.2f}x), "
                  f"break-even acceptance {row[f'verify_k{k}']['break_even_acceptance']}", flush=True)
            torch.cuda.empty_cache()
        rows.append(row)
    result = {"bench": "verify_cost", "model": f"DeepSeek-V3 layers (1 dense + {a.moe_layers} MoE, FP8 random)",
              "machine": machine_info("cuda"), "context": a.context, "rows": rows}
    write_result(a.out, "verify_cost", result)


if __name__ == "__main__":
    main()

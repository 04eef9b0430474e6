"""Prefill attention of fresh prompts (no cached prefix), the mixed steps' chunks: the Triton paged
kernel reading the pool against torch's FlashAttention varlen kernel (`torch.nn.attention.varlen`) on
the same K/V packed contiguous, the paged kernel's prefill grid in its other order
(PREFILL_LONGEST_FIRST), and with --tune the Triton prefill grid's (BLOCK_M, BLOCK_N, warps, stages) at
each shape. Qwen3-0.6B attention (16 query / 8 kv heads, head dim 128), bf16, 16-token blocks.

    python -m bench.kernels.prefill_varlen [--out DIR] [--tune]

On an H100 (torch 2.11, 2026-12-07, bench/results/prefill_varlen-20261207-224109.json) the varlen kernel
was 1.4-2.2x slower than the paged one except on 16 x 256 tokens, so the engine's `prefill_fresh` knob,
which sent a mixed step's new prompts to it, was removed (the reference workload at 0.81x with it on).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
import triton

from nanoforge.kernels.triton.attention import paged_attention

CONFIGS = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 32, 4, 3),
           (64, 32, 4, 4), (128, 64, 8, 2)]

SHAPES = {"1x4096": [4096], "4x1024": [1024] * 4, "8x512": [512] * 8, "16x256": [256] * 16,
          "ragged 100..1024 (8)": [100, 230, 360, 490, 620, 750, 880, 1010]}


def _flops(lens: list[int], heads: int, d: int) -> float:
    return 4 * sum(n * (n + 1) / 2 for n in lens) * heads * d


def bench_shape(lens: list[int], heads: int = 16, kv_heads: int = 8, d: int = 128, bs: int = 16,
                tune: bool = False) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    t = sum(lens)
    q = torch.randn(t, heads, d, dtype=dt, device=dev)
    k = torch.randn(t, kv_heads, d, dtype=dt, device=dev)
    v = torch.randn(t, kv_heads, d, dtype=dt, device=dev)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    nbps = [triton.cdiv(n, bs) for n in lens]
    nb = sum(nbps) + 1
    k_cache = torch.randn(nb, bs, kv_heads, d, dtype=dt, device=dev)
    v_cache = torch.randn_like(k_cache)
    width = max(nbps)
    perm = (torch.randperm(nb - 1, device=dev) + 1).to(torch.int32)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device=dev)
    at = 0
    for i, (n, m) in enumerate(zip(lens, nbps)):
        tables[i, :m] = perm[at:at + m]
        at += m
        slots = (tables[i, :m].long()[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)[:n]
        k_cache.view(-1, kv_heads, d)[slots] = k[cu[i]:cu[i + 1]]
        v_cache.view(-1, kv_heads, d)[slots] = v[cu[i]:cu[i + 1]]
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    flops = _flops(lens, heads, d)
    out = {"lens": lens, "tokens": t}

    def ours():
        return paged_attention(q, k_cache, v_cache, cu, ctx, tables, scale=scale, max_query_len=max(lens),
                               max_context_len=max(lens))

    A = importlib.import_module("nanoforge.kernels.triton.attention")

    def variant(cfg=None, flip=False):  # a prefill tile config, and/or the grid in its other order
        def fn():
            A._PREFILL_CFG_OVERRIDE = cfg
            A.PREFILL_LONGEST_FIRST ^= flip
            try:
                return ours()
            finally:
                A._PREFILL_CFG_OVERRIDE = None
                A.PREFILL_LONGEST_FIRST ^= flip
        return fn

    ref = ours()
    runs = {"triton_paged": ours, "triton_paged_other_order": variant(flip=True)}
    if tune:
        for c in CONFIGS:
            runs["triton_cfg_" + "_".join(map(str, c))] = variant(c)
            runs["triton_cfg_" + "_".join(map(str, c)) + "_other_order"] = variant(c, flip=True)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
        out["flash_error"] = "torch.nn.attention.varlen does not import"
    if varlen_attn is not None:
        kr, vr = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))  # torch 2.11 takes no GQA

        def flash():
            return varlen_attn(q, kr, vr, cu, cu, max(lens), max(lens), scale=scale, window_size=(-1, 0))
        runs["flash_varlen"] = flash
    for name, fn in runs.items():
        try:
            o = fn()
            err = (o.float() - ref.float()).abs().max().item()
            try:  # GPU time alone: the call's host work (~100 us) would hide small shapes
                ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            except Exception:  # not capturable: timed eagerly
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            out[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "max_abs_diff_vs_triton": err}
        except Exception as exc:  # an API this torch lacks, or a shape it refuses: recorded, not fatal
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tune", action="store_true")
    a = ap.parse_args()
    rows = []
    for name, lens in SHAPES.items():
        r = bench_shape(lens, tune=a.tune)
        r["shape"] = name
        rows.append(r)
        line = f"prefill {name:22s}"
        for k in ("triton_paged", "triton_paged_other_order", "flash_varlen"):
            x = r.get(k, {})
            line += (f" | {k} {x['ms'] * 1e3:7.1f} us {x['tflops']:6.1f} TF/s d {x['max_abs_diff_vs_triton']:.3f}"
                     if "ms" in x else f" | {k} {x.get('error', r.get('flash_error', '-'))[:70]}")
        print(line, flush=True)
        if a.tune:
            cfgs = sorted(((v["ms"], k) for k, v in r.items() if k.startswith("triton_cfg") and "ms" in v))
            print("   best configs: " + ", ".join(f"{k[11:]} {ms * 1e3:.0f} us" for ms, k in cfgs[:4]), flush=True)
    order = importlib.import_module("nanoforge.kernels.triton.attention").PREFILL_LONGEST_FIRST
    res = {"benchmark": "prefill_varlen", "longest_first": order, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"prefill_varlen-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

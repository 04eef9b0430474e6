"""Prefill attention of fresh prompts (no cached prefix), the mixed steps' chunks: the Triton paged
kernel reading the pool against torch's FlashAttention varlen call (`torch.nn.attention.varlen`) on the
step's own contiguous K/V as the engine makes it with the prefill_fresh knob
(nanoforge/kernels/triton/prefill_fresh.py), and, where the installed torch takes a block table, on
the pool itself.
Qwen3-0.6B attention (16 query / 8 kv heads, head dim 128), bf16, 16-token blocks.

    python -m bench.kernels.prefill_varlen [--out DIR] [--tune]

--tune also sweeps the Triton prefill grid's (BLOCK_M, BLOCK_N, warps, stages) at each shape.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
from pathlib import Path

import torch
import triton

from nanoforge.kernels.triton import prefill_fresh
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

    ref = ours()
    runs = {"triton_paged": ours}
    if tune:
        A = importlib.import_module("nanoforge.kernels.triton.attention")

        def with_cfg(cfg):
            def fn():
                A._PREFILL_CFG_OVERRIDE = cfg
                try:
                    return ours()
                finally:
                    A._PREFILL_CFG_OVERRIDE = None
            return fn
        runs.update({"triton_cfg_" + "_".join(map(str, c)): with_cfg(c) for c in CONFIGS})
    fn, _, causal = prefill_fresh._varlen()
    if fn is None:
        out["flash_error"] = "torch.nn.attention.varlen does not import"
    else:
        starts = cu.cpu().numpy()
        o_flash = torch.empty_like(q)

        def flash():  # as the engine calls it (nanoforge/kernels/triton/prefill_fresh.py)
            prefill_fresh.attend(q, k, v, starts, scale, o_flash)
            return o_flash

        def flash_paged():  # the pool itself (torch >= 2.12 takes a block table)
            return fn(q, k_cache, v_cache, cu, None, max(lens), max(lens), scale=scale, **causal, enable_gqa=True,
                      seqused_k=ctx, block_table=tables)
        runs.update(flash_varlen=flash, flash_varlen_paged=flash_paged)

    def sdpa_per_seq():  # torch's fused SDPA one sequence at a time (cuDNN first, as kernels/mla_prefill.py)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        o = torch.empty_like(q)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                         set_priority=True):
            for a_, b_ in zip(cu[:-1].tolist(), cu[1:].tolist()):
                o[a_:b_] = torch.nn.functional.scaled_dot_product_attention(
                    q[a_:b_].transpose(0, 1), k[a_:b_].transpose(0, 1), v[a_:b_].transpose(0, 1), is_causal=True,
                    scale=scale, enable_gqa=True).transpose(0, 1)
        return o
    runs["sdpa_per_seq"] = sdpa_per_seq
    out["torch_varlen_params"] = str(inspect.signature(fn).parameters) if fn is not None else None
    for name, fn in runs.items():
        try:
            o = fn()
            err = (o.float() - ref.float()).abs().max().item()
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
        for k in ("triton_paged", "flash_varlen", "flash_varlen_paged", "sdpa_per_seq"):
            x = r.get(k, {})
            line += (f" | {k} {x['ms'] * 1e3:7.1f} us {x['tflops']:6.1f} TF/s d {x['max_abs_diff_vs_triton']:.3f}"
                     if "ms" in x else f" | {k} {x.get('error', r.get('flash_error', '-'))[:70]}")
        print(line, flush=True)
        if a.tune:
            cfgs = sorted(((v["ms"], k) for k, v in r.items() if k.startswith("triton_cfg") and "ms" in v))
            print("   best configs: " + ", ".join(f"{k[11:]} {ms * 1e3:.0f} us" for ms, k in cfgs[:4]), flush=True)
    res = {"benchmark": "prefill_varlen", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "rows": rows}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"prefill_varlen-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""MLA decode kernel, FlashMLA (dense SM90 kernel) against the Triton paged kernel, on DeepSeek-V3's
absorbed shapes: q [B, H, 576] over a pool of [latent 512 | rope 64] bf16 entries in 64-token pages,
V = the latent. Both run inside a CUDA graph (as the engine's decode does), timed by do_bench (median,
L2 flushed), on random data in shuffled pages. This benchmark decides whether flash_mla ranks first for
MLA attention (codegen/providers.py).

    python -m bench.kernels.mla_decode --out bench/results/mla   # JSON: mla_decode-<time>.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton

from nanoforge.kernels.triton.attention import paged_attention

LATENT, ROPE, PAGE = 512, 64, 64


def _graph_ms(fn) -> float:
    fn()  # compile / JIT outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def bench_mla_decode(batch: int, ctx_len: int, heads: int = 128, seed: int = 0) -> dict:
    """ms, TB/s of pool entries read and TFLOP/s (QK over 576 + PV over 512 columns) per kernel."""
    from nanoforge.kernels.libs import flash_mla_decode as fm

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(seed)
    pages = triton.cdiv(ctx_len, PAGE)
    nb = batch * pages + 1
    cache = torch.randn(nb, PAGE, LATENT + ROPE, dtype=dt, device=dev)
    table = (torch.randperm(nb - 1, generator=g)[: batch * pages] + 1).view(batch, pages).to(torch.int32).to(dev)
    lens = torch.full((batch,), ctx_len, dtype=torch.int32, device=dev)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, LATENT + ROPE, dtype=dt, device=dev)
    scale = 192 ** -0.5
    out = q.new_empty(batch, heads, LATENT)

    def tri():
        paged_attention(q, cache[:, :, None, :], cache[:, :, None, :LATENT], starts, lens, table, scale=scale,
                        max_query_len=1, max_context_len=ctx_len, out=out)

    def flash():
        fm.mla_decode(q, cache, table, lens, scale)

    tri()
    ref = out.clone()
    err = (fm.mla_decode(q, cache, table, lens, scale).float() - ref.float()).abs().max().item()
    kv_bytes = batch * ctx_len * (LATENT + ROPE) * 2
    flops = 2 * batch * heads * ctx_len * (LATENT + ROPE + LATENT)
    row = {"batch": batch, "ctx_len": ctx_len, "heads": heads, "max_abs_diff": err}
    for name, fn in (("triton", tri), ("flash_mla", flash)):
        ms = _graph_ms(fn)
        row[name] = {"ms": ms, "tb_s": kv_bytes / (ms * 1e-3) / 1e12, "tflops": flops / (ms * 1e-3) / 1e12}
    row["flash_mla_speedup"] = row["triton"]["ms"] / row["flash_mla"]["ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/mla")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--context", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16], help="128: one GPU; 16: DeepSeek-V3 at TP8")
    a = ap.parse_args()
    rows = []
    for heads in a.heads:
        for ctx_len in a.context:
            for batch in a.batch:
                r = bench_mla_decode(batch, ctx_len, heads)
                rows.append(r)
                print(f"heads {heads:3d} ctx {ctx_len:5d} batch {batch:3d}: triton {r['triton']['ms'] * 1e3:8.1f} us "
                      f"{r['triton']['tb_s']:.2f} TB/s {r['triton']['tflops']:5.0f} TFLOP/s | flash_mla "
                      f"{r['flash_mla']['ms'] * 1e3:8.1f} us {r['flash_mla']['tb_s']:.2f} TB/s "
                      f"{r['flash_mla']['tflops']:5.0f} TFLOP/s | x{r['flash_mla_speedup']:.2f} "
                      f"(max diff {r['max_abs_diff']:.1e})", flush=True)
    versions = {p: _version(p) for p in ("torch", "triton", "sgl-flash-mla", "tokenspeed-flashmla")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mla_decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "mla_decode", "card": torch.cuda.get_device_name(), "versions": versions,
                                "config": {"latent": LATENT, "rope": ROPE, "page": PAGE, "dtype": "bf16",
                                           "timing": "CUDA-graph replay, do_bench median, L2 flushed"},
                                "rows": rows}, indent=1))
    print(f"wrote {path}")


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()

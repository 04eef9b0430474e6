"""GPU benchmark and tuning sweep of the small-batch decode GEMM (nanoforge/kernels/triton/gemm_small.py)
against cuBLAS (torch.nn.functional.linear), at the Qwen3-0.6B / 8B projection shapes for M = 32 ... 256.

    python3 -c "from bench.kernels.gemm_small import sweep; sweep('gemm_small.json')"

Timing as a decode step sees a projection: a CUDA graph of a chain of calls, each on another copy of
W, >= 256 MiB of copies in the rotation so that W always comes from HBM, never from the 50 MB L2; the
replay is timed with triton.testing.do_bench (median) and divided by the chain's length. x is one
tensor (L2-resident, as it is after the previous kernel). Each candidate config's result is checked
against cuBLAS's once; a candidate that fails to compile, launch or check is reported, not fatal.
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from nanoforge.kernels.triton import gemm_small as G

SHAPES = {  # name: (N, K) of the decode projections (q/k/v and gate/up fused)
    "0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.gate_up": (6144, 1024), "0.6b.down": (1024, 3072),
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096), "8b.down": (4096, 12288),
}
MS = (32, 64, 128, 256)
ROTATION_BYTES = 256 << 20

# (block_m, block_n, block_k, split_k, num_warps, num_stages); 0 = gemm_small's rule (block_m: the
# power of two covering M up to 128; split_k: about one wave of programs)
CANDIDATES = [
    (0, 32, 128, 0, 4, 4), (0, 64, 128, 0, 4, 3), (0, 64, 64, 0, 4, 4), (0, 64, 256, 0, 4, 2),
    (0, 128, 64, 0, 4, 3), (0, 128, 64, 0, 8, 3), (0, 64, 64, 4, 4, 4),
    (0, 64, 128, 2, 4, 3), (0, 64, 128, 1, 4, 3), (0, 128, 64, 1, 8, 4),  # fixed split 2, no split
    (64, 64, 64, 0, 4, 4), (256, 64, 64, 0, 8, 3),  # 64-row tiles (M > 64 tiled); one 256-row tile
]


def _chain_us(fn, ws, outs, warmup_ms: int, rep_ms: int) -> float:
    """Per-call us of fn(w, out) over the rotation, captured in one CUDA graph."""
    def chain():
        return [fn(w, o) for w, o in zip(ws, outs)]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compiles, cuBLAS handles and workspaces outside the capture
        chain()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    ms = do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    del graph
    return ms * 1e3 / len(ws)


def _with_cfg(cfg, fn):
    """fn() with gemm_small._CFG_OVERRIDE = cfg (None: the default table)."""
    saved, G._CFG_OVERRIDE = G._CFG_OVERRIDE, cfg
    try:
        return fn()
    finally:
        G._CFG_OVERRIDE = saved


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def _case(name: str, m: int, ws: list, sms: int, candidates, warmup_ms: int, rep_ms: int, gen) -> dict:
    """One (M, shape): cuBLAS, gemm_small's default config and each candidate on the rotation ws."""
    n, k = ws[0].shape
    dtype, dev = ws[0].dtype, ws[0].device
    x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
    outs = [torch.empty(m, n, device=dev, dtype=dtype) for _ in ws]
    ref = F.linear(x, ws[0]).float()
    tol = 2e-2 * ref.abs().max().item() + 1e-2

    def go():  # -> (us, resolved config) under the current override; raises on any failure
        plan = tuple(G._plan(m, n, k, sms))
        y = G.gemm_small(x, ws[0], out=outs[0])
        torch.cuda.synchronize()
        err = (y.float() - ref).abs().max().item()
        if not err <= tol:
            raise AssertionError(f"max |error| {err:.3g} > {tol:.3g}")
        return _chain_us(lambda w, o: G.gemm_small(x, w, out=o), ws, outs, warmup_ms, rep_ms), plan

    cublas_us = _chain_us(lambda w, o: F.linear(x, w), ws, outs, warmup_ms, rep_ms)
    default_us, default_cfg = _with_cfg(None, go)
    best_us, best_cfg, cands, failed = default_us, default_cfg, {}, {}
    for c in candidates:
        try:
            us, plan = _with_cfg(G.Cfg(*c), go)
        except Exception as e:  # noqa: BLE001 -- reported, the sweep goes on
            failed[str(tuple(c))] = _why(e)
            print(f"  failed {tuple(c)} at M={m} {name}: {_why(e)}", flush=True)
            continue
        cands[str(tuple(c))] = {"us": us, "cfg": list(plan)}
        if us < best_us:
            best_us, best_cfg = us, plan
    wbytes = n * k * ws[0].element_size()
    print(f"gemm small M={m:3d} {name:12s} cublas {cublas_us:7.2f} us | default {default_us:7.2f} us "
          f"{default_cfg} | best {best_us:7.2f} us {best_cfg} ({cublas_us / best_us:.2f}x)", flush=True)
    return {"shape": name, "M": m, "N": n, "K": k, "dtype": str(dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name(dev), "sms": sms, "cublas_us": cublas_us,
            "default_us": default_us, "default_cfg": list(default_cfg), "best_us": best_us,
            "best_cfg": list(best_cfg), "cublas_TB/s": wbytes / cublas_us / 1e6, "best_TB/s": wbytes / best_us / 1e6,
            "candidates_us": cands, "failed": failed}


def sweep(out_json: str | None = None, ms=MS, shapes=None, candidates=CANDIDATES, dtype=torch.bfloat16,
          warmup_ms: int = 5, rep_ms: int = 25) -> list[dict]:
    """cuBLAS vs gemm_small (default config and each candidate) per (M, shape); prints one line each,
    writes the rows to out_json (a JSON list) when given, returns them. Config tuples are
    (block_m, block_n, block_k, split_k, num_warps, num_stages) as run (0s resolved)."""
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, t0 = [], time.time()
    for name in shapes or SHAPES:
        n, k = SHAPES[name]
        copies = max(2, triton.cdiv(ROTATION_BYTES, n * k * torch.tensor([], dtype=dtype).element_size()))
        ws = [(torch.randn(n, k, generator=gen, device=dev) / k ** 0.5).to(dtype) for _ in range(copies)]
        for m in ms:
            rows.append(_case(name, m, ws, sms, candidates, warmup_ms, rep_ms, gen))
        del ws
        torch.cuda.empty_cache()
    print(f"gemm small sweep: {len(rows)} cases in {time.time() - t0:.0f} s on {torch.cuda.get_device_name(dev)}",
          flush=True)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows

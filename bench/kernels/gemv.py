"""GPU benchmark of the skinny decode GEMM (nanoforge/kernels/triton/gemv.py) against cuBLAS, at the
Qwen3-8B / 0.6B decode projection shapes (the figures in gemv.py's docstring come from bench_all).

    python3 -c "from bench.kernels.gemv import bench_all; bench_all()"
"""
from __future__ import annotations

import torch
import triton

from nanoforge.kernels.triton import gemv as G, pdl

SHAPES = {  # name: (N, K) of the decode projections (q/k/v and gate/up fused)
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096), "8b.down": (4096, 12288),
    "8b.lm_head": (151936, 4096),
    "0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.gate_up": (6144, 1024), "0.6b.down": (1024, 3072),
    "0.6b.lm_head": (151936, 1024),
}


def bench_skinny(M: int, N: int, K: int, dtype=torch.bfloat16, rep: int = 50) -> dict:
    """Per-call time of skinny_matmul and of torch.matmul(x, w.t()) on the same inputs as a decode
    step sees them: back-to-back calls in a CUDA graph (triton.testing.do_bench_cudagraph), each on
    another copy of W, >= 512 MiB of copies in the rotation so that W always comes from HBM, never
    from the 50 MB L2 (no flush kernel needed). TB/s counts W + x + y once. `pdl_*`: the same chain
    with PDL on (kernels/triton/pdl.py; each call overlaps the previous one's tail). `copy_TB/s`: a 512 MiB device copy
    (read + write), the yardstick."""
    from triton.testing import do_bench_cudagraph

    dev = torch.device("cuda")
    es = torch.tensor([], dtype=dtype).element_size()
    copies = max(2, triton.cdiv(512 << 20, N * K * es))
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(N, K, generator=gen, device=dev, dtype=torch.float32).to(dtype) for _ in range(copies)]
    x = torch.randn(M, K, generator=gen, device=dev, dtype=torch.float32).to(dtype)
    outs = [torch.empty(M, N, device=dev, dtype=dtype) for _ in range(copies)]
    nbytes = (N * K + M * K + M * N) * es

    def per_call(fn):
        chain = lambda: [fn(w, o) for w, o in zip(ws, outs)]  # noqa: E731
        return do_bench_cudagraph(chain, rep=rep, return_mode="median") / copies

    ms = per_call(lambda w, o: G.skinny_matmul(x, w, o))
    ref_ms = per_call(lambda w, o: torch.matmul(x, w.t(), out=o))
    saved, pdl.ENABLED = pdl.ENABLED, True
    try:
        pdl_ms = per_call(lambda w, o: G.skinny_matmul(x, w, o))
    finally:
        pdl.ENABLED = saved
    ws.clear(), outs.clear()  # free the rotation before the copy yardstick
    src = torch.empty(256 << 20, dtype=torch.uint16, device=dev)
    dst = torch.empty_like(src)
    copy_ms = do_bench_cudagraph(lambda: dst.copy_(src), rep=rep, return_mode="median")
    return {"M": M, "N": N, "K": K, "dtype": str(dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name(dev), "config": tuple(G._config(M, N, K)),
            "ms": ms, "TB/s": nbytes / ms / 1e9, "torch_ms": ref_ms, "torch_TB/s": nbytes / ref_ms / 1e9,
            "pdl_ms": pdl_ms, "pdl_TB/s": nbytes / pdl_ms / 1e9, "copy_TB/s": 2 * src.nbytes / copy_ms / 1e9}


def bench_all(ms_list=(1, 8, 16)) -> list[dict]:
    """bench_skinny at every shape of SHAPES for each M; prints one line per case."""
    rows = []
    for name, (n, k) in SHAPES.items():
        for m in ms_list:
            r = bench_skinny(m, n, k)
            r["shape"] = name
            rows.append(r)
            print(f"{name:12s} M={m:2d} {r['config']}: triton {r['ms'] * 1e3:6.1f} us {r['TB/s']:.2f} TB/s | "
                  f"torch {r['torch_ms'] * 1e3:6.1f} us {r['torch_TB/s']:.2f} | pdl {r['pdl_TB/s']:.2f} | "
                  f"copy {r['copy_TB/s']:.2f}", flush=True)
    return rows

"""GPU benchmarks of the third-party library adapters (nanoforge/kernels/libs) against the Triton
kernels' benchmarks: bench_flashinfer_decode (vs bench/kernels/attention.py's bench_paged_decode)
and bench_deep_gemm_grouped (vs bench/kernels/moe.py's bench_moe); bench/gpu_check.sh stage
`compare` runs both. The adapters are imported inside the functions, so this module imports
without the libraries (calling a function without its library raises the adapter's ImportError).
"""
from __future__ import annotations

import torch


def bench_flashinfer_decode(batch: int, ctx_len: int, heads: int = 16, kv_heads: int = 8, head_dim: int = 128,
                            block_size: int = 16, dtype: torch.dtype = torch.bfloat16, *, graph: bool = True,
                            time_eager: bool = True, use_tensor_cores: bool = False, seed: int = 0) -> dict:
    """FlashInfer's decode on the inputs bench/kernels/attention.py's bench_paged_decode builds (same
    sizes, RNG calls, shuffled pages, byte count, do_bench median with L2 flushed, CUDA-graph replays
    when graph=True; the plan is made once, outside the timing). Returns the same keys plus `backend`."""
    import triton
    from triton.testing import do_bench

    from nanoforge.kernels.libs import flashinfer_attn as F

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(seed)
    nbps = triton.cdiv(ctx_len, block_size)
    nb = batch * nbps + 1
    k_cache = torch.randn(nb, block_size, kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn(nb, block_size, kv_heads, head_dim, dtype=dtype, device=dev)
    kv_bytes = 2 * batch * ctx_len * kv_heads * head_dim * k_cache.element_size()
    perm = torch.randperm(nb - 1, generator=g)[: batch * nbps] + 1
    block_tables = perm.view(batch, nbps).to(torch.int32).to(dev)
    context_lens = torch.full((batch,), ctx_len, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=dev)
    out = torch.empty_like(q)
    scale = head_dim ** -0.5
    dec = F.PagedDecode(dev, use_tensor_cores=use_tensor_cores, graph_batch=batch if graph else None,
                        max_pages=batch * nbps)
    dec.plan(block_tables, context_lens, block_size, heads, kv_heads, head_dim, dtype, dtype, scale)

    def fn():
        dec.run(q, k_cache, v_cache, out=out)

    fn()  # JIT compile + warm up
    torch.cuda.synchronize()
    ms_eager = None
    if time_eager or not graph:
        ms_eager = do_bench(fn, warmup=25, rep=100, return_mode="median")
    ms = ms_eager
    if graph:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        ms = do_bench(gr.replay, warmup=25, rep=100, return_mode="median")
    return {"device": torch.cuda.get_device_name(dev), "batch": batch, "ctx_len": ctx_len, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "mla_rank": 0, "block_size": block_size,
            "dtype": str(dtype), "num_splits": None, "graph": graph, "ms": ms, "ms_eager": ms_eager,
            "kv_bytes": kv_bytes, "tb_s": kv_bytes / (ms * 1e-3) / 1e12,
            "backend": f"flashinfer {F.flashinfer.__version__} fa2{' tensor-core' if use_tensor_cores else ''}"}


def bench_deep_gemm_grouped(T: int, E: int, top_k: int, H: int, I: int, *, layers: int = 4, seed: int = 0) -> dict:
    """On bench/kernels/moe.py's bench_moe problem (same _bench_problem: `layers` random bf16 layers
    and their routing), graph-replayed median ms per layer of
      ms          the two grouped GEMMs alone (gate_up as one [E, 2I, H] GEMM, then down) on the
                  routing's contiguous layout built once outside the timing: compare with triton's
                  experts_graph_ms minus its align/reduce, or read as DeepGEMM's GEMM floor
      experts_ms  grouped_experts end to end (align, gather, GEMMs, silu*mul, combine): compare with
                  triton's experts_graph_ms
    tflops = 6*T*top_k*H*I over ms (padding rows not counted)."""
    from triton.testing import do_bench_cudagraph

    from bench.kernels.moe import _bench_problem
    from nanoforge.kernels.libs import deep_gemm_ops as M

    x, _, ls = _bench_problem(T, E, top_k, H, I, layers, seed)
    runs = []
    for l in ls:
        rows, m_idx, _ = M.contiguous_layout(l["route"][1], E)
        a = x.index_select(0, torch.where(rows >= 0, rows // top_k, 0))
        runs.append(dict(a=a, m_idx=m_idx, w13=torch.cat([l["w_gate"], l["w_up"]], dim=1).contiguous(),
                         h=torch.randn(a.shape[0], I, dtype=x.dtype, device=x.device), **l))

    def gemms():
        for r in runs:
            M._grouped(r["a"], r["w13"], r["m_idx"])
            M._grouped(r["h"], r["w_down"], r["m_idx"])

    def experts():
        for r in runs:
            M.grouped_experts(x, *r["route"], r["w_gate"], r["w_up"], r["w_down"], num_experts=E,
                              renormalize=True, w13=r["w13"])

    gemms()  # JIT compile + warm up outside the capture
    experts()
    torch.cuda.synchronize()
    flops = 6.0 * T * top_k * H * I
    out = dict(T=T, E=E, top_k=top_k, H=H, I=I, rows=int(runs[0]["a"].shape[0]),
               align=M.deep_gemm.get_mk_alignment_for_contiguous_layout())
    out["ms"] = do_bench_cudagraph(gemms, return_mode="median") / layers
    out["tflops"] = flops / out["ms"] * 1e-9
    try:
        out["experts_ms"] = do_bench_cudagraph(experts, return_mode="median") / layers
    except Exception as exc:  # noqa: BLE001 - the GEMM floor above is the main number
        out["experts_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out

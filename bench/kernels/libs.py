"""GPU benchmarks of the third-party library adapters (nanoforge/kernels/libs) against the Triton
kernels' benchmarks: bench_flashinfer_decode (vs bench/kernels/attention.py's bench_paged_decode)
and bench_deep_gemm_grouped (vs bench/kernels/moe.py's bench_moe); bench/gpu_check.sh stage
`compare` runs both. bench_deep_gemm_fp8_grouped: DeepSeek-V3's block-FP8 routed experts on
DeepGEMM's FP8 grouped GEMMs vs the Triton bf16 fused experts (stage `fp8_moe`). The adapters are
imported inside the functions, so this module imports without the libraries (calling a function
without its library raises the adapter's ImportError).
"""
from __future__ import annotations

from collections.abc import Sequence

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
      experts_ms  fused_experts end to end (align, gather, GEMMs, silu*mul, combine): compare with
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
            M.fused_experts(x, *r["route"], r["w_gate"], r["w_up"], r["w_down"], num_experts=E,
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


def bench_deep_gemm_fp8_grouped(Ts: int | Sequence[int] = (1, 64, 128, 4096), E: int = 256, top_k: int = 8,
                                H: int = 7168, I: int = 2048, *, seed: int = 0) -> list[dict]:
    """DeepSeek-V3's routed experts (defaults: 256 x gate/up [2048, 7168] + down [7168, 2048] in e4m3 with
    f32 128x128 scales: 11 GB) per T of Ts, on given routing (softmax top-k of a random router,
    renormalized), CUDA-graph-replayed median ms of one layer (its weights are far beyond L2: each
    replay streams them from HBM):
      deep_gemm      deep_gemm_ops.fused_experts, the provider's FP8 path: W8A8, masked layout up to
                     MASKED_MAX_T rows, contiguous above, gate and up as two GEMMs (as the ops get them)
      deep_gemm_w13  the same with gate+up as one GEMM over cat([w_gate, w_up], 1) (+7.5 GB): what a
                     loader-fused gate_up would give
      triton_bf16    the Triton provider's fused_experts on the same weights widened to bf16 once,
                     outside the timing (22 GB). The Triton provider's own FP8 path widens every expert
                     per call through f32 temporaries (~45 GB at this size): not a usable baseline here.
    tflops = 6*T*top_k*H*I / ms (padding not counted); gbps = bytes of the experts the routing touches
    (e4m3 + scales, or bf16) / ms. rel_diff = ||deep_gemm - triton_bf16|| / ||triton_bf16||: W8A8 vs
    widened weights, a few percent. Weights are built once for all Ts: 41 GB on the GPU."""
    from triton.testing import do_bench_cudagraph

    from nanoforge.kernels import fp8
    from nanoforge.kernels.libs import deep_gemm_ops as M
    from nanoforge.kernels.torch_ref import _route
    from nanoforge.kernels.triton.moe import fused_experts as triton_experts

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)

    def stack(n, k):  # e4m3 [E, n, k], its scales, and the same widened to bf16, one expert at a time
        q = torch.empty(E, n, k, dtype=torch.float8_e4m3fn, device=dev)
        s = torch.empty(E, -(-n // 128), -(-k // 128), device=dev)
        wide = torch.empty(E, n, k, dtype=torch.bfloat16, device=dev)
        for e in range(E):
            q[e], s[e] = fp8.quantize(torch.randn(n, k, device=dev, generator=g) * k ** -0.5, (128, 128))
            wide[e] = fp8.dequantize(q[e], s[e], (128, 128), torch.bfloat16)
        return q, s, wide

    (gq, gs, gw), (uq, us, uw), (dq, ds, dw) = stack(I, H), stack(I, H), stack(H, I)
    w13 = torch.cat([gq.view(torch.uint8), uq.view(torch.uint8)], dim=1).view(gq.dtype)  # fp8 cat via bytes
    s13 = torch.cat([gs, us], dim=1)
    router = torch.randn(E, H, device=dev, dtype=torch.bfloat16, generator=g) * H ** -0.5
    attrs = dict(num_experts=E, top_k=top_k, scoring="softmax", norm_topk_prob=True)
    rows = []
    for T in [Ts] if isinstance(Ts, int) else Ts:
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
        weights, ids = _route(x, router, None, **attrs)
        active = int((torch.bincount(ids.reshape(-1), minlength=E) > 0).sum())  # host sync: setup only
        fp8_bytes = active * (3 * H * I + 4 * (gs[0].numel() + us[0].numel() + ds[0].numel()))
        runs = {
            "deep_gemm": (lambda: M.fused_experts(x, weights, ids, gq, uq, dq, num_experts=E, scales=(gs, us, ds)),
                          fp8_bytes),
            "deep_gemm_w13": (lambda: M.fused_experts(x, weights, ids, gq, uq, dq, num_experts=E,
                                                      scales=(gs, us, ds), w13=w13, w13_scale_inv=s13), fp8_bytes),
            "triton_bf16": (lambda: triton_experts(x, weights, ids, gw, uw, dw, num_experts=E), active * 6 * H * I),
        }
        flops = 6.0 * T * top_k * H * I
        row = dict(device=torch.cuda.get_device_name(dev), T=T, E=E, top_k=top_k, H=H, I=I, active_experts=active,
                   layout="masked" if T <= M.MASKED_MAX_T else "contiguous", masked_max_t=M.MASKED_MAX_T)
        outs = {}
        for name, (fn, nbytes) in runs.items():
            try:
                outs[name] = fn().float()  # JIT compile + warm up outside the capture
                torch.cuda.synchronize()
                ms = row[f"{name}_ms"] = do_bench_cudagraph(fn, return_mode="median")
                row[f"{name}_tflops"], row[f"{name}_gbps"] = flops / ms * 1e-9, nbytes / ms * 1e-6
            except Exception as exc:  # noqa: BLE001 - a comparison: say why a variant is missing
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if "deep_gemm" in outs and "triton_bf16" in outs:
            ref = outs["triton_bf16"]
            row["rel_diff"] = ((outs["deep_gemm"] - ref).norm() / ref.norm()).item()
        if "deep_gemm_ms" in row and "triton_bf16_ms" in row:
            row["speedup_vs_triton_bf16"] = row["triton_bf16_ms"] / row["deep_gemm_ms"]
        rows.append(row)
        del outs
        torch.cuda.empty_cache()
    return rows

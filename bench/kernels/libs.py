"""GPU benchmarks of the third-party library adapters (nanoforge/kernels/libs) against the Triton
kernels' benchmarks: bench_flashinfer_decode (vs bench/kernels/attention.py's bench_paged_decode)
and bench_deep_gemm_grouped (vs bench/kernels/moe.py's bench_moe); bench/gpu_check.sh stage
`compare` runs both. bench_deep_gemm_fp8_grouped: DeepSeek-V3's block-FP8 routed experts on
DeepGEMM's FP8 grouped GEMMs vs the Triton bf16 fused experts (stage `fp8_moe`);
bench_fp8_experts_small: the same experts at decode sizes, Triton's small-batch FP8 kernels
(kernels/triton/moe_fp8.py) vs DeepGEMM's masked GEMMs, with a tile sweep (stage `fp8_moe_small`,
also run at the end of `fp8_moe`). The adapters are
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


# SmallCfg fields: block_m, gu_block_n, dn_block_n, num_warps, num_stages; the first is small_config's default
SMALL_SWEEP = ((16, 64, 64, 4, 4), (16, 32, 64, 4, 4), (16, 128, 128, 8, 4), (16, 64, 128, 4, 3),
               (16, 32, 32, 4, 4), (16, 128, 64, 4, 4))


def bench_fp8_experts_small(Ts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), E: int = 256, top_k: int = 8,
                            H: int = 7168, I: int = 2048, *, configs: int = 4, sweep_ts: Sequence[int] = (1, 16),
                            seed: int = 0) -> dict:
    """Small-batch W8A8 experts (triton/moe_fp8.py) against DeepGEMM's masked grouped GEMMs on DeepSeek-V3's
    routed experts (defaults: 256 x gate/up [2048, 7168] + down [7168, 2048] e4m3, f32 128x128 scales: 11 GB,
    built from random bytes in about a second), softmax top-k routing renormalized, CUDA-graph-replayed
    median ms of one layer's experts per T (routing outside the timing). Each replay streams the routed
    experts from HBM (they are far beyond L2). Per T:
      triton_small  moe_fp8.fused_experts_fp8 with its small_config (what the provider runs up to SMALL_MAX_T)
      deep_gemm     deep_gemm_ops.fused_experts with small_max_t=0: the masked layout (T <= MASKED_MAX_T)
    gbps = bytes of the experts the routing touches (e4m3 + scales) / ms; rel_diff = ||small - deep_gemm|| /
    ||deep_gemm|| (the same W8A8 math: summation order and roundings only). `sweep`: the first `configs`
    of SMALL_SWEEP at sweep_ts (the first is the default table's). crossover_t: the largest T up to which
    triton_small beat deep_gemm at every measured T (the candidate for deep_gemm_ops.SMALL_MAX_T)."""
    from triton.testing import do_bench_cudagraph

    from nanoforge.kernels.triton import moe_fp8
    from nanoforge.kernels.triton.moe import select_experts

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)

    def stack(n, k):  # e4m3 values N(0, 1) (|x| < 448: no saturation), scales ~ k^-0.5: weights ~ N(0, 1/k)
        q = torch.empty(E, n, k, dtype=torch.float8_e4m3fn, device=dev)
        for e0 in range(0, E, 32):
            q[e0:e0 + 32] = torch.randn(min(32, E - e0), n, k, device=dev, dtype=torch.bfloat16, generator=g)
        s = (torch.rand(E, -(-n // 128), -(-k // 128), device=dev, generator=g) + 0.5) * k ** -0.5
        return q, s

    (gq, gs), (uq, us), (dq, ds) = stack(I, H), stack(I, H), stack(H, I)
    scales = (gs, us, ds)
    router = torch.randn(E, H, device=dev, dtype=torch.bfloat16, generator=g) * H ** -0.5
    try:
        from nanoforge.kernels.libs import deep_gemm_ops as D
        dg_error = None
    except ImportError as exc:  # the Triton numbers stand alone
        D, dg_error = None, f"{type(exc).__name__}: {exc}"[:300]
    out: dict = {"device": torch.cuda.get_device_name(dev), "E": E, "top_k": top_k, "H": H, "I": I, "rows": [],
                 "sweep": []}
    if D is not None:
        out["small_max_t"] = D.SMALL_MAX_T

    def problem(T):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
        weights, ids = select_experts(x, router, None, num_experts=E, top_k=top_k, scoring="softmax")
        active = int((torch.bincount(ids.reshape(-1), minlength=E) > 0).sum())  # host sync: setup only
        return x, weights, ids, active * (3 * H * I + 4 * (gs[0].numel() + us[0].numel() + ds[0].numel())), active

    def timed(fn):
        res = fn().float()  # compile / JIT + warm up outside the capture
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, return_mode="median"), res

    for T in Ts:
        x, weights, ids, nbytes, active = problem(T)
        row = dict(T=T, active_experts=active, touched_bytes=nbytes,
                   small_config=list(moe_fp8.small_config(T * top_k, E)))
        outs = {}
        runs = {"triton_small": lambda: moe_fp8.fused_experts_fp8(x, weights, ids, gq, uq, dq, scales, num_experts=E,
                                                                   renormalize=True)}
        if D is not None:
            runs["deep_gemm"] = lambda: D.fused_experts(x, weights, ids, gq, uq, dq, num_experts=E, scales=scales,
                                                        renormalize=True, small_max_t=0)
        else:
            row["deep_gemm_error"] = dg_error
        for name, fn in runs.items():
            try:
                ms, outs[name] = timed(fn)
                row[f"{name}_ms"], row[f"{name}_gbps"] = ms, nbytes / ms * 1e-6
            except Exception as exc:  # noqa: BLE001 - a comparison: say why a variant is missing
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if len(outs) == 2:
            row["rel_diff"] = ((outs["triton_small"] - outs["deep_gemm"]).norm() / outs["deep_gemm"].norm()).item()
        if "triton_small_ms" in row and "deep_gemm_ms" in row:
            row["speedup_vs_deep_gemm"] = row["deep_gemm_ms"] / row["triton_small_ms"]
        out["rows"].append(row)
    for T in sweep_ts:
        x, weights, ids, nbytes, _ = problem(T)
        for cfg in SMALL_SWEEP[:configs]:
            c = moe_fp8.SmallCfg(*cfg)
            try:
                ms, _ = timed(lambda: moe_fp8.fused_experts_fp8(x, weights, ids, gq, uq, dq, scales, num_experts=E,
                                                                 renormalize=True, config=c))
                out["sweep"].append(dict(T=T, config=list(cfg), ms=ms, gbps=nbytes / ms * 1e-6))
            except Exception as exc:  # noqa: BLE001 - e.g. a tile that does not fit shared memory
                out["sweep"].append(dict(T=T, config=list(cfg), error=f"{type(exc).__name__}: {exc}"[:200]))
    crossover = 0
    for r in out["rows"]:
        if r.get("speedup_vs_deep_gemm", 0) <= 1:
            break
        crossover = r["T"]
    out["crossover_t"] = crossover if D is not None else None
    return out


def run_fp8_experts_small(out_dir: str) -> dict:
    """bench/gpu_check.sh stage fp8_moe_small (and the end of stage fp8_moe): bench_fp8_experts_small at
    DeepSeek-V3's size, one line per T and per swept config, JSON to out_dir/fp8_moe_small.json."""
    import json
    import time

    t0 = time.time()
    res = bench_fp8_experts_small()
    res["wall_s"] = time.time() - t0
    for r in res["rows"]:
        line = f"fp8 moe small T {r['T']:3d} ({r['active_experts']} experts):"
        for k in ("triton_small", "deep_gemm"):
            line += (f" {k} {r[k + '_ms'] * 1e3:.1f} us {r[k + '_gbps']:.0f} GB/s |" if k + "_ms" in r
                     else f" {k} failed: {r.get(k + '_error', '?')[:80]} |")
        print(line + f" speedup {r.get('speedup_vs_deep_gemm', float('nan')):.2f} "
                     f"rel_diff {r.get('rel_diff', float('nan')):.4f}", flush=True)
    for s in res["sweep"]:
        print(f"fp8 moe small sweep T {s['T']:3d} cfg {s['config']}: "
              + (f"{s['ms'] * 1e3:.1f} us {s['gbps']:.0f} GB/s" if "ms" in s else f"failed: {s['error'][:80]}"))
    print(f"fp8 moe small: crossover T {res['crossover_t']} (SMALL_MAX_T {res.get('small_max_t')}), "
          f"{res['wall_s']:.0f} s")
    with open(f"{out_dir}/fp8_moe_small.json", "w") as fh:
        json.dump(res, fh, indent=1)
    return res

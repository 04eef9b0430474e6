"""GPU benchmarks and config sweeps of the paged attention kernels (nanoforge/kernels/triton/attention.py):
kept apart from the kernels so the provider module stays about the kernels themselves. The
sweeps set attention.py's override knobs and restore them.

    python -m bench.kernels.attention [fp8]  # from the repo root: _tune_decode, rows to $OUT/tune[-fp8].json
"""
from __future__ import annotations

import importlib
import os
import time

import torch
import triton

from nanoforge.kernels.triton.attention import _num_splits, _pow2, paged_attention

A = importlib.import_module("nanoforge.kernels.triton.attention")  # the module (the package's `attention` is the op)


def bench_paged_decode(batch: int, ctx_len: int, heads: int = 16, kv_heads: int = 8, head_dim: int = 128,
                       block_size: int = 16, dtype: torch.dtype = torch.bfloat16, *, mla_rank: int = 0,
                       num_splits: int | None = None, graph: bool = True, time_eager: bool = True,
                       seed: int = 0, kv_dtype: str = "bf16", min_ctx: int | None = None,
                       max_ctx: int | None = None, order: str = "random") -> dict:
    """Time the decode path (q_len 1 per sequence, every sequence at ctx_len) with
    triton.testing.do_bench (median; it flushes L2 before each run) on random data in shuffled pages
    (batch 32 x 4k x 8 heads x 128 = 268 MB of K+V, far over the 50 MB L2). With graph=True (the
    engine's decode path) the call is captured in a CUDA graph and its replays are timed, so host
    launch overhead is excluded; ms_eager times the plain call too. Effective bandwidth = K+V bytes
    read / time. mla_rank=r > 0 benchmarks the MLA layout instead: kv_heads 1, one cache
    [NB, BS, 1, head_dim] with V = its first r columns (read once). kv_dtype "fp8": e4m3 caches plus
    f32 scales per (token, kv head) (MLA: one per token, K's and V's), random; bytes = values + scales
    read. `dtype` is the queries' (and a "bf16" cache's) dtype. max_ctx: the max_context_len the call
    is made with (the engine captures its graphs with max_model_len); contexts are min_ctx..ctx_len.
    order (ragged contexts): "random" as drawn, "longest_first" / "shortest_first" sorted, so a
    sequence's programs start in that order (the decode grid runs the sequence index fastest);
    "decode_order": as drawn, with paged_attention's decode_order argument sorting them longest first."""
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(seed)
    nbps = triton.cdiv(ctx_len, block_size)
    nb = batch * nbps + 1
    if kv_dtype not in ("bf16", "fp8"):
        raise ValueError(f"kv_dtype must be bf16 or fp8, got {kv_dtype!r}")
    fp8 = kv_dtype == "fp8"

    def cache() -> torch.Tensor:
        x = torch.randn(nb, block_size, kv_heads, head_dim, dtype=dtype, device=dev)
        return x.to(torch.float8_e4m3fn) if fp8 else x

    def scales() -> torch.Tensor | None:  # an amax / 448 spread, as quantize_kv makes them
        return torch.rand(nb, block_size, kv_heads, device=dev) * 0.02 + 0.002 if fp8 else None

    k_cache, k_scale = cache(), scales()
    per_pos = kv_heads * (head_dim * k_cache.element_size() + (4 if fp8 else 0))  # one position of K (or V)
    if mla_rank:
        v_cache, v_scale = k_cache[..., :mla_rank], k_scale
        kv_bytes = batch * ctx_len * per_pos
    else:
        v_cache, v_scale = cache(), scales()
        kv_bytes = 2 * batch * ctx_len * per_pos
    lens = torch.full((batch,), ctx_len, dtype=torch.int32)
    if min_ctx is not None:
        lens = torch.randint(min_ctx, ctx_len + 1, (batch,), generator=g, dtype=torch.int32)
        kv_bytes = kv_bytes * int(lens.sum()) // (batch * ctx_len)
    if order not in ("random", "longest_first", "shortest_first", "decode_order"):
        raise ValueError(f"order must be random, longest_first, shortest_first or decode_order, got {order!r}")
    if order in ("longest_first", "shortest_first"):
        lens = lens.sort(descending=order == "longest_first").values
    decode_order = lens.argsort(descending=True, stable=True).to(torch.int32).to(dev) \
        if order == "decode_order" else None
    perm = torch.randperm(nb - 1, generator=g)[: batch * nbps] + 1
    block_tables = perm.view(batch, nbps).to(torch.int32).to(dev)
    context_lens = lens.to(dev)
    query_start = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=dev)
    out = q.new_empty(batch, heads, v_cache.shape[-1])
    scale = head_dim ** -0.5

    def fn():
        paged_attention(q, k_cache, v_cache, query_start, context_lens, block_tables, scale=scale, max_query_len=1,
                        max_context_len=max_ctx or ctx_len, out=out, num_splits=num_splits, k_scale=k_scale,
                        v_scale=v_scale, decode_order=decode_order)

    fn()
    torch.cuda.synchronize()
    ms_eager = None
    if time_eager or not graph:
        ms_eager = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    ms = ms_eager
    if graph:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        ms = triton.testing.do_bench(gr.replay, warmup=25, rep=100, return_mode="median")
    G = heads // kv_heads
    DV = v_cache.shape[-1]
    HB = min(_pow2(G), max(1, 16384 // max(16, _pow2(DV))), 64)
    splits = num_splits or _num_splits(batch, kv_heads * triton.cdiv(G, HB), ctx_len, dev)
    return {"device": torch.cuda.get_device_name(dev), "batch": batch, "ctx_len": ctx_len, "min_ctx": min_ctx,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "mla_rank": mla_rank, "block_size": block_size,
            "dtype": str(dtype), "kv_dtype": kv_dtype, "num_splits": splits, "graph": graph, "ms": ms,
            "ms_eager": ms_eager, "kv_bytes": kv_bytes, "tb_s": kv_bytes / (ms * 1e-3) / 1e12, "order": order}


def decode_order_ab(out_json: str | None = None) -> list[dict]:
    """Ragged decode batches in drawn order vs sorted by context: does launching the longest
    sequences first shorten the grid's tail (python -c "...decode_order_ab('$OUT/decode_order.json')")."""
    rows = []
    for batch, lo, hi in [(256, 128, 2048), (256, 64, 1024), (256, 100, 2000), (128, 128, 2048), (64, 128, 2048),
                          (32, 128, 2048)]:
        line = []
        for order in ("random", "longest_first", "decode_order", "shortest_first", "random", "decode_order"):
            r = bench_paged_decode(batch, hi, min_ctx=lo, max_ctx=2049, time_eager=False, order=order)
            rows.append(r)
            line.append(f"{order} {r['ms'] * 1e3:.1f}us {r['tb_s']:.2f}")
        print(f"decode order batch {batch} ctx {lo}..{hi}: " + " | ".join(line), flush=True)
    if out_json:
        import json
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def bench_paged_prefill(seqs: int, q_len: int, prefix: int = 0, heads: int = 16, kv_heads: int = 8,
                        head_dim: int = 128, block_size: int = 16, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Time a prefill batch (`seqs` chunks of q_len new tokens over `prefix` cached ones) eagerly;
    returns causal-attention TFLOP/s (2 matmuls, masked half of the new-token square not counted)."""
    dev = torch.device("cuda")
    ctx_len = prefix + q_len
    nbps = triton.cdiv(ctx_len, block_size)
    nb = seqs * nbps + 1
    k_cache = torch.randn(nb, block_size, kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    block_tables = (torch.randperm(nb - 1, device=dev)[: seqs * nbps] + 1).view(seqs, nbps).to(torch.int32)
    context_lens = torch.full((seqs,), ctx_len, dtype=torch.int32, device=dev)
    query_start = torch.arange(0, (seqs + 1) * q_len, q_len, dtype=torch.int32, device=dev)
    q = torch.randn(seqs * q_len, heads, head_dim, dtype=dtype, device=dev)
    out = torch.empty_like(q)

    def fn():
        paged_attention(q, k_cache, v_cache, query_start, context_lens, block_tables, scale=head_dim ** -0.5,
                        max_query_len=q_len, max_context_len=ctx_len, out=out)

    fn()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    pairs = seqs * (q_len * prefix + q_len * (q_len + 1) / 2)
    flops = 4 * pairs * heads * head_dim
    return {"seqs": seqs, "q_len": q_len, "prefix": prefix, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def _tune_decode(out_json: str | None = None, kv_dtype: str = "bf16") -> list[dict]:
    """Sweep decode configs and split counts on the current GPU (python -m bench.kernels.attention [fp8])."""
    rows = []
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    print(f"copy ceiling: {2 * x.numel() / (ms * 1e-3) / 1e12:.2f} TB/s (read + write)")
    del x, y
    for batch in (1, 8, 32, 64, 256):
        r = bench_paged_decode(batch, 4096, kv_dtype=kv_dtype)
        rows.append({"cfg": "default", **r})
        print(f"default batch {batch:4d} S {r['num_splits']:2d}: graph {r['ms'] * 1e3:7.1f} us eager "
              f"{r['ms_eager'] * 1e3:7.1f} us {r['tb_s']:.2f} TB/s")
    cfgs = [(64, 4, 2), (128, 4, 2), (128, 4, 3), (64, 4, 3)]
    for batch in (1, 4, 8, 16, 32, 48, 64, 128, 256):
        line = []
        for cfg in cfgs:
            A._DECODE_CFG_OVERRIDE = cfg
            best = None
            for S in (1, 2, 3, 4, 6, 8, 16, 32):
                if S > 1 and batch * 8 * S > 8 * 132 * 2:
                    continue
                r = bench_paged_decode(batch, 4096, num_splits=S, time_eager=False, kv_dtype=kv_dtype)
                rows.append({"cfg": list(cfg), **r})
                if best is None or r["tb_s"] > best[1]:
                    best = (S, r["tb_s"])
            line.append(f"{cfg}: S{best[0]:2d} {best[1]:.2f}")
        print(f"batch {batch:4d}: " + " | ".join(line))
    A._DECODE_CFG_OVERRIDE = None
    for args in [(1, 4096, 0), (4, 2048, 2048), (16, 512, 0)]:
        for hk in [(16, 8, 128), (32, 8, 128), (32, 32, 80)]:
            r = bench_paged_prefill(*args, *hk)
            rows.append({"cfg": "prefill", **r})
            print(f"prefill {args} heads {hk}: {r['ms'] * 1e3:8.1f} us {r['tflops']:.0f} TFLOP/s")
    for batch in (1, 32, 64):
        r = bench_paged_decode(batch, 4096, 16, 1, 576, 64, mla_rank=512, kv_dtype=kv_dtype)
        rows.append({"cfg": "mla", **r})
        print(f"mla batch {batch}: S {r['num_splits']} {r['ms'] * 1e3:7.1f} us {r['tb_s']:.2f} TB/s")
    if out_json:
        import json
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def tune_fp8_decode(out_json: str | None = None, budget_s: float = 300.0) -> list[dict]:
    """FP8 KV decode tiles against bf16's default, 4k context, batch 32 / 64 / 128, blocks of 16 and 64:
    (BLOCK_N, warps, stages) beyond the bf16-tuned ones, since an e4m3 tile is half the bytes per
    stage (bench/gpu_check.sh kv_fp8_tune). Stops adding configs after `budget_s` seconds."""
    start, rows = time.monotonic(), []
    cfgs = [None, (128, 4, 3), (128, 4, 4), (256, 4, 2), (256, 8, 2), (256, 8, 3), (64, 4, 4), (128, 8, 3)]
    for batch in (32, 64, 128):
        base = bench_paged_decode(batch, 4096, time_eager=False)
        rows.append({"batch": batch, "cfg": "bf16 default", "ms": base["ms"], "num_splits": base["num_splits"]})
        print(f"batch {batch}: bf16 default {base['ms'] * 1e3:.1f} us", flush=True)
        for block_size in (16, 64):
            for cfg in cfgs:
                if time.monotonic() - start > budget_s:
                    break
                A._DECODE_CFG_OVERRIDE = cfg
                for splits in (None, 2) if batch <= 64 else (None,):
                    r = bench_paged_decode(batch, 4096, block_size=block_size, kv_dtype="fp8", num_splits=splits,
                                           time_eager=False)
                    rows.append({"batch": batch, "block_size": block_size, "cfg": cfg, "num_splits": r["num_splits"],
                                 "ms": r["ms"], "tb_s": r["tb_s"], "speedup_vs_bf16": base["ms"] / r["ms"]})
                    print(f"  fp8 block {block_size} cfg {cfg} S {r['num_splits']}: {r['ms'] * 1e3:.1f} us, "
                          f"{base['ms'] / r['ms']:.2f}x bf16, {r['tb_s']:.2f} TB/s", flush=True)
                A._DECODE_CFG_OVERRIDE = None
    if out_json:
        import json
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def tune_short_decode(out_json: str | None = None) -> list[dict]:
    """Decode tiles at the offline workload's contexts (ragged, up to 2k; batch 64 / 128 / 256, Qwen3-0.6B
    and Qwen3-8B heads): the default (BLOCK_N 128, 4 warps, 2 stages) was tuned at 4k, where a program
    runs 32 tiles; at 512 it runs 4, so its pipeline's fill and drain weigh more (bench/gpu_check.sh
    decode_tune)."""
    rows = []
    cfgs = [None, (64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 3), (32, 4, 4), (128, 4, 3), (128, 8, 2), (64, 8, 3),
            (32, 2, 4), (64, 2, 3)]
    shapes = [(256, 512, None), (256, 2048, 128), (128, 1024, 128), (64, 2048, 512), (256, 4096, 2048)]
    for heads in (16, 32):
        for batch, ctx, lo in shapes:
            base = None
            line = []
            for cfg in cfgs:
                A._DECODE_CFG_OVERRIDE = cfg
                try:
                    r = bench_paged_decode(batch, ctx, heads, min_ctx=lo, time_eager=False)
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses (shared memory)
                    line.append(f"{cfg} fail {str(e)[:30]}")
                    continue
                base = base or r["ms"]
                rows.append({"cfg": cfg or "default", **r, "speedup_vs_default": base / r["ms"]})
                line.append(f"{cfg or 'default'} {r['ms'] * 1e3:.1f}us {r['tb_s']:.2f}")
            A._DECODE_CFG_OVERRIDE = None
            print(f"decode tune heads {heads} batch {batch} ctx {lo or ctx}..{ctx}: " + " | ".join(line), flush=True)
    if out_json:
        import json
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def _tune_more(out_json: str | None = None) -> list[dict]:
    """MLA decode and prefill config sweeps (python -c ... _tune_more())."""
    rows = []
    v_from_k = A._V_FROM_K
    for batch in (1, 8, 32, 64, 128):
        r = bench_paged_decode(batch, 4096, time_eager=False)
        rows.append({"cfg": "default", **r})
        print(f"gqa default batch {batch:4d} S {r['num_splits']:2d}: {r['ms'] * 1e3:7.1f} us {r['tb_s']:.2f} TB/s")
    for cfg in [(16, 4, 2), (32, 4, 2), (32, 4, 3), (32, 8, 2), (64, 4, 2), (64, 8, 2), (32, 4, 1), (16, 4, 3)]:
        for vk in (True, False):
            A._DECODE_CFG_OVERRIDE, A._V_FROM_K = cfg, vk
            res = []
            for batch, S in [(64, 1), (64, 2), (64, 4), (32, 8), (8, 16)]:
                try:
                    r = bench_paged_decode(batch, 4096, 16, 1, 576, 64, mla_rank=512, num_splits=S, time_eager=False)
                except Exception as e:  # noqa: BLE001
                    res.append(f"b{batch} S{S} fail {str(e)[:40]}")
                    continue
                rows.append({"cfg": ["mla", *cfg, vk], **r})
                res.append(f"b{batch} S{S} {r['tb_s']:.2f}")
            print(f"mla {cfg} v_from_k={vk}: " + " | ".join(res))
    A._DECODE_CFG_OVERRIDE, A._V_FROM_K = None, v_from_k
    for cfg in [None, (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)]:
        A._PREFILL_CFG_OVERRIDE = cfg
        res = []
        for args in [(1, 4096, 0, 32, 8, 128), (16, 512, 0, 16, 8, 128), (4, 2048, 2048, 32, 32, 80)]:
            try:
                r = bench_paged_prefill(*args)
            except Exception as e:  # noqa: BLE001
                res.append(f"fail {str(e)[:40]}")
                continue
            rows.append({"cfg": ["prefill", cfg], **r})
            res.append(f"{r['tflops']:.0f}")
        print(f"prefill {cfg}: TFLOP/s " + " | ".join(res))
    A._PREFILL_CFG_OVERRIDE = None
    if out_json:
        import json
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    import sys

    kv = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    name = "tune.json" if kv == "bf16" else f"tune-{kv}.json"
    _tune_decode(os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None, kv)

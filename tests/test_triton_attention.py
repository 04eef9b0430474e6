"""Triton paged attention (nanoforge/kernels/triton/attention.py) against the torch reference.

CPU CI runs the small tests in the Triton interpreter (conftest sets TRITON_INTERPRET=1; fp32/fp16
only, since bf16 arithmetic is wrong there). `pytest -m gpu` runs the realistic bf16 shapes and the
CUDA-graph replay test on a GPU.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import numpy as np
import torch

from nanoforge.kernels import torch_ref
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kv_contract import KVContract, KVLayer

HAS_CUDA = torch.cuda.is_available()
CAN_RUN = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _attn():
    import importlib  # imported after conftest set the interpreter mode; the package's `attention`
    # attribute is the provider function, so import the module by its full name

    return importlib.import_module("nanoforge.kernels.triton.attention")


def build_batch(spec, *, shapes, block_size, dtype, seed, skip_rows=(), device=DEV, spare_blocks=3):
    """A random paged batch. spec: list of (q_len, ctx_len) (q_len 1 = decode row, q_len < ctx_len =
    chunk over a cached prefix). Block ids are shuffled and non-contiguous; block 0 is never handed
    out and is filled with NaN (block_tables pad with 0, so an unmasked read of padding shows up);
    every other pool entry is random. skip_rows get slot -1. Returns (pool, seqs, ctx)."""
    rng = random.Random(seed)
    need = sum(math.ceil(c / block_size) for _, c in spec)
    num_blocks = 1 + 2 * need + spare_blocks
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    free = free[::2] + free[1::2]  # every other one first: gaps between a sequence's blocks
    seqs = []
    for q_len, c in spec:
        seqs.append((q_len, c, [free.pop(0) for _ in range(math.ceil(c / block_size))]))
    contract = KVContract(block_size, DTYPE_NAMES[dtype], (KVLayer(0, "gqa", tuple(map(tuple, shapes))),))
    pool = allocate_pool(contract, num_blocks, device)
    gen = torch.Generator().manual_seed(seed)
    for t in pool[0]:
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
        t[0] = float("nan")
    ctx = make_context(pool, block_size, seqs, device)
    for r in skip_rows:
        ctx.slot_mapping[r] = -1
    return pool, seqs, ctx


def clone_ctx(pool, seqs, block_size, skip_rows=(), device=DEV):
    pool2 = [tuple(t.clone() for t in layer) for layer in pool]
    ctx = make_context(pool2, block_size, seqs, device)
    for r in skip_rows:
        ctx.slot_mapping[r] = -1
    return pool2, ctx


def rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEV)


def check_close(out, ref, tol):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.float() - ref.float()).abs().max().item()
    bound = tol * max(1.0, ref.float().abs().max().item())
    assert err <= bound, f"max abs err {err:.3e} > {bound:.3e}"


def run_gqa(spec, *, heads, kv_heads, head_dim, block_size, dtype, seed, tol, skip_rows=()):
    A = _attn()
    pool, seqs, ctx = build_batch(spec, shapes=[[kv_heads, head_dim], [kv_heads, head_dim]],
                                  block_size=block_size, dtype=dtype, seed=seed, skip_rows=skip_rows)
    pool_ref, ctx_ref = clone_ctx(pool, seqs, block_size, skip_rows)
    T = sum(q for q, _ in spec)
    gen = torch.Generator().manual_seed(seed + 1)
    q = rand(gen, T, heads * head_dim, dtype=dtype)
    k = rand(gen, T, kv_heads * head_dim, dtype=dtype)
    v = rand(gen, T, kv_heads * head_dim, dtype=dtype)
    attrs = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    scale = head_dim ** -0.5
    out = A.attention(q, k, v, ctx=ctx, kind="gqa", layer=0, scale=scale, **attrs)
    ref = torch_ref.attention(q, k, v, ctx=ctx_ref, kind="gqa", layer=0, scale=scale, **attrs)
    for a, b in zip(pool[0], pool_ref[0]):  # the stores are exact copies
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    check_close(out, ref, tol)
    return out, ref


def run_mla(spec, *, heads, nope, rope_d, vd, r, block_size, dtype, seed, tol):
    A = _attn()
    pool, seqs, ctx = build_batch(spec, shapes=[[r + rope_d]], block_size=block_size, dtype=dtype, seed=seed)
    pool_ref, ctx_ref = clone_ctx(pool, seqs, block_size)
    T = sum(q for q, _ in spec)
    gen = torch.Generator().manual_seed(seed + 1)
    q = rand(gen, T, heads * (nope + rope_d), dtype=dtype)
    latent = rand(gen, T, r, dtype=dtype)
    k_rope = rand(gen, T, rope_d, dtype=dtype)
    kv_b_proj = rand(gen, heads * (nope + vd), r, dtype=dtype) * r ** -0.5
    attrs = dict(heads=heads, qk_nope_head_dim=nope, qk_rope_head_dim=rope_d, v_head_dim=vd, kv_lora_rank=r)
    scale = (nope + rope_d) ** -0.5
    out = A.attention(q, latent, k_rope, ctx=ctx, kind="mla", layer=0, scale=scale, kv_b_proj=kv_b_proj, **attrs)
    ref = torch_ref.attention(q, latent, k_rope, ctx=ctx_ref, kind="mla", layer=0, scale=scale, kv_b_proj=kv_b_proj,
                              **attrs)
    assert torch.equal(pool[0][0].nan_to_num(7.0), pool_ref[0][0].nan_to_num(7.0))
    check_close(out, ref, tol)


# ---------------------------------------------------------------------------------------------
# interpreter-sized tests (CPU CI) -- also run on a GPU
# ---------------------------------------------------------------------------------------------
def test_store_kv_skips_minus_one():
    A = _attn()
    gen = torch.Generator().manual_seed(0)
    NB, BS, KVH, D, DV = 5, 4, 2, 16, 8
    kc = rand(gen, NB, BS, KVH, D, dtype=torch.float32)
    vc = rand(gen, NB, BS, KVH, DV, dtype=torch.float32)
    kc0, vc0 = kc.clone(), vc.clone()
    T = 6
    kv = rand(gen, T, KVH * (D + DV), dtype=torch.float32)  # strided views, as a split would give
    k, v = kv[:, : KVH * D].view(T, KVH, D), kv[:, KVH * D:].view(T, KVH, DV)
    slots = torch.tensor([7, -1, 0, 19, -1, 10], dtype=torch.long, device=DEV)
    A.store_kv(kc, vc, k, v, slots)
    torch_ref._store(kc0, slots, k)
    torch_ref._store(vc0, slots, v)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
    # the single MLA cache, 3-D, k = the whole entry
    cache = rand(gen, NB, BS, 24, dtype=torch.float32)
    cache0 = cache.clone()
    entry = rand(gen, T, 24, dtype=torch.float32)
    A.store_kv(cache, None, entry, None, slots)
    torch_ref._store(cache0, slots, entry)
    assert torch.equal(cache, cache0)


def test_gqa_mixed_batch_interp():
    # prefill chunk over a cached prefix, a fresh prefill, decode rows; slot -1 on one decode row
    # (its K/V already sit in the cache) and on one chunk row
    # max_query_len > 8: the prefill grid serves every row (query tiles of 8 tokens x 2 heads)
    spec = [(11, 19), (1, 9), (9, 9), (1, 20)]
    run_gqa(spec, heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, seed=1,
            tol=1e-4, skip_rows=(2, 11))
    # max_query_len <= 8: the decode grid takes short chunks too (8 query rows a program)
    spec = [(5, 13), (1, 9), (7, 7), (1, 20)]
    run_gqa(spec, heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, seed=1,
            tol=1e-4, skip_rows=(2, 5))


def test_gqa_decode_split_k_interp(monkeypatch):
    A = _attn()
    monkeypatch.setattr(A, "_num_splits", lambda *args: 4)  # the policy picks 1 on tiny contexts
    run_gqa([(1, 37), (1, 5), (1, 64)], heads=4, kv_heads=2, head_dim=32, block_size=8,
            dtype=torch.float32, seed=2, tol=1e-4)
    # speculative-verify rows (q_len 2..3) through the split-K grid, fp16, head dim 40 (32 + 16 tail)
    run_gqa([(3, 30), (2, 17)], heads=2, kv_heads=1, head_dim=40, block_size=8, dtype=torch.float16,
            seed=3, tol=2e-3)


def test_gqa_mixed_with_split_decode_interp(monkeypatch):
    # max_query_len > 8: decode rows go to the split-K grid, the chunk to the prefill grid
    A = _attn()
    monkeypatch.setattr(A, "_num_splits", lambda *args: 3)
    run_gqa([(1, 40), (10, 26), (1, 3)], heads=4, kv_heads=2, head_dim=16, block_size=8,
            dtype=torch.float32, seed=4, tol=1e-4)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("spec", [[(1, 5), (1, 37), (1, 12), (1, 64), (1, 1)],  # decode rows
                                  [(1, 9), (10, 26), (1, 40), (7, 7)]])  # decode rows among prefill chunks
def test_gqa_decode_order_interp(spec, splits, monkeypatch):
    # the decode grid taking its sequences longest first (ctx.decode_order, DECODE_LONGEST_FIRST) still
    # writes each sequence's rows, with and without the split-K reduce
    from nanoforge.kernels.context import decode_order_of

    A = _attn()
    monkeypatch.setattr(A, "_num_splits", lambda *args: splits)
    order = decode_order_of(np.array([c for _, c in spec]))
    assert order.tolist() == sorted(range(len(spec)), key=lambda i: -spec[i][1])
    real = A.paged_attention
    monkeypatch.setattr(A, "paged_attention", lambda *a, **kw: real(
        *a, **{**kw, "decode_order": torch.from_numpy(order).to(DEV)}))
    run_gqa(spec, heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, seed=11, tol=1e-4)


@pytest.mark.parametrize("spec,decode_grid", [
    ([(9, 9), (12, 20), (2, 30)], 0),  # prompts, a chunk over a cached prefix, 2 rows: no single-row sequence
    ([(9, 9), (1, 20)], 1),  # a decode row rides along
])
def test_prefill_step_launches_no_decode_grid_interp(spec, decode_grid, monkeypatch):
    # a mixed batch without single-row sequences (the host's q_range says so) skips the decode grid
    A = _attn()
    calls = []
    real = A._decode_grid
    monkeypatch.setattr(A, "_decode_grid", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    run_gqa(spec, heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, seed=10, tol=1e-4)
    assert len(calls) == decode_grid


@pytest.mark.parametrize("longest_first", [True, False])
def test_gqa_prefill_grid_order_interp(longest_first, monkeypatch):
    # the prefill grid in either order (PREFILL_LONGEST_FIRST): every program still finds its
    # sequence, tile and heads; chunks of several tiles, over a cached prefix, next to decode rows; the
    # last tile of the grid holds rows (69 rows, the last prompt starting at row 60)
    A = _attn()
    monkeypatch.setattr(A, "PREFILL_LONGEST_FIRST", longest_first)
    run_gqa([(1, 40), (37, 37), (20, 45), (2, 4), (9, 9)], heads=8, kv_heads=2, head_dim=16, block_size=4,
            dtype=torch.float32, seed=9, tol=1e-4)


@pytest.mark.parametrize("v_from_k", [False, True])
def test_mla_absorbed_interp(v_from_k, monkeypatch):
    A = _attn()
    monkeypatch.setattr(A, "_num_splits", lambda *args: 2)
    monkeypatch.setattr(A, "_V_FROM_K", v_from_k)  # V tile loaded again, or the K tile reused
    # decode-only (split-K), then mixed (prefill grid): K = [latent 32 | rope 16], V = K[:, :32]
    run_mla([(1, 11), (1, 20)], heads=4, nope=16, rope_d=16, vd=16, r=32, block_size=4,
            dtype=torch.float32, seed=5, tol=1e-4)
    run_mla([(9, 12), (1, 6)], heads=4, nope=16, rope_d=16, vd=16, r=32, block_size=4,
            dtype=torch.float32, seed=6, tol=1e-4)


def _expanded_rows(monkeypatch) -> list[int]:
    """Spy on kernels/mla_prefill.py: the query rows of each sequence it runs in the expanded form."""
    from nanoforge.kernels import mla_prefill

    calls, real = [], mla_prefill.expanded_attention

    def spy(q, *args, **kw):
        calls.append(q.shape[0])
        return real(q, *args, **kw)
    monkeypatch.setattr(mla_prefill, "expanded_attention", spy)
    return calls


def test_mla_prefill_split_interp(monkeypatch):
    # prefill chunks (> 8 rows; fresh, or after a cached prefix) split off to the expanded form on torch's SDPA
    # (kernels/mla_prefill.py: on CUDA only, here on the CPU too); decode and verify rows through this kernel
    from nanoforge.kernels import mla_prefill

    monkeypatch.setattr(mla_prefill, "DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_attn(), "_num_splits", lambda *args: 2)
    calls = _expanded_rows(monkeypatch)
    run_mla([(9, 12), (1, 6), (3, 9), (12, 30), (1, 17)], heads=4, nope=16, rope_d=16, vd=16, r=32, block_size=4,
            dtype=torch.float32, seed=7, tol=1e-4)
    assert calls == [9, 12]


# ---------------------------------------------------------------------------------------------
# GPU tests: realistic bf16 shapes, CUDA graphs
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _mixed_spec(rng, n_decode, n_prefill, max_ctx, max_chunk):
    spec = [(1, rng.randint(1, max_ctx)) for _ in range(n_decode)]
    for _ in range(n_prefill):
        ctx_len = rng.randint(2, max_ctx)
        spec.append((rng.randint(2, min(ctx_len, max_chunk)), ctx_len))
    rng.shuffle(spec)
    return spec


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (32, 8, 128), (32, 32, 80), (8, 1, 256),
                                                     (28, 4, 128), (12, 2, 96), (16, 16, 64)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_gqa_gpu_bf16(heads, kv_heads, head_dim, block_size):
    rng = random.Random(heads * 1000 + head_dim + block_size)
    for i, spec in enumerate([
        _mixed_spec(rng, 48, 16, 4096, 512),  # batch 64 mixed
        [(1, rng.randint(3000, 4096)) for _ in range(32)],  # decode only, split-K policy
        [(1, 4096)],  # batch-1 long-context decode (many splits)
        [(rng.randint(1, 4), rng.randint(100, 2000)) for _ in range(8)],  # verify rows
    ]):
        run_gqa(spec, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                dtype=torch.bfloat16, seed=i, tol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 64])
def test_mla_gpu_bf16(block_size):
    rng = random.Random(block_size)
    for i, spec in enumerate([_mixed_spec(rng, 24, 6, 3000, 300), [(1, rng.randint(100, 4096)) for _ in range(16)],
                              [(1, 4000)]]):
        run_mla(spec, heads=16, nope=128, rope_d=64, vd=128, r=512, block_size=block_size,
                dtype=torch.bfloat16, seed=i, tol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("split", [True, False], ids=["expanded-prefill", "all-triton"])
def test_mla_prefill_split_gpu_bf16(split, monkeypatch):
    """DeepSeek-V3's MLA at its sizes (128 heads, q/k 128 + 64, v 128, latent 512, 64-token blocks): a
    mixed step whose prefill chunks (fresh, and after cached prefixes) run the expanded form on torch's
    SDPA (kernels/mla_prefill.py) and its decode and verify rows this kernel; and all of it on this kernel."""
    from nanoforge.kernels import mla_prefill

    if not split:
        monkeypatch.setattr(mla_prefill, "DEVICES", frozenset())
    calls = _expanded_rows(monkeypatch)
    rng = random.Random(11)
    spec = [(1, rng.randint(1, 3000)) for _ in range(12)] + [(3, 700), (1024, 1024), (300, 2500), (40, 1800)]
    rng.shuffle(spec)
    run_mla(spec, heads=128, nope=128, rope_d=64, vd=128, r=512, block_size=64, dtype=torch.bfloat16, seed=11,
            tol=2e-2)
    assert sorted(calls) == ([40, 300, 1024] if split else [])


@gpu
@needs_cuda
def test_gqa_gpu_fp16_and_fp32():
    rng = random.Random(7)
    spec = _mixed_spec(rng, 16, 4, 1500, 200)
    run_gqa(spec, heads=16, kv_heads=8, head_dim=128, block_size=16, dtype=torch.float16, seed=7, tol=5e-3)
    run_gqa(spec, heads=16, kv_heads=8, head_dim=128, block_size=16, dtype=torch.float32, seed=8, tol=1e-4)


@gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_paged_attention_cuda_graph_replay(batch):
    """Capture a decode batch once, replay with new context lengths, block tables and queries."""
    A = _attn()
    H, KVH, D, BS, W = 16, 8, 128, 16, 64  # up to 64 blocks = 1024 positions per sequence
    max_ctx = W * BS
    rng = random.Random(batch)
    nb = batch * W + 1
    dtype = torch.bfloat16
    k_cache = torch.randn(nb, BS, KVH, D, device="cuda", dtype=dtype)
    v_cache = torch.randn(nb, BS, KVH, D, device="cuda", dtype=dtype)
    q = torch.randn(batch, H, D, device="cuda", dtype=dtype)
    qs = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    ctx_lens = torch.full((batch,), max_ctx, dtype=torch.int32, device="cuda")
    bt = torch.randperm(nb - 1, device="cuda")[: batch * W].view(batch, W).to(torch.int32) + 1
    out = torch.empty(batch, H, D, device="cuda", dtype=dtype)
    scale = D ** -0.5

    def step():
        A.paged_attention(q, k_cache, v_cache, qs, ctx_lens, bt, scale=scale, max_query_len=1, max_context_len=max_ctx,
                          out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile + warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for trial in range(3):
        lens = [rng.randint(1, max_ctx) for _ in range(batch)]
        blocks = torch.randperm(nb - 1)[: batch * W].view(batch, W) + 1
        seqs = [(1, c, blocks[i, : math.ceil(c / BS)].tolist()) for i, c in enumerate(lens)]
        ctx_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        bt.copy_(blocks.to(torch.int32))
        q.copy_(torch.randn(batch, H, D, dtype=dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_ctx = make_context([(k_cache, v_cache)], BS, seqs, "cuda")
        ref = torch.cat([
            torch_ref._attend(q[i: i + 1], k_cache.view(-1, KVH, D)[ref_ctx.context_slots(sq)],
                              v_cache.view(-1, KVH, D)[ref_ctx.context_slots(sq)], sq.ctx_len, scale)
            for i, sq in enumerate(ref_ctx.seqs)])
        check_close(out, ref, 2e-2)


@gpu
@needs_cuda
def test_bench_helper_runs():
    from bench.kernels.attention import bench_paged_decode

    r = bench_paged_decode(4, 512)
    assert r["tb_s"] > 0 and r["ms"] > 0


@gpu
@needs_cuda
def test_bench_mla_prefill_runs():
    from bench.kernels.mla_prefill import bench_case

    for n, c in [(256, 256), (64, 700)]:  # absorbed (this kernel) and expanded (kernels/mla_prefill.py) agree
        rows = bench_case(n, c, heads=16)["kernels"]
        bound = 2e-2 * max(1.0, rows["absorbed_triton"]["max_abs_out"])
        for key in ("expanded", "expanded_v_padded"):
            assert rows[key]["ms"] > 0 and rows[key]["max_abs_diff_vs_absorbed"] <= bound, (key, rows[key])

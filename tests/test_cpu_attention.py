"""The `cpu` provider's attention (nanoforge/kernels/cpu/attention.py) against torch_ref.attention:
same outputs (fp32, ~1e-5) and bit-equal KV pools after the call, on random paged batches (shuffled,
non-contiguous blocks; block 0 is never handed out and holds NaN, so an unmasked read of padding
shows up as a non-finite output); plus the provider's registration."""
from __future__ import annotations

import importlib
import math
import random

import pytest
import torch

from nanoforge.codegen.providers import BY_NAME, candidates, graph_unsafe_reason
from nanoforge.facts import Target
from nanoforge.kernels import torch_ref
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kv_contract import KVContract, KVLayer

cpu_attn = importlib.import_module("nanoforge.kernels.cpu.attention")  # the package's `attention` is the function
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3"}


def build_batch(spec, *, shapes, block_size, dtype, seed, skip_rows=()):
    """Two identical random paged batches (pool, ctx) for spec [(q_len, ctx_len)]: one for each kernel."""
    rng = random.Random(seed)
    need = sum(math.ceil(c / block_size) for _, c in spec)
    free = list(range(1, 2 + 2 * need))
    rng.shuffle(free)
    free = free[::2] + free[1::2]  # gaps between a sequence's blocks
    seqs = [(q, c, [free.pop(0) for _ in range(math.ceil(c / block_size))]) for q, c in spec]
    contract = KVContract(block_size, DTYPE_NAMES[dtype], (KVLayer(0, "gqa", tuple(map(tuple, shapes))),))
    pool = allocate_pool(contract, 2 + 2 * need)
    gen = torch.Generator().manual_seed(seed)
    for t in pool[0]:
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
        t[0] = float("nan")
    pools = [pool, [tuple(t.clone() for t in layer) for layer in pool]]
    out = []
    for p in pools:
        ctx = make_context(p, block_size, seqs)
        for r in skip_rows:
            ctx.slot_mapping[r] = -1
        out.append((p, ctx))
    return out


def check(out, ref, pools, tol):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output: padding was read unmasked"
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    assert err <= tol * max(1.0, ref.float().abs().max().item() if ref.numel() else 0.0), err
    for a, b in zip(pools[0][0], pools[1][0]):  # the stores are exact copies: bit-equal pools
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run_gqa(spec, *, heads=4, kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, seed=0, tol=1e-5,
            skip_rows=(), pool_dtype=None):
    (pool, ctx), (pool_ref, ctx_ref) = build_batch(spec, shapes=[[kv_heads, head_dim]] * 2, block_size=block_size,
                                                   dtype=pool_dtype or dtype, seed=seed, skip_rows=skip_rows)
    t = sum(q for q, _ in spec)
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(t, n * head_dim, generator=gen).to(dtype) for n in (heads, kv_heads, kv_heads))
    kw = dict(kind="gqa", layer=0, scale=head_dim ** -0.5, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    out = cpu_attn.attention(q, k, v, ctx=ctx, **kw)
    ref = torch_ref.attention(q, k, v, ctx=ctx_ref, **kw)
    check(out, ref, (pool, pool_ref), tol)
    return ctx


def run_mla(spec, *, heads=4, nope=16, rope_d=8, vd=16, r=32, block_size=4, seed=0, tol=1e-5):
    (pool, ctx), (pool_ref, ctx_ref) = build_batch(spec, shapes=[[r + rope_d]], block_size=block_size,
                                                   dtype=torch.float32, seed=seed)
    t = sum(q for q, _ in spec)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(t, heads * (nope + rope_d), generator=gen)
    latent, k_rope = torch.randn(t, r, generator=gen), torch.randn(t, rope_d, generator=gen)
    kv_b_proj = torch.randn(heads * (nope + vd), r, generator=gen) * r ** -0.5
    kw = dict(kind="mla", layer=0, scale=(nope + rope_d) ** -0.5, kv_b_proj=kv_b_proj, heads=heads,
              qk_nope_head_dim=nope, qk_rope_head_dim=rope_d, v_head_dim=vd, kv_lora_rank=r)
    out = cpu_attn.attention(q, latent, k_rope, ctx=ctx, **kw)
    ref = torch_ref.attention(q, latent, k_rope, ctx=ctx_ref, **kw)
    check(out, ref, (pool, pool_ref), tol)


def mixed_spec(seed, n_decode, n_prefill, max_ctx, max_chunk):
    rng = random.Random(seed)
    spec = [(1, rng.randint(1, max_ctx)) for _ in range(n_decode)]
    for _ in range(n_prefill):
        c = rng.randint(2, max_ctx)
        spec.append((rng.randint(2, min(c, max_chunk)), c))  # a chunk over a cached prefix (or a whole prompt)
    rng.shuffle(spec)
    return spec


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (6, 1), (6, 3)])
def test_gqa_decode_only(heads, kv_heads):
    run_gqa(mixed_spec(1, 17, 0, 90, 1), heads=heads, kv_heads=kv_heads, seed=heads * 10 + kv_heads)
    run_gqa([(1, 40)] * 8, heads=heads, kv_heads=kv_heads, seed=3)  # uniform: one group, no scatter


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_gqa_prefill_only(heads, kv_heads):
    run_gqa([(c, c) for c in (1, 7, 33, 16, 70)], heads=heads, kv_heads=kv_heads, seed=kv_heads)
    run_gqa([(24, 24)] * 5, heads=heads, kv_heads=kv_heads, seed=4)
    run_gqa([(c, c) for c in (33, 40, 64, 47, 50)], heads=heads, kv_heads=kv_heads, seed=5)  # ragged: one is_causal call
    run_gqa([(c, c) for c in (33, 40, 47, 50)], heads=heads, kv_heads=kv_heads, block_size=16, seed=6)  # keys pad past q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gqa_mixed(seed):
    run_gqa(mixed_spec(seed, 12, 5, 150, 40), heads=8, kv_heads=2, head_dim=32, block_size=16, seed=seed)
    run_gqa([(11, 19), (1, 9), (9, 9), (1, 20), (3, 130)], seed=seed + 10)


def test_many_shuffled_blocks():
    run_gqa([(1, 301), (5, 517), (1, 3)], block_size=4, seed=5)  # 130 blocks for one sequence


def test_skipped_rows_bf16_and_fp8_pool():
    run_gqa([(5, 13), (1, 9), (7, 7)], skip_rows=(0, 6), seed=6)
    run_gqa(mixed_spec(7, 6, 3, 60, 20), dtype=torch.bfloat16, seed=7, tol=3e-2)
    run_gqa(mixed_spec(8, 6, 3, 60, 20), pool_dtype=torch.float8_e4m3fn, seed=8)  # f32 math over an fp8 pool


@pytest.mark.parametrize("budget", [1, 3000])
def test_calls_split_under_the_budget(budget, monkeypatch):
    monkeypatch.setattr(cpu_attn, "CALL_BUDGET", budget)  # 1: one sequence per SDPA call
    run_gqa([(1, 30)] * 6, seed=8)
    run_gqa(mixed_spec(9, 8, 4, 80, 30), seed=9)
    run_mla(mixed_spec(10, 5, 2, 40, 20), seed=10)


def test_mla():
    run_mla([(1, 11), (1, 20), (1, 3)], seed=11)  # decode only
    run_mla([(12, 12), (5, 5)], seed=12)  # prefill only
    run_mla([(9, 12), (1, 6), (4, 30)], heads=8, nope=32, rope_d=16, vd=24, r=64, block_size=16, seed=13)


def test_empty_batch():
    for kind_run in (run_gqa, run_mla):
        kind_run([], seed=14)


def test_ragged_batch_is_not_padded_to_the_prefill():
    """A 2k-token chunk over a 4k context beside 63 decode rows: decode rows are grouped apart, so the
    masks hold about one chunk x context, not 64 of them."""
    bs = 16
    spec = [(2048, 4096)] + [(1, 100 + 7 * i) for i in range(63)]
    seqs, nxt = [], 1
    for q, c in spec:
        n = math.ceil(c / bs)
        seqs.append((q, c, list(range(nxt, nxt + n))))
        nxt += n
    ctx = make_context([], bs, seqs)
    plan = cpu_attn._plan(ctx)
    assert sum(g.mask.numel() for g in plan.groups) <= 2048 * 4096 + 63 * 512
    assert max(g.rows.shape[1] for g in plan.groups if g.rows.shape[0] > 1) == 1
    assert cpu_attn._plan(ctx) is plan  # built once per step, shared by the layers


def test_padding_keys_are_zeroed_whatever_the_pool_holds():
    """Keys past a sequence's context (its last block's tail, pad blocks of a group) are gathered
    with whole blocks: NaN there must not reach the output (a masked key's value still multiplies)."""
    spec = [(1, 5), (1, 13), (3, 6), (1, 33)]
    (pool, ctx), (pool_ref, ctx_ref) = build_batch(spec, shapes=[[2, 16]] * 2, block_size=8, dtype=torch.float32,
                                                   seed=15)
    for p, c in ((pool, ctx), (pool_ref, ctx_ref)):
        for t in p[0]:
            for (q, n, blocks) in c._host:  # every slot past the context of its sequence holds NaN
                flat = t[blocks].view(-1, *t.shape[2:])
                flat[n:] = float("nan")
                t[blocks] = flat.view(len(blocks), *t.shape[1:])
    t = sum(q for q, _ in spec)
    gen = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(t, n * 16, generator=gen) for n in (4, 2, 2))
    kw = dict(kind="gqa", layer=0, scale=0.25, heads=4, kv_heads=2, head_dim=16)
    out = cpu_attn.attention(q, k, v, ctx=ctx, **kw)
    ref = torch_ref.attention(q, k, v, ctx=ctx_ref, **kw)
    assert torch.isfinite(out).all() and torch.allclose(out, ref, atol=1e-5)


def test_registered_for_the_cpu_target_only():
    assert "attention" in BY_NAME["cpu"].ops
    cpu = dict(candidates("attention", Target(device="cpu")))
    assert cpu["cpu"] is None and list(cpu).index("cpu") < list(cpu).index("torch")
    cuda = dict(candidates("attention", Target(device="cuda")))
    assert cuda["cpu"] == "runs on the CPU target only"
    assert graph_unsafe_reason("attention", "cpu") is not None

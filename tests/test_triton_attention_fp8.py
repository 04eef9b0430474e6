"""FP8 (e4m3) KV cache in the Triton paged attention (nanoforge/kernels/triton/attention.py): the store
against fp8.quantize_kv bit for bit, the read path against attention on the dequantized pool.

CPU CI runs everything in the Triton interpreter (conftest sets TRITON_INTERPRET=1) with tiny shapes:
f32 queries (tiles cast to f32) and f16 / bf16 queries (the bit-widening path of attention_fp8.py,
its PV product in f16 there since the interpreter has no bf16 dot; one test runs the GPU's bf16 PV
constants with a patched dot, and one emulates the inline PTX). `pytest -m gpu` adds realistic bf16
shapes on a GPU. Every pool slot no sequence owns (block 0, the block-table padding, spare blocks,
the tail of each last block) holds NaN values and NaN scales, so a leak of padding shows up as a
non-finite output.
"""
from __future__ import annotations

import importlib
import math
import os
import random

import pytest
import torch

from nanoforge.kernels import fp8, torch_ref
from nanoforge.kernels.context import make_context

HAS_CUDA = torch.cuda.is_available()
CAN_RUN = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
E4M3 = torch.float8_e4m3fn


def _attn():
    return importlib.import_module("nanoforge.kernels.triton.attention")  # after conftest set the interpreter


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern (NaN == NaN) for exact comparisons."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def spread(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """randn with per-row magnitudes over 1e-2 .. 1e2 and per-element spread, so rows hit e4m3 subnormals
    (on the generator's device)."""
    kw = {"generator": gen, "device": gen.device}
    x = torch.randn(*shape, **kw) * 10 ** (torch.rand(*shape[:-1], 1, **kw) * 4 - 2)
    return x * 10 ** (torch.rand(*shape, **kw) - 0.5)


def fp8_batch(spec, *, kv_heads: int, dims: tuple[int, ...], block_size: int, seed: int, mla: bool = False,
              skip_rows=()):
    """Random FP8 pool + context for spec [(q_len, ctx_len)] on shuffled, gapped pages. GQA: dims (Dk, Dv),
    pool (k, v, k_scale, v_scale); MLA: dims (r + rope,), pool (cache [NB, BS, D], scale [NB, BS, 1])."""
    rng = random.Random(seed)
    bs = block_size
    nb = 1 + 2 * sum(math.ceil(c / bs) for _, c in spec) + 3
    free = list(range(1, nb))
    rng.shuffle(free)
    free = free[::2] + free[1::2]
    seqs = [(q, c, [free.pop(0) for _ in range(math.ceil(c / bs))]) for q, c in spec]
    gen = torch.Generator(device=DEV).manual_seed(seed)  # GPU-test pools are GBs: made where they live
    values, scales = [], []
    for d in dims:
        q, s = fp8.quantize_kv(spread(gen, nb * bs, kv_heads, d))
        values.append(q.view(nb, bs, d) if mla else q.view(nb, bs, kv_heads, d))
        scales.append(s.view(nb, bs, kv_heads))
    owned = torch.zeros(nb * bs, dtype=torch.bool)
    for _, c, blocks in seqs:
        owned[torch.tensor([b * bs + o for b in blocks for o in range(bs)])[:c]] = True
    pool = tuple(values + scales)
    for t in pool:  # e4m3fn NaN is 0x7f (torch has no masked fill for float8)
        flat = t.view(torch.uint8) if t.dtype == E4M3 else t
        flat.view(nb * bs, -1)[~owned.to(DEV)] = 0x7F if t.dtype == E4M3 else float("nan")
    ctx = make_context([pool], bs, seqs, DEV)
    for r in skip_rows:
        ctx.slot_mapping[r] = -1
    return pool, seqs, ctx


def deq(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The pool widened to f32 (MLA cache [NB, BS, D] with scale [NB, BS, 1] too)."""
    if values.dim() == scale.dim():  # MLA: one head
        return fp8.dequantize_kv(values[..., None, :], scale, torch.float32)[..., 0, :]
    return fp8.dequantize_kv(values, scale, torch.float32)


def ref_paged(q, k, v, ctx, scale):
    """torch_ref's causal attention per sequence over f32 caches [NB, BS, KVH, D*]."""
    out = []
    for s in ctx.seqs:
        slots = ctx.context_slots(s)
        out.append(torch_ref._attend(q[s.q_start: s.q_start + s.q_len].float(), k.flatten(0, 1)[slots],
                                     v.flatten(0, 1)[slots], s.ctx_len, scale))
    return torch.cat(out)


def check_close(out, ref, tol):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output: padding or garbage leaked"
    err = (out.float() - ref.float()).abs().max().item()
    bound = tol * max(1.0, ref.float().abs().max().item())
    assert err <= bound, f"max abs err {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------------------------
# store_kv: bitwise fp8.quantize_kv
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_fp8_bitwise(dtype):
    A = _attn()
    gen = torch.Generator().manual_seed(11)
    NB, BS, KVH, D, DV, T = 5, 4, 3, 24, 40, 7  # non-power-of-two head dims and head count
    kc = torch.full((NB, BS, KVH, D), float("nan"), dtype=E4M3, device=DEV)
    vc = torch.full((NB, BS, KVH, DV), float("nan"), dtype=E4M3, device=DEV)
    ks, vs = (torch.full((NB, BS, KVH), float("nan"), device=DEV) for _ in range(2))
    kv = spread(gen, T, KVH * (D + DV))
    kv[3, :D] *= 1e-11  # one head below SCALE_EPS: the eps path
    kv = kv.to(dtype).to(DEV)
    k, v = kv[:, : KVH * D].view(T, KVH, D), kv[:, KVH * D:].view(T, KVH, DV)  # strided views
    slots = torch.tensor([7, -1, 0, 19, -1, 10, 13], dtype=torch.long, device=DEV)
    before = [t.clone() for t in (kc, vc, ks, vs)]
    A.store_kv(kc, vc, k, v, slots, ks, vs)
    keep = slots >= 0
    for cache, scale, x, c0, s0 in ((kc, ks, k, before[0], before[2]), (vc, vs, v, before[1], before[3])):
        q_ref, s_ref = fp8.quantize_kv(x)
        c0.flatten(0, 1)[slots[keep]] = q_ref[keep]
        s0.flatten(0, 1)[slots[keep]] = s_ref[keep]
        assert torch.equal(bits(cache), bits(c0)), "e4m3 values differ from fp8.quantize_kv"
        assert torch.equal(bits(scale), bits(s0)), "scales differ from fp8.quantize_kv"

    # MLA: the whole [latent | rope] entry, one scale per token, into a 3-D cache
    R, ROPE = 32, 16
    cache = torch.full((NB, BS, R + ROPE), float("nan"), dtype=E4M3, device=DEV)
    sc = torch.full((NB, BS, 1), float("nan"), device=DEV)
    c0, s0 = cache.clone(), sc.clone()
    entry = spread(gen, T, 1, R + ROPE).to(dtype).to(DEV)
    A.store_kv(cache, None, entry.view(T, R + ROPE), None, slots, k_scale=sc)
    q_ref, s_ref = fp8.quantize_kv(entry)
    c0.flatten(0, 1)[slots[keep]] = q_ref[keep, 0]
    s0.flatten(0, 1)[slots[keep]] = s_ref[keep]
    assert torch.equal(bits(cache), bits(c0)) and torch.equal(bits(sc), bits(s0))


# ---------------------------------------------------------------------------------------------
# paged_attention over FP8 caches
# ---------------------------------------------------------------------------------------------
def run_paged(spec, *, heads, kv_heads, dk, dv, block_size, seed, num_splits=None, dtype=torch.float32,
              tol=1e-4, mla=False):
    A = _attn()
    if mla:  # K = the whole entry, V = its first dv columns, one shared scale
        (cache, sc), _, ctx = fp8_batch(spec, kv_heads=1, dims=(dk,), block_size=block_size, seed=seed,
                                           mla=True)
        kc, vc, ks, vs = cache[:, :, None, :], cache[:, :, None, :dv], sc, sc
        kd = deq(cache, sc)[:, :, None, :]
        vd = kd[..., :dv]
    else:
        (kc, vc, ks, vs), _, ctx = fp8_batch(spec, kv_heads=kv_heads, dims=(dk, dv), block_size=block_size,
                                                seed=seed)
        kd, vd = deq(kc, ks), deq(vc, vs)
    gen = torch.Generator().manual_seed(seed + 1)
    T = sum(q for q, _ in spec)
    q = torch.randn(T, heads, dk, generator=gen).to(dtype).to(DEV)
    scale = dk ** -0.5
    out = A.paged_attention(q, kc, vc, ctx.query_start, ctx.context_lens, ctx.block_tables, scale=scale,
                            max_query_len=ctx.max_query_len, max_context_len=ctx.max_context_len,
                            num_splits=num_splits, k_scale=ks, v_scale=vs)
    check_close(out, ref_paged(q, kd, vd, ctx, scale), tol)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_fp8_decode(num_splits):
    # ragged contexts (partial last pages, one shorter than a tile), GQA group 2
    run_paged([(1, 37), (1, 5), (1, 64), (1, 16)], heads=4, kv_heads=2, dk=32, dv=32, block_size=8, seed=1,
              num_splits=num_splits)
    # speculative-verify rows through the decode grid, head dim 40 (32 + 16 tail)
    run_paged([(3, 30), (2, 17)], heads=4, kv_heads=2, dk=40, dv=40, block_size=8, seed=2, num_splits=num_splits)


def test_paged_fp8_mixed():
    # prefill chunk over a cached prefix, a fresh prefill, decode rows (split-K); GQA group 3
    run_paged([(11, 19), (1, 9), (9, 9), (1, 20)], heads=6, kv_heads=2, dk=16, dv=16, block_size=4, seed=3,
              num_splits=2)


@pytest.mark.parametrize("spec,splits", [([(1, 11), (1, 20)], 2), ([(9, 12), (1, 6)], None)])
def test_paged_fp8_mla_layout(spec, splits):
    run_paged(spec, heads=4, kv_heads=1, dk=48, dv=32, block_size=4, seed=4, num_splits=splits, mla=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 1e-2)])
def test_paged_fp8_16bit_queries(dtype, tol):
    """The bit-widening path (attention_fp8._widen; f16 PV under the interpreter, bf16 on a GPU)."""
    run_paged([(1, 37), (1, 5), (3, 20)], heads=4, kv_heads=2, dk=40, dv=40, block_size=8, seed=11, num_splits=2,
              dtype=dtype, tol=tol)
    run_paged([(11, 19), (1, 9), (9, 9), (1, 20)], heads=6, kv_heads=2, dk=16, dv=16, block_size=4, seed=12,
              num_splits=2, dtype=dtype, tol=tol)
    run_paged([(9, 12), (1, 6)], heads=4, kv_heads=1, dk=48, dv=32, block_size=4, seed=13, mla=True, dtype=dtype,
              tol=tol)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter stand-in for what a GPU runs natively")
def test_paged_fp8_bf16_pv_interp(monkeypatch):
    """The GPU's PV constants (bf16 V = e4m3 * 2^-120, p * v_scale * 2^104, acc and l * 2^-16) under the
    interpreter, whose bf16 dot multiplies the raw uint16 storage: patched here to widen bf16 exactly."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    A = _attn()
    real_dot = interpreter.InterpreterBuilder.create_dot

    def dot(self, a, b, d, *args):
        if a.dtype.scalar == tl.bfloat16:
            a, b = (interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
                    for x in (a, b))
        return real_dot(self, a, b, d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)
    monkeypatch.setattr(A, "PV_WIDEN", (4, 2.0 ** 104, 2.0 ** -16))
    run_paged([(1, 37), (1, 5), (3, 20)], heads=4, kv_heads=2, dk=40, dv=40, block_size=8, seed=21, num_splits=2,
              dtype=torch.float16, tol=1e-2)
    run_paged([(11, 19), (1, 9)], heads=4, kv_heads=1, dk=48, dv=32, block_size=4, seed=22, mla=True,
              dtype=torch.float16, tol=1e-2)


# ---------------------------------------------------------------------------------------------
# provider entry `attention`: store + attend, against torch_ref on the dequantized pool
# ---------------------------------------------------------------------------------------------
def run_provider_gqa(spec, *, heads, kv_heads, head_dim, block_size, seed, dtype=torch.float32, tol=1e-4,
                     skip_rows=()):
    A = _attn()
    pool, seqs, ctx = fp8_batch(spec, kv_heads=kv_heads, dims=(head_dim, head_dim), block_size=block_size,
                                seed=seed, skip_rows=skip_rows)
    kc, vc, ks, vs = pool
    ref_pool = [(deq(kc, ks), deq(vc, vs))]
    ctx_ref = make_context(ref_pool, block_size, seqs, DEV)
    ctx_ref.slot_mapping.copy_(ctx.slot_mapping)
    before = [t.clone() for t in pool]
    gen = torch.Generator().manual_seed(seed + 1)
    T = sum(q for q, _ in spec)
    q = torch.randn(T, heads * head_dim, generator=gen).to(dtype).to(DEV)
    k, v = (spread(gen, T, kv_heads, head_dim).to(dtype).to(DEV) for _ in range(2))
    attrs = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    scale = head_dim ** -0.5
    out = A.attention(q, k.view(T, -1), v.view(T, -1), ctx=ctx, kind="gqa", layer=0, scale=scale, **attrs)
    (kq, ksc), (vq, vsc) = fp8.quantize_kv(k), fp8.quantize_kv(v)
    ref = torch_ref.attention(q.float(), deq(kq, ksc).view(T, -1), deq(vq, vsc).view(T, -1), ctx=ctx_ref, kind="gqa",
                              layer=0, scale=scale, **attrs)
    keep = ctx.slot_mapping >= 0
    for t, t0, new in zip(pool, before, (kq, vq, ksc, vsc)):  # the store, bit for bit, and nothing else
        t0.flatten(0, 1)[ctx.slot_mapping[keep]] = new[keep]
        assert torch.equal(bits(t), bits(t0))
    check_close(out, ref, tol)


def run_provider_mla(spec, *, heads, nope, rope_d, vd, r, block_size, seed, dtype=torch.float32, tol=1e-4,
                     vs_16bit_pool: bool = False):
    """vs_16bit_pool: besides the FP8 pool, run the same dequantized values from a pool in `dtype`, and
    bound the FP8 error by that run's error plus tol * max|ref| (absorbed MLA in bf16 rounds q_lat and
    o_lat: on these 1e-2..1e2 entries that alone is 0.2-3.5% RMS on an H100, more than FP8 adds)."""
    A = _attn()
    pool, seqs, ctx = fp8_batch(spec, kv_heads=1, dims=(r + rope_d,), block_size=block_size, seed=seed, mla=True)
    cache, sc = pool
    ctx_ref = make_context([(deq(cache, sc),)], block_size, seqs, DEV)
    ctx_16 = make_context([(deq(cache, sc).to(dtype),)], block_size, seqs, DEV)
    before = [t.clone() for t in pool]
    gen = torch.Generator().manual_seed(seed + 1)
    T = sum(q for q, _ in spec)
    q = torch.randn(T, heads * (nope + rope_d), generator=gen).to(dtype).to(DEV)
    entry = spread(gen, T, 1, r + rope_d).to(dtype).to(DEV)
    kv_b_proj = (torch.randn(heads * (nope + vd), r, generator=gen) * r ** -0.5).to(dtype).to(DEV)
    attrs = dict(heads=heads, qk_nope_head_dim=nope, qk_rope_head_dim=rope_d, v_head_dim=vd, kv_lora_rank=r)
    scale = (nope + rope_d) ** -0.5
    latent, k_rope = entry[:, 0, :r], entry[:, 0, r:]
    out = A.attention(q, latent, k_rope, ctx=ctx, kind="mla", layer=0, scale=scale, kv_b_proj=kv_b_proj, **attrs)
    eq, es = fp8.quantize_kv(entry)  # one scale over the whole [latent | rope] entry
    e_ref = deq(eq, es)[:, 0]
    ref = torch_ref.attention(q.float(), e_ref[:, :r], e_ref[:, r:], ctx=ctx_ref, kind="mla", layer=0, scale=scale,
                              kv_b_proj=kv_b_proj.float(), **attrs)
    for t, t0, new in zip(pool, before, (eq[:, 0], es)):
        t0.flatten(0, 1)[ctx.slot_mapping] = new
        assert torch.equal(bits(t), bits(t0))
    if not vs_16bit_pool:
        check_close(out, ref, tol)
        return
    e16 = e_ref.to(dtype)
    out16 = A.attention(q, e16[:, :r], e16[:, r:], ctx=ctx_16, kind="mla", layer=0, scale=scale, kv_b_proj=kv_b_proj,
                        **attrs)
    assert torch.isfinite(out).all()
    err, err16 = ((o.float() - ref).abs().max().item() for o in (out, out16))
    assert err <= err16 + tol * ref.abs().max().item(), (err, err16)


def test_provider_gqa_fp8():
    # max_query_len > 8 (prefill grid + split-K decode rows); slot -1 on a decode row and a chunk row
    run_provider_gqa([(11, 19), (1, 9), (9, 9), (1, 20)], heads=4, kv_heads=2, head_dim=16, block_size=4, seed=5,
                     skip_rows=(2, 11))
    run_provider_gqa([(1, 33), (3, 12), (1, 7)], heads=4, kv_heads=1, head_dim=24, block_size=8, seed=6)
    # the engine's dtype: bf16 K/V quantized at store, bf16 queries through the widening path
    run_provider_gqa([(10, 21), (1, 13)], heads=4, kv_heads=2, head_dim=16, block_size=4, seed=9,
                     dtype=torch.bfloat16, tol=1e-2)


def test_provider_mla_fp8():
    run_provider_mla([(1, 11), (1, 20)], heads=4, nope=16, rope_d=16, vd=16, r=32, block_size=4, seed=7)
    run_provider_mla([(9, 12), (1, 6)], heads=4, nope=16, rope_d=16, vd=16, r=32, block_size=4, seed=8)
    run_provider_mla([(1, 9), (2, 14)], heads=4, nope=16, rope_d=16, vd=16, r=32, block_size=4, seed=10,
                     dtype=torch.bfloat16, tol=2e-2)


# ---------------------------------------------------------------------------------------------
# the GPU's inline PTX widening, emulated
# ---------------------------------------------------------------------------------------------
def _run_ptx(asm: str, x: int) -> tuple[int, int]:
    """Execute _widen's PTX (prmt / and / shr / or on b32 registers) on input register $2 = x."""
    regs = {"$2": x}
    for line in asm.strip("{} ").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = (a.strip() for a in args.split(","))
        val = [regs[a] if a in regs else int(a, 0) for a in src]
        if op == "prmt.b32":
            pool = (val[1] << 32) | val[0]
            regs[d] = sum(((pool >> (8 * ((val[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        else:
            regs[d] = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
                       "shr.b32": lambda a, b: a >> b}[op](*val) & 0xFFFFFFFF
    return regs["$0"], regs["$1"]


def test_widen_ptx_semantics():
    """The GPU's inline PTX of _widen (untestable here otherwise) maps every e4m3 byte, in every byte
    position, to e4m3 * 2^-120 as bf16 and e4m3 * 2^-8 as f16."""
    from nanoforge.kernels.triton.attention_fp8 import _widen_ptx

    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    rng = random.Random(0)
    for shift, dt, factor in ((4, torch.bfloat16, 2.0 ** 120), (7, torch.float16, 2.0 ** 8)):
        asm = _widen_ptx(shift)
        for pos in range(4):
            out = []
            for byte in range(256):
                others = [rng.randrange(256) for _ in range(4)]
                others[pos] = byte
                lo, hi = _run_ptx(asm, sum(b << (8 * i) for i, b in enumerate(others)))
                out.append(((hi if pos >= 2 else lo) >> (16 * (pos % 2))) & 0xFFFF)
            got = torch.tensor(out, dtype=torch.int32).to(torch.int16).view(dt).double() * factor
            finite = ~e4m3.isnan()  # 0x7f / 0xff (NaN) widen to +-480: never stored, padding is masked
            assert torch.equal(got[finite], e4m3[finite].double()), f"shift {shift} byte position {pos}"


# ---------------------------------------------------------------------------------------------
# GPU: realistic bf16 shapes
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (32, 8, 128), (32, 32, 80), (8, 1, 256)])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("widen", [True, False], ids=["widen-bits", "cast"])
def test_gqa_fp8_gpu_bf16(heads, kv_heads, head_dim, block_size, widen, monkeypatch):
    monkeypatch.setattr(_attn(), "FP8_WIDEN_BY_BITS", widen)
    rng = random.Random(heads + head_dim + block_size)
    for i, spec in enumerate([
        [(1, rng.randint(1, 3000)) for _ in range(40)] + [(rng.randint(2, 300), rng.randint(300, 2000))
                                                          for _ in range(8)],
        [(1, rng.randint(3000, 4096)) for _ in range(32)],
        [(1, 4096)],
        [(rng.randint(1, 4), rng.randint(100, 2000)) for _ in range(8)],
    ]):
        run_provider_gqa(spec, heads=heads, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, seed=i,
                         dtype=torch.bfloat16, tol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("widen", [True, False], ids=["widen-bits", "cast"])
def test_mla_fp8_gpu_bf16(block_size, widen, monkeypatch):
    monkeypatch.setattr(_attn(), "FP8_WIDEN_BY_BITS", widen)
    rng = random.Random(block_size)
    for i, spec in enumerate([[(1, rng.randint(1, 3000)) for _ in range(24)] + [(rng.randint(2, 300), 2500)] * 4,
                              [(1, rng.randint(100, 4096)) for _ in range(16)], [(1, 4000)]]):
        run_provider_mla(spec, heads=16, nope=128, rope_d=64, vd=128, r=512, block_size=block_size, seed=i,
                         dtype=torch.bfloat16, tol=1e-2, vs_16bit_pool=True)


@gpu
@needs_cuda
def test_bench_helper_fp8_runs():
    from bench.kernels.attention import bench_paged_decode

    r = bench_paged_decode(4, 512, kv_dtype="fp8")
    assert r["tb_s"] > 0 and r["ms"] > 0 and r["kv_dtype"] == "fp8"

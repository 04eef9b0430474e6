"""The paged KV store in Triton: each new token's K/V rows written to their pool slots, or (FP8 KV)
quantized per (token, head) on the way, bitwise as kernels/fp8.py `quantize_kv`, with the scale
written beside the values. Split from attention.py, whose provider entry calls it first."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8 import FP8, SCALE_EPS
from .attention_fp8 import _quant_rows
from .host_math import cdiv
from .host_math import pow2 as _pow2
from .pdl import pdl_args, pdl_enter


@triton.jit
def _store_rows(src, dst, scale_ptr, t, blk, off, h, s_t, s_h, s_d, s_b, s_o, s_ch, s_cd, s_sb, s_so, s_sh, KVH, D,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, EPS: tl.constexpr):
    """Token t's [KVH, D] rows into pool slot (blk, off); QUANT: as e4m3 with their scales beside them."""
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < KVH) & (d[None, :] < D)
    x = tl.load(src + t * s_t + h[:, None] * s_h + d[None, :] * s_d, mask=m, other=0.0)
    if QUANT:
        x, sc = _quant_rows(x.to(tl.float32), BLOCK_H, EPS)
        tl.store(scale_ptr + blk * s_sb + off * s_so + h * s_sh, sc, mask=h < KVH)
    tl.store(dst + blk * s_b + off * s_o + h[:, None] * s_ch + d[None, :] * s_cd, x.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                     s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
                     s_kcb, s_kco, s_kch, s_kcd, s_vcb, s_vco, s_vch, s_vcd,
                     s_ksb, s_kso, s_ksh, s_vsb, s_vso, s_vsh,
                     KVH, DK, DV,
                     BS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DV: tl.constexpr, HAS_V: tl.constexpr, QUANT: tl.constexpr, EPS: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BS
    off = slot % BS
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _store_rows(k_ptr, kc_ptr, ks_ptr, t, blk, off, h, s_kt, s_kh, s_kd, s_kcb, s_kco, s_kch, s_kcd,
                s_ksb, s_kso, s_ksh, KVH, DK, BLOCK_H, BLOCK_DK, QUANT, EPS)
    if HAS_V:
        _store_rows(v_ptr, vc_ptr, vs_ptr, t, blk, off, h, s_vt, s_vh, s_vd, s_vcb, s_vco, s_vch, s_vcd,
                    s_vsb, s_vso, s_vsh, KVH, DV, BLOCK_H, BLOCK_DV, QUANT, EPS)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor | None, k: torch.Tensor,
             v: torch.Tensor | None, slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write k [T, KVH, Dk] (and v [T, KVH, Dv]) into the paged caches [NB, BS, KVH, D*] at
    slot_mapping[t] = block * block_size + offset; rows with slot -1 are skipped. Caches and inputs
    may be strided views (MLA: k_cache = cache[..., None, :r], v_cache = cache[..., None, r:]).
    With v_cache None only k is written (e.g. the whole MLA entry [T, r + rope] into a 3-D cache).
    FP8 KV: with k_scale (and v_scale) [NB, BS, KVH] f32 each (token, head) row is quantized as
    fp8.quantize_kv does, bitwise, and its scale written beside it."""
    if k_cache.dim() == 3:
        k_cache = k_cache.unsqueeze(2)
    if k.dim() == 2:
        k = k.unsqueeze(1)
    T, KVH, DK = k.shape
    if T == 0:
        return
    has_v = v_cache is not None
    quant = k_scale is not None
    if quant:
        assert k_cache.dtype == FP8 and (not has_v or (v_cache.dtype == FP8 and v_scale is not None)), \
            "scales come with e4m3 caches (and a v_scale with a v_cache)"
        k_scale = k_scale.view(*k_cache.shape[:3])
    if has_v:
        if v_cache.dim() == 3:
            v_cache = v_cache.unsqueeze(2)
        if v.dim() == 2:
            v = v.unsqueeze(1)
        DV = v.shape[-1]
    else:
        v_cache, v, DV = k_cache, k, DK
    v_scale = v_scale.view(*v_cache.shape[:3]) if quant and has_v else k_scale
    BS = k_cache.shape[1]
    BLOCK_DK, BLOCK_DV = _pow2(DK), _pow2(DV)
    BLOCK_H = min(_pow2(KVH), max(1, 4096 // max(BLOCK_DK, BLOCK_DV)))
    grid = (T, cdiv(KVH, BLOCK_H))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else k_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *(k_scale.stride() if quant else (0, 0, 0)), *(v_scale.stride() if quant else (0, 0, 0)),
        KVH, DK, DV, BS=BS, BLOCK_H=BLOCK_H, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV, HAS_V=has_v,
        QUANT=quant, EPS=SCALE_EPS, **pdl_args(k), num_warps=4)

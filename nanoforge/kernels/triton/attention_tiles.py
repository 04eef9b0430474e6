"""One KV tile of paged attention folded into the online softmax (the loop bodies of attention.py's
kernel).

A tile is BLOCK_N consecutive positions of one sequence; each position's page id comes from its
block-table row, so a tile spans several pages, and each token row is a contiguous head_dim run.
Masked tiles (the last one, the causal edge) mask at load time, so padding never leaks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_fp8 import _widen


@triton.jit
def _slot(page, offs_n, s_block, s_slot, BS: tl.constexpr):
    """Each position's offset in a pool tensor: its page's row plus its slot within the page."""
    return page.to(tl.int64) * s_block + (offs_n % BS) * s_slot


@triton.jit
def _online_softmax(s, m_i, l_i):
    """Base-2 scores [M, N] folded into the running row max and sum -> (p, alpha, new max, new sum);
    a row whose scores are all -inf so far keeps p = 0 (its max stands in as 0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _kv_tile(acc, m_i, l_i, q1, q2, start, ctx, q_pos, bt_row, k_base, v_base, ks_base, vs_base, qk_scale,
             s_kb, s_ko, s_kd, s_vb, s_vo, s_vd, s_ksb, s_kso, s_vsb, s_vso,
             DK: tl.constexpr, DV: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
             BLOCK_DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, V_FROM_K: tl.constexpr, DOT_PREC: tl.constexpr, KV_SCALED: tl.constexpr,
             KV_BITS: tl.constexpr, PV_SHIFT: tl.constexpr, PV_SCALE: tl.constexpr):
    """One KV tile (BLOCK_N positions from `start`) folded into the online softmax state. KV_SCALED
    (FP8 KV): K's per-token scales multiply the score columns, V's the probability columns (after l_i
    took them unscaled). KV_BITS (16-bit queries): e4m3 tiles widened by _widen, K to f16 (q comes
    rescaled into f16), V to PV_SHIFT's type; else they are cast to the query dtype (f32)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    kv_ok = offs_n < ctx
    if MASKED:
        page = tl.load(bt_row + offs_n // BS, mask=kv_ok, other=0)
    else:
        page = tl.load(bt_row + offs_n // BS)
    k_tok = _slot(page, offs_n, s_kb, s_ko, BS)
    d1 = tl.arange(0, DK1)
    k_ptrs = k_base + k_tok[None, :] + d1[:, None] * s_kd
    if MASKED:
        if DK1 > DK:
            k1 = tl.load(k_ptrs, mask=kv_ok[None, :] & (d1[:, None] < DK), other=0.0)
        else:
            k1 = tl.load(k_ptrs, mask=kv_ok[None, :], other=0.0)
    else:
        if DK1 > DK:
            k1 = tl.load(k_ptrs, mask=d1[:, None] < DK, other=0.0)
        else:
            k1 = tl.load(k_ptrs)
    if KV_BITS:
        k1 = _widen(k1, 7)
    s = tl.dot(q1, k1.to(q1.dtype), input_precision=DOT_PREC)
    if DK2 > 0:
        d2 = DK1 + tl.arange(0, DK2)
        if MASKED:
            k2 = tl.load(k_base + k_tok[None, :] + d2[:, None] * s_kd,
                         mask=kv_ok[None, :] & (d2[:, None] < DK), other=0.0)
        else:
            k2 = tl.load(k_base + k_tok[None, :] + d2[:, None] * s_kd, mask=d2[:, None] < DK, other=0.0)
        if KV_BITS:
            k2 = _widen(k2, 7)
        s = tl.dot(q2, k2.to(q2.dtype), s, input_precision=DOT_PREC)
    if KV_SCALED:  # padding scales may be garbage: masked to 0 (the -inf mask below drops those columns)
        ks_ptrs = ks_base + _slot(page, offs_n, s_ksb, s_kso, BS)
        if MASKED:
            s = s * (tl.load(ks_ptrs, mask=kv_ok, other=0.0) * qk_scale)[None, :]
        else:
            s = s * (tl.load(ks_ptrs) * qk_scale)[None, :]
    else:
        s = s * qk_scale
    if MASKED:
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & kv_ok[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = _online_softmax(s, m_i, l_i)
    if V_FROM_K:
        v = tl.trans(k1)  # (never with KV_BITS: k1 is widened for QK)
    else:
        v_tok = _slot(page, offs_n, s_vb, s_vo, BS)
        dv = tl.arange(0, BLOCK_DV)
        v_ptrs = v_base + v_tok[:, None] + dv[None, :] * s_vd
        if MASKED:
            if BLOCK_DV > DV:
                v = tl.load(v_ptrs, mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
            else:
                v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            if BLOCK_DV > DV:
                v = tl.load(v_ptrs, mask=dv[None, :] < DV, other=0.0)
            else:
                v = tl.load(v_ptrs)
        if KV_BITS:
            v = _widen(v, PV_SHIFT)
    if KV_SCALED:  # V's scales (times PV_SCALE: undoes the widening's power of two) on the probabilities
        vs_ptrs = vs_base + _slot(page, offs_n, s_vsb, s_vso, BS)
        if MASKED:
            vsc = tl.load(vs_ptrs, mask=kv_ok, other=0.0)
        else:
            vsc = tl.load(vs_ptrs)
        p = p * (vsc * PV_SCALE)[None, :]
    acc = acc * alpha[:, None]
    if KV_BITS:
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = tl.dot(p.to(q1.dtype), v.to(q1.dtype), acc, input_precision=DOT_PREC)
    return acc, m_new, l_i

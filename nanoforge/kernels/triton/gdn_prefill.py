"""Triton kernels of a Gated DeltaNet prefill: the prefill rows (sequences with several new tokens) of a
step, every sequence from its state row (zeros at position 0) and back to it, against the torch reference in
kernels/hybrid_ref.py (causal_conv, chunk_gated_delta_rule).

  causal_conv1d_varlen   silu(depthwise causal conv) of each sequence's rows: a row's first K-1 taps reach
                         back into the sequence's conv window where they fall before its first row; then
                         (a second launch, after every read of the old windows) each window becomes the
                         sequence's last K-1 inputs
  chunk_gated_delta      the gated delta rule in chunks of C tokens, WY form (Yang et al., Gated Delta
                         Networks, 2024). Per chunk, with cum = cumsum(g) inside the chunk, D[i,j] =
                         exp(cum_i - cum_j) and the strictly lower L = (beta k k^T * D) below the diagonal:
                           T = (I + L)^-1,  W = T (beta exp(cum) k),  U = T (beta v)      (_wy_kernel)
                         which do not depend on the state, so every chunk of the step runs at once; then per
                         (sequence, value head, block of value dims) the chunks in order (_chunk_state_kernel):
                           v' = U - W S;  o = (exp(cum) q) S + (q k^T * D, lower incl. diagonal) v'
                           S  = exp(cum_last) S + (exp(cum_last - cum) k)^T v'
                         T comes from block forward substitution (the 16 x 16 diagonal blocks row by row,
                         then block rows in order), never from a series of powers of L, which cancels
                         badly when keys are alike. The state row and every sum stay f32; products run on
                         tensor cores: tf32 for bf16 / f16 activations, tf32x3 (about f32's precision; exact
                         FMA products spill these tiles badly) for f32 plans; q k^T in the activations'
                         own dtype (exact products).

Tables (built on the host once per step, prefill steps are never graph-captured): per prefill sequence
(first row in the flat batch, rows, state slot, fresh), per chunk (sequence, first row inside it). Rows of
other sequences (decode rows of a mixed step) are neither read nor written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from .. import hybrid_ref
from .host_math import cdiv, next_pow2

CHUNK = 64  # tokens per chunk; the gdn op's default, chosen by bench/gdn_kernels.py (H100: chunk 64 2.8-3.0M
# tokens/s a layer at real head sizes, chunk 32 2.75-2.87M; chunk 128, or block_v 64, needs 288-368 KiB of shared
# memory at head dim 128, over the H100's 227 KiB: refused below)
BLOCK_V = 32  # value dims per program of the sequential state kernel: more programs for one long prompt


@dataclass
class PrefillTables:
    """Where the prefill sequences of a step sit: seq i32 [P, 4] (first row, rows, state slot, fresh),
    chunks i32 [N, 2] (sequence, first row inside it) for chunks of `chunk` rows."""
    seq: torch.Tensor
    chunks: torch.Tensor
    chunk: int

    @property
    def num_seqs(self) -> int:
        return self.seq.shape[0]


def prefill_tables(rows: list[tuple[int, int, int, bool]], chunk: int, device: torch.device) -> PrefillTables:
    """Tables of the sequences `rows` = (first row, rows, state slot, fresh), in one host-to-device copy."""
    if chunk not in (16, 32, 64):
        raise ValueError(f"gdn prefill chunk {chunk}: must be 16, 32 or 64 (128 needs more shared memory than "
                         "an H100 has at head dim 128)")
    seq = np.asarray(rows, np.int64).reshape(-1, 4)
    if (seq[:, 1] < 1).any() or (seq[:, 2] < 0).any():
        raise ValueError(f"gdn prefill: every sequence needs rows and a state slot, got (rows, slot) "
                         f"{seq[:, 1:3].tolist()}")
    per = -(-seq[:, 1] // chunk)
    owner = np.repeat(np.arange(len(seq)), per)
    first = np.arange(len(owner)) - np.repeat(np.cumsum(per) - per, per)
    flat = np.concatenate([seq.reshape(-1), np.stack([owner, first * chunk], 1).reshape(-1)]).astype(np.int32)
    buf = torch.from_numpy(flat).to(device)
    return PrefillTables(buf[:seq.size].view(-1, 4), buf[seq.size:].view(-1, 2), chunk)


@triton.jit
def _conv_varlen_kernel(x_ptr, x_stride, win_ptr, w_ptr, seq_ptr, chunk_ptr, out_ptr, C,
                        K: tl.constexpr, BT: tl.constexpr, SUB: tl.constexpr, BLOCK_C: tl.constexpr):
    ci = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s = tl.load(chunk_ptr + 2 * ci)
    start = tl.load(seq_ptr + 4 * s).to(tl.int64)
    qlen = tl.load(seq_ptr + 4 * s + 1)
    keep = tl.load(seq_ptr + 4 * s + 3) == 0  # a fresh sequence's taps before its first row read zeros
    xs_ptr = x_ptr + start * x_stride + c[None, :]  # the sequence's rows
    ws_ptr = win_ptr + tl.load(seq_ptr + 4 * s + 2).to(tl.int64) * C * (K - 1) + c[None, :] * (K - 1) + (K - 1)
    os_ptr = out_ptr + start * C + c[None, :]
    for r0 in range(0, BT, SUB):  # the chunk's rows SUB at a time: a [BT, BLOCK_C] tile per tap would spill
        p = (tl.load(chunk_ptr + 2 * ci + 1) + r0 + tl.arange(0, SUB)).to(tl.int64)  # rows inside the sequence
        m = (p < qlen)[:, None] & cm[None, :]
        acc = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
        for j in tl.static_range(K):
            src = p - (K - 1) + j
            xs = tl.load(xs_ptr + src[:, None] * x_stride, mask=m & (src >= 0)[:, None], other=0.0)
            ws = tl.load(ws_ptr + src[:, None], mask=m & (src < 0)[:, None] & keep, other=0.0)
            acc += (xs.to(tl.float32) + ws) * tl.load(w_ptr + c * K + j, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(os_ptr + p[:, None] * C, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_window_kernel(x_ptr, x_stride, win_ptr, seq_ptr, C, K: tl.constexpr, KP: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    start = tl.load(seq_ptr + 4 * s).to(tl.int64)
    qlen = tl.load(seq_ptr + 4 * s + 1)
    slot = tl.load(seq_ptr + 4 * s + 2).to(tl.int64)
    keep = tl.load(seq_ptr + 4 * s + 3) == 0
    j = tl.arange(0, KP)
    src = qlen - (K - 1) + j  # the window's column j is the sequence's input at row src (before it: the old window)
    m = cm[:, None] & (j < K - 1)[None, :]
    base = win_ptr + (slot * C + c[:, None]) * (K - 1)
    xs = tl.load(x_ptr + (start + src)[None, :] * x_stride + c[:, None], mask=m & (src >= 0)[None, :], other=0.0)
    ws = tl.load(base + (K - 1 + src)[None, :], mask=m & (src < 0)[None, :] & keep, other=0.0)
    tl.debug_barrier()  # every read of the old window before any write of it
    tl.store(base + j[None, :], xs.to(tl.float32) + ws, mask=m)


def causal_conv1d_varlen(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor,
                         tables: PrefillTables) -> torch.Tensor:
    """x [T, C] (rows may be strided), window pool [S, C, K-1] f32 (the tables' sequences' rows updated
    in place), weight [C, K]; returns [T, C] in x's dtype with the tables' rows filled (others unset)."""
    rows, c = x.shape
    kern = weight.shape[1]
    assert x.stride(1) == 1 and window.is_contiguous() and kern >= 2
    out = torch.empty(rows, c, dtype=x.dtype, device=x.device)
    if tables.num_seqs:
        w = weight.contiguous()
        block = min(next_pow2(c), 64)
        _conv_varlen_kernel[(tables.chunks.shape[0], cdiv(c, block))](
            x, x.stride(0), window, w, tables.seq, tables.chunks, out, c, K=kern, BT=tables.chunk, SUB=16,
            BLOCK_C=block, num_warps=4)
        block = min(next_pow2(c), 256)
        _conv_window_kernel[(tables.num_seqs, cdiv(c, block))](
            x, x.stride(0), window, tables.seq, c, K=kern, KP=next_pow2(kern - 1), BLOCK_C=block)
    return out


@triton.jit
def _gates(a_ptr, b_ptr, ab_stride, alog_ptr, dtb_ptr, rows, rm, hv):
    """Log decay g (0 on padding rows, so cum stays flat past the last row) and beta (0 there) of rows."""
    a = tl.load(a_ptr + rows * ab_stride + hv, mask=rm, other=0.0).to(tl.float32) + tl.load(dtb_ptr + hv).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
    g = tl.where(rm, -tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * softplus, 0.0)
    beta = tl.where(rm, tl.sigmoid(tl.load(b_ptr + rows * ab_stride + hv, mask=rm, other=0.0).to(tl.float32)), 0.0)
    return g, beta


@triton.jit
def _head_rows(ptr, rows, rm, row_stride, kk, km):
    """Rows of one head's q or k as stored (zeros off rm) and the f32 factor that L2-normalises each (as
    hybrid_ref._prepare): the kernels scale the small products rather than these [BT, Dk] tiles."""
    t = tl.load(ptr + rows[:, None] * row_stride + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
    tf = t.to(tl.float32)
    return t, tl.rsqrt(tl.sum(tf * tf, axis=1) + 1e-6)


@triton.jit
def _wy_kernel(k_ptr, v_ptr, row_stride, a_ptr, b_ptr, ab_stride, alog_ptr, dtb_ptr, seq_ptr, chunk_ptr,
               w_ptr, u_ptr, HV,
               REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
               BT: tl.constexpr, DOT: tl.constexpr):
    ci = tl.program_id(0)
    hv = tl.program_id(1)
    s = tl.load(chunk_ptr + 2 * ci)
    off = tl.load(chunk_ptr + 2 * ci + 1)
    t = tl.arange(0, BT)
    rm = off + t < tl.load(seq_ptr + 4 * s + 1)
    rows = tl.load(seq_ptr + 4 * s).to(tl.int64) + off + t
    kk, vv = tl.arange(0, BK), tl.arange(0, BVF)
    km, vm = kk < DK, vv < DV
    k, rk = _head_rows(k_ptr + (hv // REP) * DK, rows, rm, row_stride, kk, km)
    g, beta = _gates(a_ptr, b_ptr, ab_stride, alog_ptr, dtb_ptr, rows, rm, hv)
    cum = tl.cumsum(g, axis=0)
    below = t[:, None] > t[None, :]
    decay = tl.exp(tl.where(below, cum[:, None] - cum[None, :], 0.0)) * (beta * rk)[:, None] * rk[None, :]
    lower = tl.where(below, tl.dot(k, tl.trans(k), input_precision=DOT) * decay, 0.0)  # exact products of k
    # T = (I + L)^-1 by block forward substitution (stable: each row from rows already final, never a
    # series of powers of L): the 16 x 16 diagonal blocks row by row, all blocks at once ...
    same = (t[:, None] // 16) == (t[None, :] // 16)
    eye = tl.where(t[:, None] == t[None, :], 1.0, 0.0)
    diag = tl.where(same, lower, 0.0)
    inv = eye
    for r in range(1, 16):
        pick = (t % 16 == r)[:, None]
        inv = tl.where(pick, eye - tl.dot(tl.where(pick, diag, 0.0), inv, input_precision=DOT), inv)
    # ... then block row i below them: T_i. = -T_ii (sum over blocks m < i of L_im T_m.)
    dinv = tl.where(same, inv, 0.0)
    for bi in range(1, BT // 16):
        pick = (t // 16 == bi)[:, None]
        part = tl.dot(tl.where(pick & ~same, lower, 0.0), inv, input_precision=DOT)
        inv -= tl.dot(dinv, part, input_precision=DOT)
    hb = rows * HV + hv
    k, rk = _head_rows(k_ptr + (hv // REP) * DK, rows, rm, row_stride, kk, km)  # again: not live in the loop
    w = tl.dot(inv * (beta * rk * tl.exp(cum))[None, :], k.to(tl.float32), input_precision=DOT)  # T (beta exp(cum) k)
    tl.store(w_ptr + hb[:, None] * DK + kk[None, :], w, mask=rm[:, None] & km[None, :])
    v = tl.load(v_ptr + rows[:, None] * row_stride + hv * DV + vv[None, :], mask=rm[:, None] & vm[None, :],
                other=0.0).to(tl.float32)
    u = tl.dot(inv * beta[None, :], v, input_precision=DOT)  # T (beta v)
    tl.store(u_ptr + hb[:, None] * DV + vv[None, :], u, mask=rm[:, None] & vm[None, :])


@triton.jit
def _chunk_state_kernel(q_ptr, k_ptr, row_stride, a_ptr, b_ptr, ab_stride, alog_ptr, dtb_ptr, seq_ptr, w_ptr, u_ptr,
                        state_ptr, out_ptr, HV, scale,
                        REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        BT: tl.constexpr, DOT: tl.constexpr):
    """The state held transposed (S^T [BV, Dk]) and every product written so that its big operands go to
    shared memory as loaded (tf32 wants them K-major): v'^T = U^T - S^T W^T, o^T = S^T q^T + v'^T A^T."""
    si = tl.program_id(0)
    hv = tl.program_id(1)
    vv = tl.program_id(2) * BV + tl.arange(0, BV)
    kk, t = tl.arange(0, BK), tl.arange(0, BT)
    km, vm = kk < DK, vv < DV
    start = tl.load(seq_ptr + 4 * si).to(tl.int64)
    qlen = tl.load(seq_ptr + 4 * si + 1)
    slot = tl.load(seq_ptr + 4 * si + 2).to(tl.int64)
    keep = tl.load(seq_ptr + 4 * si + 3) == 0  # a fresh sequence starts from a zero state
    sp = state_ptr + ((slot * HV + hv) * DK + kk[None, :]) * DV + vv[:, None]
    m2 = vm[:, None] & km[None, :]
    st = tl.load(sp, mask=m2 & keep, other=0.0)
    causal = t[:, None] >= t[None, :]
    hk = hv // REP
    for c0 in range(0, qlen, BT):
        rows = start + c0 + t
        rm = c0 + t < qlen
        hb = rows * HV + hv
        g, _ = _gates(a_ptr, b_ptr, ab_stride, alog_ptr, dtb_ptr, rows, rm, hv)  # beta is inside W and U
        cum = tl.cumsum(g, axis=0)
        last = tl.sum(tl.where(t == BT - 1, cum, 0.0), axis=0)  # = cum at the chunk's last row (g is 0 past it)
        w = tl.load(w_ptr + hb[:, None] * DK + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        ut = tl.load(u_ptr + hb[None, :] * DV + vv[:, None], mask=rm[None, :] & vm[:, None], other=0.0)
        vnt = ut - tl.dot(st, tl.trans(w), input_precision=DOT)  # v'^T [BV, BT]
        q, rq = _head_rows(q_ptr + hk * DK, rows, rm, row_stride, kk, km)
        k, rk = _head_rows(k_ptr + hk * DK, rows, rm, row_stride, kk, km)
        rq = rq * scale
        att = tl.dot(q, tl.trans(k), input_precision=DOT)  # in the activations' dtype: exact products
        att = tl.where(causal, att * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0)), 0.0)
        ot = tl.dot(st, tl.trans(q.to(tl.float32)), input_precision=DOT) * (rq * tl.exp(cum))[None, :]
        ot += tl.dot(vnt, tl.trans(att * rq[:, None] * rk[None, :]), input_precision=DOT)
        tl.store(out_ptr + hb[None, :] * DV + vv[:, None], ot.to(out_ptr.dtype.element_ty),
                 mask=rm[None, :] & vm[:, None])
        kd = vnt * (rk * tl.exp(last - cum))[None, :]
        st = st * tl.exp(last) + tl.dot(kd, k.to(tl.float32), input_precision=DOT)
    tl.store(sp, st, mask=m2)


def chunk_gated_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: dict, attrs: dict, *,
                      state: torch.Tensor, tables: PrefillTables, block_v: int = BLOCK_V) -> torch.Tensor:
    """The delta rule over the tables' sequences' rows of x = conv output [T, q | k | v]; a, b [T, Hv];
    state pool [S, Hv, Dk, Dv] f32 (their rows read unless fresh, then written). Returns [T, Hv, Dv] in x's
    dtype, the tables' rows filled (others unset)."""
    hk, hv, dk, dv = (attrs[n] for n in ("k_heads", "v_heads", "k_head_dim", "v_head_dim"))
    rows, bt = x.shape[0], tables.chunk
    if block_v not in (16, 32):
        raise ValueError(f"gdn prefill block_v {block_v}: must be 16 or 32 (64 needs more shared memory than an "
                         "H100 has at chunk 64)")
    assert x.stride(1) == 1 and a.stride() == b.stride() and a.stride(1) == 1 and state.is_contiguous()
    out = torch.empty(rows, hv, dv, dtype=x.dtype, device=x.device)
    if not tables.num_seqs:
        return out
    n_chunks = tables.chunks.shape[0]
    w = torch.empty(rows, hv, dk, dtype=torch.float32, device=x.device)
    u = torch.empty(rows, hv, dv, dtype=torch.float32, device=x.device)
    bk, bvf = max(next_pow2(dk), 16), max(next_pow2(dv), 16)
    dot = "tf32x3" if x.dtype == torch.float32 else "tf32"  # f32 plans: three tf32 passes, about f32's precision
    q_, k_, v_ = x, x[:, hk * dk:], x[:, 2 * hk * dk:]
    gates = (a, b, a.stride(0), params["A_log"], params["dt_bias"])
    _wy_kernel[(n_chunks, hv)](k_, v_, x.stride(0), *gates, tables.seq, tables.chunks, w, u, hv,
                               REP=hv // hk, DK=dk, DV=dv, BK=bk, BVF=bvf, BT=bt, DOT=dot,
                               num_warps=8 if bt >= 128 else 4)
    bv = max(min(block_v, next_pow2(dv)), 16)
    _chunk_state_kernel[(tables.num_seqs, hv, cdiv(dv, bv))](
        q_, k_, x.stride(0), *gates, tables.seq, w, u, state, out, hv, dk ** -0.5,
        REP=hv // hk, DK=dk, DV=dv, BK=bk, BV=bv, BT=bt, DOT=dot, num_warps=8 if bt >= 128 else 4)
    return out


def gdn_prefill_core(qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, params: dict, attrs: dict, *,
                     pool: tuple, tables: PrefillTables, block_v: int = BLOCK_V) -> torch.Tensor:
    """Conv + delta rule of the tables' sequences (before the gated norm): [T, Hv * Dv] in qkv's dtype,
    their rows filled, their conv windows and delta states in `pool` advanced past them."""
    x = causal_conv1d_varlen(qkv, pool[0], params["conv"][:, 0, :], tables)
    core = chunk_gated_delta(x, a, b, params, attrs, state=pool[1], tables=tables, block_v=block_v)
    return core.reshape(qkv.shape[0], -1)


def gdn_prefill(qkv, z, b, a, params: dict, attrs: dict, *, pool: tuple, tables: PrefillTables,
                block_v: int = BLOCK_V) -> torch.Tensor:
    """The gdn op over the tables' sequences: [T, Hv * Dv] after the gated norm, their rows filled (the
    others hold whatever their unset rows normalise to)."""
    core = gdn_prefill_core(qkv, b, a, params, attrs, pool=pool, tables=tables, block_v=block_v)
    dv = attrs["v_head_dim"]
    out = hybrid_ref.gated_norm(core.reshape(-1, dv), z.reshape(-1, dv), params["norm"], attrs["eps"])
    return out.reshape(qkv.shape[0], -1)

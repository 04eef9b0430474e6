"""Triton kernels of a Gated DeltaNet decode step (one new token per sequence), each against its torch
reference in kernels/hybrid_ref.py:

  causal_conv1d_update      silu(depthwise conv) of the new [q|k|v] row after the sequence's conv
                            window, and the window shifted by that row, in place in the state pool (or
                            read from one row, written to another: a verify chain)
  recurrent_gated_delta     the gated delta rule's step: q/k L2-normalised and q scaled in the kernel,
                            decay exp(g) and beta from a / b / A_log / dt_bias in the kernel; reads and
                            writes the sequence's f32 state row in place; one program per (sequence,
                            value head, block of value dims) since the rule is separable along them
  gdn                       the `gdn` op with torch_ref's signature: decode rows through the two kernels
                            (+ the gated norm in torch), prefill sequences through gdn_prefill.py's
                            varlen conv and chunked delta rule, speculative verify sequences as chains
                            of decode steps that keep the state after every row (rollback of drafts)

State rows come from ctx.state_slots (device i64); a row whose sequence is at position 0 (context of 1)
starts from zeros; slot -1 (a CUDA graph's padding row) reads a zero state and stores none. A decode-only
batch runs without host syncs, so the `triton` provider lists `gdn` as graph safe (only decode-only batches
are captured; runtime/cuda_graphs.py carries the state slots). Mixed and prefill steps build their row
lists on the host (never captured) and run their prefill sequences through gdn_prefill.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import hybrid_ref
from . import gdn_prefill
from .host_math import cdiv, next_pow2


@triton.jit
def _conv_update_kernel(x_ptr, x_stride, win_ptr, w_ptr, slot_ptr, src_ptr, fresh_ptr, out_ptr, C,
                        K: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    j = tl.arange(0, KP)
    jm = j < K - 1
    m2 = cm[:, None] & jm[None, :]
    slot = tl.load(slot_ptr + b)
    live = slot >= 0  # slot -1: a CUDA graph's padding row, which reads zeros and writes no state
    slot = tl.maximum(slot, 0)
    src = tl.maximum(tl.load(src_ptr + b), 0)  # the row read: the slot itself but in verify chains
    keep = (tl.load(fresh_ptr + b) == 0) & live  # a sequence at position 0 starts from a zero window
    read = win_ptr + src * C * (K - 1) + c[:, None] * (K - 1)
    base = win_ptr + slot * C * (K - 1) + c[:, None] * (K - 1)
    x = tl.load(x_ptr + b * x_stride + c, mask=cm, other=0.0).to(tl.float32)
    prev = tl.load(read + j[None, :], mask=m2 & keep, other=0.0)
    w = tl.load(w_ptr + c[:, None] * K + j[None, :], mask=m2, other=0.0).to(tl.float32)
    acc = tl.sum(prev * w, axis=1) + x * tl.load(w_ptr + c * K + K - 1, mask=cm, other=0.0).to(tl.float32)
    nxt = tl.load(read + j[None, :] + 1, mask=cm[:, None] & (j[None, :] + 1 < K - 1) & keep, other=0.0)
    shifted = tl.where(j[None, :] == K - 2, x[:, None], nxt)
    tl.debug_barrier()  # every read of the window before any write of it
    tl.store(base + j[None, :], shifted, mask=m2 & live)
    y = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * C + c, y.to(out_ptr.dtype.element_ty), mask=cm)


def causal_conv1d_update(x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor,
                         slots: torch.Tensor, fresh: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, C] (rows may be strided), window pool [S, C, K-1] f32 (rows `slots` updated in place,
    read as zeros where `fresh`; slot -1 reads zeros and writes nothing), weight [C, K]; returns
    silu(conv) [B, C] in x's dtype. `src`: the rows read instead of `slots` (a verify chain's)."""
    bsz, c = x.shape
    kern = weight.shape[1]
    assert x.stride(1) == 1 and window.is_contiguous() and kern >= 2
    out = torch.empty(bsz, c, dtype=x.dtype, device=x.device)
    block = min(next_pow2(c), 256)
    if bsz:
        _conv_update_kernel[(bsz, cdiv(c, block))](x, x.stride(0), window, weight.contiguous(), slots,
                                                          slots if src is None else src, fresh.to(torch.int32), out, c,
                                                          K=kern, KP=next_pow2(kern - 1), BLOCK_C=block)
    return out


@triton.jit
def _recurrent_kernel(q_ptr, k_ptr, v_ptr, row_stride, a_ptr, b_ptr, ab_stride, alog_ptr, dtb_ptr, state_ptr,
                      slot_ptr, src_ptr, fresh_ptr, out_ptr, HV, scale,
                      REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bi = tl.program_id(0)
    hv = tl.program_id(1)
    vv = tl.program_id(2) * BV + tl.arange(0, BV)
    kk = tl.arange(0, BK)
    km, vm = kk < DK, vv < DV
    hk = hv // REP
    q = tl.load(q_ptr + bi * row_stride + hk * DK + kk, mask=km, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bi * row_stride + hk * DK + kk, mask=km, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    v = tl.load(v_ptr + bi * row_stride + hv * DV + vv, mask=vm, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + bi * ab_stride + hv).to(tl.float32) + tl.load(dtb_ptr + hv).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))
    decay = tl.exp(-tl.exp(tl.load(alog_ptr + hv).to(tl.float32)) * softplus)
    beta = tl.sigmoid(tl.load(b_ptr + bi * ab_stride + hv).to(tl.float32))
    slot = tl.load(slot_ptr + bi)
    live = slot >= 0  # slot -1: a CUDA graph's padding row (zero state, nothing stored)
    slot = tl.maximum(slot, 0)
    src = tl.maximum(tl.load(src_ptr + bi), 0)  # the row read: the slot itself but in verify chains
    sp = state_ptr + ((slot * HV + hv) * DK + kk[:, None]) * DV + vv[None, :]
    m2 = km[:, None] & vm[None, :]
    s = tl.load(state_ptr + ((src * HV + hv) * DK + kk[:, None]) * DV + vv[None, :], mask=m2 & live, other=0.0)
    s = tl.where(tl.load(fresh_ptr + bi) != 0, 0.0, s) * decay
    delta = (v - tl.sum(s * k[:, None], axis=0)) * beta
    s = s + k[:, None] * delta[None, :]
    tl.store(sp, s, mask=m2 & live)
    tl.store(out_ptr + (bi * HV + hv) * DV + vv, tl.sum(s * q[:, None], axis=0), mask=vm)


def recurrent_gated_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, params: dict, attrs: dict, *,
                          state: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor,
                          src: torch.Tensor | None = None) -> torch.Tensor:
    """One delta-rule step per row of x = conv output [B, q | k | v]; a, b [B, Hv]; state pool
    [S, Hv, Dk, Dv] f32 (rows `slots` updated in place, zeroed first where `fresh`; read from rows `src`
    instead where given). Returns f32 [B, Hv, Dv]."""
    hk, hv, dk, dv = (attrs[n] for n in ("k_heads", "v_heads", "k_head_dim", "v_head_dim"))
    bsz = x.shape[0]
    assert x.stride(1) == 1 and a.stride() == b.stride() and a.stride(1) == 1 and state.is_contiguous()
    out = torch.empty(bsz, hv, dv, dtype=torch.float32, device=x.device)
    bv = min(next_pow2(dv), 64)
    if bsz:
        _recurrent_kernel[(bsz, hv, cdiv(dv, bv))](
            x, x[:, hk * dk:], x[:, 2 * hk * dk:], x.stride(0), a, b, a.stride(0), params["A_log"], params["dt_bias"],
            state, slots, slots if src is None else src, fresh.to(torch.int32), out, hv, dk ** -0.5,
            REP=hv // hk, DK=dk, DV=dv, BK=next_pow2(dk), BV=bv)
    return out


def _decode_rows(qkv, z, b, a, params: dict, attrs: dict, *, pool: tuple, slots: torch.Tensor,
                 fresh: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
    dv = attrs["v_head_dim"]
    x = causal_conv1d_update(qkv, pool[0], params["conv"][:, 0, :], slots, fresh, src)
    core = recurrent_gated_delta(x, a, b, params, attrs, state=pool[1], slots=slots, fresh=fresh, src=src)
    out = hybrid_ref.gated_norm(core.to(qkv.dtype).reshape(-1, dv), z.reshape(-1, dv), params["norm"], attrs["eps"])
    return out.reshape(qkv.shape[0], -1)


def gdn(qkv, z, b, a, *, conv, dt_bias, A_log, norm, ctx, layer, **attrs):
    """The gdn op: a decode-only batch entirely on the device; in a mixed or prefill step the prefill
    sequences through the chunked kernels (gdn_prefill.py) and the decode rows through the step kernels,
    each sequence reading and writing its own state row. A speculative verify sequence (ctx.state_history)
    runs its rows as a chain of decode steps, the j-th row of every such sequence in one launch, each step
    reading the previous step's row and writing its own: the history rows, then the slot (hybrid_ref)."""
    params = {"conv": conv, "dt_bias": dt_bias, "A_log": A_log, "norm": norm}
    if not ctx.state:
        return hybrid_ref.gdn(qkv, z, b, a, ctx=ctx, layer=layer, **params, **attrs)  # it explains what is missing
    pool = ctx.state[layer]
    if ctx.max_query_len <= 1:
        return _decode_rows(qkv, z, b, a, params, attrs, pool=pool, slots=ctx.state_slots, fresh=ctx.context_lens == 1)
    tables, decode, chain = _step_rows(ctx, qkv.device)
    out = gdn_prefill.gdn_prefill(qkv, z, b, a, params, attrs, pool=pool, tables=tables) if tables.num_seqs else \
        qkv.new_empty(qkv.shape[0], attrs["v_heads"] * attrs["v_head_dim"])  # decode and verify rows: below
    for rows, slots, fresh, src in ([decode] if decode is not None else []) + chain:
        out[rows] = _decode_rows(qkv[rows], z[rows], b[rows], a[rows], params, attrs, pool=pool, slots=slots,
                                 fresh=fresh, src=src)
    return out


def _step_rows(ctx, device: torch.device) -> tuple:
    """The step's prefill tables, decode rows (rows, state slots, fresh, None) and verify chain (per row
    position j: rows, rows written, never fresh, rows read), made on the host by the first gdn layer and
    shared by the others through ctx.scratch: a few host-to-device copies a step, not a layer."""
    hit = ctx.scratch.get("gdn_rows")
    if hit is None:
        seqs, slot_of = ctx.seqs, ctx.state_slot_list
        history = ctx.state_history or [-1] * len(seqs)
        tables = gdn_prefill.prefill_tables([(s.q_start, s.q_len, slot_of[i], s.ctx_len == s.q_len)
                                             for i, s in enumerate(seqs) if s.q_len > 1 and history[i] < 0],
                                            gdn_prefill.CHUNK, device)
        decode = [i for i, s in enumerate(seqs) if s.q_len == 1 and history[i] < 0]
        rows = None
        if decode:
            cols = torch.tensor([[seqs[i].q_start for i in decode], decode, [seqs[i].ctx_len == 1 for i in decode]],
                                device=device)
            rows = (cols[0], ctx.state_slots[cols[1]], cols[2] != 0, None)
        hit = ctx.scratch["gdn_rows"] = (tables, rows, _verify_chain(seqs, slot_of, history, device))
    return hit


def _verify_chain(seqs, slot_of: list[int], history: list[int], device: torch.device) -> list[tuple]:
    """Per row position j of the verify sequences: (their j-th rows, the pool rows the states go to: history
    row first + j, the slot for a sequence's last row; never fresh; the rows read: the slot at j = 0, else
    the previous position's)."""
    verify = [i for i, h in enumerate(history) if h >= 0]
    assert all(seqs[i].ctx_len > seqs[i].q_len for i in verify), "a verify sequence starts at position 0"
    chain = []
    for j in range(max((seqs[i].q_len for i in verify), default=0)):
        live = [i for i in verify if seqs[i].q_len > j]
        dst = [history[i] + j if j < seqs[i].q_len - 1 else slot_of[i] for i in live]
        src = [slot_of[i] if j == 0 else history[i] + j - 1 for i in live]
        cols = torch.tensor([[seqs[i].q_start + j for i in live], dst, src], device=device)
        chain.append((cols[0], cols[1], torch.zeros(len(live), dtype=torch.bool, device=device), cols[2]))
    return chain

"""Triton MoE provider for EP=1: routing, align, fused grouped GEMMs over expert-sorted tokens.

Semantics are those of `torch_ref.moe` (Qwen3-MoE softmax top-k and DeepSeek-V3 sigmoid
group-limited routing, SwiGLU experts, weights w_gate/w_up [E, I, H], w_down [E, H, I]).

Pipeline (every step CUDA-graph safe: no host sync, only shapes derived from T):

1. route   torch_ref.select_experts itself (the selection part of `torch_ref._route`), so the routed experts are
           bit-identical to the reference on the same device (bf16 router logits can tie at the
           top-k boundary; torch.topk then breaks the tie the same way). Renormalisation and
           routed_scaling_factor are applied in the down GEMM's epilogue (saves ~3 launches).
2. align   Triton. The N = T*top_k (token, slot) pairs are grouped by expert; each expert's
           segment is padded to a multiple of BLOCK_M inside a buffer of static worst-case size
           N + min(E, N)*(BLOCK_M-1). Outputs: sorted_pair_ids (padding = sentinel N),
           expert_ids per BLOCK_M block (-1 past the end), num_tokens_post_padded (device int32).
           Small N: one program, no atomics, no memset. Large N: a counting kernel then a
           scatter kernel (per-expert slot cursors via vector atomics; the order of pairs inside
           an expert segment may vary run to run, results do not: each row is computed alone).
3. gate_up one grouped GEMM for both projections: per block, x[token rows] @ W_gate[e]^T and
           @ W_up[e]^T in two fp32 accumulators, silu(g)*u in the epilogue, written to h[pair, I].
4. down    grouped GEMM h[pair rows] @ W_down[e]^T, routing weight multiplied in the epilogue,
           written to y[pair, H] (one row per (token, slot): no atomics, deterministic).
5. reduce  y.view(T, top_k, H).sum(1) (torch, fp32 accumulation).

Blocks at or past num_tokens_post_padded return at once, so one grid (sized by T) serves every
routing outcome.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..fp8 import fake_quantize_activations
from ..torch_ref import _act_quant, _ep_position, expert_weights, select_experts
from .host_math import cdiv, next_pow2

__all__ = ["moe", "grouped_experts", "select_experts", "fused_experts", "moe_align", "pick_config"]


# ---------------------------------------------------------------------------------------------
# align
# ---------------------------------------------------------------------------------------------
@triton.jit
def _align_blocks(b0, ends, starts, counts, total, sorted_ptr, expert_ids_ptr, N, num_blocks,
                  BM: tl.constexpr, E_PAD: tl.constexpr, NB: tl.constexpr):
    """Expert id of blocks b0..b0+NB, and the sentinel into the padding slots of those blocks."""
    ecols = tl.arange(0, E_PAD)
    b = b0 + tl.arange(0, NB)
    bstart = b * BM
    # padded segments are BM-aligned: a block's expert = number of segments ending at or before it
    be = tl.sum((ends[None, :] <= bstart[:, None]).to(tl.int32), axis=1)
    live = bstart < total
    onehot = (be[:, None] == ecols[None, :]).to(tl.int32)
    fill_from = tl.sum(onehot * (starts + counts)[None, :], axis=1)  # first padding slot of the segment
    tl.store(expert_ids_ptr + b, tl.where(live, be, -1), mask=b < num_blocks)
    pos = bstart[:, None] + tl.arange(0, BM)[None, :]
    pad = (b < num_blocks)[:, None] & live[:, None] & (pos >= fill_from[:, None])
    tl.store(sorted_ptr + pos, tl.full([NB, BM], 0, tl.int32) + N, mask=pad)


@triton.jit(do_not_specialize=["N", "num_blocks"])
def _align_single_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, N, E, num_blocks,
                         BM: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr):
    """Whole align in one program: deterministic (pairs keep their order inside a segment)."""
    ecols = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for c in range(0, N, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < N, other=E_PAD).to(tl.int32)
        e = tl.where(e < E, e, E_PAD)  # an expert of another rank: no segment here
        counts += tl.sum((e[:, None] == ecols[None, :]).to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(npp_ptr, total)
    cursor = starts
    for c in range(0, N, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < N, other=E_PAD).to(tl.int32)
        onehot = (e[:, None] == ecols[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0) - 1 + cursor[None, :]
        dest = tl.sum(onehot * rank, axis=1)
        tl.store(sorted_ptr + dest, offs, mask=(offs < N) & (e < E))
        cursor += tl.sum(onehot, axis=0)
    for b0 in range(0, num_blocks, NB):
        _align_blocks(b0, ends, starts, counts, total, sorted_ptr, expert_ids_ptr, N, num_blocks, BM, E_PAD, NB)


@triton.jit(do_not_specialize=["N"])
def _align_count_kernel(ids_ptr, counts_ptr, N, E, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    ecols = tl.arange(0, E_PAD)
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < N, other=E_PAD).to(tl.int32)
    cnt = tl.sum((e[:, None] == ecols[None, :]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + ecols, cnt, mask=(ecols < E) & (cnt > 0))


@triton.jit(do_not_specialize=["N", "num_blocks"])
def _align_scatter_kernel(ids_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, npp_ptr, N, E, num_blocks,
                          BM: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, NB: tl.constexpr):
    """counts_ptr[0:E] = per-expert counts (complete), counts_ptr[E:2E] = slot cursors (zeroed)."""
    pid = tl.program_id(0)
    ecols = tl.arange(0, E_PAD)
    emask = ecols < E
    counts = tl.load(counts_ptr + ecols, mask=emask, other=0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    if pid == 0:
        tl.store(npp_ptr, total)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < N, other=E_PAD).to(tl.int32)
    e = tl.where(e < E, e, E_PAD)
    onehot = (e[:, None] == ecols[None, :]).to(tl.int32)
    cnt = tl.sum(onehot, axis=0)
    base = tl.atomic_add(counts_ptr + E + ecols, cnt, mask=emask & (cnt > 0))  # distinct addresses
    base = tl.where(emask & (cnt > 0), base, 0)
    rank = tl.cumsum(onehot, axis=0) - 1 + (starts + base)[None, :]
    dest = tl.sum(onehot * rank, axis=1)
    tl.store(sorted_ptr + dest, offs, mask=(offs < N) & (e < E))
    _align_blocks(pid * NB, ends, starts, counts, total, sorted_ptr, expert_ids_ptr, N, num_blocks, BM, E_PAD, NB)


def _p2(n: int) -> int:
    return next_pow2(max(int(n), 1))


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int, single_max: int = 256):
    """(sorted_pair_ids int32 [num_blocks*BM], expert_ids int32 [num_blocks], num_post_padded int32 [1]).

    ids: [T, top_k] (any int dtype) expert id of each (token, slot); pair p = t*top_k + slot. A pair
    whose id is num_experts or more (an expert of another EP rank) is left out of every segment.
    Padding entries hold the sentinel N = ids.numel(). Every shape depends on (N, E, BM) only."""
    flat = ids.reshape(-1)
    n, E = flat.numel(), num_experts
    num_blocks = cdiv(n + min(E, n) * (block_m - 1), block_m)
    dev = ids.device
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    npp = torch.empty(1, dtype=torch.int32, device=dev)
    e_pad = max(_p2(E), 16)
    chunk = max(16, min(_p2(n), 8192 // e_pad))
    nb = max(16, min(_p2(num_blocks), 4096 // e_pad))
    if n <= single_max:
        _align_single_kernel[(1,)](flat, sorted_ids, expert_ids, npp, n, E, num_blocks,
                                   BM=block_m, E_PAD=e_pad, CHUNK=chunk, NB=nb, num_warps=4)
    else:
        counts = torch.zeros(2 * E, dtype=torch.int32, device=dev)
        _align_count_kernel[(cdiv(n, chunk),)](flat, counts, n, E, E_PAD=e_pad, CHUNK=chunk, num_warps=4)
        grid = (max(cdiv(n, chunk), cdiv(num_blocks, nb)),)
        _align_scatter_kernel[grid](flat, counts, sorted_ids, expert_ids, npp, n, E, num_blocks,
                                    BM=block_m, E_PAD=e_pad, CHUNK=chunk, NB=nb, num_warps=4)
    return sorted_ids, expert_ids, npp


# ---------------------------------------------------------------------------------------------
# grouped GEMMs
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_coords(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    gsz = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % gsz, (pid % in_group) // gsz


@triton.jit(do_not_specialize=["N", "num_pid_m"])
def _gate_up_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, sorted_ptr, eid_ptr, npp_ptr,
                    N, K, I, top_k, num_pid_m,
                    stride_xt, stride_we, stride_wn, stride_ht,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr, PREC: tl.constexpr):
    """h[pair, n] = silu(x[tok] . Wg[e, n]) * (x[tok] . Wu[e, n]) for the pairs of one block."""
    pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(I, BN), GROUP_M)
    if pid_m * BM >= tl.load(npp_ptr):
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    valid = pair < N
    tok = tl.where(valid, pair // top_k, 0).to(tl.int64)  # padding rows read row 0, never stored
    e = tl.load(eid_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_nw = offs_n % I  # in-bounds weight rows; the tail columns are masked at the store
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    w_off = e * stride_we + offs_nw[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    g_ptrs = wg_ptr + w_off
    u_ptrs = wu_ptr + w_off
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            bg = tl.load(g_ptrs)
            bu = tl.load(u_ptrs)
        else:
            km = offs_k < K - k0
            a = tl.load(a_ptrs, mask=km[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=km[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=km[:, None], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        a_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * stride_ht + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < I)[None, :])


@triton.jit(do_not_specialize=["N", "num_pid_m"])
def _down_kernel(h_ptr, wd_ptr, y_ptr, rw_ptr, sorted_ptr, eid_ptr, npp_ptr,
                 N, K, H, num_pid_m, top_k, norm_eps, scale,
                 stride_ht, stride_we, stride_wn, stride_yt,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr, TOPK_PAD: tl.constexpr):
    """y[pair, n] = w[pair] * (h[pair] . Wd[e, n]) for the pairs of one block, with
    w = rw[pair] (/ (sum of the token's top_k rw + norm_eps) if NORM) * scale."""
    pid_m, pid_n = _block_coords(num_pid_m, tl.cdiv(H, BN), GROUP_M)
    if pid_m * BM >= tl.load(npp_ptr):
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    valid = pair < N
    row = tl.where(valid, pair, 0).to(tl.int64)
    e = tl.load(eid_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_nw = offs_n % H
    offs_k = tl.arange(0, BK)
    a_ptrs = h_ptr + row[:, None] * stride_ht + offs_k[None, :]
    b_ptrs = wd_ptr + e * stride_we + offs_nw[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            km = offs_k < K - k0
            a = tl.load(a_ptrs, mask=km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=km[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK
        b_ptrs += BK
    w = tl.load(rw_ptr + row)
    if NORM:
        j = tl.arange(0, TOPK_PAD)
        sib = (row // top_k)[:, None] * top_k + j[None, :]
        w = w / (tl.sum(tl.load(rw_ptr + sib, mask=(j < top_k)[None, :], other=0.0), axis=1) + norm_eps)
    w = w * scale
    # the reference casts the routing weight to the activation dtype before multiplying
    w = w.to(y_ptr.dtype.element_ty).to(tl.float32)
    acc = acc * w[:, None]
    y_ptrs = y_ptr + row[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < H)[None, :])


# ---------------------------------------------------------------------------------------------
# configs and the entry points
# ---------------------------------------------------------------------------------------------
def pick_config(T: int, top_k: int, E: int, H: int, I: int) -> dict:
    """Tile sizes from the token count (static per captured size). Keys: BM, GROUP_M, and per GEMM
    (gu = gate_up, dn = down): BN, BK, warps, stages. Re-tune on a new GPU with bench/kernels/moe.py
    (python -m bench.kernels.moe --tune, from the repo root)."""
    per_expert = T * top_k / E
    if per_expert <= 8:  # decode: memory bound, spread the weight stream over many programs
        cfg = dict(BM=16, gu=(64, 128, 4, 4), dn=(64, 128, 4, 4))
    elif per_expert <= 32:
        cfg = dict(BM=32, gu=(64, 128, 4, 4), dn=(64, 128, 4, 4))
    elif per_expert <= 96:
        cfg = dict(BM=64, gu=(128, 64, 4, 4), dn=(256, 64, 8, 4))
    else:
        cfg = dict(BM=128, gu=(128, 64, 8, 4), dn=(256, 64, 8, 4))
    cfg["GROUP_M"] = 8
    return cfg


SMEM_BUDGET = 200 * 1024  # bytes of shared memory per program; H100 allows 227 KiB


def _fit(bn_bk, n, k, bm, elem_bytes, b_tiles):
    """Clamp the tile to the problem, then drop pipeline stages (and BK) until the A tile plus
    `b_tiles` B tiles of every stage fit SMEM_BUDGET: fp32 weights need half the depth of bf16."""
    bn, bk, warps, stages = bn_bk
    bn, bk = min(bn, max(16, _p2(n))), min(bk, max(16, _p2(k)))
    per_elem = elem_bytes * (1.5 if elem_bytes == 4 else 1)  # tf32 dots took 1.5x that on H100
    smem = lambda: stages * (bm * bk + b_tiles * bk * bn) * per_elem
    while smem() > SMEM_BUDGET and stages > 2:
        stages -= 1
    while smem() > SMEM_BUDGET and bk > 16:
        bk //= 2
    return bn, bk, warps, stages


def fused_experts(x, weights, ids, w_gate, w_up, w_down, *, num_experts, config=None, align_single_max=256,
                  renormalize=False, norm_eps=0.0, scale=1.0, skips=False, act_quant=0):
    """sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t,k], x [T, H], with
    w = weights (/ (weights.sum(-1) + norm_eps) if renormalize) * scale, rounded to x.dtype.
    `skips`: some ids are num_experts (not this rank's); those pairs add nothing. `act_quant`: x and
    the SwiGLU output are quantized per token and that many columns and widened back (the W8A8 math
    of FP8 experts, on widened weights)."""
    if act_quant:
        x = fake_quantize_activations(x, act_quant)
    T, H = x.shape
    top_k = ids.shape[1]
    E, I = num_experts, w_gate.shape[1]
    assert w_gate.shape == w_up.shape == (E, I, H) and w_down.shape == (E, H, I), "MoE weight shapes"
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_gate, w_up, w_down = (w if w.stride(-1) == 1 else w.contiguous() for w in (w_gate, w_up, w_down))
    assert w_gate.stride() == w_up.stride(), "w_gate and w_up need the same strides"
    cfg = dict(config or pick_config(T, top_k, E, H, I))
    BM = cfg["BM"]
    n = T * top_k
    if n == 0:
        return torch.zeros_like(x)
    sorted_ids, expert_ids, npp = moe_align(ids, E, BM, single_max=align_single_max)
    num_pid_m = expert_ids.numel()
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    rw = weights.reshape(-1).float().contiguous()

    h = torch.empty(n, I, dtype=x.dtype, device=x.device)
    bn, bk, warps, stages = _fit(cfg["gu"], I, H, BM, x.element_size(), 2)
    _gate_up_kernel[(num_pid_m * cdiv(I, bn),)](
        x, w_gate, w_up, h, sorted_ids, expert_ids, npp, n, H, I, top_k, num_pid_m,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), h.stride(0),
        BM=BM, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=H % bk == 0, PREC=prec,
        num_warps=warps, num_stages=stages)

    if act_quant:
        h = fake_quantize_activations(h, act_quant)
    y = (torch.zeros if skips else torch.empty)(n, H, dtype=x.dtype, device=x.device)  # skipped rows stay 0
    bn, bk, warps, stages = _fit(cfg["dn"], H, I, BM, x.element_size(), 1)
    _down_kernel[(num_pid_m * cdiv(H, bn),)](
        h, w_down, y, rw, sorted_ids, expert_ids, npp, n, I, H, num_pid_m, top_k, float(norm_eps), float(scale),
        h.stride(0), w_down.stride(0), w_down.stride(1), y.stride(0),
        BM=BM, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=I % bk == 0, PREC=prec,
        NORM=bool(renormalize), TOPK_PAD=_p2(top_k), num_warps=warps, num_stages=stages)
    return y.view(T, top_k, H).sum(dim=1) if top_k > 1 else y


def moe(x, router, w_gate, w_up, w_down, score_bias=None, *, num_experts, top_k, scoring,
        norm_topk_prob=False, n_group=1, topk_group=1, routed_scaling_factor=1.0, **fp8_scales):
    """Same contract as torch_ref.moe; CUDA-graph safe (block-FP8 experts widened per call: the fallback
    where DeepGEMM's FP8 grouped GEMMs do not run)."""
    w_gate, w_up, w_down = expert_weights(x, w_gate, w_up, w_down, fp8_scales)
    weights, ids = select_experts(x, router, score_bias, num_experts=num_experts, top_k=top_k, scoring=scoring,
                                  n_group=n_group, topk_group=topk_group)
    return fused_experts(x, weights, ids, w_gate, w_up, w_down, num_experts=num_experts,
                         renormalize=norm_topk_prob, norm_eps=1e-20 if scoring == "sigmoid" else 0.0,
                         scale=routed_scaling_factor, act_quant=_act_quant(fp8_scales))


def grouped_experts(x, weights, ids, w_gate, w_up, w_down, *, ctx=None, group="ep", align_single_max=256,
                    **fp8_scales):
    """torch_ref.grouped_experts' contract: the experts of this EP rank (L = len(w_gate), global
    ids first .. first+L-1) over the rows moe_dispatch brought here, already routed and weighted;
    a row's slots naming other ranks' experts are skipped by the align step."""
    w_gate, w_up, w_down = expert_weights(x, w_gate, w_up, w_down, fp8_scales)
    first = _ep_position(ctx, group)[0] * w_gate.shape[0]
    local = ids - first
    local = torch.where((local >= 0) & (local < w_gate.shape[0]), local, w_gate.shape[0])
    return fused_experts(x, weights, local, w_gate, w_up, w_down, num_experts=w_gate.shape[0], skips=True,
                         align_single_max=align_single_max, act_quant=_act_quant(fp8_scales))

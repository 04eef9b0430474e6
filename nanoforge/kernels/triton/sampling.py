"""Batched sampling for large vocabularies: logits [B, V] -> token ids [B], one program per row.

Same semantics as the torch sampler's `_filter` + draw (runtime/sampler.py): temperature, then
top-k, then min-p and top-p on the tempered top-k distribution; temperature 0 = greedy (first
argmax of the raw logits, like torch.argmax).

No sort. Every filter is a value cutoff `c` (keep x >= c), found by a multi-probe search over the
order-preserving int image of fp32: each pass over the row tests NT thresholds at once (spread in
value while the bracket is wide, then in keys) and stops once one element is left in the bracket,
so the kept set is exact; at V = 151936, NT = 16 that is ~3 passes for top-k 50, ~3 for top-p
after it, ~5 for top-p alone (plus a max pass, a mass pass and part of a draw pass):
  top-k: c_k = largest t with count(x >= t) >= k   (= the k-th largest value; ties at it survive,
         as with torch's `logits < kth` mask)
  top-p: c_p = largest t with mass(x >= t) >= top_p * mass(x >= c_k)   (= torch's "smallest set
         whose mass reaches top_p"; a tie group straddling the cutoff is kept whole, where a sort
         would keep an arbitrary part of it). The search starts at m + log((1-top_p)/V) - 1, above
         which nothing can be cut.
  min-p: elementwise exp(x - max) >= min_p.
The draw is an inverse-CDF scan in index order with one uniform u in [0, 1) per row supplied by
the caller (drawn from the request's own torch.Generator), so a row's token depends only on its
logits, its params and its u: seeded requests are reproducible whatever they are batched with.

CUDA graphs: no host sync, grid = (B,); all per-row settings are device tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .host_math import next_pow2

try:  # the combine functions behind tl.sum/max/min/argmax/cumsum: called through tl.reduce/associative_scan
    # directly they skip a device-function call, which the interpreter makes ~50x dearer than the op
    from triton.language.standard import _argmax_combine_tie_break_left as _argmax_op
    from triton.language.standard import _elementwise_max as _max_op
    from triton.language.standard import _elementwise_min as _min_op
    from triton.language.standard import _sum_combine as _add_op
except ImportError:  # pragma: no cover - other Triton versions: same ops, slower interpreter
    @triton.jit
    def _add_op(a, b):
        return a + b

    @triton.jit
    def _max_op(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _min_op(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _argmax_op(v1, i1, v2, i2):
        gt = (v1 > v2) | ((v1 == v2) & (i1 < i2))
        return tl.where(gt, v1, v2), tl.where(gt, i1, i2)


@triton.jit
def _cutoff(row, V, inv_t, m, floor, lo_f, need, MASS: tl.constexpr, NT: tl.constexpr, BLOCK: tl.constexpr):
    """Largest fp32 c in [lo_f, m] with count(x >= c) >= need (MASS: mass(x >= c) >= need *
    mass(x >= floor), mass = exp(x - m)), or any c' with {x >= c'} = {x >= c}. Assumes the
    predicate holds at lo_f. Invariant: it holds at lo, fails at hi + 1."""
    # keys: the fp32 bits as int32, negative floats with the magnitude flipped, so that the signed
    # int order is the float order (inlined: device-function calls are slow in the interpreter)
    bl = lo_f.to(tl.int32, bitcast=True)
    lo = tl.where(bl < 0, bl ^ 0x7FFFFFFF, bl).to(tl.int64)
    bh = m.to(tl.int32, bitcast=True)
    hi = tl.where(bh < 0, bh ^ 0x7FFFFFFF, bh).to(tl.int64)
    n_lo = V + 1  # count(x >= lo), unknown yet; count(x >= hi + 1) = n_hi = 0
    n_hi = 0
    j = tl.arange(0, NT).to(tl.int64) + 1
    ar = tl.arange(0, BLOCK)
    # one element left in [lo, hi]: it is the cutoff, and {x >= lo} is already the kept set
    while (lo < hi) & (n_lo - n_hi > 1):
        # probes split [lo, hi] into NT+1 parts: evenly in value while the bracket spans more than
        # two binades (keys near 0 hold ~no logits), then evenly in keys, which ends exactly
        step = (hi - lo + NT) // (NT + 1)
        bl = lo.to(tl.int32)
        lo_v = tl.where(bl < 0, bl ^ 0x7FFFFFFF, bl).to(tl.float32, bitcast=True)
        bh = hi.to(tl.int32)
        width = tl.where(bh < 0, bh ^ 0x7FFFFFFF, bh).to(tl.float32, bitcast=True) - lo_v
        bv = (lo_v + width * (j.to(tl.float32) / (NT + 1))).to(tl.int32, bitcast=True)
        kv = tl.maximum(tl.where(bv < 0, bv ^ 0x7FFFFFFF, bv).to(tl.int64), lo + j)  # > lo, increasing
        wide = (hi - lo > (1 << 24)) & (width < float("inf"))
        kp = tl.minimum(tl.where(wide, kv, lo + j * step), hi)
        bp = kp.to(tl.int32)
        t = tl.where(bp < 0, bp ^ 0x7FFFFFFF, bp).to(tl.float32, bitcast=True)
        # per-lane partial sums; one cross-thread reduction per pass, not per tile
        cnt2 = tl.full([NT, BLOCK], 0, tl.int32)
        mass2 = tl.full([NT, BLOCK], 0.0, tl.float32)
        tot1 = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=float("-inf")) * inv_t
            ge = (x[None, :] >= t[:, None]) & valid[None, :]
            cnt2 += ge.to(tl.int32)
            if MASS:
                e = tl.where(valid & (x >= floor), tl.exp(x - m), 0.0)
                tot1 += e
                mass2 += tl.where(ge, e[None, :], 0.0)
        cnt = tl.reduce(cnt2, 1, _add_op)
        if MASS:
            ok = tl.reduce(mass2, 1, _add_op) >= need * tl.reduce(tot1, 0, _add_op)
        else:
            ok = cnt.to(tl.float32) >= need
        # probes are increasing, so ok is true-then-false and counts fall
        lo = tl.reduce(tl.where(ok, kp, lo), 0, _max_op)
        n_lo = tl.reduce(tl.where(ok, cnt, n_lo), 0, _min_op)
        hi = tl.reduce(tl.where(ok, hi, kp - 1), 0, _min_op)
        n_hi = tl.reduce(tl.where(ok, n_hi, cnt), 0, _max_op)
    bl = lo.to(tl.int32)
    return tl.where(bl < 0, bl ^ 0x7FFFFFFF, bl).to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(x_ptr, t_ptr, k_ptr, p_ptr, mp_ptr, u_ptr, out_ptr, mask_ptr, V, stride,
                   NT: tl.constexpr, BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr):
    pid = tl.program_id(0)
    row = x_ptr + pid.to(tl.int64) * stride
    temp = tl.load(t_ptr + pid).to(tl.float32)
    greedy = temp <= 0.0
    inv_t = tl.math.div_rn(1.0, tl.where(greedy, 1.0, temp))  # torch on CUDA: x * (1/T) for a scalar T
    ar = tl.arange(0, BLOCK)
    # pass 1, per lane: max, its first index, min
    m1 = tl.full([BLOCK], float("-inf"), tl.float32)
    am1 = tl.full([BLOCK], 0, tl.int32)
    mn1 = tl.full([BLOCK], float("inf"), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + ar
        valid = offs < V
        x = tl.load(row + offs, mask=valid, other=float("-inf")) * inv_t
        am1 = tl.where(x > m1, offs, am1)
        m1 = tl.maximum(m1, x)
        mn1 = tl.minimum(mn1, tl.where(valid, x, float("inf")))
    m = tl.reduce(m1, 0, _max_op)
    am = tl.reduce(tl.where(m1 == m, am1, V), 0, _min_op)  # the first maximum, as torch.argmax
    mn = tl.reduce(mn1, 0, _min_op)
    tok = am.to(tl.int64)
    if temp > 0.0:
        k = tl.load(k_ptr + pid).to(tl.int32)
        top_p = tl.load(p_ptr + pid).to(tl.float32)
        min_p = tl.load(mp_ptr + pid).to(tl.float32)
        u = tl.load(u_ptr + pid).to(tl.float32)
        c = mn
        if (k > 0) & (k < V):
            c = _cutoff(row, V, inv_t, m, mn, mn, k.to(tl.float32), False, NT, BLOCK)
        if top_p < 1.0:
            lo = tl.maximum(c, m + tl.log((1.0 - top_p) / V) - 1.0)  # nothing above this can be cut
            c = _cutoff(row, V, inv_t, m, c, lo, top_p, True, NT, BLOCK)
        # pass: mass of the survivors (and the mask, for tests)
        z1 = tl.full([BLOCK], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=float("-inf")) * inv_t
            e = tl.exp(x - m)
            keep = valid & (x >= c) & (e >= min_p) & (x > float("-inf"))  # masked ids stay out
            z1 += tl.where(keep, e, 0.0)
            if WRITE_MASK:
                tl.store(mask_ptr + pid.to(tl.int64) * V + offs, keep.to(tl.int8), mask=valid)
        # inverse CDF in index order; stops at the tile that holds the draw
        target = u * tl.reduce(z1, 0, _add_op)
        run = tl.full([], 0.0, tl.float32)
        pick = tl.full([], -1, tl.int32)
        start = tl.full([], 0, tl.int32)
        while (start < V) & (pick < 0):
            offs = start + ar
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=float("-inf")) * inv_t
            e = tl.exp(x - m)
            w = tl.where(valid & (x >= c) & (e >= min_p), e, 0.0)  # -inf ids weigh 0: never the first hit
            ts = tl.reduce(w, 0, _add_op)
            if run + ts > target:  # the draw is in this tile
                hit = (run + tl.associative_scan(w, 0, _add_op)) > target  # the first hit has w > 0
                pick = tl.reduce(tl.where(hit & valid, offs, V), 0, _min_op)
                pick = tl.where(pick < V, pick, -1)
            run += ts
            start += BLOCK
        tok = tl.where(pick < 0, am, pick).to(tl.int64)  # u*zf past the rounded total: the argmax survives every filter
    tl.store(out_ptr + pid, tok)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, uniform: torch.Tensor, *, return_mask: bool = False, block: int | None = None,
                  probes: int | None = None, num_warps: int | None = None):
    """Token ids int64 [B] for fp32 logits [B, V] (unit column stride). Per-row [B] tensors on the
    logits' device, any numeric dtype: temperature (0 = greedy), top_k (<= 0 or >= V = off), top_p
    (1 = off), min_p (0 = off), uniform in [0, 1) (the row's randomness). return_mask: also the
    int8 [B, V] mask of the filtered set (tests; unset for greedy rows)."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"sample_tokens: expects fp32 logits [B, V], got {logits.dtype} {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    mask = torch.zeros(b, v, dtype=torch.int8, device=logits.device) if return_mask else out
    if b:
        interp = _interpreted()
        # GPU: 16 probes x 512 columns x 4 warps = ~246 registers, 2 programs per SM, no spills (sm_90).
        # The interpreter pays per op, not per element: wide tiles and probe sets, fewer passes.
        block = block or min(next_pow2(v), 1024 if interp else 512)
        probes = probes or (max(16, min(4096, (1 << 17) // block)) if interp else 16)
        _sample_kernel[(b,)](logits, temperature, top_k, top_p, min_p, uniform, out, mask, v, logits.stride(0),
                             NT=probes, BLOCK=block, WRITE_MASK=return_mask,
                             num_warps=num_warps or (1 if interp else 4))
    return (out, mask.bool()) if return_mask else out

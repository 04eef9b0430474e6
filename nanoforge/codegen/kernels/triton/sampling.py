"""Batched sampling for large vocabularies: logits [B, V] -> token ids [B], one program per row.

Same semantics as the torch sampler's `_filter` + draw (runtime/sampler.py): temperature, then
top-k, then min-p and top-p on the tempered top-k distribution; temperature 0 = greedy (first
argmax of the raw logits, like torch.argmax).

No sort. Every filter is a value cutoff `c` (keep x >= c), found by a multi-probe search over the
order-preserving int image of fp32: each pass over the row tests NT thresholds at once, so a 2^32
key range takes ~8 passes at NT=16 and the result is an exact data value:
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
    """Largest fp32 value c in [lo_f, m] with count(x >= c) >= need (MASS: mass(x >= c) >=
    need * mass(x >= floor), mass = exp(x - m)). Assumes the predicate holds at lo_f."""
    # keys: the fp32 bits as int32, negative floats with the magnitude flipped, so that the signed
    # int order is the float order (inlined: device-function calls are slow in the interpreter)
    b = lo_f.to(tl.int32, bitcast=True)
    lo = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)
    b = m.to(tl.int32, bitcast=True)
    hi = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64)
    j = tl.arange(0, NT).to(tl.int64) + 1
    ar = tl.arange(0, BLOCK)
    while lo < hi:
        step = (hi - lo + NT) // (NT + 1)  # >= 1; the NT probes split [lo, hi] into NT+1 parts
        kp = tl.minimum(lo + j * step, hi)
        b = kp.to(tl.int32)
        t = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)
        acc = tl.full([NT], 0.0, tl.float32)
        tot = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=0.0) * inv_t
            if MASS:
                w = tl.where(valid & (x >= floor), tl.exp(x - m), 0.0)
                tot += tl.reduce(w, 0, _add_op)
            else:
                w = valid.to(tl.float32)  # counts stay exact in fp32 (V < 2^24)
            acc += tl.reduce(tl.where(x[None, :] >= t[:, None], w[None, :], 0.0), 1, _add_op)
        if MASS:
            ok = acc >= need * tot
        else:
            ok = acc >= need
        lo = tl.reduce(tl.where(ok, kp, lo), 0, _max_op)  # probes are increasing, so ok is true-then-false
        hi = tl.reduce(tl.where(ok, hi, kp - 1), 0, _min_op)
    b = lo.to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(x_ptr, t_ptr, k_ptr, p_ptr, mp_ptr, u_ptr, out_ptr, mask_ptr, V, stride,
                   NT: tl.constexpr, BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr):
    pid = tl.program_id(0)
    row = x_ptr + pid.to(tl.int64) * stride
    temp = tl.load(t_ptr + pid).to(tl.float32)
    greedy = temp <= 0.0
    inv_t = tl.math.div_rn(1.0, tl.where(greedy, 1.0, temp))  # torch on CUDA: x * (1/T) for a scalar T
    ar = tl.arange(0, BLOCK)
    # pass 1: max, its first index, min
    m = tl.full([], float("-inf"), tl.float32)
    mn = tl.full([], float("inf"), tl.float32)
    am = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + ar
        valid = offs < V
        x = tl.load(row + offs, mask=valid, other=float("-inf")) * inv_t
        tmax, targ = tl.reduce((x, ar), 0, _argmax_op)  # first max; the interpreter returns positions
        am = tl.where(tmax > m, targ + start, am)
        m = tl.maximum(m, tmax)
        mn = tl.minimum(mn, tl.reduce(tl.where(valid, x, float("inf")), 0, _min_op))
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
            lo = tl.maximum(c, m + tl.log((1.0 - top_p) / V) - 1.0)
            c = _cutoff(row, V, inv_t, m, c, lo, top_p, True, NT, BLOCK)
        # pass: mass of the survivors (and the mask, for tests)
        zf = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + ar
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=0.0) * inv_t
            e = tl.exp(x - m)
            keep = valid & (x >= c) & (e >= min_p) & (x > float("-inf"))  # masked ids stay out
            zf += tl.reduce(tl.where(keep, e, 0.0), 0, _add_op)
            if WRITE_MASK:
                tl.store(mask_ptr + pid.to(tl.int64) * V + offs, keep.to(tl.int8), mask=valid)
        # inverse CDF in index order; stops at the tile that holds the draw
        target = u * zf
        run = tl.full([], 0.0, tl.float32)
        pick = tl.full([], -1, tl.int32)
        start = tl.full([], 0, tl.int32)
        while (start < V) & (pick < 0):
            offs = start + ar
            valid = offs < V
            x = tl.load(row + offs, mask=valid, other=0.0) * inv_t
            e = tl.exp(x - m)
            w = tl.where(valid & (x >= c) & (e >= min_p), e, 0.0)  # -inf ids weigh 0: never the first hit
            hit = (run + tl.associative_scan(w, 0, _add_op)) > target  # first hit has w > 0
            pick = tl.reduce(tl.where(hit & valid, offs, V), 0, _min_op)
            pick = tl.where(pick < V, pick, -1)
            run += tl.reduce(w, 0, _add_op)
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
        block = block or min(triton.next_power_of_2(v), 1024)
        # the interpreter pays per op, not per element: wide probe sets, fewer passes
        probes = probes or (max(16, min(4096, (1 << 17) // block)) if interp else 16)
        _sample_kernel[(b,)](logits, temperature, top_k, top_p, min_p, uniform, out, mask, v, logits.stride(0),
                             NT=probes, BLOCK=block, WRITE_MASK=return_mask,
                             num_warps=num_warps or (1 if interp else 8))
    return (out, mask.bool()) if return_mask else out


def bench_sampling(B: int, V: int = 151936, **kw) -> dict:
    """Median ms (triton.testing.do_bench) of sample_tokens vs the torch sampler's per-row path on
    the same batch (rows cycle through top-p, top-k + top-p, min-p and plain-temperature settings).
    kw (block, probes, num_warps) go to sample_tokens, for tuning."""
    from triton.testing import do_bench

    from ....runtime.sampler import SampleRequest, _sample_torch
    from ....runtime.sampling_params import SamplingParams

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, V, generator=gen, device=dev) * 4
    kinds = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
             SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=1.0)]
    params = [kinds[i % len(kinds)] for i in range(B)]
    reqs = [SampleRequest(p, [], [], None, []) for p in params]
    cols = [torch.tensor(c, device=dev) for c in zip(*[(p.temperature, p.top_k, p.top_p, p.min_p) for p in params])]
    u = torch.rand(B, generator=gen, device=dev)
    fast = lambda: sample_tokens(logits, *cols, u, **kw)  # noqa: E731
    ms = do_bench(fast, warmup=25, rep=200, return_mode="median")
    ref_ms = do_bench(lambda: _sample_torch(logits, reqs), warmup=1, rep=50, return_mode="median")
    return {"B": B, "V": V, "triton_ms": ms, "torch_ms": ref_ms, "speedup": ref_ms / ms,
            "device": torch.cuda.get_device_name(dev), **kw}

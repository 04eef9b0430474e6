"""Fresh prompts of a mixed step on torch's FlashAttention varlen kernel (knob ENABLED, off until timed).

A sequence whose whole context is this step's tokens (a new prompt, or its first chunk, with no cached
prefix) attends only to the K/V the step just computed: they are contiguous in the step's k and v, so it
needs no pool read, and FlashAttention's varlen kernel can take it. The scheduler puts newly admitted
sequences after the running ones, so such prompts are the tail of the flat batch: `split` finds where
that tail starts, the Triton paged kernel serves the sequences before it (decode rows and continued
chunks) and `attend` the tail. bench/kernels/prefill_varlen.py times both kernels on fresh prompts;
`bench/knob_ab.py prefill_fresh` runs the GPU tests with it on and the reference workload.

Eager steps only (the host's per-sequence lengths choose the split); CUDA-graph decode steps have no
prefill rows. Every row of an eager step is stored (slot -1 marks only a captured graph's padding), so
the pool holds what the tail attended to. Off by default until timed on a GPU; the FP8-KV path keeps
the paged kernel (its reference reads the quantized pool).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ENABLED = False


@dataclass(frozen=True)
class FreshTail:
    """Where a step's trailing new prompts start (sequence b0, token t0), their starts rebased to t0, and
    the longest query / context of the sequences before them (the paged kernel's bounds for those)."""
    b0: int
    t0: int
    starts: np.ndarray
    head_max_q: int
    head_max_ctx: int


def split(host, max_decode_q: int) -> FreshTail | None:
    """The batch's trailing run of fresh prefill sequences (more than `max_decode_q` tokens each, all of
    their context), or None when the batch ends otherwise."""
    if host is None or host.q_range[1] <= max_decode_q:
        return None
    q_lens = np.diff(host.starts)
    fresh = (q_lens == host.ctx_lens) & (q_lens > max_decode_q)
    if not fresh[-1]:
        return None
    stale = np.flatnonzero(~fresh)
    b0 = int(stale[-1]) + 1 if len(stale) else 0
    t0 = int(host.starts[b0])
    return FreshTail(b0, t0, host.starts[b0:] - t0, int(q_lens[:b0].max(initial=0)),
                     int(host.ctx_lens[:b0].max(initial=0)))


@functools.lru_cache(maxsize=1)
def _varlen():
    """torch's varlen FlashAttention, whether it takes GQA itself (enable_gqa, torch >= 2.12) and how it
    is told to be causal (window_size (-1, 0) from torch 2.10, is_causal before)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, False, {}
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, "enable_gqa" in params, causal


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: np.ndarray, scale: float,
           out: torch.Tensor, cache: dict | None = None) -> None:
    """Causal attention of whole sequences packed in q [T, H, D], k / v [T, KVH, D], sequence b at rows
    starts[b] .. starts[b + 1] - 1 (starts[0] = 0), into out [T, H, D]. FlashAttention's varlen kernel
    on CUDA for 16-bit heads it takes (D <= 256, a multiple of 8); per-sequence SDPA otherwise (f32, and
    the interpreter tests: the same split, a reference kernel). `cache` (the step's scratch) keeps the
    device copy of `starts` for the step's other layers."""
    fn, gqa, causal = _varlen()
    d = q.shape[-1]
    if q.is_cuda and fn is not None and q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0:
        cu = None if cache is None else cache.get("prefill_fresh_cu")
        if cu is None:
            cu = torch.from_numpy(starts.astype(np.int32)).to(q.device)
            if cache is not None:
                cache["prefill_fresh_cu"] = cu
        longest = int(np.diff(starts).max())
        if not gqa and k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        o = fn(q, k, v, cu, cu, longest, longest, scale=scale, **causal, **({"enable_gqa": True} if gqa else {}))
        out.copy_(o)
        return
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           is_causal=True, scale=scale, enable_gqa=True)
        out[a:b] = o.transpose(0, 1)

"""MLA prefill in the expanded (non-absorbed) form, beside the absorbed decode path.

Decode attends in the latent space (absorbed: q_nope folded through W_uk, [latent | k_rope] entries
as keys, the latent as V, W_uv after): per query row and context position 2 * h * (r + rope + r)
FLOPs, on a paged kernel. A prefill chunk has many rows per sequence, so it pays instead to expand
the sequence's context once through kv_b_proj into per-head K = [K_nope | k_rope] [L, h, nope + rope]
and V [L, h, vd] (2 * L * r * h * (nope + vd) FLOPs, one GEMM) and run a dense causal flash kernel:
DeepSeek-V3's 128 heads then attend with 192 / 128 dims instead of 576 / 512, 3.4x fewer FLOPs, on
torch's fused SDPA kernels (cuDNN or memory-efficient on CUDA: flash wants dv == dk) rather than the
paged Triton kernel (H100, bench/deepseek_layers.py: ~28 ms a layer for a 4k prefill absorbed). Both
forms compute the same attention up to float reassociation; the KV pool and its store are unchanged.

A mixed step is split per sequence (`split_step`): sequences of more than `absorbed_max_q` rows
(MAX_DECODE_Q: longer than any decode or speculative-verify row set) take the expanded path, one SDPA
call each (causal aligned bottom-right when the chunk follows a cached prefix); the rest (decode rows,
verify rows, and chunks whose expanded context would exceed EXPAND_MAX_BYTES) run the provider's
absorbed path as a batch of their own (FlashMLA or the Triton kernel). Only eager steps split: a
captured CUDA graph's context carries no host-side sequence list, and decode-only steps never split,
so graph capture and replay are as before. The split is planned once per step (ctx.scratch).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .context import BatchContext

DEVICES = frozenset({"cuda"})  # device types whose MLA providers split prefill rows off (CPU tests add "cpu";
# the CPU interpreter tests of the Triton kernel keep its mixed path)
EXPAND_MAX_BYTES = 2 << 30  # a sequence whose expanded K/V temporaries would take more stays absorbed
FUSED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
# in this order of preference (cuDNN was fastest in every case timed); on CUDA never the math backend: it would
# materialize [h, n, L] scores (GiBs at 4k tokens)
PAD_V_TO_QK = False  # V zero-padded to q/k's width (128 -> 192) so flash attention (dv == dk only) takes it,
# at 20% more PV FLOPs. Off: cuDNN takes dv != dk as is and is faster (H100, bench/results/mla_prefill/: 4096
# rows causal 1.20 ms against flash padded 2.69; 1024 rows after a 3072 prefix 0.97 against 1.16)


@dataclass
class StepSplit:
    """One mixed step's MLA rows, split: `expanded` holds (first row, rows, pool slots of positions
    0 .. ctx_len - 1) per sequence of the expanded path; the other rows (`absorbed_rows` of the flat
    batch, None if none) form `absorbed_ctx`, a batch of their own for the absorbed path."""
    expanded: list[tuple[int, int, torch.Tensor]]
    absorbed_rows: torch.Tensor | None = None
    absorbed_ctx: BatchContext | None = None
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (rows, context) -> causal_sdpa's
    # mask, built by the step's first layer and read by the others


def expanded_bytes_per_token(a: dict, itemsize: int) -> int:
    """Temporary bytes per context token of expanded_attention: kv_b_proj's output, K and V copies."""
    h, nope, rope, vd = a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
    return h * ((nope + vd) + (nope + rope) + vd) * itemsize


def _fused_kernels_take(a: dict, device: torch.device) -> bool:
    """Whether torch's fused SDPA kernels take these head dims (multiples of 8: cuDNN's and the
    memory-efficient kernel's alignment in 16-bit dtypes); the CPU runs any."""
    return device.type != "cuda" or ((a["qk_nope_head_dim"] + a["qk_rope_head_dim"]) % 8 == 0
                                     and a["v_head_dim"] % 8 == 0)


def split_step(ctx: BatchContext, q: torch.Tensor, a: dict, *, absorbed_max_q: int) -> StepSplit | None:
    """This step's split of an MLA layer's rows (see the module doc), or None: every row absorbed
    (a decode-only or captured step, another device, or no sequence the expanded path takes)."""
    if ctx.max_query_len <= absorbed_max_q or q.device.type not in DEVICES or not _fused_kernels_take(a, q.device):
        return None
    host = ctx._host  # (q_len, ctx_len, blocks) per sequence; empty in a CUDA graph's context
    if len(host) != ctx.context_lens.shape[0] or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    max_ctx = EXPAND_MAX_BYTES // expanded_bytes_per_token(a, q.element_size())
    key = ("mla_prefill", max_ctx)
    if key not in ctx.scratch:
        ctx.scratch[key] = _plan(ctx, host, absorbed_max_q, max_ctx)
    return ctx.scratch[key]


def _plan(ctx: BatchContext, host: list, absorbed_max_q: int, max_ctx: int) -> StepSplit | None:
    dev, bs = ctx.block_tables.device, ctx.block_size
    expanded, rows, kept, start = [], [], [], 0
    for i, (q_len, ctx_len, _) in enumerate(host):
        if q_len > absorbed_max_q and ctx_len <= max_ctx:
            expanded.append((start, q_len, ctx_len, i))
        else:
            rows.extend(range(start, start + q_len))
            kept.append(i)
        start += q_len
    if not expanded:
        return None
    split = StepSplit([])
    for start, q_len, ctx_len, i in expanded:
        pos = torch.arange(ctx_len, device=dev)
        split.expanded.append((start, q_len, ctx.block_tables[i][pos // bs].long() * bs + pos % bs))
    if kept:
        put = lambda xs, dt: torch.tensor(xs, dtype=dt).to(dev, non_blocking=True)  # noqa: E731
        q_lens, ctx_lens = [host[i][0] for i in kept], [host[i][1] for i in kept]
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        split.absorbed_rows = put(rows, torch.long)
        split.absorbed_ctx = BatchContext(
            kv=ctx.kv, block_size=bs, slot_mapping=ctx.slot_mapping.index_select(0, split.absorbed_rows),
            query_start=put(starts, torch.int32), context_lens=put(ctx_lens, torch.int32),
            block_tables=ctx.block_tables.index_select(0, put(kept, torch.long)), max_query_len=max(q_lens),
            max_context_len=max(ctx_lens), _host=[host[i] for i in kept], comm=ctx.comm, ep_tokens=ctx.ep_tokens)
    return split


def read_entries(cache: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """Pool entries [len(slots), r + rope] in `dtype`: an MLA pool [NB, BS, r + rope], FP8 ones
    times their per-token scale [NB, BS, 1] (as torch_ref reads them)."""
    rows = cache.view(-1, cache.shape[-1])[slots]
    if scale is None:
        return rows.to(dtype)
    return (rows.to(torch.float32) * scale.view(-1)[slots, None]).to(dtype)


def expanded_attention(q: torch.Tensor, entry: torch.Tensor, w: torch.Tensor, *, scale: float,
                       nope: int, masks: dict | None = None) -> torch.Tensor:
    """Causal MLA of one sequence in the expanded form: q [n, h, nope + rope] are positions L - n ..
    L - 1; entry [L, r + rope] its context's [latent | k_rope] in q's dtype; w = kv_b_proj viewed
    [h, nope + vd, r] in q's dtype. Returns [n, h, vd]. Plain torch (any device)."""
    n, h, dk = q.shape
    L, r = entry.shape[0], w.shape[-1]
    vd = w.shape[1] - nope
    kv = F.linear(entry[:, :r], w.reshape(h * (nope + vd), r)).view(L, h, nope + vd)
    k = torch.cat([kv[..., :nope], entry[:, None, r:].expand(L, h, dk - nope)], dim=-1)
    v = kv[..., nope:].contiguous()  # cuDNN takes only dense [L, h, d] layouts
    if PAD_V_TO_QK and vd < dk:
        v = F.pad(v, (0, dk - vd))
    # [1, h, len, d] views of [len, h, d] rows: the layout the fused kernels read without copies
    qb, kb, vb = (x.contiguous().view(1, x.shape[0], h, x.shape[-1]).transpose(1, 2) for x in (q, k, v))
    return causal_sdpa(qb, kb, vb, scale, masks)[0].transpose(0, 1)[..., :vd]


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                masks: dict | None = None) -> torch.Tensor:
    """SDPA of q [1, h, n, dk] over k/v [1, h, L, d], causal aligned bottom-right (the n rows are the
    last n positions). n < L goes in as a dense boolean mask, not torch's CausalBias: with dv != dk the
    bias would take the memory-efficient kernel, 2x slower than cuDNN with the mask on an H100
    (bench/kernels/mla_prefill.py, 1024 rows / 4096 context: 0.97 ms against 2.01). `masks` keeps
    the masks built for reuse (a step's layers share them: StepSplit.masks)."""
    n, L = q.shape[2], k.shape[2]
    mask = None if n == L else (masks or {}).get((n, L))
    if n != L and mask is None:
        mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
        if masks is not None:
            masks[(n, L)] = mask
    with sdpa_kernel(FUSED_BACKENDS, set_priority=True) if q.is_cuda else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


def run_split(q: torch.Tensor, split: StepSplit, absorbed: Callable[[torch.Tensor, BatchContext], torch.Tensor], *,
              w: torch.Tensor, cache: torch.Tensor, kv_scale: torch.Tensor | None, scale: float,
              nope: int) -> torch.Tensor:
    """One MLA layer over a split step: q [T, h * (nope + rope)] -> [T, h * vd]. The absorbed rows go
    through `absorbed(q_rows, their ctx) -> [rows, h * vd]`, each expanded sequence through
    expanded_attention over its context read from the pool (this step's entries already stored)."""
    T = q.shape[0]
    h, vd = w.shape[0], w.shape[1] - nope
    qh = q.reshape(T, h, -1)
    out = q.new_empty(T, h, vd)
    if split.absorbed_rows is not None:
        rows = split.absorbed_rows
        out.index_copy_(0, rows, absorbed(q.index_select(0, rows), split.absorbed_ctx).view(-1, h, vd))
    for start, n, slots in split.expanded:
        entry = read_entries(cache, kv_scale, slots, q.dtype)
        out[start:start + n] = expanded_attention(qh[start:start + n], entry, w, scale=scale, nope=nope,
                                                  masks=split.masks)
    return out.view(T, h * vd)

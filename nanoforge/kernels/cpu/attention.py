"""Paged attention for the CPU target without a Python loop over sequences.

torch_ref.attention attends one sequence at a time: a decode step of 32 sequences runs ~100 tiny
calls per layer stack, and a small model's step is then mostly host work. Here the step's sequences
are grouped by shape once (the plan is cached on the step's BatchContext and shared by every layer),
each group's context is gathered from the pool whole blocks at a time (one index per block, not per
token: 16x fewer, contiguous rows), cut to the group's longest context, and attended with one
scaled_dot_product_attention call (CPU flash kernel, native GQA) under a mask that is causal within
each sequence and hides padding; a uniform decode batch needs no mask, whole prompts of any lengths
none either (is_causal). Padding keys (the tail of a last block, pad blocks) are zeroed in the
gathered copy: a masked key must still be finite, as its zero weight multiplies its value. (Passing a
kv head's query heads as the query rows of one task reads its keys once, not once per head, but the
flash kernel then splits the work over two threads poorly: 2x slower at two threads on a tiny
Llama's decode step, 10% faster at one.) Groups are bucketed by powers of two of q_len and ctx_len
(decode rows never pad to a prefill's query length), and each call's gathered K/V and mask stay
under CALL_BUDGET bytes, so a 2k prefill chunk beside 63 decode rows stays cheap.

Two steps skip the gather. Whole prompts of one length (a uniform prefill) attend on the step's own
K/V rows, viewed [n, heads, len, d]. A decode step that continues the previous one attends on dense
copies of the batch's K/V kept across steps (decode_kv.py). The plan reads make_context's host
arrays (BatchContext.host), not the tensors back.

MLA runs in the absorbed form (as the Triton provider does): queries are projected into the latent
space with kv_b_proj's key half and attend to the pool's [latent | k_rope] entries as one shared kv
head; the output is mapped back with its value half. This is torch_ref's expansion up to float
reassociation, without re-expanding the whole context at every decode step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..context import BatchContext
from . import decode_kv

CALL_BUDGET = 128 << 20  # bytes of gathered K/V, mask and padded q/out per SDPA call


@dataclass(frozen=True)
class _Group:
    """Sequences attended together: n sequences padded to max_q queries and max_ctx keys."""
    rows: torch.Tensor  # i64[n, max_q]: flat-batch row of each query (padding repeats a real row)
    keep: torch.Tensor | None  # bool[n, max_q]: real (not padding) queries (None: max_q is 1, every query is real)
    blocks: torch.Tensor  # i64|i32[n, nb]: pool blocks of each sequence's context (nb = the longest's)
    keys: int  # max_ctx: the gathered blocks' first keys attended (the longest context)
    pad: torch.Tensor | None  # i64[P]: keys of the first max_ctx past a sequence's context, as rows of the
    #                           gathered [n * nb * block_size]
    mask: torch.Tensor | None  # bool[n, 1, max_q, max_ctx]: key visible to query (None: see causal)
    causal: bool  # with no mask: whole prompts (is_causal), else every key is visible
    whole: bool = False  # the group is the whole batch, one decode row per sequence, in order

    @property
    def size(self) -> int:
        return self.rows.shape[0]


@dataclass(frozen=True)
class _Plan:
    groups: list[_Group]
    store_slots: torch.Tensor  # i64[S]: pool slots of the new K/V rows that are stored
    store_rows: torch.Tensor | None  # i64[S]: their rows in the flat batch (None: every row, in order)
    decode: decode_kv.DecodeStep | None = None  # a decode step continuing the last: attend on the kept copies
    prompt_len: int = 0  # > 0: whole prompts of this one length, their K/V are the step's own rows


def _put(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _buckets(q_lens: np.ndarray, ctx_lens: np.ndarray, live: np.ndarray) -> list[np.ndarray]:
    """Sequence ids grouped by (ceil log2 q_len, ceil log2 ctx_len): padding stays under 2x per axis."""
    key = np.ceil(np.log2(q_lens[live])).astype(np.int64) * 64 + np.ceil(np.log2(ctx_lens[live])).astype(np.int64)
    return [live[key == k] for k in np.unique(key)]


def _group(ids: np.ndarray, starts: np.ndarray, q_lens: np.ndarray, ctx_lens: np.ndarray, tables: np.ndarray,
           block_size: int, device: torch.device) -> _Group:
    ql, cl = q_lens[ids, None], ctx_lens[ids, None]
    nb = -(-int(cl.max()) // block_size)
    qi, kj = np.arange(int(ql.max())), np.arange(int(cl.max()))
    rows = starts[ids, None] + np.minimum(qi, ql - 1)
    qpos = cl - ql + qi  # position of each query; a padding query (qi >= q_len) sees the whole context
    pad = kj >= cl  # keys past the context: a pad block (table padding) or the tail of the last block
    mask = (kj <= qpos[..., None]) & ~pad[:, None, :]
    pad_rows = (np.arange(len(ids))[:, None] * (nb * block_size) + kj)[pad]
    # is_causal aligns query i with key i: right for whole prompts (no cached prefix) of any lengths, as a
    # real query i sees keys 0..i, all its own; padding queries see padding keys (zeroed), and are dropped
    causal = len(qi) > 1 and bool((ql == cl).all())
    plain = causal or bool(mask.all())  # SDPA needs no mask (and skips the masked half when causal)
    return _Group(_put(rows, device), _put(qi < ql, device), _put(tables[ids, :nb].astype(np.int64), device),
                  len(kj), _put(pad_rows, device) if len(pad_rows) else None,
                  None if plain else _put(mask[:, None], device), causal)


def _decode_group(ids: np.ndarray | None, starts: np.ndarray, ctx_lens: np.ndarray, tables: np.ndarray,
                  block_size: int, device: torch.device, ctx_range: tuple[int, int] | None = None) -> _Group:
    """_group for one query a sequence (ids None: every sequence, in order, whose (min, max) context
    is ctx_range), in fewer numpy calls: a decode step plans in a few microseconds."""
    cl = ctx_lens if ids is None else ctx_lens[ids]
    shortest, keys = ctx_range if ctx_range is not None else (int(cl.min()), int(cl.max()))
    nb = -(-keys // block_size)
    blocks = tables[:, :nb] if ids is None else tables[ids, :nb]
    rows = (starts[:-1] if ids is None else starts[ids])[:, None]
    pad = mask = None
    if shortest != keys:  # ragged: mask the keys past each context, zero them in the gathered copy
        past = np.arange(keys) >= cl[:, None]
        pad = _put((np.arange(len(cl))[:, None] * (nb * block_size) + np.arange(keys))[past], device)
        mask = _put(~past[:, None, None, :], device)
    return _Group(_put(rows, device), None, _put(blocks, device), keys, pad, mask, False,
                  whole=ids is None)


def _host_arrays(ctx: BatchContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int], tuple[int, int]]:
    """(query starts i64[B+1], context lengths i64[B], block tables [B, max_blocks], (min, max) query
    length, (min, max) context length) on the host."""
    h = ctx.host
    if h is not None:
        return h.starts, h.ctx_lens, h.tables, h.q_range, h.ctx_range
    starts, ctx_lens = ctx.query_start.cpu().numpy().astype(np.int64), ctx.context_lens.cpu().numpy().astype(np.int64)
    q_lens = np.diff(starts)
    ranges = [(int(a.min()), int(a.max())) if len(a) else (0, 0) for a in (q_lens, ctx_lens)]
    return starts, ctx_lens, ctx.block_tables.cpu().numpy(), ranges[0], ranges[1]


def _plan(ctx: BatchContext) -> _Plan:
    """Per-step bookkeeping shared by every attention layer (cached on the context)."""
    plan = getattr(ctx, "_cpu_attention_plan", None)
    if plan is not None:
        return plan
    starts, ctx_lens, tables, q_range, ctx_range = _host_arrays(ctx)
    dev, bs = ctx.slot_mapping.device, ctx.block_size
    keep = ctx.slot_mapping >= 0
    every = bool(keep.all())
    decode, recorded = None, False
    if q_range == (1, 1):  # decode only
        n = len(ctx_lens)
        if every and len(ctx._host) == n:
            decode = decode_kv.plan_step(ctx.carry, [b for _, _, b in ctx._host], ctx_lens, ctx.kv, ctx_range)
            recorded = True
        buckets = None if ctx_range[0] == ctx_range[1] else _buckets(np.ones(n, np.int64), ctx_lens, np.arange(n))
        if decode is not None or buckets is None or len(buckets) == 1:  # (the copies are filled from this group)
            groups = [_decode_group(None, starts, ctx_lens, tables, bs, dev, ctx_range)]
        else:
            groups = [_decode_group(ids, starts, ctx_lens, tables, bs, dev) for ids in buckets]
    else:
        q_lens = np.diff(starts)
        live = np.flatnonzero(q_lens > 0)
        groups = [_group(ids, starts, q_lens, ctx_lens, tables, bs, dev) for ids in _buckets(q_lens, ctx_lens, live)]
    if not recorded:  # no decode step of one group: the next step cannot continue this one on copies
        decode_kv.drop(ctx.carry)
    store_rows = None if every else keep.nonzero().flatten()
    prompts = q_range[0] > 1 and q_range[0] == q_range[1] == ctx_range[0] == ctx_range[1]
    plan = _Plan(groups, ctx.slot_mapping if every else ctx.slot_mapping[keep], store_rows, decode,
                 q_range[0] if prompts else 0)
    ctx._cpu_attention_plan = plan  # type: ignore[attr-defined]
    return plan


def _store(cache: torch.Tensor, plan: _Plan, values: torch.Tensor) -> None:
    """torch_ref._store as one index_copy_: the stored bits are the same."""
    if plan.store_rows is not None:
        values = values.index_select(0, plan.store_rows)
    flat = cache.view(-1, *cache.shape[2:])
    if values.dtype != cache.dtype:
        values = values.to(cache.dtype)
    if cache.element_size() == 1 and cache.is_floating_point():  # no fp8 index_copy_ on CPU: copy the bytes
        flat, values = flat.view(torch.uint8), values.view(torch.uint8)
    flat.index_copy_(0, plan.store_slots, values)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d] at idx [n, m] -> [n, heads, m, d] (index_select: far cheaper than x[idx])."""
    return x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:]).transpose(1, 2)


def _gather(pool: torch.Tensor, blocks: torch.Tensor, pad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """pool [num_blocks, block_size, kvh, d] at blocks [n, nb] -> [n, nb * block_size, kvh, d] in dtype,
    padding keys zeroed (the gathered copy is ours to change)."""
    n, nb = blocks.shape
    bs = pool.shape[1]
    out = pool.index_select(0, blocks.view(-1))
    if out.dtype != dtype:
        out = out.to(dtype)
    out = out.view(n, nb * bs, *pool.shape[2:])
    if pad is not None:  # index_fill_ of whole rows: a broadcast masked_fill_ costs more than the gather
        out.view(n * nb * bs, -1).index_fill_(0, pad, 0)
    return out


def _context(pool: torch.Tensor, blocks: torch.Tensor, keys: int, pad: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """_gather's first `keys` keys as [n, kvh, keys, d]. Keys past the longest context are cut, not
    masked: a uniform decode batch then needs no mask at all."""
    out = _gather(pool, blocks, pad, dtype)
    return (out if keys == out.shape[1] else out[:, :keys]).transpose(1, 2)


def _sdpa(q: torch.Tensor, g: _Group, part: slice | None, k_pool: torch.Tensor, v_pool: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """One padded call over the group's sequences `part` (None: all): q [T, h, d], pools [num_blocks,
    block_size, kvh, d*] (v_pool None: values are the keys) -> [n, h, max_q, dv]."""
    rows, blocks, pad, mask = g.rows, g.blocks, g.pad, g.mask
    if part is not None:
        rows, blocks, mask = rows[part], blocks[part], None if mask is None else mask[part]
        if pad is not None:  # the pad rows of this slice of the group
            per = g.blocks.shape[1] * k_pool.shape[1]
            lo, hi = part.start * per, min(part.stop, g.size) * per
            pad = pad[(pad >= lo) & (pad < hi)] - lo
    keys = _context(k_pool, blocks, g.keys, pad, q.dtype)
    values = keys if v_pool is None else _context(v_pool, blocks, g.keys, pad, q.dtype)
    if g.whole:
        qs = (q if part is None else q[part]).unsqueeze(2)
    else:
        qs = _take(q, rows)
    return F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, is_causal=g.causal, scale=scale,
                                          enable_gqa=True)


def _attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor | None, plan: _Plan,
            scale: float) -> torch.Tensor:
    """Causal attention of every query row q [T, h, d] over its sequence's context -> [T, h, dv];
    pools [num_blocks, block_size, kvh, d*]."""
    dv = (k_pool if v_pool is None else v_pool).shape[-1]
    entry = math.prod(k_pool.shape[2:]) + (0 if v_pool is None else math.prod(v_pool.shape[2:]))
    row_bytes = q.element_size() * entry
    out = None
    for g in plan.groups:
        n, max_q = g.rows.shape
        per_seq = g.blocks.shape[1] * k_pool.shape[1] * (row_bytes + 5 * max_q) + max_q * q[0].numel() * 2 * \
            q.element_size()
        step = max(1, CALL_BUDGET // per_seq)
        if g.whole and step >= n:  # plain decode in one call: no gather of q, no scatter of the output
            return _sdpa(q, g, None, k_pool, v_pool, scale).view(n, q.shape[1], dv)
        for lo in range(0, n, step):
            part = slice(lo, lo + step)
            o = _sdpa(q, g, part, k_pool, v_pool, scale).transpose(1, 2)  # [n', max_q, h, dv]
            out = q.new_zeros(q.shape[0], q.shape[1], dv) if out is None else out
            rows = g.rows[part]
            if max_q == 1:
                out.index_copy_(0, rows[:, 0], o[:, 0])
            else:
                keep = g.keep[part]  # type: ignore[index]
                out.index_copy_(0, rows[keep], o[keep])
    return q.new_zeros(q.shape[0], q.shape[1], dv) if out is None else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BatchContext, kind: str, layer: int,
              scale: float, kv_b_proj: torch.Tensor | None = None, **a) -> torch.Tensor:
    """torch_ref.attention's contract: store this step's K/V into the paged pool at ctx.slot_mapping,
    then causal attention of each sequence's queries; q [T, heads * dk] -> [T, heads * dv]."""
    plan, t, h = _plan(ctx), q.shape[0], a["heads"]
    if kind == "gqa":
        kvh, d = a["kv_heads"], a["head_dim"]
        k_cache, v_cache = ctx.kv[layer]
        _store(k_cache, plan, k.reshape(t, kvh, d))
        _store(v_cache, plan, v.reshape(t, kvh, d))
        if plan.prompt_len and plan.store_rows is None and k_cache.dtype == q.dtype:
            # whole prompts of one length, all stored: the keys are the step's own rows, no gather, no scatter
            n, L = t // plan.prompt_len, plan.prompt_len
            rows = lambda x, heads: x.reshape(t, heads, d).view(n, L, heads, d).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(rows(q, h), rows(k, kvh), rows(v, kvh), is_causal=True, scale=scale,
                                               enable_gqa=True)
            return o.transpose(1, 2).reshape(t, h * d)
        if plan.decode is not None:
            g = plan.groups[0]
            o = decode_kv.attend(q.reshape(t, h, d), k.reshape(t, kvh, d), v.reshape(t, kvh, d), (k_cache, v_cache),
                                 plan.decode, layer, fill=lambda pool: _gather(pool, g.blocks, g.pad, q.dtype),
                                 scale=scale)
            if o is not None:
                return o.reshape(t, h * d)
        o = _attend(q.reshape(t, h, d), k_cache, v_cache, plan, scale)
        return o.reshape(t, h * d)
    nope, rope_d, vd = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
    (cache,) = ctx.kv[layer]
    r = k.shape[-1]
    _store(cache, plan, torch.cat([k, v], dim=-1))
    w = kv_b_proj.to(q.dtype).view(h, nope + vd, r)
    qh = q.reshape(t, h, nope + rope_d)
    q_lat = torch.einsum("thn,hnr->thr", qh[..., :nope], w[:, :nope])
    # values are the whole entries (SDPA's flash kernel wants dv == dk); their k_rope part is dropped
    o = _attend(torch.cat([q_lat, qh[..., nope:]], dim=-1), cache.view(*cache.shape[:2], 1, cache.shape[-1]), None,
                plan, scale)
    return torch.einsum("thr,hvr->thv", o[..., :r], w[:, nope:]).reshape(t, h * vd)

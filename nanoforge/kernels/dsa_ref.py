"""Torch reference of DeepSeek Sparse Attention (ops `indexer` and `sparse_mla`) over the paged pool,
following transformers' DeepseekV32Indexer / DeepseekV32Attention (and GLM-5's) math: f32 scores,
relu per head, f32 head weights, top-k over the causal tokens; MLA expanded through kv_b_proj with the
unselected tokens masked out. torch_ref exposes both (the `torch` provider); other kernels are tested
against these.

A DSA layer's pool tensors (plan_memory, kernels/context.allocate_pool): `(entry, index_k)`, with
FP8 KV `(entry, index_k, entry_scale, index_k_scale)`, with FP8 indexer keys only (--index-kv-dtype fp8)
`(entry, index_k, index_k_scale)`; a GLM-5 layer without an indexer holds MLA's `(entry,)` /
`(entry, entry_scale)`. Token ids are positions in the sequence, -1 where a query has
fewer than topk tokens before it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8
from .context import BatchContext
from .rope_math import rope_frequencies_on


def dsa_pool(ctx: BatchContext, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                     torch.Tensor | None]:
    """(entry, entry scales, indexer keys, their scales) of one layer's pool; None where absent. As the
    other reference kernels do, the pool says what is quantized: the values come first, then one scale
    tensor per FP8 value, in order (n values with f of them FP8 make n + f tensors)."""
    t = ctx.kv[layer]
    n = next(n for n in range(1, len(t) + 1) if n + sum(x.dtype == fp8.FP8 for x in t[:n]) == len(t))
    rest = iter(t[n:])
    scales = [next(rest) if x.dtype == fp8.FP8 else None for x in t[:n]]
    return t[0], scales[0], (t[1] if n > 1 else None), (scales[1] if n > 1 else None)


def store(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, scale: torch.Tensor | None) -> None:
    """values [T, D] into pool rows `slots` (-1: skip); FP8 with a scale per token when `scale` is given.
    Indexed by (block, offset), not through a flat view: an FP8 pool's indexer keys and scales are strided
    views of one buffer (context.allocate_pool)."""
    keep = slots[slots >= 0]
    blk, off = keep // cache.shape[1], keep % cache.shape[1]
    rows = values[slots >= 0]
    if scale is None:
        cache[blk, off] = rows.to(cache.dtype)
        return
    q, s = fp8.quantize_kv(rows[:, None, :])
    cache[blk, off] = q[:, 0]
    scale[blk, off] = s


def read(cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows `slots` [L, D] in `dtype`, dequantized when the pool holds FP8 with scales."""
    blk, off = slots // cache.shape[1], slots % cache.shape[1]
    rows = cache[blk, off]
    if scale is None:
        return rows.to(dtype)
    return fp8.dequantize_kv(rows[:, None, :], scale[blk, off], dtype)[:, 0]


def rope_front(x: torch.Tensor, positions: torch.Tensor, heads: int, *, head_dim: int, rope_dim: int, style: str,
               theta: float, scaling: dict | None) -> torch.Tensor:
    """[T, heads, head_dim] with the FIRST rope_dim dims of each head rotated (the indexer's layout; the
    rope op rotates the last ones). Interleaved pairs come out de-interleaved, as transformers does."""
    inv_freq, attn_factor = rope_frequencies_on(rope_dim, theta, scaling, x.device)  # no copy per call: graphs
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * attn_factor).to(x.dtype)[:, None], (emb.sin() * attn_factor).to(x.dtype)[:, None]
    t = x.view(x.shape[0], heads, head_dim)
    r, keep = t[..., :rope_dim], t[..., rope_dim:]
    if style == "interleaved":
        r = torch.cat([r[..., 0::2], r[..., 1::2]], dim=-1)
    half = rope_dim // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    return torch.cat([r * cos + rotated * sin, keep], dim=-1)


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """f32[n, L]: per query, sum over heads h of weights[:, h] * relu(scale * q[:, h] . key) (q [n, H, D],
    keys [L, D], weights f32[n, H] with the 1/sqrt(H) already in), as transformers orders the math."""
    scores = F.relu(torch.matmul(q.float(), keys.float().t()) * scale)  # [n, H, L]
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


def select_topk(scores: torch.Tensor, first_pos: int, topk: int) -> torch.Tensor:
    """i32[n, topk]: the best `topk` of each query's causal tokens (query i at position first_pos + i),
    -1 padded; every causal token where there are at most topk of them."""
    n, length = scores.shape
    qpos = torch.arange(first_pos, first_pos + n, device=scores.device)[:, None]
    causal = torch.arange(length, device=scores.device)[None, :] <= qpos
    ids = scores.masked_fill(~causal, float("-inf")).topk(min(topk, length), dim=-1).indices
    ids = ids.masked_fill(ids > qpos, -1).to(torch.int32)
    return F.pad(ids, (0, topk - ids.shape[1]), value=-1)


def indexer(x, q, k, positions, weights_proj, k_norm, k_norm_bias, *, ctx: BatchContext, layer, heads, head_dim,
            rope_dim, style, theta, topk, scale, eps, scaling=None, **_):
    """Store this step's indexer keys, then each query's top-k token positions over its sequence."""
    rope = dict(head_dim=head_dim, rope_dim=rope_dim, style=style, theta=theta, scaling=scaling)
    q = rope_front(q, positions, heads, **rope)
    k = rope_front(F.layer_norm(k, (head_dim,), k_norm, k_norm_bias, eps), positions, 1, **rope)[:, 0]
    _, _, cache, cache_scale = dsa_pool(ctx, layer)
    store(cache, ctx.slot_mapping, k, cache_scale)
    weights = F.linear(x.to(weights_proj.dtype), weights_proj).float() * heads ** -0.5
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    for s in ctx.seqs:
        rows = slice(s.q_start, s.q_start + s.q_len)
        first = s.ctx_len - s.q_len
        if s.ctx_len <= topk:  # every query keeps all its tokens: dense, nothing to score
            out[rows] = select_topk(q.new_zeros(s.q_len, s.ctx_len, dtype=torch.float32), first, topk)
            continue
        keys = read(cache, ctx.context_slots(s), cache_scale, q.dtype)
        out[rows] = select_topk(index_scores(q[rows], keys, weights[rows], scale), first, topk)
    return out


def selected_mask(token_ids: torch.Tensor, length: int, first_pos: int) -> torch.Tensor:
    """bool[n, length]: the tokens each query attends to (its token ids, never after itself)."""
    n = token_ids.shape[0]
    ids = torch.where(token_ids < 0, length, token_ids.long())
    mask = torch.zeros(n, length + 1, dtype=torch.bool, device=token_ids.device).scatter_(1, ids, True)[:, :length]
    qpos = torch.arange(first_pos, first_pos + n, device=token_ids.device)[:, None]
    return mask & (torch.arange(length, device=token_ids.device)[None, :] <= qpos)


def sparse_mla(q, latent, k_rope, token_ids, kv_b_proj, *, ctx: BatchContext, layer, heads, qk_nope_head_dim,
               qk_rope_head_dim, v_head_dim, kv_lora_rank, scale, **_):
    """Store this step's MLA entries, then MLA per sequence over the selected tokens only."""
    h, nope, rope_d, vd, r = heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank
    cache, cache_scale, _, _ = dsa_pool(ctx, layer)
    store(cache, ctx.slot_mapping, torch.cat([latent, k_rope], dim=-1), cache_scale)
    out = []
    for s in ctx.seqs:
        rows = slice(s.q_start, s.q_start + s.q_len)
        entry = read(cache, ctx.context_slots(s), cache_scale, q.dtype)
        kv = F.linear(entry[:, :r], kv_b_proj).view(-1, h, nope + vd)
        ks = torch.cat([kv[..., :nope], entry[:, None, r:].expand(-1, h, rope_d)], dim=-1)
        qs = q[rows].view(-1, h, nope + rope_d)
        scores = torch.einsum("qhd,lhd->hql", qs, ks) * scale
        keep = selected_mask(token_ids[rows], s.ctx_len, s.ctx_len - s.q_len)
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        out.append(torch.einsum("hql,lhd->qhd", probs, kv[..., nope:]).reshape(s.q_len, h * vd))
    return torch.cat(out, dim=0) if out else q.new_zeros(0, h * vd)

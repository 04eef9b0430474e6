"""DeepSeek sparse attention in Triton: the indexer's scores over the paged key cache (then top-k with
torch.topk), and absorbed MLA over each query's selected tokens. `indexer` and `sparse_mla` have the
torch reference's signatures (kernels/dsa_ref.py) and read the same pool layout: (entry, index_k), with
FP8 KV (entry, index_k, entry_scale, index_k_scale), with FP8 indexer keys only (entry, index_k, index_k_scale).

Both kernels take one program per query row, so prefill chunks, decode rows and speculative verify
rows are all the same grid; a row's sequence comes from query_start by a binary search on the device
and its position from context_lens, so nothing is read on the host.

  * `index_scores`: grid (T, width / BLOCK_N), width = max_context_len rounded up to BLOCK_N. A
    program loads BLOCK_N keys of its sequence through the block table ([D, BLOCK_N]), dots every
    indexer head's query against them (tensor cores, f32 accumulation; bf16 products are exact in
    f32, as transformers' f32 matmul), relu(scale * qk) (FP8 keys: times their per-token scale
    first), weights the heads and sums them: one score per position, -inf past the row's position.
  * `sparse_latent_attention`: grid (T, heads / BLOCK_H). Walks the row's topk token ids in tiles of
    BLOCK_N (ids -1 masked), gathers [latent | k_rope] entries through the block table, online
    softmax in base 2 over q_lat . latent + q_rope . k_rope, accumulates probabilities x latent
    ([BLOCK_H, r]). W_uk is folded into the queries and W_uv applied after, as mla.mla_attention.
    A tile of ids costs the same whether the ids are near or far: the kernel reads topk entries per
    row whatever the context (dense rows below topk read their -1 padding masked).

Both are listed by the `triton` provider for CUDA plans and are graph safe: grids come from shapes and
ctx.max_context_len (a graph's is max_model_len), the indexer's rope frequencies are cached on the device
(rope_math.rope_frequencies_on). Checked against the torch reference in the interpreter
(tests/test_triton_dsa.py) and, gpu-marked, at real dims on CUDA; bench/dsa_decode.py times them. The top-k
is torch.topk over [T, width] f32 scores (DeepGEMM's MQA-logits kernels and a fused Triton top-k are next).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..dsa_ref import dsa_pool, rope_front
from ..fp8 import FP8
from .host_math import cdiv
from .kv_store import _pow2, store_kv

LOG2E = 1.4426950408889634


def row_positions(query_start: torch.Tensor, context_lens: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence of each flat-batch row, its position) on the device, without host reads."""
    t = torch.arange(rows, device=query_start.device, dtype=query_start.dtype)
    seq = torch.searchsorted(query_start[1:].contiguous(), t, right=True)
    return seq, (context_lens.long()[seq] - (query_start[1:].long()[seq] - t.long()))


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, pos_ptr, seq_ptr, bt_ptr, out_ptr, scale,
                         s_qt, s_qh, s_qd, s_wt, s_kb, s_ko, s_kd, s_ksb, s_kso, s_bt, s_ot, H, D,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                         KV_SCALED: tl.constexpr, DOT_PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK_N
    offs_n = start + tl.arange(0, BLOCK_N)
    qpos = tl.load(pos_ptr + t)
    out = out_ptr + t * s_ot + offs_n
    if start > qpos:
        tl.store(out, tl.full([BLOCK_N], float("-inf"), tl.float32))
        return
    ok = offs_n <= qpos
    b = tl.load(seq_ptr + t).to(tl.int64)
    page = tl.load(bt_ptr + b * s_bt + offs_n // BS, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + page[None, :] * s_kb + (offs_n % BS)[None, :] * s_ko + d[:, None] * s_kd,
                mask=ok[None, :] & (d[:, None] < D), other=0.0)
    h = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + t * s_qt + h[:, None] * s_qh + d[None, :] * s_qd, mask=(h[:, None] < H) & (d[None, :] < D),
                other=0.0)
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC)
    if KV_SCALED:
        s = s * tl.load(ks_ptr + page * s_ksb + (offs_n % BS) * s_kso, mask=ok, other=0.0)[None, :]
    s = tl.maximum(s * scale, 0.0)
    w = tl.load(w_ptr + t * s_wt + h, mask=h < H, other=0.0)
    tl.store(out, tl.where(ok, tl.sum(s * w[:, None], 0), float("-inf")))


def index_scores(q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                 rows: tuple[torch.Tensor, torch.Tensor], block_tables: torch.Tensor, *, width: int,
                 scale: float) -> torch.Tensor:
    """f32[T, width']: per row, sum over heads of weights * relu(scale * q . key) for its positions
    0 .. pos, -inf after (width' = width rounded up to the tile). q [T, H, D]; weights f32 [T, H];
    k_cache [NB, BS, D] (e4m3 with k_scale [NB, BS, 1]); rows = row_positions(...)."""
    T, H, D = q.shape
    BLOCK_N = 16 if q.device.type == "cpu" else 64
    width = max(BLOCK_N, cdiv(width, BLOCK_N) * BLOCK_N)
    out = torch.empty(T, width, device=q.device, dtype=torch.float32)
    if T == 0:
        return out
    scaled = k_scale is not None
    seq, pos = rows
    weights = weights.contiguous()
    _index_scores_kernel[(T, width // BLOCK_N)](
        q, weights, k_cache, k_scale if scaled else k_cache, pos, seq, block_tables, out, float(scale),
        *q.stride(), weights.stride(0), *k_cache.stride(), *(k_scale.stride()[:2] if scaled else (0, 0)),
        block_tables.stride(0), out.stride(0), H, D, BLOCK_H=max(16, _pow2(H)), BLOCK_D=max(16, _pow2(D)),
        BS=k_cache.shape[1], BLOCK_N=BLOCK_N, KV_SCALED=scaled,
        DOT_PREC="ieee" if q.dtype == torch.float32 else None, num_warps=4)
    return out


def select(scores: torch.Tensor, positions: torch.Tensor, topk: int) -> torch.Tensor:
    """i32[T, topk]: the best topk positions of each row (-1 where it has fewer tokens)."""
    ids = scores.topk(min(topk, scores.shape[1]), dim=-1).indices
    ids = ids.masked_fill(ids > positions[:, None], -1).to(torch.int32)
    return F.pad(ids, (0, topk - ids.shape[1]), value=-1)


@triton.jit
def _sparse_mla_kernel(q_ptr, c_ptr, cs_ptr, ids_ptr, seq_ptr, bt_ptr, o_ptr, qk_scale,
                       s_qt, s_qh, s_qd, s_cb, s_co, s_cd, s_csb, s_cso, s_it, s_bt, s_ot, s_oh, s_od, H, R, P, K,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BS: tl.constexpr,
                       BLOCK_N: tl.constexpr, KV_SCALED: tl.constexpr, DOT_PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b = tl.load(seq_ptr + t).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    hm = h[:, None] < H
    q_row = q_ptr + t * s_qt + h[:, None] * s_qh
    q_lat = tl.load(q_row + r[None, :] * s_qd, mask=hm & (r[None, :] < R), other=0.0)
    q_rope = tl.load(q_row + (R + p)[None, :] * s_qd, mask=hm & (p[None, :] < P), other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for start in range(0, K, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        tok = tl.load(ids_ptr + t * s_it + j, mask=j < K, other=-1)
        ok = tok >= 0
        tok = tl.where(ok, tok, 0)
        page = tl.load(bt_ptr + b * s_bt + tok // BS, mask=ok, other=0).to(tl.int64)
        row = page * s_cb + (tok % BS) * s_co
        lat = tl.load(c_ptr + row[:, None] + r[None, :] * s_cd, mask=ok[:, None] & (r[None, :] < R), other=0.0)
        rp = tl.load(c_ptr + row[:, None] + (R + p)[None, :] * s_cd, mask=ok[:, None] & (p[None, :] < P), other=0.0)
        if KV_SCALED:  # dequantized to the query dtype, as the reference reads the pool
            sc = tl.load(cs_ptr + page * s_csb + (tok % BS) * s_cso, mask=ok, other=0.0)
            lat = lat.to(tl.float32) * sc[:, None]
            rp = rp.to(tl.float32) * sc[:, None]
        lat = lat.to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(lat), input_precision=DOT_PREC)
        s = tl.dot(q_rope, tl.trans(rp.to(q_lat.dtype)), s, input_precision=DOT_PREC)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = tl.dot(pr.to(q_lat.dtype), lat, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + t * s_ot + h[:, None] * s_oh + r[None, :] * s_od, o.to(o_ptr.dtype.element_ty),
             mask=hm & (r[None, :] < R))


def sparse_latent_attention(q_full: torch.Tensor, cache: torch.Tensor, cache_scale: torch.Tensor | None,
                            token_ids: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor],
                            block_tables: torch.Tensor, *, r: int, scale: float) -> torch.Tensor:
    """[T, H, r]: absorbed MLA of q_full [T, H, r + rope] over the pool entries [NB, BS, r + rope]
    (e4m3 with cache_scale [NB, BS, 1]) of each row's token ids i32[T, K] (-1: none)."""
    T, H, width = q_full.shape
    out = q_full.new_empty(T, H, r)
    if T == 0:
        return out
    scaled = cache_scale is not None
    if scaled:
        assert cache.dtype == FP8, "an entry scale comes with an e4m3 pool"
    BLOCK_H = 16 if H <= 16 else 32
    K = token_ids.shape[1]
    _sparse_mla_kernel[(T, cdiv(H, BLOCK_H))](
        q_full, cache, cache_scale if scaled else cache, token_ids, rows[0], block_tables, out,
        float(scale) * LOG2E, *q_full.stride(), *cache.stride(),
        *(cache_scale.stride()[:2] if scaled else (0, 0)), token_ids.stride(0), block_tables.stride(0),
        *out.stride(), H, r, width - r, K, BLOCK_H=BLOCK_H, BLOCK_R=max(16, _pow2(r)),
        BLOCK_P=max(16, _pow2(width - r)), BS=cache.shape[1], BLOCK_N=16 if q_full.device.type == "cpu" else 32,
        KV_SCALED=scaled, DOT_PREC="ieee" if q_full.dtype == torch.float32 else None, num_warps=4)
    return out


def index_inputs(x, q, k, positions, weights_proj, k_norm, k_norm_bias, *, ctx, layer, heads, head_dim, rope_dim,
                 style, theta, eps, scaling=None):
    """What every indexer kernel starts from: this step's keys normed, roped and stored in the layer's
    index cache; returns (roped queries, f32 head weights [T, heads], the cache, its scales or None)."""
    rope = dict(head_dim=head_dim, rope_dim=rope_dim, style=style, theta=theta, scaling=scaling)
    qr = rope_front(q, positions, heads, **rope)
    kr = rope_front(F.layer_norm(k, (head_dim,), k_norm, k_norm_bias, eps), positions, 1, **rope)[:, 0]
    _, _, cache, cache_scale = dsa_pool(ctx, layer)
    store_kv(cache, None, kr, None, ctx.slot_mapping, k_scale=cache_scale)
    weights = F.linear(x.to(weights_proj.dtype), weights_proj).float() * heads ** -0.5
    return qr, weights, cache, cache_scale


def indexer(x, q, k, positions, weights_proj, k_norm, k_norm_bias, *, ctx, layer, heads, head_dim, rope_dim, style,
            theta, topk, scale, eps, scaling=None, **_):
    """torch_ref.indexer's contract: store this step's indexer keys, return each row's top-k positions."""
    qr, weights, cache, cache_scale = index_inputs(
        x, q, k, positions, weights_proj, k_norm, k_norm_bias, ctx=ctx, layer=layer, heads=heads, head_dim=head_dim,
        rope_dim=rope_dim, style=style, theta=theta, eps=eps, scaling=scaling)
    rows = row_positions(ctx.query_start, ctx.context_lens, q.shape[0])
    scores = index_scores(qr, weights, cache, cache_scale, rows, ctx.block_tables, width=ctx.max_context_len,
                          scale=scale)
    return select(scores, rows[1], topk)


def sparse_mla(q, latent, k_rope, token_ids, kv_b_proj, *, ctx, layer, heads, qk_nope_head_dim, qk_rope_head_dim,
               v_head_dim, kv_lora_rank, scale, attend=None, **_):
    """torch_ref.sparse_mla's contract, in absorbed form: W_uk folded into the queries, W_uv after.
    `attend`: another kernel for the latent attention, attend(q_full, cache, token_ids, rows, ctx, scale=)
    -> [T, H, r] (libs/flash_mla_sparse.py); None: sparse_latent_attention."""
    T, h, nope, vd, r = q.shape[0], heads, qk_nope_head_dim, v_head_dim, kv_lora_rank
    cache, cache_scale, _, _ = dsa_pool(ctx, layer)
    store_kv(cache, None, torch.cat([latent, k_rope], dim=-1), None, ctx.slot_mapping, k_scale=cache_scale)
    w = kv_b_proj.view(h, nope + vd, r).to(q.dtype)
    qh = q.reshape(T, h, nope + qk_rope_head_dim)
    q_lat = torch.bmm(qh[..., :nope].transpose(0, 1), w[:, :nope, :])  # [h, T, r]
    q_full = torch.cat([q_lat.transpose(0, 1), qh[..., nope:]], dim=-1).contiguous()
    rows = row_positions(ctx.query_start, ctx.context_lens, T)
    if attend is not None:
        o_lat = attend(q_full, cache, token_ids, rows, ctx, scale=scale)
    else:
        o_lat = sparse_latent_attention(q_full, cache, cache_scale, token_ids, rows, ctx.block_tables, r=r, scale=scale)
    return torch.bmm(o_lat.transpose(0, 1), w[:, nope:, :].transpose(1, 2)).transpose(0, 1).reshape(T, h * vd)

"""Torch reference implementation of every IR op: the ground truth every provider is tested
against. Written for clarity, not speed; runs on CPU (fp32/bf16) and on GPU.

Numerics follow HF transformers (fp32 norms and softmax, cast points) so that fp32 logits
match HF to ~1e-5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import NanoForgeError
from . import fp8
from .context import BatchContext
from .dsa_ref import indexer, sparse_mla  # noqa: F401  (DeepSeek sparse attention, in its own file)
from .hybrid_ref import gated_qk_norm_rope, gdn, offset_rms_norm, sigmoid_mul  # noqa: F401  (hybrid models' ops)
from .rope_math import rope_frequencies_on
from .vision_ref import (deepstack_add, gelu, layer_norm, merge_patches, mrope, patch_embed,  # noqa: F401
                         vision_attention, vision_embed, vision_pos_embed)  # (vision-language models' ops)


def embed(tokens, weight, vocab_parallel=None, ctx=None, **_):
    if vocab_parallel is None:
        return F.embedding(tokens, weight)
    ids, keep = local_token_ids(tokens, weight.shape[0], ctx, vocab_parallel)
    return F.embedding(ids, weight) * keep[..., None].to(weight.dtype)


def local_token_ids(tokens, rows: int, ctx, group: str):
    """(row in this rank's share of a vocab-parallel table, mask of the ids it holds): rank i of
    the group holds ids i*rows .. (i+1)*rows - 1; the others look up row 0 and are masked out."""
    comm = getattr(ctx, "comm", None)
    start = 0 if comm is None else comm.group_position(group)[0] * rows
    ids = tokens - start
    keep = (ids >= 0) & (ids < rows)
    return torch.where(keep, ids, torch.zeros_like(ids)), keep


def linear(x, weight, bias=None, weight_scale_inv=None, fp8_block=None, act_quant=0, **_):
    if weight_scale_inv is not None and act_quant:  # W8A8, as the FP8 GEMMs compute it
        return fp8.w8a8_linear(x, weight, weight_scale_inv, bias, group=act_quant)
    if weight_scale_inv is not None:  # block FP8 weights only: widened on the fly
        weight = fp8.dequantize(weight, weight_scale_inv, fp8_block, x.dtype)
    return F.linear(x, weight, bias)


def expert_weights(x, w_gate, w_up, w_down, attrs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' weights in x's dtype: block-FP8 ones (with `<slot>_scale_inv` in attrs) widened."""
    if attrs.get("w_gate_scale_inv") is None:
        return w_gate, w_up, w_down
    return tuple(fp8.dequantize(w, attrs[f"{name}_scale_inv"], attrs["fp8_block"], x.dtype)  # type: ignore
                 for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))


def add(a, b, **_):
    return a + b


def mul(a, b, **_):
    return a * b


def silu(x, **_):
    return F.silu(x)


def silu_mul(gate, up, **_):
    return F.silu(gate) * up


def rms_norm(x, weight, eps, group=None, **_):
    shape = x.shape
    if group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).reshape(shape)


def add_rms_norm(x, residual, weight, eps, **_):
    s = x + residual
    return rms_norm(s, weight, eps), s


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int,
            rotary_dim: int, style: str) -> torch.Tensor:
    """Rotate the last rotary_dim dims of each head (neox halves; interleaved pairs are first
    de-interleaved into halves, as HF does, which leaves q.k unchanged)."""
    t = x.reshape(x.shape[0], heads, head_dim)
    keep, r = t[..., : head_dim - rotary_dim], t[..., head_dim - rotary_dim:]
    if style == "interleaved":
        r = torch.cat([r[..., 0::2], r[..., 1::2]], dim=-1)
    half = rotary_dim // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], dim=-1)
    r = r * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([keep, r], dim=-1).reshape(x.shape)


def rope(q, k, positions, *, heads, kv_heads, q_head_dim, k_head_dim, rotary_dim, style, theta, scaling=None, **_):
    inv_freq, attn_factor = rope_frequencies_on(rotary_dim, theta, scaling, q.device)  # no copy per call: graphs
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * attn_factor).to(q.dtype), (emb.sin() * attn_factor).to(q.dtype)
    return (_rotate(q, cos, sin, heads, q_head_dim, rotary_dim, style),
            _rotate(k, cos, sin, kv_heads, k_head_dim, rotary_dim, style))


def qk_norm_rope(q, k, positions, q_norm, k_norm, eps, **attrs):
    q = rms_norm(q, q_norm, eps, group=attrs["q_head_dim"])
    k = rms_norm(k, k_norm, eps, group=attrs["k_head_dim"])
    return rope(q, k, positions, **attrs)


def qk_rope_store(q, k, v, positions, q_norm=None, k_norm=None, eps=None, *, layer, ctx: BatchContext, **attrs):
    """rope (after the per-head norms, when given) of q and k; this step's k and v into the layer's
    pool, as attention does when it stores them itself."""
    q, k = qk_norm_rope(q, k, positions, q_norm, k_norm, eps, **attrs) if q_norm is not None else \
        rope(q, k, positions, **attrs)
    _store_kv(ctx, layer, k, v, attrs["kv_heads"], attrs["k_head_dim"])
    return q, k


def split(x, sizes, **_):
    return tuple(torch.split(x, sizes, dim=-1))


def concat(a, b, **_):
    return torch.cat([a, b], dim=-1)


def _store(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """values [T, ...] into the pool rows `slots` (-1: skip); with `scale` (an FP8 pool's scales,
    [NB, BS, H]) each [T, H, D] entry is quantized per token and head as it is stored."""
    keep = slots >= 0
    flat = cache.view(-1, *cache.shape[2:])
    if scale is None:
        flat[slots[keep]] = values[keep].to(cache.dtype)
        return
    q, s = fp8.quantize_kv(values[keep].reshape(int(keep.sum()), scale.shape[-1], -1))
    flat[slots[keep]] = q.view(-1, *cache.shape[2:])
    scale.view(-1, scale.shape[-1])[slots[keep]] = s


def _store_kv(ctx: BatchContext, layer: int, k: torch.Tensor, v: torch.Tensor, kvh: int, d: int) -> None:
    """A GQA layer's new K and V rows into its pools (and their scales, FP8 KV)."""
    k_cache, v_cache, *scales = ctx.kv[layer]
    k_scale, v_scale = scales or (None, None)
    _store(k_cache, ctx.slot_mapping, k.reshape(-1, kvh, d), k_scale)
    _store(v_cache, ctx.slot_mapping, v.reshape(-1, kvh, d), v_scale)


def _read(cache: torch.Tensor, slots: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows `slots` in `dtype`, dequantized when the pool holds FP8 with scales."""
    rows = cache.view(-1, *cache.shape[2:])[slots]
    if scale is None:
        return rows.to(dtype)
    heads = scale.shape[-1]
    x = fp8.dequantize_kv(rows.reshape(len(slots), heads, -1), scale.view(-1, heads)[slots], dtype)
    return x.view(rows.shape)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_len: int, scale: float) -> torch.Tensor:
    """q [n, h, d], k/v [L, kvh, d*] (each kv head serves h/kvh query heads) -> [n, h, dv];
    query i sits at position ctx_len - n + i."""
    n, h, d = q.shape
    kvh = k.shape[1]
    qg = q.view(n, kvh, h // kvh, d)
    scores = torch.einsum("qkgd,lkd->kgql", qg, k) * scale
    if n > 1:
        qpos = torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(ctx_len, device=q.device)[None, :] > qpos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("kgql,lkd->qkgd", probs, v).reshape(n, h, -1)


def attention(q, k, v, *, ctx: BatchContext, kind, layer, scale, kv_b_proj=None, kv_stored=False, **a):
    """Write this step's K/V into the paged pool (unless qk_rope_store did), then causal attention
    per sequence."""
    out = []
    width = a["heads"] * (a["head_dim"] if kind == "gqa" else a["v_head_dim"])
    if kind == "gqa":
        h, kvh, d = a["heads"], a["kv_heads"], a["head_dim"]
        k_cache, v_cache, *scales = ctx.kv[layer]
        k_scale, v_scale = scales or (None, None)
        if not kv_stored:
            _store_kv(ctx, layer, k, v, kvh, d)
        for s in ctx.seqs:
            slots = ctx.context_slots(s)
            ks, vs = _read(k_cache, slots, k_scale, q.dtype), _read(v_cache, slots, v_scale, q.dtype)
            qs = q[s.q_start: s.q_start + s.q_len].view(-1, h, d)
            out.append(_attend(qs, ks, vs, s.ctx_len, scale).reshape(s.q_len, h * d))
    else:  # mla: the pool holds the normalized latent and the roped shared key per token
        h, nope, rope_d, vd = a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
        cache, *scales = ctx.kv[layer]
        entry_scale = scales[0] if scales else None
        _store(cache, ctx.slot_mapping, torch.cat([k, v], dim=-1), entry_scale)
        r = k.shape[-1]
        for s in ctx.seqs:
            entry = _read(cache, ctx.context_slots(s), entry_scale, q.dtype)
            kv = F.linear(entry[:, :r], kv_b_proj).view(-1, h, nope + vd)
            k_rope = entry[:, None, r:].expand(-1, h, rope_d)
            ks = torch.cat([kv[..., :nope], k_rope], dim=-1)
            qs = q[s.q_start: s.q_start + s.q_len].view(-1, h, nope + rope_d)
            out.append(_attend(qs, ks, kv[..., nope:], s.ctx_len, scale).reshape(s.q_len, h * vd))
    return torch.cat(out, dim=0) if out else q.new_zeros(0, width)  # an empty batch (an idle DP rank)


def select_experts(x, router, score_bias, *, num_experts, top_k, scoring, n_group=1, topk_group=1):
    """(unnormalised weights f32[T, k], expert ids [T, k]); every provider routes through this,
    so they all pick the same experts."""
    if scoring == "softmax":
        scores = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
        return torch.topk(scores, top_k, dim=-1)
    # sigmoid with a selection-only bias, limited to the best groups (DeepSeek-V3)
    scores = F.linear(x.float(), router.float()).sigmoid()
    choice = scores + (score_bias.float() if score_bias is not None else 0)
    t = x.shape[0]
    group_scores = choice.view(t, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1)
    mask = keep[:, :, None].expand(t, n_group, num_experts // n_group).reshape(t, num_experts)
    ids = choice.masked_fill(mask == 0, float("-inf")).topk(top_k, dim=-1)[1]
    return scores.gather(1, ids), ids


def _route(x, router, score_bias, *, num_experts, top_k, scoring, norm_topk_prob=False, n_group=1,
           topk_group=1, routed_scaling_factor=1.0, **_):
    """(weights f32[T, k], expert ids [T, k]) for each token."""
    weights, ids = select_experts(x, router, score_bias, num_experts=num_experts, top_k=top_k, scoring=scoring,
                                  n_group=n_group, topk_group=topk_group)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0))
    return weights * routed_scaling_factor, ids


def moe(x, router, w_gate, w_up, w_down, score_bias=None, **attrs):
    weights, ids = _route(x, router, score_bias, **attrs)
    return _experts(x, weights, ids, *expert_weights(x, w_gate, w_up, w_down, attrs), act_quant=_act_quant(attrs))


def _act_quant(attrs: dict) -> int:
    """The group of a W8A8 FP8 expert layer's activation quantization (0: weight-only or not FP8)."""
    return attrs.get("act_quant", 0) if attrs.get("w_gate_scale_inv") is not None else 0


def _experts(x, weights, ids, w_gate, w_up, w_down, *, first: int = 0, act_quant: int = 0):
    """Sum over each token's chosen experts of weight * SwiGLU; the params hold experts
    first .. first + len(w_gate) - 1 (ids outside them contribute nothing). With act_quant, the
    W8A8 experts' math: x and silu(g) * u quantized per token and act_quant columns before their GEMMs."""
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    aq = (lambda t: fp8.fake_quantize_activations(t, act_quant)) if act_quant else (lambda t: t)
    for e in ids.unique().tolist():
        if not first <= e < first + w_gate.shape[0]:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h, i = aq(x[tok]), e - first
        y = F.linear(aq(F.silu(F.linear(h, w_gate[i])) * F.linear(h, w_up[i])), w_down[i])
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def lm_head(x, rows, weight, **_):
    """Logits in the model's dtype, as HF computes them: greedy decoding takes the argmax as is (widening
    is exact and monotone), the sampler widens to f32; a [256, 152k] widening cost 0.12 ms a step."""
    return F.linear(x[rows], weight)


# -- tensor parallelism (passes/shard_tp.py): collectives over ctx.comm; no comm is a group of one
def all_reduce(x, group, ctx=None, **_):
    comm = getattr(ctx, "comm", None)
    return x if comm is None else comm.all_reduce(x, group)


def all_gather(x, group, dim, ctx=None, **_):
    comm = getattr(ctx, "comm", None)
    return x if comm is None else comm.all_gather(x, group, dim)


# -- expert parallelism (passes/shard_ep.py). Dispatch sends each token to the ranks that own one of
# its experts (all-to-all, variable counts: torch.distributed's all_to_all_single runs on gloo and
# NCCL), experts run on what arrived, combine sends the outputs back and sums them per token. A sent
# row packs the token, its routing weights and expert ids as bytes: one exchange of counts and one of
# rows per dispatch, one of rows per combine (its counts are the dispatch's, reversed). The exchange
# plan travels between the two as one i64 tensor: [T, recv counts (W), send counts (W), the token
# index of every sent row].
def _ep_position(ctx, group: str) -> tuple[int, int]:
    comm = getattr(ctx, "comm", None)
    return (0, 1) if comm is None else comm.group_position(group)


def ep_step_tokens(ctx, group: str, tokens: int, device: torch.device) -> int:
    """The most tokens any rank of the EP group has this step: the step header's (ctx.ep_tokens),
    else gathered from the group once per step (a host sync) and kept on the step's context."""
    most = getattr(ctx, "ep_tokens", None) or getattr(ctx, "_ep_gathered_tokens", None)
    if most is None:
        most = int(ctx.comm.all_gather(torch.tensor([tokens], device=device), group, 0).max())
        ctx._ep_gathered_tokens = most
    if most < tokens:
        raise NanoForgeError(f"an EP layer has {tokens} tokens on this rank, but the step holds at most {most} "
                             "per rank (a step's context reused with a larger batch)")
    return most


def _as_bytes(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.contiguous().view(torch.uint8).reshape(t.shape[0], math.prod(t.shape[1:]) * t.element_size())
                      for t in ts], dim=1)


def _from_bytes(rows: torch.Tensor, *like: tuple[torch.dtype, int]) -> list[torch.Tensor]:
    """Split packed rows back into (dtype, width) columns."""
    out, at = [], 0
    for dtype, width in like:
        n = width * torch.empty(0, dtype=dtype).element_size()
        out.append(rows[:, at:at + n].contiguous().view(dtype))
        at += n
    return out


def moe_dispatch(x, router, score_bias=None, *, ctx=None, group="ep", **attrs):
    weights, ids = _route(x, router, score_bias, **attrs)
    size = _ep_position(ctx, group)[1]
    if size == 1:
        return x, weights, ids, torch.tensor([x.shape[0], x.shape[0], x.shape[0], *range(x.shape[0])])
    owner = ids // (attrs["num_experts"] // size)
    hit = torch.zeros(x.shape[0], size, dtype=torch.bool, device=x.device).scatter_(1, owner, True)
    order = hit.t().nonzero()[:, 1]  # tokens for rank 0, then rank 1, ...
    send = hit.sum(0).tolist()
    rows, recv = ctx.comm.all_to_all(_as_bytes(x[order], weights[order], ids[order]), group, send)
    k = ids.shape[1]
    x_in, w_in, ids_in = _from_bytes(rows, (x.dtype, x.shape[1]), (weights.dtype, k), (ids.dtype, k))
    plan = torch.cat([torch.tensor([x.shape[0], *recv, *send]), order.cpu()])
    return x_in, w_in, ids_in, plan


def grouped_experts(x, weights, ids, w_gate, w_up, w_down, *, ctx=None, group="ep", **attrs):
    return _experts(x, weights, ids, *expert_weights(x, w_gate, w_up, w_down, attrs),
                    first=_ep_position(ctx, group)[0] * w_gate.shape[0], act_quant=_act_quant(attrs))


def moe_combine(y, plan, *, ctx=None, group="ep"):
    size = _ep_position(ctx, group)[1]
    if size == 1:
        return y
    plan = plan.tolist()
    tokens, recv, send, order = plan[0], plan[1:1 + size], plan[1 + size:1 + 2 * size], plan[1 + 2 * size:]
    back, _ = ctx.comm.all_to_all(y, group, recv, recv_counts=send)  # each row returns to the rank it came from
    return y.new_zeros(tokens, y.shape[-1]).index_add_(0, torch.tensor(order, dtype=torch.long, device=y.device), back)

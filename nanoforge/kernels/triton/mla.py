"""MLA in absorbed form over a paged [latent | k_rope] pool, for every provider whose MLA differs
only in the latent-space attention kernel (the Triton paged kernel, FlashMLA): the store, W_uk
folded into the queries, W_uv applied after, and the split of mixed steps whose prefill chunks run
the expanded form instead (mla_prefill.py)."""
from __future__ import annotations

import torch

from .. import mla_prefill
from .kv_store import store_kv


def mla_attention(q, k, v, ctx, *, layer: int, scale: float, kv_b_proj, a: dict, attend,
                  absorbed_max_q: int) -> torch.Tensor:
    """MLA in absorbed form: store [latent | k_rope] into the pool, fold W_uk into the queries, attend
    in latent space with `attend(q_full [T, h, r + rope], cache, r, ctx, scale) -> [T, h, r]`, then
    apply W_uv. Shared by the providers whose MLA differs only in that kernel (Triton, FlashMLA).
    An FP8 pool (cache, scale [NB, BS, 1]) stores the entry with one scale over [latent | k_rope] and
    passes attend `kv_scale=` (only _paged_latent takes FP8 pools). In eager steps with prefill chunks,
    those sequences run the expanded form instead (mla_prefill.py) and the other rows the absorbed one."""
    T = q.shape[0]
    h, nope, rope_d, vd = a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
    cache, *scales = ctx.kv[layer]
    r = k.shape[-1]
    if scales:  # the amax must cover the whole entry: store it in one piece
        store_kv(cache, None, torch.cat([k.reshape(T, r), v.reshape(T, -1)], dim=-1), None, ctx.slot_mapping,
                 k_scale=scales[0])
    else:
        store_kv(cache[:, :, None, :r], cache[:, :, None, r:], k.reshape(T, 1, r), v.reshape(T, 1, -1),
                 ctx.slot_mapping)
    w = kv_b_proj.view(h, nope + vd, r)

    def absorbed(q: torch.Tensor, ctx) -> torch.Tensor:
        T = q.shape[0]
        qh = q.reshape(T, h, nope + rope_d)
        q_lat = torch.bmm(qh[..., :nope].transpose(0, 1), w[:, :nope, :].to(q.dtype))  # [h, T, r]
        q_full = torch.cat([q_lat.transpose(0, 1), qh[..., nope:]], dim=-1)  # [T, h, r + rope]
        o_lat = (attend(q_full, cache, r, ctx, scale, kv_scale=scales[0]) if scales
                 else attend(q_full, cache, r, ctx, scale))
        o = torch.bmm(o_lat.transpose(0, 1), w[:, nope:, :].transpose(1, 2).to(q.dtype))  # [h, T, vd]
        return o.transpose(0, 1).reshape(T, h * vd)

    # steps with prefill chunks: those sequences in the expanded form on torch's fused SDPA (mla_prefill.py)
    split = mla_prefill.split_step(ctx, q, a, absorbed_max_q=absorbed_max_q)
    if split is None:
        return absorbed(q, ctx)
    return mla_prefill.run_split(q, split, absorbed, w=w.to(q.dtype), cache=cache,
                                 kv_scale=scales[0] if scales else None, scale=scale, nope=nope)

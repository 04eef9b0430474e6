"""FlashMLA (module flash_mla from sgl-flash-mla==1.0.0, or tokenspeed-flashmla==1.0.0.post20260429)
adapter: dense bf16 MLA decode over our MLA pool, absorbed form (as triton/attention.py's MLA path):
q [B, H, 576] = [q_nope @ W_uk (512) | q_rope (64)] attends to the pool entries
[latent (512) | k_rope (64)], V = the latent -> [B, H, 512].

On SM90 the dense kernel lives on the library's legacy side (use_legacy=True; gpu.md): head dim
576 (or 512), V dim 512, page size 64 only, q and cache of one dtype (bf16 / fp16).

Scheduling: flash_mla_with_kvcache fills an empty FlashMLASchedMeta on its first call with a device
kernel over cache_seqlens (no host sync) and reuses it on later calls. The split plan depends on
the lengths, so a meta is valid for one step: share one across the layers of a step (`new_schedule`),
never across steps. Inside a CUDA graph the metadata kernel is captured and reruns on replay.
Provider `flash_mla` (op attention): a decode-only step (every sequence one query row, as in every
captured decode graph) of an MLA layer with a bf16 pool of 64-token blocks runs the latent attention
here, and so do the decode rows of a mixed step (its prefill chunks run the expanded form,
kernels/mla_prefill.py); anything else (verify rows, GQA, other pool dtypes or block sizes) runs the
Triton provider's kernel. The KV store and the W_uk / W_uv absorption are the Triton provider's
(triton/mla.py mla_attention), so both paths share one pool layout and one set of numerics
around the kernel. plan_memory gives a plan with flash_mla 64-token blocks (Provider.block_sizes).
"""
from __future__ import annotations

import importlib.metadata

import torch

from . import FLASH_MLA, import_library, version_error

flash_mla = import_library(FLASH_MLA)
_ALT = ("tokenspeed-flashmla", "1.0.0.post20260429")  # the other build gpu.md checked


def _alt_version() -> str | None:
    try:
        return importlib.metadata.version(_ALT[0])
    except importlib.metadata.PackageNotFoundError:
        return None


if getattr(flash_mla, "__version__", None) != FLASH_MLA.version and _alt_version() != _ALT[1]:
    raise version_error(FLASH_MLA, getattr(flash_mla, "__version__", None) or _alt_version())
if not flash_mla.has_legacy():
    raise ImportError("flash_mla was built without its legacy kernels (FLASH_MLA_BUILD_LEGACY=0): "
                      "dense MLA decode on SM90 needs them")

__all__ = ["PAGE_SIZE", "new_schedule", "mla_decode", "takes", "attention"]

PAGE_SIZE = 64
V_DIM = 512


def new_schedule():
    """An empty scheduler meta: filled by the first mla_decode of a step, reused by its other layers."""
    return flash_mla.get_mla_metadata()[0]


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               scale: float, *, v_dim: int = V_DIM, sched=None, return_lse: bool = False):
    """Dense MLA decode. q [B, H, D] (or [B, s_q, H, D] for s_q speculative rows, which attend
    causally: row i sees positions < context_lens[b] - s_q + i + 1); cache [NB, 64, D] (our pool)
    or [NB, 64, 1, D]; block_tables int32 [B, max_blocks]; context_lens int32 [B] (this step's
    entries already stored). Returns out [B, H, v_dim] (or [B, s_q, H, v_dim]) and, with
    return_lse, the fp32 log-sum-exp [B, H, s_q]. V = cache[..., :v_dim]."""
    squeeze = q.dim() == 3
    if squeeze:
        q = q.unsqueeze(1)
    if cache.dim() == 3:
        cache = cache.unsqueeze(2)
    _, s_q, _, D = q.shape
    if cache.shape[1] != PAGE_SIZE:
        raise ValueError(f"flash_mla dense decode needs block_size {PAGE_SIZE}, the pool has {cache.shape[1]}")
    if cache.shape[-1] != D or D not in (576, 512) or v_dim != V_DIM:
        raise ValueError(f"flash_mla dense decode needs head dim 576 or 512 and v_dim 512; got q {D}, "
                         f"cache {cache.shape[-1]}, v_dim {v_dim}")
    if q.dtype != cache.dtype or q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"flash_mla dense decode needs q and cache of one dtype, bf16 or fp16; got {q.dtype}, "
                         f"{cache.dtype}")
    if not q.is_contiguous():  # the kernel's host code views q as [B, s_q, h_k, H / h_k, D]
        q = q.contiguous()
    out, lse = flash_mla.flash_mla_with_kvcache(
        q, cache, block_tables.to(torch.int32), context_lens.to(torch.int32).contiguous(), v_dim,
        sched if sched is not None else new_schedule(), softmax_scale=float(scale), causal=s_q > 1,
        use_legacy=True)
    if squeeze:
        out = out.squeeze(1)
    return (out, lse) if return_lse else out


def takes(ctx, kind: str, layer: int, k: torch.Tensor, rope_dim: int) -> bool:
    """Whether this step of an attention node runs on FlashMLA (else on the Triton kernel)."""
    return ctx.max_query_len == 1 and _fits(ctx, kind, layer, k, rope_dim)


def _fits(ctx, kind: str, layer: int, k: torch.Tensor, rope_dim: int) -> bool:
    """Whether FlashMLA's dense decode reads this layer's pool (MLA, 64-token pages, 16-bit, 512 + 64)."""
    if kind != "mla" or ctx.block_size != PAGE_SIZE:
        return False
    cache = ctx.kv[layer][0]
    return cache.dtype in (torch.bfloat16, torch.float16) and k.shape[-1] == V_DIM and cache.shape[-1] == V_DIM + rope_dim == 576


def _latent(q_full: torch.Tensor, cache: torch.Tensor, r: int, ctx, scale: float) -> torch.Tensor:
    """The step's schedule is made by the first layer's call and reused by the others; one per
    capture state, so the warm-up forward before a graph capture never hands the graph its meta."""
    key = ("flash_mla", q_full.is_cuda and torch.cuda.is_current_stream_capturing())
    sched = ctx.scratch.get(key)
    if sched is None:
        sched = ctx.scratch[key] = new_schedule()
    return mla_decode(q_full.to(cache.dtype), cache, ctx.block_tables, ctx.context_lens, scale, sched=sched)


def _latent_or_triton(q_full: torch.Tensor, cache: torch.Tensor, r: int, ctx, scale: float) -> torch.Tensor:
    """Decode-only rows (a decode step, or the decode rows mla_prefill split off a mixed step) on
    FlashMLA; rows of longer queries on the Triton kernel."""
    from ..triton.attention import _paged_latent

    if ctx.max_query_len != 1:
        return _paged_latent(q_full, cache, r, ctx, scale)
    return _latent(q_full, cache, r, ctx, scale)


def attention(q, k, v, *, ctx, kind, layer, scale, kv_b_proj=None, **a):
    """torch_ref.attention's contract: MLA layers whose pool FlashMLA reads run their decode rows here
    (prefill chunks: mla_prefill's expanded form), the rest on the Triton provider."""
    from ..triton.attention import MAX_DECODE_Q, attention as triton_attention
    from ..triton.mla import mla_attention

    if not _fits(ctx, kind, layer, k, a.get("qk_rope_head_dim", 0)):
        return triton_attention(q, k, v, ctx=ctx, kind=kind, layer=layer, scale=scale, kv_b_proj=kv_b_proj, **a)
    return mla_attention(q, k, v, ctx, layer=layer, scale=scale, kv_b_proj=kv_b_proj, a=a, attend=_latent_or_triton,
                         absorbed_max_q=MAX_DECODE_Q)

"""FlashMLA (module flash_mla from sgl-flash-mla==1.0.0) adapter for DeepSeek sparse attention: op
`sparse_mla` (DeepSeek-V3.2, GLM-5) on the library's SM90 sparse kernel, absorbed form as
triton/dsa.py: q [T, H, 576] = [q_nope @ W_uk (512) | q_rope (64)] attends to the pool entries
[latent (512) | k_rope (64)] of each row's selected tokens, V = the latent -> [T, H, 512], W_uv after.

Which kernel, and why (read in the wheel: flash_mla_interface.py and the legacy extension's checks):
  * flash_mla_with_kvcache(indices=...), the sparse *decode* kernel, reads FP8 KV only, in DeepSeek's
    656-byte V3.2 layout per token (512 e4m3 + 4 f32 tile scales + 64 bf16 rope; kv_format V32). Our
    pool holds bf16 [latent | rope] entries, or with --kv-dtype fp8 e4m3 entries with one scale per
    token: neither is that layout, and converting the pool each step would read all of it.
  * flash_mla_sparse_fwd(use_legacy=True), the sparse *prefill* kernel (upstream's sm90 phase1: B_H 64,
    B_TOPK 64), reads bf16 rows [s_kv, h_kv, 576] by flat index. Our bf16 pool [NB, BS, 576] is exactly
    that viewed as [NB * BS, 1, 576], so it serves prefill chunks, decode rows and verify rows alike
    (one query row per kernel row, as the Triton kernel), over any block size. Constraints (checked
    there): q bf16 [s_q, h_q, 576] with h_q 64 or 128 and heads contiguous, kv bf16, indices i32
    [s_q, 1, topk] with topk a multiple of 64, -1 (or >= s_kv) for none, d_v 512.
It has no scheduler metadata and reads nothing on the host: one launch on shapes fixed by the batch,
so decode runs in CUDA graphs. Heads are padded to 64 / 128 (more than 128: chunks of 128), the
row's token ids become flat pool rows (dsa_layouts.token_slots) padded with -1 to a multiple of 128
(DeepSeek's 2048 needs none).

Provider `flash_mla_sparse` (op sparse_mla): bf16 plans whose MLA entry is latent 512 + rope 64 run
here; anything else (other dims or dtypes, FP8 KV, no SM90) runs the Triton provider's kernel, which
also stores the step's entries and does the W_uk / W_uv absorption here, so both paths share one pool
layout and one set of numerics around the kernel.
"""
from __future__ import annotations

import importlib.metadata

import torch

from ..dsa_layouts import kernel_heads, pad_heads, token_slots
from . import FLASH_MLA, import_library, version_error

flash_mla = import_library(FLASH_MLA)
_ALT = ("tokenspeed-flashmla", "1.0.0.post20260429")  # the other build gpu.md checked (as flash_mla_decode.py)


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if getattr(flash_mla, "__version__", None) != FLASH_MLA.version and _installed(_ALT[0]) != _ALT[1]:
    raise version_error(FLASH_MLA, getattr(flash_mla, "__version__", None) or _installed(_ALT[0]))
if not flash_mla.has_legacy():
    raise ImportError("flash_mla was built without its legacy kernels (FLASH_MLA_BUILD_LEGACY=0): "
                      "the SM90 sparse kernel is one of them")
if not hasattr(flash_mla, "flash_mla_sparse_fwd"):
    raise ImportError("flash_mla has no flash_mla_sparse_fwd: NanoForge needs sgl-flash-mla==1.0.0")

__all__ = ["LATENT", "ROPE", "TOPK_TILE", "HEADS", "takes", "sparse_attend", "sparse_mla"]

LATENT, ROPE = 512, 64  # the only entry the sm90 kernel instantiates with a separate V: d_qk 576, d_v 512
TOPK_TILE = 128  # the sm90 kernel tiles top-k by 64 (B_TOPK); 128 also fits its 128-wide variants (2048: as is)
HEADS = (64, 128)


def takes(ctx, layer: int, q_dtype: torch.dtype, kv_lora_rank: int, rope_dim: int) -> bool:
    """Whether this node runs on FlashMLA's sparse kernel (else on the Triton kernel)."""
    cache = ctx.kv[layer][0]
    return (q_dtype == torch.bfloat16 and cache.dtype == torch.bfloat16
            and kv_lora_rank == LATENT and rope_dim == ROPE and cache.shape[-1] == LATENT + ROPE
            and cache.is_contiguous())


def sparse_attend(q_full: torch.Tensor, cache: torch.Tensor, token_ids: torch.Tensor, rows, ctx, *,
                  scale: float) -> torch.Tensor:
    """[T, H, 512]: q_full bf16 [T, H, 576] over the bf16 pool [NB, BS, 576] at each row's token ids
    i32[T, K] (-1: none); rows = (sequence of each row, its position), as triton/dsa.row_positions."""
    T, H, D = q_full.shape
    if T == 0:
        return q_full.new_empty(0, H, LATENT)
    kv = cache.view(-1, 1, D)
    idx = token_slots(token_ids, rows[0], ctx.block_tables, cache.shape[1], TOPK_TILE).unsqueeze(1)
    outs = []
    for h0 in range(0, H, HEADS[-1]):  # more heads than the kernel's largest count: chunks of it
        part = q_full[:, h0:h0 + HEADS[-1]]
        n = part.shape[1]
        q = pad_heads(part, kernel_heads(n, HEADS))
        out = flash_mla.flash_mla_sparse_fwd(q, kv, idx, float(scale), LATENT, use_legacy=True)[0]
        outs.append(out[:, :n])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def sparse_mla(q, latent, k_rope, token_ids, kv_b_proj, *, ctx, layer, heads, qk_nope_head_dim, qk_rope_head_dim,
               v_head_dim, kv_lora_rank, scale, **a):
    """torch_ref.sparse_mla's contract: FlashMLA's sparse kernel where it fits, the Triton provider otherwise."""
    from ..triton.dsa import sparse_mla as triton_sparse_mla

    fits = takes(ctx, layer, q.dtype, kv_lora_rank, qk_rope_head_dim)
    return triton_sparse_mla(q, latent, k_rope, token_ids, kv_b_proj, ctx=ctx, layer=layer, heads=heads,
                             qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                             v_head_dim=v_head_dim, kv_lora_rank=kv_lora_rank, scale=scale,
                             attend=sparse_attend if fits else None, **a)

"""The layouts third-party DeepSeek-sparse-attention kernels read, built from ours in plain torch (no
library import, so they are checked on the CPU; kernels/libs/flash_mla_sparse.py and
kernels/libs/deep_gemm_indexer.py call them on the GPU). Every function is a few device ops on shapes
fixed by the batch, with no host read: safe inside a captured CUDA graph.

  * `token_slots`: FlashMLA's sparse kernels take, per query row, the flat rows of the KV pool to attend
    to (pool [NB, BS, D] viewed as [NB * BS, D]): block_table[seq, tok // BS] * BS + tok % BS, -1 for
    none, padded with -1 to the kernel's top-k tile.
  * `pad_heads`: both libraries instantiate a few head counts only (FlashMLA 64 / 128, DeepGEMM 32 / 64);
    fewer heads (DeepSeek-V3.2 at TP8, tiny test models) run padded with zero rows, sliced off after.
  * `fp8_index_queries`: DeepGEMM's MQA logits take the indexer queries in e4m3 without scales. As
    DeepSeek's inference code does, each (token, head) row is quantized with its own scale and that
    scale is folded into the head weight with the softmax scale: relu is positively homogeneous, so
    w * relu(scale * q . k) = (w * q_scale * scale) * relu(q_fp8 . k).
  * `alloc_index_keys` / `fused_index_cache`: an FP8 DSA pool keeps each block's indexer keys and their
    f32 scales in one buffer, [BS x D e4m3 | BS x f32] (DeepGEMM's paged "fused" KV cache). The pool
    hands out the two parts as ordinary strided tensors ([NB, BS, D], [NB, BS, 1]), so every other
    kernel reads them through strides as before; `fused_index_cache` gives DeepGEMM the uint8 view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import FP8, quantize_activations


def token_slots(token_ids: torch.Tensor, seq: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                multiple: int = 1) -> torch.Tensor:
    """i32[T, K'] flat pool rows of each row's token ids i32[T, K] (-1: none), row t belonging to sequence
    seq[t] of block_tables i32[B, max_blocks]; K' = K rounded up to `multiple`, the extra columns -1."""
    T, K = token_ids.shape
    tok = token_ids.long()
    valid = tok >= 0
    tok = tok.clamp(min=0)
    table = block_tables if block_tables.is_contiguous() else block_tables.contiguous()
    width = table.shape[1]
    blk = (tok // block_size).clamp(max=width - 1)  # never read past a row of the table
    page = table.view(-1)[seq.long()[:, None] * width + blk].long()
    slots = torch.where(valid & (page >= 0), page * block_size + tok % block_size, -1)
    pad = -K % multiple
    return F.pad(slots, (0, pad), value=-1).to(torch.int32) if pad else slots.to(torch.int32)


def pad_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x [T, H, ...] with zero rows appended to `heads` heads (x itself when it has that many), contiguous."""
    H = x.shape[1]
    if H == heads:
        return x.contiguous()
    assert H < heads, f"{H} heads do not fit a kernel of {heads}"
    out = x.new_zeros(x.shape[0], heads, *x.shape[2:])
    out[:, :H] = x
    return out


def kernel_heads(heads: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of a kernel's head counts `sizes` that holds `heads`, None when none does."""
    return next((s for s in sorted(sizes) if heads <= s), None)


def fp8_index_queries(q: torch.Tensor, weights: torch.Tensor, scale: float,
                      heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [T, heads, D], f32 [T, heads]) from the indexer's roped queries q [T, H, D] and head weights
    f32 [T, H]: each (token, head) row scaled by its own amax / 448, that scale and the softmax `scale`
    moved into the weight; padded heads get zero queries and zero weights."""
    T, H, D = q.shape
    q8, q_scale = quantize_activations(q.float().reshape(T * H, D), group=D)
    w = weights.float() * q_scale.view(T, H) * scale
    return pad_heads(q8.view(T, H, D), heads), pad_heads(w, heads)


def alloc_index_keys(num_blocks: int, block_size: int, dim: int,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(keys e4m3 [NB, BS, D], scales f32 [NB, BS, 1]) sharing one zeroed buffer, per block the BS x D
    values then the BS scales (DeepGEMM's fused paged layout); the scales start at 1, as the pool's do."""
    assert dim % 4 == 0, "f32 scales after the values need a 4-byte aligned row"
    row = block_size * (dim + 4)
    buf = torch.zeros(num_blocks, row, dtype=torch.uint8, device=device)
    keys = buf[:, :block_size * dim].view(FP8).view(num_blocks, block_size, dim)
    scales = buf[:, block_size * dim:].view(torch.float32).view(num_blocks, block_size, 1)
    scales.fill_(1.0)
    return keys, scales


def fused_index_cache(keys: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """uint8 [NB, BS, 1, D + 4] over the buffer `alloc_index_keys` made (the view DeepGEMM's paged MQA
    logits take), or None when keys and scales are not laid out that way."""
    if keys.dtype != FP8 or scales.dtype != torch.float32 or keys.dim() != 3:
        return None
    nb, bs, d = keys.shape
    row = bs * (d + 4)
    fused = keys.stride() == (row, d, 1) and scales.shape == (nb, bs, 1) and scales.stride()[:2] == (row // 4, 1) \
        and scales.data_ptr() == keys.data_ptr() + bs * d
    if not fused:
        return None
    return torch.empty(0, dtype=torch.uint8, device=keys.device).set_(
        keys.untyped_storage(), keys.storage_offset(), (nb, bs, 1, d + 4), (row, d + 4, d + 4, 1))

"""DeepGEMM (module deep_gemm from tokenspeed-deepgemm==2.5.0.post20260424) adapter for DeepSeek
sparse attention's lightning indexer: op `indexer` (DeepSeek-V3.2, GLM-5) scores a decode step's rows
on fp8_paged_mqa_logits, the kernel DeepSeek's own inference runs, then torch.topk as the Triton path.

What the pinned wheel takes (its _C.pyi and host checks; its SM90 path): q e4m3 [B, next_n, H, D] with
H 32 or 64 and D 128, no q scales; the paged key cache as one uint8 tensor [NB, 64, 1, D + 4] whose
blocks hold 64 x D e4m3 values then 64 f32 scales (64-token pages only on SM90); weights f32
[B * next_n, H]; context_lens i32 [B, next_n] (the metadata helper asserts 2-D); the schedule from
get_paged_mqa_logits_metadata(context_lens, 64, num_sms), int32 [num_sms + 1, 2]. It returns f32
logits [B * next_n, max_context_len] = sum_h w[h] * relu(q[h] . k * k_scale), unwritten past each
row's length (paged cleaning is not supported: masked here).

So the keys must be FP8 with a scale per token in that fused layout: the DSA pool of a --kv-dtype fp8 or
--index-kv-dtype fp8 plan (the latter with bf16 latents beside, for FlashMLA's sparse kernel) is allocated
so (context.allocate_pool, dsa_layouts.alloc_index_keys); a bf16 pool's keys are not FP8 and run the
Triton kernel. The queries are quantized per (token, head) with the scale folded into
the head weights together with the softmax scale (dsa_layouts.fp8_index_queries; as DeepSeek's
inference code does): the scores differ from the reference's by the e4m3 rounding of q, so near-ties
in the top-k may pick other tokens than the bf16 queries would.

Provider `deep_gemm_indexer` (op indexer): decode-only steps (one row per sequence, as every captured
decode graph) of an FP8 DSA pool with 64-token blocks, index head dim 128 and at most 64 heads (padded
to 32 / 64 with zero weights). Everything else, and the key store, is the Triton provider's. Graph
safe: the metadata kernel and the logits kernel launch on device data; DeepGEMM JIT-compiles a shape
on first use, which the runtime's warm-up forward does outside the capture.
"""
from __future__ import annotations

import torch

from ..dsa_layouts import fp8_index_queries, fused_index_cache, kernel_heads
from . import DEEP_GEMM, import_library, version_error

deep_gemm = import_library(DEEP_GEMM)
if (_err := version_error(DEEP_GEMM, getattr(deep_gemm, "__version__", None))) is not None:
    raise _err
if not all(hasattr(deep_gemm, f) for f in ("fp8_paged_mqa_logits", "get_paged_mqa_logits_metadata", "get_num_sms")):
    raise ImportError("deep_gemm has no fp8_paged_mqa_logits / get_paged_mqa_logits_metadata (built for CUDA < 12.1?)")

__all__ = ["BLOCK", "HEAD_DIM", "HEADS", "takes", "index_logits", "indexer"]

BLOCK = 64  # SM90 pages
HEAD_DIM = 128
HEADS = (32, 64)


def takes(ctx, layer: int, heads: int, head_dim: int, rows: int) -> bool:
    """Whether this step of an indexer node scores on DeepGEMM (else on the Triton kernel)."""
    from ..dsa_ref import dsa_pool

    _, _, keys, scales = dsa_pool(ctx, layer)
    return (ctx.max_query_len == 1 and ctx.block_size == BLOCK and head_dim == HEAD_DIM and keys is not None
            and kernel_heads(heads, HEADS) is not None and scales is not None
            and rows == ctx.context_lens.shape[0] and fused_index_cache(keys, scales) is not None)


def index_logits(q8: torch.Tensor, weights: torch.Tensor, fused: torch.Tensor, context_lens: torch.Tensor,
                 block_tables: torch.Tensor, width: int) -> torch.Tensor:
    """f32[B, width]: per decode row, its scores at positions 0 .. len - 1, -inf after. q8 e4m3 [B, H, D]
    (H in HEADS), weights f32 [B, H], fused = dsa_layouts.fused_index_cache, context_lens i32 [B]."""
    lens = context_lens.to(torch.int32).view(-1, 1).contiguous()
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens, BLOCK, deep_gemm.get_num_sms())
    logits = deep_gemm.fp8_paged_mqa_logits(q8.unsqueeze(1).contiguous(), fused, weights.contiguous(), lens,
                                            block_tables.to(torch.int32), meta, width, False)
    valid = torch.arange(width, device=lens.device)[None, :] < lens
    return logits[:, :width].masked_fill(~valid, float("-inf"))


def indexer(x, q, k, positions, weights_proj, k_norm, k_norm_bias, *, ctx, layer, heads, head_dim, rope_dim, style,
            theta, topk, scale, eps, scaling=None, **a):
    """torch_ref.indexer's contract: DeepGEMM's paged MQA logits for decode steps over FP8 keys, else Triton."""
    from ..triton.dsa import index_inputs, indexer as triton_indexer, select

    if not takes(ctx, layer, heads, head_dim, q.shape[0]):
        return triton_indexer(x, q, k, positions, weights_proj, k_norm, k_norm_bias, ctx=ctx, layer=layer, heads=heads,
                              head_dim=head_dim, rope_dim=rope_dim, style=style, theta=theta, topk=topk, scale=scale,
                              eps=eps, scaling=scaling, **a)
    qr, weights, keys, scales = index_inputs(
        x, q, k, positions, weights_proj, k_norm, k_norm_bias, ctx=ctx, layer=layer, heads=heads, head_dim=head_dim,
        rope_dim=rope_dim, style=style, theta=theta, eps=eps, scaling=scaling)
    q8, w = fp8_index_queries(qr, weights, scale, kernel_heads(heads, HEADS))
    scores = index_logits(q8, w, fused_index_cache(keys, scales), ctx.context_lens, ctx.block_tables,
                          ctx.max_context_len)
    return select(scores, ctx.context_lens.long() - 1, topk)

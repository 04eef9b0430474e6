"""DeepGEMM (module deep_gemm from tokenspeed-deepgemm==2.5.0.post20260424) adapters: `linear`
for the provider table (bf16_gemm_nt), and an m-grouped contiguous MoE expert path
(m_grouped_bf16_gemm_nt_contiguous); its benchmark against triton/moe.py's shapes is
bench/kernels/libs.py's bench_deep_gemm_grouped.

DeepGEMM JIT-compiles each kernel config with nvcc on first use (~3.5 s; cached on disk): the first
call of a new shape must run outside CUDA-graph capture (the runtime's warm-up does that). After
that a call is host-side config lookup + TMA descriptors + one launch: no host sync, graph safe.

SM90 bf16 constraints (asserts in deep_gemm's host code): A/B bf16, D bf16 (no C accumulation),
K % 64 == 0, 16-byte aligned rows (N % 8 == 0). Anything else falls back to torch (cuBLAS).

Block FP8 (a plan's W8A8 linears, attr act_quant=128): fp8_gemm_nt((x_fp8, x_scale), (w, w_scale_inv), d)
with x quantized per token and 128 columns by triton/fp8_gemm.py's kernel and the checkpoint's f32
128x128 weight scales as they are (SM90: disable_ue8m0_cast). On an H100 (bench/results/fp8/) its
output equals the Triton W8A8 GEMM's to 1e-4 and it runs DeepSeek-V3's linears at 0.75-1.9x bf16
cuBLAS, up to 1.3 PFLOP/s. Shapes it is not checked on (K % 128, N % 64, non-bf16 x) go to the
Triton W8A8 GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import DEEP_GEMM, import_library, version_error

deep_gemm = import_library(DEEP_GEMM)
if (_err := version_error(DEEP_GEMM, getattr(deep_gemm, "__version__", None))) is not None:
    raise _err

__all__ = ["linear", "gemm_ok", "grouped_experts", "moe"]


def gemm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether bf16_gemm_nt takes x [.., K] @ weight [N, K].T as is."""
    n, k = weight.shape
    return (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and weight.stride(-1) == 1
            and weight.stride(0) == k and k % 64 == 0 and n % 8 == 0 and x.numel() > 0)


def fp8_gemm_ok(x: torch.Tensor, weight: torch.Tensor, act_quant: int) -> bool:
    """Whether fp8_gemm_nt takes this W8A8 linear (the shapes and dtypes it was checked on)."""
    n, k = weight.shape
    return (x.is_cuda and act_quant == 128 and weight.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16
            and k % 128 == 0 and n % 64 == 0 and torch.cuda.get_device_capability(x.device) == (9, 0))


def _fp8_linear(x, weight, scale, bias):
    from ..triton.fp8_gemm import quantize_activations

    n, k = weight.shape
    a = x.reshape(-1, k)
    d = torch.zeros(a.shape[0], n, dtype=torch.bfloat16, device=x.device)
    if a.shape[0]:  # an idle EP rank's empty batch launches nothing
        deep_gemm.fp8_gemm_nt(quantize_activations(a), (weight, scale), d, disable_ue8m0_cast=True)
    if bias is not None:
        d += bias
    return d.view(*x.shape[:-1], n)


def linear(x, weight, bias=None, weight_scale_inv=None, fp8_block=None, act_quant=0, **_):
    """torch_ref.linear (F.linear) via deep_gemm.bf16_gemm_nt(a [M, K], b [N, K], d [M, N]); the bias
    is added after the GEMM (DeepGEMM's C operand is a full fp32 [M, N] tensor, not a row). A block-FP8
    weight: fp8_gemm_nt where it applies, else the Triton provider's FP8 linear."""
    if weight_scale_inv is not None:
        if fp8_gemm_ok(x, weight, act_quant):
            return _fp8_linear(x, weight, weight_scale_inv, bias)
        from ..triton.gemv import linear as triton_linear

        return triton_linear(x, weight, bias, weight_scale_inv=weight_scale_inv, fp8_block=fp8_block,
                             act_quant=act_quant)
    if not gemm_ok(x, weight):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    a = x.reshape(-1, k)
    if not a.is_contiguous():
        a = a.contiguous()
    d = torch.empty(a.shape[0], n, dtype=x.dtype, device=x.device)
    deep_gemm.bf16_gemm_nt(a, weight, d)
    if bias is not None:
        d += bias
    return d.view(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# MoE experts over the m-grouped contiguous layout
# ---------------------------------------------------------------------------------------------
def _grouped(a: torch.Tensor, w: torch.Tensor, m_idx: torch.Tensor) -> torch.Tensor:
    d = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w, d, m_idx)
    return d


def contiguous_layout(ids: torch.Tensor, num_experts: int):
    """(rows, m_idx, pair_row): the (token, slot) pairs sorted by expert into segments aligned to
    get_mk_alignment_for_contiguous_layout(), in a buffer of static worst-case size (so no host sync):
    rows [M] = pair id per row (-1 for padding), m_idx int32 [M] = expert per row (-1 for padding:
    DeepGEMM skips a block whose first row is -1; valid rows lead each segment), pair_row [T*top_k]
    = the row of each pair. Reuses the Triton provider's moe_align (device-side, graph safe)."""
    from ..triton.moe import moe_align

    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    n = ids.numel()
    sorted_ids, expert_ids, _ = moe_align(ids, num_experts, align)
    block_e = expert_ids.repeat_interleave(align)  # -1 past the last segment (sorted_ids unset there)
    valid = (block_e >= 0) & (sorted_ids >= 0) & (sorted_ids < n)
    rows = torch.where(valid, sorted_ids, -1)
    m_idx = torch.where(valid, block_e, -1).to(torch.int32).contiguous()
    inv = torch.empty(n + 1, dtype=torch.long, device=ids.device)  # slot n collects the padding rows
    inv.scatter_(0, torch.where(valid, sorted_ids, n).long(), torch.arange(rows.numel(), device=ids.device))
    return rows, m_idx, inv[:n]


def grouped_experts(x, weights, ids, w_gate, w_up, w_down, *, num_experts, renormalize=False, norm_eps=0.0,
                    scale=1.0, w13=None):
    """triton moe.fused_experts' contract on DeepGEMM: sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
    w = weights (/ (sum + norm_eps) if renormalize) * scale rounded to x.dtype. x [T, H] bf16,
    w_gate/w_up [E, I, H], w_down [E, H, I]; w13 = cat([w_gate, w_up], 1) runs gate+up as one GEMM."""
    T, H = x.shape
    top_k = ids.shape[1]
    I = w_gate.shape[1]
    if T == 0:
        return torch.zeros_like(x)
    rows, m_idx, pair_row = contiguous_layout(ids, num_experts)
    a = x.index_select(0, torch.where(rows >= 0, rows // top_k, 0))
    if w13 is not None:
        gu = _grouped(a, w13, m_idx)
        g, u = gu[:, :I], gu[:, I:]
    else:
        g, u = _grouped(a, w_gate, m_idx), _grouped(a, w_up, m_idx)
    y = _grouped((F.silu(g) * u).contiguous(), w_down, m_idx)  # rows of skipped blocks hold garbage, never read
    w = weights.float()
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + norm_eps)
    w = (w * scale).to(x.dtype)
    yp = y.index_select(0, pair_row).view(T, top_k, H)
    return (yp.float() * w.float()[..., None]).sum(1).to(x.dtype)


def moe(x, router, w_gate, w_up, w_down, score_bias=None, *, num_experts, top_k, scoring, norm_topk_prob=False,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, **_):
    """torch_ref.moe's contract: the Triton provider's routing (bit-identical to the reference),
    DeepGEMM grouped GEMMs for the experts. Not registered as a provider op (see providers.py)."""
    from ..triton.moe import select_experts

    weights, ids = select_experts(x, router, score_bias, num_experts=num_experts, top_k=top_k, scoring=scoring,
                                  n_group=n_group, topk_group=topk_group)
    return grouped_experts(x, weights, ids, w_gate, w_up, w_down, num_experts=num_experts,
                           renormalize=norm_topk_prob, norm_eps=1e-20 if scoring == "sigmoid" else 0.0,
                           scale=routed_scaling_factor)

"""DeepGEMM (module deep_gemm from tokenspeed-deepgemm==2.5.0.post20260424) adapters for the
provider table: `linear` (bf16_gemm_nt, fp8_gemm_nt) and the MoE experts `moe` / `grouped_experts`
(m-grouped GEMMs). Benchmarks: bench/kernels/libs.py's bench_deep_gemm_grouped (bf16, against
triton/moe.py's shapes) and bench_deep_gemm_fp8_grouped (block FP8, DeepSeek-V3's experts).

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

MoE experts (ops `moe` and `grouped_experts`, the Triton provider's contracts; bf16 or block-FP8
experts). bf16: m_grouped_bf16_gemm_nt_contiguous. Block FP8 (DeepSeek-V3's e4m3 experts with f32
128x128 `w_*_scale_inv`) in a W8A8 plan (attr act_quant=128, as for linears): x quantized once per
token and 128 columns, h = silu(g) * u quantized the same way before the down GEMM, the checkpoint's
scales as stored, on m_grouped_fp8_gemm_nt_contiguous (prefill, T > MASKED_MAX_T) or _masked
(decode), except at T <= SMALL_MAX_T tokens: there triton/moe_fp8.py's small-batch kernels run the same
W8A8 math reading only the routed experts' tiles (the masked GEMM streams 8 experts at ~1.2 TB/s on one
token: bench/results/fp8/; bench/kernels/libs.py's bench_fp8_experts_small times both), H and I of any
size (`small_experts_ok`; DeepGEMM's need multiples of 128). Against
weight-only experts (widened weights, bf16 x and h) that is 4-5% relative (Frobenius, random layers;
one W8A8 linear: 2.6%, triton/fp8_gemm.py). Weight-only plans, and shapes or GPUs these kernels were
not checked on (`experts_ok`), get the Triton provider's experts.
`fused_experts` says what was read in the wheel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import torch_ref
from . import DEEP_GEMM, import_library, version_error

deep_gemm = import_library(DEEP_GEMM)
if (_err := version_error(DEEP_GEMM, getattr(deep_gemm, "__version__", None))) is not None:
    raise _err

__all__ = ["linear", "gemm_ok", "fp8_gemm_ok", "bf16_experts_ok", "fp8_experts_ok", "small_experts_ok", "experts_ok",
           "contiguous_layout", "masked_layout", "fused_experts", "grouped_experts", "moe"]


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
# MoE experts: layouts. Both are built on the device with shapes from T alone: no host sync.
# ---------------------------------------------------------------------------------------------
SMALL_MAX_T = 32  # FP8 experts: up to this many tokens the Triton small-batch kernels (triton/moe_fp8.py), above
# them DeepGEMM's grouped GEMMs. A first guess (H100): re-pick it from bench_fp8_experts_small's crossover
MASKED_MAX_T = 128  # FP8 experts: up to this many rows the masked layout (decode), above it the contiguous one
MASKED_M = 128  # rows per expert in the masked buffers: >= MASKED_MAX_T (top-k ids are distinct, so an expert
# gets a row at most once), and a multiple of every BLOCK_M SM90's masked GEMM picks (64 or 128 in DeepGEMM's
# csrc/jit_kernels/heuristics/sm90.hpp, which the wheel ships compiled): its tiles are stored whole into an
# [E * MASKED_M, N] view, so a tile past an expert's MASKED_M rows would overwrite the next expert's (DeepGEMM
# issue #268: wrong results with max_m < 64). The buffers (x, gate, up, h, down rows) take ~1 GB per call for
# 256 DeepSeek-V3 experts, ~130 MB for an EP8 rank's 32; the GEMMs compute only masked_m's tiles


def _take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows]; fp8 through a uint8 view (the same bytes; float8 index kernels are not in every torch build)."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).index_select(0, rows).view(t.dtype)
    return t.index_select(0, rows)


def contiguous_layout(ids: torch.Tensor, num_experts: int):
    """(rows, m_idx, pair_row): the (token, slot) pairs sorted by expert into segments aligned to
    get_mk_alignment_for_contiguous_layout(), in a buffer of static worst-case size (so no host sync):
    rows [M] = pair id per row (-1 for padding), m_idx int32 [M] = expert per row (-1 for padding:
    DeepGEMM skips a block whose first row is -1; valid rows lead each segment), pair_row [T*top_k]
    = the row of each pair (0 for a pair of another EP rank's expert, id >= num_experts: mask it).
    Reuses the Triton provider's moe_align (device-side, graph safe)."""
    from ..triton.moe import moe_align

    align = deep_gemm.get_mk_alignment_for_contiguous_layout()
    n = ids.numel()
    sorted_ids, expert_ids, _ = moe_align(ids, num_experts, align)
    block_e = expert_ids.repeat_interleave(align)  # -1 past the last segment (sorted_ids unset there)
    valid = (block_e >= 0) & (sorted_ids >= 0) & (sorted_ids < n)
    rows = torch.where(valid, sorted_ids, -1)
    m_idx = torch.where(valid, block_e, -1).to(torch.int32).contiguous()
    inv = torch.zeros(n + 1, dtype=torch.long, device=ids.device)  # slot n collects the padding rows
    inv.scatter_(0, torch.where(valid, sorted_ids, n).long(), torch.arange(rows.numel(), device=ids.device))
    return rows, m_idx, inv[:n]


def masked_layout(ids: torch.Tensor, num_experts: int):
    """(slot [N], masked_m int32 [E], keep [N]) for the N = T*top_k (token, slot) pairs: pair p of expert e
    goes to row slot[p] = e * MASKED_M + (its rank among e's pairs) of an [E * MASKED_M + N, K] buffer
    whose first E * MASKED_M rows are DeepGEMM's [E, MASKED_M, K]; a pair of another EP rank's expert
    (id >= E, keep False) gets a dump row of its own, E * MASKED_M + p (unique slots: a plain index_put).
    One-hot cumsum over [N, E]: small at decode sizes, deterministic."""
    flat = ids.reshape(-1).long()
    onehot = (flat[:, None] == torch.arange(num_experts, device=ids.device)).to(torch.int32)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    keep = flat < num_experts
    dump = num_experts * MASKED_M + torch.arange(flat.numel(), device=ids.device)
    return torch.where(keep, flat * MASKED_M + rank, dump), onehot.sum(0).to(torch.int32), keep


# ---------------------------------------------------------------------------------------------
# MoE experts: the grouped GEMMs
# ---------------------------------------------------------------------------------------------
def _grouped(a: torch.Tensor, w: torch.Tensor, m_idx: torch.Tensor) -> torch.Tensor:
    d = torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device)
    deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, w, d, m_idx)
    return d


def _fp8_contiguous(a, w, m_idx):
    """a = (fp8 [M, K], f32 [M, K/128]), w = (fp8 [E, N, K], f32 [E, N/128, K/128]) -> bf16 [M, N]."""
    d = torch.empty(a[0].shape[0], w[0].shape[1], dtype=torch.bfloat16, device=a[0].device)
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, w, d, m_idx, disable_ue8m0_cast=True)
    return d


def _fp8_masked(a, w, masked_m, expected_m):
    """a = (fp8 [E, MASKED_M, K], f32 [E, MASKED_M, K/128]) -> bf16 [E * MASKED_M, N], rows past
    masked_m[e] of each expert unset."""
    d = torch.empty(w[0].shape[0], MASKED_M, w[0].shape[1], dtype=torch.bfloat16, device=a[0].device)
    deep_gemm.m_grouped_fp8_gemm_nt_masked(a, w, d, masked_m, expected_m, disable_ue8m0_cast=True)
    return d.view(-1, d.shape[-1])


def _bf16_experts(x, ids, w_gate, w_up, w_down, *, w13, num_experts):
    """Rows [T*top_k, H]: down_e(silu(gate_e(x_t)) * up_e(x_t)) per (token, slot) pair."""
    top_k, I = ids.shape[1], w_gate.shape[1]
    rows, m_idx, pair_row = contiguous_layout(ids, num_experts)
    a = x.index_select(0, torch.where(rows >= 0, rows // top_k, 0))
    if w13 is not None:
        gu = _grouped(a, w13, m_idx)
        g, u = gu[:, :I], gu[:, I:]
    else:
        g, u = _grouped(a, w_gate, m_idx), _grouped(a, w_up, m_idx)
    y = _grouped((F.silu(g) * u).contiguous(), w_down, m_idx)  # rows of skipped blocks hold garbage, never read
    return y.index_select(0, pair_row)


def _fp8_experts(x, ids, gate, up, down, *, w13, num_experts, expected_m):
    """_bf16_experts' rows, W8A8: gate / up / down / w13 are (fp8 weight, f32 128x128 scales) pairs; x
    and h = silu(g) * u are quantized per token and 128 columns (triton/fp8_gemm.py's quantizer: DeepGEMM's
    activation format) before their GEMMs. Up to MASKED_MAX_T rows the masked layout: x's fp8 rows are
    scattered into per-expert buffers, h is computed on the pairs' rows only and scattered back for the
    down GEMM. Above, the contiguous layout over expert-sorted, padded rows."""
    from ..triton.fp8_gemm import quantize_activations as quant

    T, top_k = ids.shape
    I, n = gate[0].shape[1], ids.numel()
    xq, xs = quant(x)
    if T <= MASKED_MAX_T:
        slot, masked_m, keep = masked_layout(ids, num_experts)
        rows = torch.where(keep, slot, 0)  # the pairs' rows of a GEMM output (dump rows read row 0: masked)
        em = num_experts * MASKED_M

        def place(q, s, src=None):
            bq, bs = q.new_empty(em + n, q.shape[1]), s.new_empty(em + n, s.shape[1])
            bq.view(torch.uint8)[slot] = (q if src is None else _take(q, src)).view(torch.uint8)
            bs[slot] = s if src is None else s.index_select(0, src)
            return bq[:em].view(num_experts, MASKED_M, -1), bs[:em].view(num_experts, MASKED_M, -1)

        a = place(xq, xs, torch.arange(n, device=x.device) // top_k)
        gemm = lambda a, w: _fp8_masked(a, w, masked_m, expected_m)
        pick = lambda d: d.index_select(0, rows)
        pick_y = pick
    else:
        r, m_idx, pair_row = contiguous_layout(ids, num_experts)
        tok = torch.where(r >= 0, r // top_k, 0)
        a = (_take(xq, tok), xs.index_select(0, tok))
        gemm = lambda a, w: _fp8_contiguous(a, w, m_idx)
        place, pick = (lambda q, s: (q, s)), (lambda d: d)  # h over every row, padding included
        pick_y = lambda d: d.index_select(0, pair_row)
    if w13 is not None:
        gu = pick(gemm(a, w13))
        g, u = gu[:, :I], gu[:, I:]
    else:
        g, u = pick(gemm(a, gate)), pick(gemm(a, up))
    return pick_y(gemm(place(*quant(F.silu(g) * u)), down))


def fused_experts(x, weights, ids, w_gate, w_up, w_down, *, num_experts, renormalize=False, norm_eps=0.0,
                  scale=1.0, scales=None, w13=None, w13_scale_inv=None, routed_experts=None, small_max_t=None):
    """triton moe.fused_experts' contract on DeepGEMM: sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
    w = weights (/ (sum + norm_eps) if renormalize) * scale rounded to x.dtype, for ids < num_experts
    (others add nothing). x [T, H], w_gate/w_up [E, I, H], w_down [E, H, I]; w13 = cat([w_gate, w_up], 1)
    (and its scales for FP8: cat along dim 1, so I % 128 == 0) runs gate+up as one GEMM. `scales`
    (gate, up, down f32 128x128 scales) selects the W8A8 path: up to `small_max_t` tokens (default
    SMALL_MAX_T) triton/moe_fp8.py's fused_experts_fp8, above `_fp8_experts`; expected_m, the masked
    GEMM's config hint, is T * top_k / routed_experts (the model's expert count; default num_experts).

    Read in the tokenspeed-deepgemm 2.5.0.post20260424 wheel: deep_gemm/__init__.py exports
    m_grouped_fp8_gemm_nt_contiguous / _masked (aliases of the m_grouped_fp8_fp4_* functions); _C.pyi
    gives (a, b, d, grouped_layout, recipe=None, recipe_a=None, recipe_b=None, compiled_dims="nk",
    disable_ue8m0_cast=False, use_psum_layout=False, expected_m_for_psum_layout=None) and (a, b, d,
    masked_m, expected_m, recipe..., compiled_dims="nk", disable_ue8m0_cast=False); a = (fp8, f32 scales
    [.., ceil(K/128)] row-major, which DeepGEMM itself turns MN-major and TMA-aligned: its
    get_mn_major_tma_aligned_tensor), b = (fp8 [E, N, K], f32 [E, ceil(N/128), ceil(K/128)] contiguous,
    the checkpoint's as stored). Host asserts (strings of _C.so): grouped_layout / masked_m int32 and
    contiguous, d bf16, K-major A and B. Kernel (include/deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh,
    scheduler/gemm.cuh): BLOCK_K = 128, N % 8 == 0 (device assert); contiguous: a BLOCK_M (= the
    alignment) tile multiplies the expert of its first row and each 64-row WGMMA half is skipped when its
    first row is -1; masked: expert e's rows are e * M .. of an [E * M, K] view, ceil(masked_m[e] /
    BLOCK_M) tiles computed and stored whole (hence MASKED_M)."""
    T, H = x.shape
    if T == 0:  # an idle EP rank's empty batch launches nothing
        return torch.zeros_like(x)
    top_k = ids.shape[1]
    if scales is not None and T <= (SMALL_MAX_T if small_max_t is None else small_max_t):
        from ..triton.moe_fp8 import fused_experts_fp8, small_fp8_ok

        # w13 is not needed there: gate and up tiles are read side by side from w_gate and w_up
        if small_fp8_ok(x, w_gate, w_up, w_down, scales, [128, 128]):
            return fused_experts_fp8(x, weights, ids, w_gate, w_up, w_down, scales, num_experts=num_experts,
                                     renormalize=renormalize, norm_eps=norm_eps, scale=scale)
    if scales is None:
        y = _bf16_experts(x, ids, w_gate, w_up, w_down, w13=w13, num_experts=num_experts)
    else:
        per_expert = -(-T * top_k // (routed_experts or num_experts))
        fp8_w13 = None if w13 is None else (w13, w13_scale_inv)
        y = _fp8_experts(x, ids, *zip((w_gate, w_up, w_down), scales), w13=fp8_w13, num_experts=num_experts,
                         expected_m=max(1, min(MASKED_M, per_expert)))
    w = weights.float()
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + norm_eps)
    # other ranks' pairs read an arbitrary row (unset: maybe NaN), so zero the rows, not just the weights
    y = torch.where((ids < num_experts)[..., None], y.view(T, top_k, H), 0)
    return torch.bmm((w * scale).to(x.dtype)[:, None, :], y)[:, 0]  # fp32 accumulation on the GPU


# ---------------------------------------------------------------------------------------------
# MoE experts: the provider ops
# ---------------------------------------------------------------------------------------------
def _scales(attrs: dict) -> tuple | None:
    s = tuple(attrs.get(f"{w}_scale_inv") for w in ("w_gate", "w_up", "w_down"))
    return None if s[0] is None else s


def fp8_experts_ok(x, w_gate, w_up, w_down, scales, block) -> bool:
    """Whether the FP8 grouped GEMMs take these experts: SM90 (f32 scales; SM100 wants UE8M0), bf16 x,
    128x128 blocks, contiguous operands, H and I multiples of 128 (the asserts need N % 8 and 16-byte
    K-major rows; 128 keeps every scale block whole and lets w13's scales be concatenated)."""
    _, I, H = w_gate.shape
    ws = (w_gate, w_up, w_down)
    return (x.is_cuda and x.dtype == torch.bfloat16 and list(block or ()) == [128, 128] and H % 128 == 0
            and I % 128 == 0 and all(w.dtype == torch.float8_e4m3fn and w.is_contiguous() for w in ws)
            and all(s.dtype == torch.float32 and s.is_contiguous() for s in scales)
            and torch.cuda.get_device_capability(x.device) == (9, 0))


def bf16_experts_ok(x, w_gate, w_up, w_down) -> bool:
    """Whether m_grouped_bf16_gemm_nt_contiguous takes these experts (K % 64, bf16, contiguous)."""
    _, I, H = w_gate.shape
    return (x.is_cuda and x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype == torch.bfloat16
            and H % 64 == 0 and I % 64 == 0 and all(w.is_contiguous() for w in (w_gate, w_up, w_down)))


def small_experts_ok(x, w_gate, w_up, w_down, scales, block) -> bool:
    """Whether triton/moe_fp8.py's small-batch kernels take these FP8 experts at this batch on SM90: up
    to SMALL_MAX_T tokens of bf16 x, 128x128 blocks, any H and I (partial blocks included)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= SMALL_MAX_T
            and torch.cuda.get_device_capability(x.device) == (9, 0)):
        return False
    from ..triton.moe_fp8 import small_fp8_ok

    return small_fp8_ok(x, w_gate, w_up, w_down, scales, block)


def experts_ok(x, w_gate, w_up, w_down, attrs: dict) -> bool:
    """Whether the DeepGEMM experts run this node (or, at small batches, the Triton small-batch FP8
    kernels, whose shape rules are looser); else the Triton provider's. Block-FP8 experts only in a W8A8
    plan (attr act_quant=128, set by quantize_weights): the FP8 GEMMs quantize the activations, so a
    weight-only plan keeps the widened experts' math."""
    scales = _scales(attrs)
    if scales is None:
        return bf16_experts_ok(x, w_gate, w_up, w_down)
    block = attrs.get("fp8_block")
    return attrs.get("act_quant") == 128 and (fp8_experts_ok(x, w_gate, w_up, w_down, scales, block)
                                              or small_experts_ok(x, w_gate, w_up, w_down, scales, block))


def moe(x, router, w_gate, w_up, w_down, score_bias=None, *, num_experts, top_k, scoring, norm_topk_prob=False,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, **fp8):
    """torch_ref.moe's contract: the Triton provider's routing (bit-identical to the reference), DeepGEMM
    grouped GEMMs for the experts (bf16, or W8A8 for block-FP8 ones: attrs `w_*_scale_inv`, fp8_block,
    act_quant=128) where `experts_ok`, else the Triton provider's moe."""
    from ..triton.moe import moe as triton_moe, select_experts

    if not experts_ok(x, w_gate, w_up, w_down, fp8):
        return (triton_moe if x.is_cuda else torch_ref.moe)(
            x, router, w_gate, w_up, w_down, score_bias, num_experts=num_experts, top_k=top_k, scoring=scoring,
            norm_topk_prob=norm_topk_prob, n_group=n_group, topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor, **fp8)
    weights, ids = select_experts(x, router, score_bias, num_experts=num_experts, top_k=top_k, scoring=scoring,
                                  n_group=n_group, topk_group=topk_group)
    return fused_experts(x, weights, ids, w_gate, w_up, w_down, num_experts=num_experts, scales=_scales(fp8),
                         renormalize=norm_topk_prob, norm_eps=1e-20 if scoring == "sigmoid" else 0.0,
                         scale=routed_scaling_factor)


def grouped_experts(x, weights, ids, w_gate, w_up, w_down, *, ctx=None, group="ep", num_experts=None, **fp8):
    """torch_ref.grouped_experts' contract (the Triton provider's): the experts of this EP rank (L =
    len(w_gate), global ids first .. first+L-1) over the rows moe_dispatch brought here, already routed
    and weighted; a row's slots naming other ranks' experts add nothing."""
    if not experts_ok(x, w_gate, w_up, w_down, fp8):
        from ..triton.moe import grouped_experts as triton_grouped

        return (triton_grouped if x.is_cuda else torch_ref.grouped_experts)(
            x, weights, ids, w_gate, w_up, w_down, ctx=ctx, group=group, **fp8)
    L = w_gate.shape[0]
    local = ids - torch_ref._ep_position(ctx, group)[0] * L
    local = torch.where((local >= 0) & (local < L), local, L)
    return fused_experts(x, weights, local, w_gate, w_up, w_down, num_experts=L, scales=_scales(fp8),
                         routed_experts=num_experts)

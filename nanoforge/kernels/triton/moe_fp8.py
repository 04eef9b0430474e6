"""Block-FP8 (W8A8) fused experts for small batches: decode reads only the routed experts' weights.

Why: DeepGEMM's masked grouped GEMM runs over every expert's 128-row buffer (the scatter, gather and
quantize kernels around it included) and on one token streams the 8 routed experts at ~1.2 TB/s on an
H100 (bench/results/fp8/fp8_moe-h100-20261206.json). Here each program owns one expert's 16-row block
of routed (token, slot) pairs and one column tile, and reads that expert's e4m3 tiles and their
128x128 block scales only, so the weight stream is spread over hundreds of programs.

Math (the FP8 grouped GEMMs' and torch_ref's W8A8 experts, act_quant=128; weights w_gate/w_up
[E, I, H], w_down [E, H, I] e4m3 with f32 scales [E, ceil(rows/128), ceil(cols/128)]):

1. quant   x -> (e4m3 [T, H], f32 [T, ceil(H/128)]) per token and 128 columns: fp8_gemm.quantize_activations
           (bitwise the torch reference, fp8.quantize_activations).
2. align   triton/moe.py's moe_align (BLOCK_M rows per expert block; pairs of ids >= num_experts left out).
3. gate_up per block and I tile, per 128-wide K block kb: dot(xq, wq) * x_scale[t, kb] * w_scale[e, n/128, kb]
           summed in f32 (one fp8 dot never spans two scale blocks: Hopper's reduced-precision fp8
           accumulation stays inside 128 products); g and u rounded to x.dtype, h = silu(g) * u rounded
           like torch's bf16 ops (silu then the product), written to h [pairs, I] in x.dtype.
4. quant   h, as in 1 (the down GEMM's activations).
5. down    per block and H tile the same blocked dot over I; y [pairs, H] in x.dtype (DeepGEMM's output).
6. combine out[t] = sum over slots k in order of w_k * y[t, k] in f32, rounded once to x.dtype, with
           w = weights (/ (their sum + norm_eps) if renormalize) * scale rounded to x.dtype; slots naming
           ids >= num_experts (another EP rank's) add nothing. No atomics: deterministic, and a CUDA-graph
           replay equals the eager call bit for bit.

Every shape and grid comes from (T, top_k, E, H, I): no host sync, graph safe. Blocks past the
aligned length return at once. Any H and I (partial 128 blocks masked; the scale of a partial
activation group covers its valid columns, as the reference's does). Needs fp8 dots (sm89+; the
provider sends these experts here on SM90 only, deep_gemm_ops.SMALL_MAX_T). TRITON_INTERPRET=1 runs
the kernels on CPU tensors (fp8 loads and dots are exact there; the quantizer is torch's on CPU).
Configs: `small_config`, a first guess for H100; bench/kernels/libs.py's bench_fp8_experts_small
sweeps tiles and times this against DeepGEMM's masked path at T = 1 .. 64.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .fp8_gemm import quantize_activations
from .host_math import cdiv
from .moe import _p2, moe_align

__all__ = ["SmallCfg", "small_config", "small_fp8_ok", "fused_experts_fp8"]

GROUP = 128  # the activation group = the weight block = one K step of the kernels


class SmallCfg(NamedTuple):
    block_m: int = 16  # pairs per expert block (moe_align); 16 is the smallest fp8 dot
    gu_block_n: int = 64  # gate/up columns (of I) per program; divides 128 (one weight-scale row per tile)
    dn_block_n: int = 64  # down columns (of H) per program; divides 128
    num_warps: int = 4
    num_stages: int = 4


def small_config(rows: int, num_experts: int) -> SmallCfg:
    """Tiles for T * top_k = `rows` pairs. Decode sizes: 16-row blocks (an expert rarely gets more
    than 16 pairs), 64-column tiles: on one token 8 experts x 32 gate/up tiles = 256 programs, 8 x
    112 down tiles = 896 (an H100 has 132 SMs). A first guess (bench_fp8_experts_small to refine)."""
    if rows / max(num_experts, 1) > 8:  # many pairs per expert: fuller blocks
        return SmallCfg(block_m=32)
    return SmallCfg()


def small_fp8_ok(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 scales: tuple, block: list[int] | tuple[int, ...] | None) -> bool:
    """Whether fused_experts_fp8 takes these experts: CUDA with fp8 dots (sm89+) or the interpreter's
    CPU tensors, x bf16 / f16 / f32, 128x128 blocks, e4m3 weights and f32 scales with unit last stride."""
    if x.is_cuda:
        if torch.version.hip is not None or torch.cuda.get_device_capability(x.device) < (8, 9):
            return False
    elif not _interpreting():
        return False
    ws = (w_gate, w_up, w_down)
    return (x.dtype in (torch.bfloat16, torch.float16, torch.float32) and list(block or ()) == [GROUP, GROUP]
            and all(w.dtype == torch.float8_e4m3fn and w.stride(-1) == 1 for w in ws)
            and all(s is not None and s.dtype == torch.float32 and s.stride(-1) == 1 for s in scales))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_rows(sorted_ptr, eid_ptr, pid_m, N, BM: tl.constexpr):
    """(pair ids [BM], valid [BM], expert (i64)) of expert block pid_m; padding rows hold pair N."""
    pair = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    valid = pair < N
    return tl.where(valid, pair, 0).to(tl.int64), valid, tl.load(eid_ptr + pid_m).to(tl.int64)


@triton.jit(do_not_specialize=["N"])
def _gate_up_kernel(xq_ptr, xs_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, sorted_ptr, eid_ptr, npp_ptr,
                    N, H, I, top_k,
                    stride_xq, stride_xs, stride_we, stride_wn, stride_se, stride_sn, stride_h,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """h[p, n] = silu(g) * u for the pairs p of one expert block and columns n of one tile, with
    g = sum_kb dot(xq[t, kb], wg[e, n, kb]) * xs[t, kb] * sg[e, n // BK, kb] (t = p // top_k), u alike."""
    num_pid_n = tl.cdiv(I, BN)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    if pid_m * BM >= tl.load(npp_ptr):
        return
    pair, valid, e = _block_rows(sorted_ptr, eid_ptr, pid_m, N, BM)
    tok = pair // top_k
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BK)
    a_rows = xq_ptr + tok[:, None] * stride_xq + offs_k[None, :]
    as_rows = xs_ptr + tok * stride_xs
    w_rows = e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    s_row = e * stride_se + ((pid_n * BN) // BK) * stride_sn  # BN divides BK: one scale row per tile
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BK)):
        k0 = kb * BK
        if EVEN_K:
            a = tl.load(a_rows + k0, mask=valid[:, None], other=0.0)
            bg = tl.load(wg_ptr + w_rows + k0, mask=n_ok[:, None], other=0.0)
            bu = tl.load(wu_ptr + w_rows + k0, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k < H)[None, :]
            a = tl.load(a_rows + k0, mask=valid[:, None] & k_ok, other=0.0)
            bg = tl.load(wg_ptr + w_rows + k0, mask=n_ok[:, None] & k_ok, other=0.0)
            bu = tl.load(wu_ptr + w_rows + k0, mask=n_ok[:, None] & k_ok, other=0.0)
        a_s = tl.load(as_rows + kb, mask=valid, other=0.0)
        acc_g += tl.dot(a, tl.trans(bg)) * (a_s[:, None] * tl.load(sg_ptr + s_row + kb))
        acc_u += tl.dot(a, tl.trans(bu)) * (a_s[:, None] * tl.load(su_ptr + s_row + kb))
    # torch's order in x.dtype: g and u are GEMM outputs, then silu(g), then silu(g) * u
    dt = h_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    h_ptrs = h_ptr + pair[:, None] * stride_h + offs_n[None, :]
    tl.store(h_ptrs, (s * u).to(dt), mask=valid[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["N"])
def _down_kernel(hq_ptr, hs_ptr, wd_ptr, sd_ptr, y_ptr, sorted_ptr, eid_ptr, npp_ptr, N, I, H,
                 stride_hq, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_y,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """y[p, n] = sum_kb dot(hq[p, kb], wd[e, n, kb]) * hs[p, kb] * sd[e, n // BK, kb] for the pairs of
    one expert block and the columns of one tile (no routing weight: the combine applies it)."""
    num_pid_n = tl.cdiv(H, BN)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    if pid_m * BM >= tl.load(npp_ptr):
        return
    pair, valid, e = _block_rows(sorted_ptr, eid_ptr, pid_m, N, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BK)
    a_rows = hq_ptr + pair[:, None] * stride_hq + offs_k[None, :]
    as_rows = hs_ptr + pair * stride_hs
    w_rows = wd_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    s_row = sd_ptr + e * stride_se + ((pid_n * BN) // BK) * stride_sn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, BK)):
        k0 = kb * BK
        if EVEN_K:
            a = tl.load(a_rows + k0, mask=valid[:, None], other=0.0)
            b = tl.load(w_rows + k0, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k < I)[None, :]
            a = tl.load(a_rows + k0, mask=valid[:, None] & k_ok, other=0.0)
            b = tl.load(w_rows + k0, mask=n_ok[:, None] & k_ok, other=0.0)
        a_s = tl.load(as_rows + kb, mask=valid, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * tl.load(s_row + kb))
    y_ptrs = y_ptr + pair[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, w_ptr, ids_ptr, out_ptr, H, top_k, E, norm_eps, scale, stride_y, stride_o,
                    NORM: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, n] = sum_k w[t, k] * y[t * top_k + k, n] over the slots k whose id is < E, f32, in one
    fixed order; w = weights[t] (/ (sum + norm_eps)) * scale rounded to out's dtype (as the reference)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, TOPK_PAD)
    j_ok = j < top_k
    w = tl.load(w_ptr + t * top_k + j, mask=j_ok, other=0.0)
    if NORM:
        w = w / (tl.sum(w, axis=0) + norm_eps)
    w = (w * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
    live = j_ok & (tl.load(ids_ptr + t * top_k + j, mask=j_ok, other=0) < E)
    rows = (t * top_k + j)[:, None] * stride_y
    y = tl.load(y_ptr + rows + offs[None, :], mask=live[:, None] & (offs < H)[None, :], other=0.0)
    out = tl.sum(y.to(tl.float32) * w[:, None], axis=0)
    tl.store(out_ptr + t * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=offs < H)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _check(x, weights, ids, w_gate, w_up, w_down, scales, *, num_experts):
    E, I, H = w_gate.shape
    if x.dim() != 2 or x.shape[1] != H or ids.dim() != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"fused_experts_fp8: expects x [T, {H}] and weights, ids [T, top_k], got {tuple(x.shape)}, "
                         f"{tuple(weights.shape)} and {tuple(ids.shape)}")
    if tuple(w_up.shape) != (E, I, H) or tuple(w_down.shape) != (E, H, I) or E != num_experts:
        raise ValueError(f"fused_experts_fp8: expects w_gate / w_up [{num_experts}, I, H] and w_down "
                         f"[{num_experts}, H, I], got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, "
                         f"{tuple(w_down.shape)}")
    want = [(E, -(-I // GROUP), -(-H // GROUP))] * 2 + [(E, -(-H // GROUP), -(-I // GROUP))]
    if [tuple(s.shape) for s in scales] != want:
        raise ValueError(f"fused_experts_fp8: scales must be {want} (128x128 blocks), got "
                         f"{[tuple(s.shape) for s in scales]}")
    if w_gate.stride() != w_up.stride() or scales[0].stride() != scales[1].stride():
        raise ValueError("fused_experts_fp8: w_gate and w_up (and their scales) need the same strides")
    if any(t.stride(-1) != 1 for t in (w_gate, w_down, *scales)):
        raise ValueError("fused_experts_fp8: weights and scales need unit stride along their last dim")


def fused_experts_fp8(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate: torch.Tensor,
                      w_up: torch.Tensor, w_down: torch.Tensor, scales: tuple, *, num_experts: int,
                      renormalize: bool = False, norm_eps: float = 0.0, scale: float = 1.0,
                      config: SmallCfg | None = None) -> torch.Tensor:
    """sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) in W8A8 (module docstring), e = ids[t,k]
    (ids >= num_experts add nothing), w = weights (/ (weights.sum(-1) + norm_eps) if renormalize) * scale
    rounded to x.dtype. x [T, H]; w_gate / w_up [E, I, H], w_down [E, H, I] e4m3 with scales =
    (gate, up, down) f32 128x128 block scales. w_gate and w_up may be views of one [E, 2I, H] tensor.
    Returns [T, H] in x.dtype; graph safe. `config` overrides small_config (tests, tuning)."""
    _check(x, weights, ids, w_gate, w_up, w_down, scales, num_experts=num_experts)
    T, H = x.shape
    top_k, I = ids.shape[1], w_gate.shape[1]
    n = T * top_k
    if n == 0:
        return torch.zeros_like(x)
    cfg = config or small_config(n, num_experts)
    bm = cfg.block_m
    if GROUP % cfg.gu_block_n or GROUP % cfg.dn_block_n:
        raise ValueError(f"fused_experts_fp8: tile widths {cfg.gu_block_n} / {cfg.dn_block_n} must divide {GROUP}")
    sg, su, sd = scales
    sorted_ids, expert_ids, npp = moe_align(ids, num_experts, bm)
    num_pid_m = expert_ids.numel()
    launch = dict(BM=bm, BK=GROUP, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    xq, xs = quantize_activations(x if x.stride(-1) == 1 else x.contiguous())
    h = torch.empty(n, I, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_pid_m * cdiv(I, cfg.gu_block_n),)](
        xq, xs, w_gate, w_up, sg, su, h, sorted_ids, expert_ids, npp, n, H, I, top_k,
        xq.stride(0), xs.stride(0), w_gate.stride(0), w_gate.stride(1), sg.stride(0), sg.stride(1), h.stride(0),
        BN=cfg.gu_block_n, EVEN_K=H % GROUP == 0, **launch)

    hq, hs = quantize_activations(h)  # rows of pairs no block wrote (other ranks' experts): never read
    y = torch.empty(n, H, dtype=x.dtype, device=x.device)
    _down_kernel[(num_pid_m * cdiv(H, cfg.dn_block_n),)](
        hq, hs, w_down, sd, y, sorted_ids, expert_ids, npp, n, I, H,
        hq.stride(0), hs.stride(0), w_down.stride(0), w_down.stride(1), sd.stride(0), sd.stride(1), y.stride(0),
        BN=cfg.dn_block_n, EVEN_K=I % GROUP == 0, **launch)

    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    block = min(512, _p2(H))
    _combine_kernel[(T, cdiv(H, block))](
        y, weights.float().contiguous(), ids.contiguous(), out, H, top_k, num_experts, float(norm_eps),
        float(scale), y.stride(0), out.stride(0), NORM=bool(renormalize), TOPK_PAD=_p2(top_k), BLOCK=block,
        num_warps=4)
    return out

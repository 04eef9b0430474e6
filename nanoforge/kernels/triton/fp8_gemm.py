"""Block-FP8 GEMM for DeepSeek-style weights, W8A8: y[M, N] = x[M, K] @ dequant(w)[N, K]^T.

Weights: e4m3 values w [N, K] with one f32 scale per 128 x 128 block, w_scale_inv [ceil(N/128),
ceil(K/128)], partial edge blocks included (nanoforge/kernels/fp8.py, `dequantize(w, s, (128, 128))`).
Activations are quantized per call, per token and per 1 x 128 group of K (DeepGEMM's activation
format): x_scale[m, g] = max(amax(|x[m, 128g : 128g + 128]|), 1e-10) / 448 (f32, [M, ceil(K/128)],
row-major), x_fp8 = e4m3(clamp(x / x_scale, +-448)) rounded to nearest even (IEEE division).

The GEMM (Triton): one program owns a BLOCK_M x BLOCK_N output tile; for each 128-wide K block kb
it does one fp8 x fp8 tl.dot with fp32 accumulation (wgmma on sm90 for BLOCK_M >= 64, mma.sync
e4m3 below; one dot spans exactly one scale block, so Hopper's reduced-precision fp8 accumulation
never runs over more than 128 products: the promotion DeepGEMM does) and adds it times
x_scale[m, kb] * w_scale_inv[n // 128, kb]. BLOCK_N divides 128, so a tile has one weight-scale
row. Every load and store is masked (M, N and K edge blocks). Split-K (decode-sized M, few output
tiles): programs split the K blocks, write fp32 partials to a [SPLIT_K, M, N] workspace, and a
second kernel sums them in a fixed order (deterministic: a graph replay equals the eager call
bit for bit), adds the bias and casts.

Configs: a fixed table per M bucket (`_config`), not triton.autotune: autotuning benchmarks with
host syncs on the first call of each new key, which must never happen inside CUDA-graph capture,
and a graph captured at one batch size must replay the kernel the eager warm-up ran. Within a
bucket the config (and the split-K factor, a function of N and K only) does not depend on M, and
M is not specialized (do_not_specialize), so a bucket compiles a few variants (output dtype, split
or not, K % 128) once, at warm-up. Buckets: M <= 16 / 32 / 64 (BLOCK_M 16 / 32 / 64, BLOCK_N 64,
split-K allowed), <= 512 (64 x 64), larger (128 x 128, 8 warps, 3 stages); BLOCK_K = 128, 4 stages
below. A first guess for H100 (e.g. vLLM's tuned H100 table for N=576, K=7168 uses 16-row tiles up
to M = 128 and 64 x 64-128 above); bench/kernels/fp8_gemm.py --tune sweeps candidates and prints
the best per (M, shape) to refine it.

CUDA graphs: no host sync, no .item(); grids and workspaces depend on shapes only; M = 0 returns
an empty [0, N] without a launch.

Accuracy. W8A8 against the weight-only reference F.linear(x, dequantize(w, s)) (what torch_ref.linear
computes), measured on CPU with the torch references (block_fp8_linear_ref; torch 2.13, seed 0),
x ~ N(0, 1) [M = 64], w = fp8.quantize(N(0, 1) / sqrt(K), (128, 128)), relative Frobenius error
||y_w8a8 - y_ref|| / ||y_ref||: 2.57-2.59% at kv_a (576, 7168), q_a (1536, 7168), q_b (24576, 1536),
down (7168, 2048) and (200, 300), the same with bf16 x; largest element error / largest |y_ref|
2.4-3.0%. That is e4m3's rounding of x itself (||dequant(x_fp8) - x|| / ||x|| = 2.57%: 3 mantissa
bits), independent of the shape; the weight side is the same in both. Against the same W8A8 math in
torch (block_fp8_linear_ref) the Triton kernel differs only by f32 summation order and, on Hopper,
the fp8 MMA's reduced-precision accumulation inside one 128-wide block: 2e-7 relative under the
interpreter (exact products); tests/test_triton_fp8_gemm.py bounds it on the GPU (1e-3 of max |y|
for f32 output).

Requires sm89+ for the fp8 tl.dot (H100/H200, Ada); older GPUs fall back to block_fp8_linear_ref.
Checked offline (triton 3.6 compiling for sm_90 on a machine without a GPU): BLOCK_M 16 / 32 use
mma.sync e4m3, 64 / 128 wgmma; the quantizer uses div.rn.f32 and cvt.rn.satfinite.e4m3x2.f32.
TRITON_INTERPRET=1 runs the GEMM (fp8 loads and dots are exact there) but its f32 -> e4m3 cast drops
the carry when rounding up to a power of two (7.75 -> 4 instead of 8), so the quantizer is only
checked bitwise on the GPU.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import fp8
from ..fp8 import FP8, SCALE_EPS
from .host_math import cdiv, next_pow2

__all__ = ["Cfg", "block_fp8_linear", "block_fp8_linear_ref", "fp8_gemm", "quantize_activations",
           "quantize_activations_ref"]

GROUP = 128  # K group of the activation scales = the weight block (both sides of one tl.dot)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------------
# activation quantization

quantize_activations_ref = fp8.quantize_activations  # the torch reference of _quant_kernel


@triton.jit
def _round_to_e4m3(q):
    """q (f32, |q| <= 448) rounded to the nearest e4m3 value, ties to even, still in f32: the cast to
    e4m3 is then exact. Casting directly, Triton may go through f16 on the way, and that double
    rounding differs from torch's single one in the last bit of ~1e-3 of the values: enough to move
    a tiny model's greedy tokens. ulp = 2^(exponent - 3), subnormals (below 2^-6) share 2^-9; the
    1.5 * 2^23 add / subtract rounds q / ulp (|.| < 16) to an integer, ties to even."""
    e = tl.maximum(((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    r = ((q * inv + 12582912.0) - 12582912.0) * ulp
    return tl.where(r == 0.0, q * 0.0, r)  # keep the sign of a zero, as torch's cast does


@triton.jit(do_not_specialize=["M"])
def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                  GROUP_K: tl.constexpr, GROUPS: tl.constexpr, EPS: tl.constexpr):
    """Row `program_id(0)`, groups program_id(1) * GROUPS ... + GROUPS - 1: a [GROUPS, GROUP_K] tile."""
    row = tl.program_id(0).to(tl.int64)
    gi = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = gi[:, None] * GROUP_K + tl.arange(0, GROUP_K)[None, :]
    mask = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # precise (div.rn) divisions: `/` on fp32 is div.full (approximate) on NVIDIA, and these must
    # round like the torch reference
    scale = tl.math.div_rn(tl.maximum(amax, EPS), tl.full([GROUPS], 448.0, tl.float32))
    q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [GROUPS, GROUP_K]))
    q = _round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + gi, scale, mask=gi * GROUP_K < K)


def _quantize_triton(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    if group < 16 or group & (group - 1):
        raise ValueError(f"quantize_activations: group must be a power of two >= 16, got {group}")
    *lead, k = x.shape
    m = math.prod(lead)
    g = cdiv(k, group)
    x2 = x.reshape(m, k)
    if k and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, g, dtype=torch.float32, device=x.device)
    if m and k:
        groups = min(next_pow2(g), max(1, 1024 // group))
        _quant_kernel[(m, cdiv(g, groups))](x2, q, s, m, k, x2.stride(0), q.stride(0), s.stride(0),
                                                   GROUP_K=group, GROUPS=groups, EPS=SCALE_EPS, num_warps=4)
    return q.view(*lead, k), s.view(*lead, g)


def quantize_activations(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activations_ref's result; a Triton kernel on CUDA (no host sync), the reference elsewhere."""
    if x.is_cuda:
        return _quantize_triton(x, group)
    return quantize_activations_ref(x, group)


# ---------------------------------------------------------------------------------------------------
# GEMM

class Cfg(NamedTuple):
    block_m: int
    block_n: int  # divides 128 (one weight-scale row per tile)
    num_warps: int
    num_stages: int
    group_m: int = 8  # L2 swizzle: GROUP_M row tiles walk the N tiles together
    split_k: int | None = None  # None: _split_k's rule (bounded buckets, few output tiles)


# (largest M of the bucket, config): a first guess for H100 (bench/kernels/fp8_gemm.py --tune to refine)
_BUCKETS: tuple[tuple[int, Cfg], ...] = (
    (16, Cfg(16, 64, 4, 4, 1)),
    (32, Cfg(32, 64, 4, 4, 1)),
    (64, Cfg(64, 64, 4, 4, 1)),
    (512, Cfg(64, 64, 4, 4, 8)),
    (1 << 62, Cfg(128, 128, 8, 3, 8)),  # unbounded: never split
)

_CFG_OVERRIDE: Cfg | None = None  # set by tuning sweeps


def _bucket(m: int) -> tuple[int, Cfg]:
    for top, cfg in _BUCKETS:
        if m <= top:
            return top, cfg
    return _BUCKETS[-1]


def _config(m: int) -> Cfg:
    return _CFG_OVERRIDE if _CFG_OVERRIDE is not None else _bucket(m)[1]


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _has_fp8_mma(device_index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (8, 9)


def _split_k(cfg: Cfg, m: int, n: int, k: int, sms: int) -> int:
    """K splits (cfg.split_k if set). Else, when the bucket's largest M would give fewer output tiles
    than SMs: about two programs per SM, at least 4 K blocks (the pipeline depth) per program, the
    fp32 partials' round trip (8 * split * M * N bytes) at most the fp8 weight (N * K bytes), no
    empty split. A function of the bucket, N and K, never of M inside the bucket."""
    kb = cdiv(k, GROUP)
    if cfg.split_k is not None:
        split = max(1, min(cfg.split_k, kb))
    else:
        top = _bucket(m)[0]
        if top >= _BUCKETS[-1][0]:
            return 1
        tiles = cdiv(top, cfg.block_m) * cdiv(n, cfg.block_n)
        if tiles >= sms:
            return 1
        split = min(cdiv(2 * sms, tiles), max(1, kb // 4), max(1, k // (8 * top)), 32)
    return cdiv(kb, cdiv(kb, split))


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, M, N, K, SPLIT_K,
                 stride_am, stride_asm, stride_bn, stride_bsn, stride_ck, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """c[pid_k][m, n] = sum over this split's K blocks kb of
    dot(a[m, kb], b[n, kb]) * as[m, kb] * bs[n // BLOCK_K, kb] (+ bias[n]); a [M, K] and b [N, K]
    e4m3 with unit stride along K, as [M, KB] and bs [NB, KB] f32 with unit stride along KB."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    b_rows = b_ptr + rn.to(tl.int64)[:, None] * stride_bn + rk[None, :]
    as_rows = as_ptr + rm.to(tl.int64) * stride_asm
    bs_row = bs_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * stride_bsn  # BLOCK_N divides BLOCK_K

    kb_total = tl.cdiv(K, BLOCK_K)
    kb_per = tl.cdiv(kb_total, SPLIT_K)
    kb_lo = pid_k * kb_per
    kb_hi = tl.minimum(kb_lo + kb_per, kb_total)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        if EVEN_K:
            a = tl.load(a_rows + k0, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_rows + k0, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk < K)[None, :]
            a = tl.load(a_rows + k0, mask=m_ok[:, None] & k_ok, other=0.0)
            b = tl.load(b_rows + k0, mask=n_ok[:, None] & k_ok, other=0.0)
        a_s = tl.load(as_rows + kb, mask=m_ok, other=0.0)
        b_s = tl.load(bs_row + kb)
        acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + pid_k.to(tl.int64) * stride_ck + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(ws_ptr, bias_ptr, c_ptr, M, N, SPLIT_K, stride_wk, stride_wm, stride_cm,
                          BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """c[m, n] = sum_s ws[s, m, n] (s = 0, 1, ... in order) + bias[n]."""
    row = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_wk + row * stride_wm + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + row * stride_cm + rn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def fp8_gemm(x_fp8: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: Cfg | None = None) -> torch.Tensor:
    """The Triton GEMM on quantized operands: x_fp8 [M, K] e4m3 with x_scale [M, ceil(K/128)] f32
    (quantize_activations), w [N, K] e4m3 with w_scale_inv [ceil(N/128), ceil(K/128)] f32 -> y [M, N]
    in out_dtype (+ bias). `config` overrides the bucket table (tests, tuning)."""
    if x_fp8.dim() != 2 or w.dim() != 2 or x_fp8.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_gemm: expects x [M, K] and w [N, K], got {tuple(x_fp8.shape)} and {tuple(w.shape)}")
    m, k = x_fp8.shape
    n = w.shape[0]
    kb, nb = cdiv(k, GROUP), cdiv(n, GROUP)
    if tuple(x_scale.shape) != (m, kb) or tuple(w_scale_inv.shape) != (nb, kb):
        raise ValueError(f"fp8_gemm: scales must be x_scale [{m}, {kb}] and w_scale_inv [{nb}, {kb}] "
                         f"(128-wide groups / 128 x 128 blocks), got {tuple(x_scale.shape)} and "
                         f"{tuple(w_scale_inv.shape)}")
    if x_fp8.dtype != FP8 or w.dtype != FP8:
        raise ValueError(f"fp8_gemm: x_fp8 and w must be float8_e4m3fn, got {x_fp8.dtype} and {w.dtype}")
    out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    if x_fp8.stride(1) != 1:
        x_fp8 = x_fp8.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    x_scale = x_scale.float()
    if x_scale.stride(1) != 1:
        x_scale = x_scale.contiguous()
    w_scale_inv = w_scale_inv.float()
    if w_scale_inv.stride(1) != 1:
        w_scale_inv = w_scale_inv.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = config or _config(m)
    if GROUP % cfg.block_n:
        raise ValueError(f"fp8_gemm: BLOCK_N = {cfg.block_n} must divide {GROUP}")
    sms = _num_sms(x_fp8.device.index or 0) if x_fp8.is_cuda else 4
    split = _split_k(cfg, m, n, k, sms)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), split)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=GROUP, GROUP_M=cfg.group_m,
                  EVEN_K=k % GROUP == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        _gemm_kernel[grid](x_fp8, x_scale, w, w_scale_inv, out, bias if bias is not None else out, m, n, k, 1,
                           x_fp8.stride(0), x_scale.stride(0), w.stride(0), w_scale_inv.stride(0), 0, out.stride(0),
                           HAS_BIAS=bias is not None, **common)
        return out
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x_fp8.device)
    _gemm_kernel[grid](x_fp8, x_scale, w, w_scale_inv, ws, ws, m, n, k, split,
                       x_fp8.stride(0), x_scale.stride(0), w.stride(0), w_scale_inv.stride(0), ws.stride(0),
                       ws.stride(1), HAS_BIAS=False, **common)
    block = min(1024, next_pow2(n))
    _splitk_reduce_kernel[(m, cdiv(n, block))](ws, bias if bias is not None else ws, out, m, n, split,
                                                      ws.stride(0), ws.stride(1), out.stride(0), BLOCK=block,
                                                      HAS_BIAS=bias is not None, num_warps=4)
    return out


def block_fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, config: Cfg | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(w, w_scale_inv, (128, 128)).T (+ bias) as W8A8: x quantized
    per token and 128-wide K group (quantize_activations), then the block-scaled FP8 GEMM; out_dtype
    defaults to x.dtype (bf16 / f16 / f32). CUDA: Triton, graph safe. CPU: the Triton GEMM under
    TRITON_INTERPRET=1 (on the reference's quantized x), else block_fp8_linear_ref."""
    out_dtype = out_dtype or x.dtype
    *lead, k = x.shape
    n = w.shape[0]
    if w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"block_fp8_linear: w must be [N, {k}], got {tuple(w.shape)}")
    if x.numel() == 0 and k:
        return torch.empty(*lead, n, dtype=out_dtype, device=x.device)
    if x.is_cuda:
        if not (_INTERPRET or _has_fp8_mma(x.device.index or 0)):
            return block_fp8_linear_ref(x, w, w_scale_inv, bias, out_dtype)
        xq, xs = _quantize_triton(x.reshape(-1, k))
    elif _INTERPRET:
        xq, xs = quantize_activations_ref(x.reshape(-1, k))
    else:
        return block_fp8_linear_ref(x, w, w_scale_inv, bias, out_dtype)
    y = fp8_gemm(xq, xs, w, w_scale_inv, bias, out_dtype, config)
    return y.view(*lead, n)


def block_fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor,
                         bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """block_fp8_linear's math in torch (fp8.w8a8_linear)."""
    return fp8.w8a8_linear(x, w, w_scale_inv, bias, out_dtype, GROUP)

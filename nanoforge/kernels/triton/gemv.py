"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T, M <= 16, W an nn.Linear weight (row-major
[out, in]); bf16/fp16 in and out, fp32 accumulation, one launch, no split-K.

At batch 1..16 a projection is a stream of W through the SMs: the goal is to read W at HBM speed.
One program owns BLOCK_N output columns over the whole K, i.e. BLOCK_N consecutive rows of W, one
contiguous slab; each tile [BLOCK_N, BLOCK_K] is BLOCK_N runs of 16-byte vectors, and no partial
sum crosses programs (no reduce kernel, no atomics; cuBLAS adds splitKreduce for some shapes). Rows
past N re-read row N - 1 and x rows past M re-read row M - 1 (clamps, not masks), so the loop's
loads carry no mask when BLOCK_K divides K (every model shape); nothing past N or M is stored.

Three bodies, chosen by M:
  * M == 1: acc [BLOCK_N, BLOCK_K] += w * x in fp32 registers, one cross-lane sum at the end. Tiles
    of 2 rows x 1024 (4 KiB): thousands of short programs, so many CTAs per SM keep loads in
    flight and the last wave is short. Bigger tiles, 8 warps, or a register double buffer of W
    measured the same or worse; num_stages does nothing here (no shared memory).
  * M == 2: the same with acc [2, BLOCK_N, BLOCK_K].
  * 3 <= M <= 16: tl.dot(x, W^T) with x padded to 16 rows (the MMA minimum; 16x the GEMV's flops is
    still far below the memory time); W tiles go through 4 pipelined shared-memory stages.

PDL (pdl.py's knob, off by default; M == 1 only, sm_90+): the kernel lets its successor launch at once
(griddepcontrol.launch_dependents), loads its first W tile, then waits for its predecessor
(griddepcontrol.wait) before reading x. W must not be written by the previous kernel. It only pays
when the predecessor also triggers early: in GEMV -> GEMV chains it lifts Qwen3-8B o / qkv at M = 1
from 2.62 / 2.74 to 2.82 / 2.87 TB/s; after a norm kernel that does not trigger it measured nothing;
with the tl.dot body, CTAs idling in the wait held SM slots and lost up to 40%.

Measured (H100 80GB HBM3, triton 3.6, torch 2.11 + cuBLAS; `bench_skinny` of bench/kernels/gemv.py:
CUDA-graph chains over 512 MiB of rotating weights, TB/s of W + x + y), triton vs torch.matmul:
  M = 1   8B qkv 2.74 vs 2.46, o 2.62 vs 2.02, gate_up 3.07 vs 2.81, down 2.86 vs 2.54, lm_head 3.17 vs
          2.86 (one layer 132 vs 149 us); 0.6B o 1.24 vs 0.74, down 1.49 vs 0.81 (launch-bound, ~3 us).
  M = 16  8B qkv 2.49 vs 2.41, o 2.30 vs 2.01, gate_up 2.87 vs 2.77, down 2.67 vs 2.50, lm_head 3.03
          vs 2.83; 0.6B from -6% (gate_up, M = 4) to +7% (down, lm_head).
The fixed ~2 us per launch (ramp-up, tail) is what keeps the 16-48 MB shapes below ~2.8 TB/s.

CUDA graphs: no host sync; the grid depends on shapes only; M is not specialized (do_not_specialize),
so each body (BLOCK_M 1, 2 or 16) compiles once per dtype.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import torch_ref
from .host_math import cdiv, next_pow2
from .pdl import use_pdl

MAX_M = 16
SMALL_M = 2  # M above this takes the tl.dot body

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Cfg(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


_CFG_OVERRIDE: Cfg | None = None  # set by tuning sweeps


def _config(m: int, n: int, k: int) -> Cfg:
    """Measured on an H100 (CUDA-graph chains of calls, W streamed from HBM; see the docstring)."""
    if _CFG_OVERRIDE is not None:
        return _CFG_OVERRIDE
    if _INTERPRET:  # few, small programs: tests stay fast and shapes exercise the tails
        return Cfg(16, 32, 4, 1)
    if m == 1:  # best or within 2% at every shape from 4 MB to 1.2 GB
        return Cfg(2, 1024, 4, 1)
    if m <= SMALL_M:
        return Cfg(4, 512, 4, 1)
    # tl.dot, 4 stages. 64-row tiles (few, long programs) beat 32 by up to 10% at K = 4096 and on
    # lm_head, but lose 8% at K = 1024 (0.6B qkv); N <= 2048 needs 16-row tiles to have programs
    # enough; K >= 8192 (down_proj) likes 512-wide tiles (smem caps those at 32 rows).
    if n <= 2048:
        return Cfg(16, 256, 4, 4)
    if k >= 8192:
        return Cfg(32, 512, 4, 4)
    return Cfg(64 if k >= 4096 or n >= 16384 else 32, 256, 4, 4)


# ---------------------------------------------------------------------------------------------------
# kernel

@triton.jit
def _mac(acc, x_rows, w_rows, rk, k0, K, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
         PREC: tl.constexpr, w=None):
    """acc += x[:, k0:k0+BLOCK_K] * W[rows, k0:k0+BLOCK_K] (W's tile loaded here unless given)."""
    if EVEN_K:
        if w is None:
            w = tl.load(w_rows + k0 + rk[None, :], eviction_policy="evict_first")
        x = tl.load(x_rows + k0 + rk[None, :], eviction_policy="evict_last")
    else:
        kmask = (k0 + rk < K)[None, :]
        if w is None:
            w = tl.load(w_rows + k0 + rk[None, :], mask=kmask, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_rows + k0 + rk[None, :], mask=kmask, other=0.0, eviction_policy="evict_last")
    if BLOCK_M == 1:
        acc += w.to(tl.float32) * x.to(tl.float32)
    elif USE_DOT:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, PREC: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
    rm = tl.arange(0, BLOCK_M)
    x_rows = x_ptr + tl.minimum(rm, M - 1)[:, None] * stride_xm
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PDL:  # the next kernel may launch now; W's first tile is read before waiting on the previous one
        tl.extra.cuda.gdc_launch_dependents()
        w0 = tl.load(w_rows + rk[None, :], mask=(rk < K)[None, :], other=0.0, eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        acc = _mac(acc, x_rows, w_rows, rk, 0, K, BLOCK_M, USE_DOT, EVEN_K, PREC, w0)
        k_start = BLOCK_K
    else:
        k_start = 0
    for k0 in range(k_start, K, BLOCK_K):
        acc = _mac(acc, x_rows, w_rows, rk, k0, K, BLOCK_M, USE_DOT, EVEN_K, PREC)
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]
    elif USE_DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=2)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# wrapper

def skinny_matmul(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T -> [M, N] in x's dtype (written into `out` when given), M <= MAX_M."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"skinny_matmul: expects x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if m > MAX_M:
        raise ValueError(f"skinny_matmul: M = {m} > MAX_M = {MAX_M}; use a GEMM")
    if x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"skinny_matmul: x and w must share a dtype of bf16/fp16/fp32, got {x.dtype}, {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("skinny_matmul: x and w need a contiguous last dim")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"skinny_matmul: out must be [{m}, {n}] {x.dtype} with a contiguous last dim")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = _config(m, n, k)
    dot = m > SMALL_M
    block_m = 1 if m == 1 else (16 if dot else next_pow2(m))
    pdl = m == 1 and use_pdl(x)  # the tl.dot body's CTAs, launched early, held SM slots in the wait (docstring)
    _skinny_kernel[(cdiv(n, cfg.block_n),)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_DOT=dot, EVEN_K=k % cfg.block_k == 0,
        PDL=pdl, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **fp8_scales) -> torch.Tensor:
    """Provider entry with torch_ref.linear's signature: the skinny kernel for a decode-sized batch
    (1..MAX_M rows) of a bias-free half-precision projection, cuBLAS for everything else. A CUDA
    graph is captured per batch size, so each captured size takes one path for good. A block-FP8
    weight with attr act_quant runs fp8_gemm.block_fp8_linear on CUDA (W8A8: about 2.6% from the
    weight-only math per linear, the rounding of the activations to e4m3; torch_ref runs the same
    W8A8 math for such a node)."""
    s = fp8_scales.get("weight_scale_inv")
    if s is not None:  # block FP8: the W8A8 GEMM where the plan quantizes activations, else widened
        if (x.is_cuda and fp8_scales.get("act_quant") == 128 and weight.dtype == torch.float8_e4m3fn
                and tuple(fp8_scales.get("fp8_block") or ()) == (128, 128)):
            from .fp8_gemm import block_fp8_linear

            return block_fp8_linear(x, weight, s, bias)
        return torch_ref.linear(x, weight, bias, **fp8_scales)
    if (bias is None and x.dim() == 2 and 0 < x.shape[0] <= MAX_M and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda and weight.is_contiguous()
            and x.stride(-1) == 1):
        return skinny_matmul(x, weight)
    return torch.nn.functional.linear(x, weight, bias)

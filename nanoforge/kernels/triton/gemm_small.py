"""Small-batch GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T with 16 < M <= 256, W an nn.Linear
weight (row-major [out, in]); bf16/fp16 (or fp32) in and out, fp32 accumulation.

Why: between the skinny kernel (gemv.py, M <= 16) and a real GEMM, a small model's projections are
too small for cuBLAS's tiles. Qwen3-0.6B's o_proj / down_proj (N = 1024) at 128 x 128 tiles give 16
output tiles for 132 SMs; cuBLAS takes 6.5-8.7 us per 0.6B GEMM at M = 256 (30 us for the four)
where the weights' bytes take ~10.5 us for all four at 3 TB/s. Parallelism has to come from narrower
N tiles and from splitting K.

The kernel: one program owns a BLOCK_M x BLOCK_N output tile over one K range, tl.dot tiles (wgmma
on sm90 from BLOCK_M 64 up, mma.sync below), num_stages pipelined shared-memory stages. Grid
(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K) with the M tile fastest: the programs that share a W
tile launch together, so its second read hits L2. BLOCK_M is a power of two >= 16 (by default the
one covering M, at most 128); x rows past M re-read row M - 1 and W rows past N re-read row N - 1
(clamps, not masks), so the loop's loads carry no mask when BLOCK_K divides K (every model shape);
nothing past M or N is stored.

Split-K (SPLIT_K > 1): the programs of split s write fp32 partials to a workspace [SPLIT_K, M, N]
and a second kernel sums them in order s = 0, 1, ... and casts. Chosen over tl.atomic_add into a
zeroed fp32 workspace because (a) for a half-precision output the atomics need three graph nodes
(memset, GEMM, cast) where this needs two; (b) plain stores of a tile are fully coalesced and do not
contend on L2 atomics units; (c) it is deterministic, a graph replay equals the eager call bit for
bit (fp8_gemm.py's split-K does the same). The round trip (8 * SPLIT_K * M * N bytes) stays in L2;
`_config` bounds it by the weight's bytes. Not done (yet): a single-launch "last program of a tile
reduces" fixup (a self-resetting per-tile counter), which would also save the second launch.

Configs: a table (`_config`), not triton.autotune (autotuning benchmarks with host syncs on a new
key: never inside a CUDA-graph capture). A first guess for H100, not yet measured: `sweep` in
bench/kernels/gemm_small.py times candidates against cuBLAS to refine it. Cfg.block_m = 0 and
Cfg.split_k = 0 mean "the rule's choice" (`_plan`), so one candidate fits every M and shape.

Checked offline (triton 3.6 compiling for sm_90a on a machine without a GPU, ptxas -v): the table's
and the sweep's configs all compile without spills; BLOCK_M >= 64 takes wgmma, 32 mma.sync; the
table's use 72-96 KB of shared memory and 72-122 registers (int32 output offsets: int64 ones took
~250 registers and spilled at 128 x 128 x 4 warps). Not yet timed on a GPU.

CUDA graphs: no host sync, no reads of tensor values; grids and the workspace depend on shapes only;
M is not specialized (do_not_specialize), so one compile serves every M of a BLOCK_M bucket.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MIN_BLOCK_M = 16  # the MMA minimum
MAX_AUTO_BLOCK_M = 128  # block_m = 0 covers M up to this; M above it takes several M tiles

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Cfg(NamedTuple):
    block_m: int  # 0: the power of two covering M (>= 16, <= MAX_AUTO_BLOCK_M)
    block_n: int
    block_k: int
    split_k: int  # 0: the rule of `_split_k`; 1: no split
    num_warps: int
    num_stages: int


_CFG_OVERRIDE: Cfg | None = None  # set by tuning sweeps and tests


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _config(m: int, n: int, k: int) -> Cfg:
    """First guess for H100 (unmeasured; see the docstring). Shared memory is (BLOCK_M + BLOCK_N) *
    BLOCK_K * 2 bytes per stage (num_stages buffers, num_stages - 1 for mma.sync): every choice here
    stays <= 96 KB, two CTAs per SM."""
    if _CFG_OVERRIDE is not None:
        return _CFG_OVERRIDE
    if _INTERPRET:  # small tiles: the tests' shapes still have N / M tails and several K blocks
        return Cfg(0, 32, 32, 0, 4, 1)
    if m <= 32:  # mma.sync; W-bound: 64-wide N tiles keep x's re-reads (M / BLOCK_N of W) small
        return Cfg(32, 64, 128, 0, 4, 4)
    if m <= 64:
        return Cfg(64, 64, 128, 0, 4, 3)
    if n >= 4096 and k >= 4096:  # 8B-sized: many tiles anyway, compute starts to matter at M = 256
        return Cfg(128, 128, 64, 0, 8, 3)
    return Cfg(128, 64, 64, 0, 4, 4)  # M > 128: two M tiles, the second W read from L2


def _split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, sms: int) -> int:
    """No split when the tiles fill 3/4 of the SMs. Else enough splits that every SM gets a program
    (tiles * split >= SMs; the table's configs fit two CTAs per SM, so a second partial wave still
    runs at once), at least 2 K blocks per split (the prologue still issues both loads at once), the
    fp32 partials' round trip (8 * split * M * N bytes) at most twice the weight (2 * N * K bytes),
    no empty split."""
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if 4 * tiles >= 3 * sms:
        return 1
    kb = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(sms, tiles), kb // 2, k // (2 * m), 32))
    return triton.cdiv(kb, triton.cdiv(kb, split))


def _plan(m: int, n: int, k: int, sms: int = 132) -> Cfg:
    """The config `gemm_small` runs: `_config` with block_m and split_k resolved."""
    cfg = _config(m, n, k)
    block_m = cfg.block_m or min(max(triton.next_power_of_2(m), MIN_BLOCK_M), MAX_AUTO_BLOCK_M)
    if block_m < MIN_BLOCK_M or block_m & (block_m - 1):
        raise ValueError(f"gemm_small: BLOCK_M = {block_m} must be a power of two >= {MIN_BLOCK_M}")
    kb = triton.cdiv(k, cfg.block_k)
    if cfg.split_k > 0:
        split = triton.cdiv(kb, triton.cdiv(kb, min(cfg.split_k, kb)))  # no empty split
    else:
        split = _split_k(m, n, k, block_m, cfg.block_n, cfg.block_k, sms)
    return cfg._replace(block_m=block_m, split_k=split)


# ---------------------------------------------------------------------------------------------------
# kernels

@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, c_ptr, M, N, K, K_PER, stride_xm, stride_wn, stride_cs, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 PREC: tl.constexpr):
    """c[pid_k][m, n] = sum over k in [pid_k * K_PER, pid_k * K_PER + K_PER) of x[m, k] * w[n, k]
    (K_PER a multiple of BLOCK_K); c is the output (one split) or the fp32 workspace."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(0) // num_m
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn + rk[None, :]
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_rows + k0, eviction_policy="evict_last")
            w = tl.load(w_rows + k0, eviction_policy="evict_first")
        else:
            kmask = (k0 + rk < K)[None, :]
            x = tl.load(x_rows + k0, mask=kmask, other=0.0, eviction_policy="evict_last")
            w = tl.load(w_rows + k0, mask=kmask, other=0.0, eviction_policy="evict_first")
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    # int32 offsets (the wrapper checks they fit): int64 pointers per output element cost ~130 registers
    c = c_ptr + (pid_k * stride_cs + rm[:, None] * stride_cm + rn[None, :])
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _reduce_kernel(ws_ptr, out_ptr, M, N, stride_ws, stride_wm, stride_om,
                   SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum_s ws[s, m, n], s = 0, 1, ... in order (unrolled: all loads in flight)."""
    row = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    src = ws_ptr + row * stride_wm + rn
    acc = tl.load(src, mask=mask, other=0.0, eviction_policy="evict_first")
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(src + s * stride_ws, mask=mask, other=0.0, eviction_policy="evict_first")
    tl.store(out_ptr + row * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# wrapper

def gemm_small(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T -> [M, N] in x's dtype (written into `out` when given). Any M works (M
    tiles); the configs are meant for 16 < M <= 256. One launch, two with split-K."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemm_small: expects x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"gemm_small: x and w must share a dtype of bf16/fp16/fp32, got {x.dtype}, {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"gemm_small: x on {x.device}, w on {w.device}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemm_small: x and w need a contiguous last dim")
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"gemm_small: out must be [{m}, {n}] {x.dtype} on {x.device} with a contiguous last dim")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 4
    cfg = _plan(m, n, k, sms)
    if max(cfg.split_k * m * n if cfg.split_k > 1 else 0, (m - 1) * out.stride(0) + n) >= 2**31:
        raise ValueError(f"gemm_small: [{m}, {n}] output (x {cfg.split_k} splits) past int32 offsets; use cuBLAS")
    k_per = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    common = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "EVEN_K": k % cfg.block_k == 0,
              "PREC": "ieee" if x.dtype == torch.float32 else "tf32",
              "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.split_k == 1:
        _gemm_kernel[grid](x, w, out, m, n, k, k_per, x.stride(0), w.stride(0), 0, out.stride(0), **common)
        return out
    ws = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device)
    _gemm_kernel[grid](x, w, ws, m, n, k, k_per, x.stride(0), w.stride(0), ws.stride(0), ws.stride(1), **common)
    block = min(1024, triton.next_power_of_2(n))
    _reduce_kernel[(m, triton.cdiv(n, block))](ws, out, m, n, ws.stride(0), ws.stride(1), out.stride(0),
                                               SPLIT_K=cfg.split_k, BLOCK=block, num_warps=4)
    return out

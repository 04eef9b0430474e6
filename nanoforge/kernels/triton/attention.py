"""Paged attention in Triton: KV store, one mixed-batch attention call (prefill chunks + decode
rows), and the provider entry `attention` with the torch reference's signature (GQA and MLA).

Layout (the KV contract of passes/plan_memory.py): a GQA layer holds K and V pools
[num_blocks, block_size, kv_heads, head_dim]; an MLA layer holds one pool
[num_blocks, block_size, kv_lora_rank + rope_dim] = [normalized latent | roped k_rope]. Every kernel
reads strides, so V may be a strided view of K's storage (MLA: V = cache[..., None, :r]).

Design
------
One program owns (query tile, kv head, head chunk[, context split]). Its rows are the packed pairs
(query token, query head of this kv head): BLOCK_M = max(16, BQ * HB) rows, row r = token r // HB,
head r % HB, so every K/V tile is loaded once for the whole GQA group and both products run on
tensor cores (tl.dot, M padded to >= 16). A KV tile is BLOCK_N consecutive positions of the
sequence; each position's page id comes from block_tables, so a tile spans several pages
(decode, head_dim 128 bf16: BLOCK_N = 128 = 8 pages of 16 or 2 of 64) and each token row is a
contiguous head_dim run (16-byte vector loads). Head dims that are not powers of two are split into
two power-of-two column blocks (80 = 64 + 16, 96 = 64 + 32, 576 = 512 + 64, 192 = 128 + 64)
instead of being padded, so masks only cut the tail block. Online softmax in fp32 (exp2, log2e
folded into the scale), fp32 accumulators, probabilities cast to the query dtype for the PV
product (as the reference does). Positions past a sequence's context (padding of block_tables,
which points at block 0) are masked at load time, so garbage or NaN there never leaks.

Two grids over the same kernel body:
  * decode grid (B, kv_heads * head_chunks, S): sequences with 1 <= q_len <= BQ (BQ = 1 for plain
    decode, up to 8 for speculative verify rows). Split-K "flash decoding": each sequence's own
    context is cut into S near-equal, tile-aligned parts (so sequences shorter than
    max_context_len simply do less work per split; nothing depends on host-side values), each
    program writes (max, sum, unnormalized acc) partials, and `_reduce_kernel` (grid (B, H, BQ))
    combines them. S = 1 writes the output directly (no partials, no second launch).
    S policy: S = (2 * SMs) // (B * kv_heads * head_chunks), clamped to [1, MAX_SPLITS] and to
    max_context_len / MIN_SPLIT_TOKENS (H100, Qwen3-0.6B shapes, 4k context: S = 32, 4, 2, 1 at
    batch 1, 8, 16, >= 32). MIN_SPLIT_TOKENS 256 -> 128 took Qwen3-8B batch-1 attention at 1k
    context from 11 to 7 us per layer (S 4 -> 8).
  * prefill grid (T // BQ + B, kv_heads * head_chunks): query tiles of BQ tokens; tile index ->
    sequence by a binary search over query_start (tile t belongs to the last b with
    query_start[b] // BQ + b <= t), so the grid depends on T and B only. Each tile attends to
    positions 0 .. its last row's position: full tiles below its first row's position run without
    masks, the rest with the causal / context mask.
A mixed batch (max_query_len > MAX_DECODE_Q) launches both: decode programs serve the sequences
with q_len == 1 (split or not), prefill programs skip them. (Sending decode rows through 64-row
prefill tiles wasted the tile, and every (S > 1, S == 1) x prefill-config pair was one more
kernel variant to compile mid-run.) The reduce kernel always reads MAX_SPLITS partial slots
(masked), so a new split count never compiles a new variant.

Tried and dropped: decode batches storing their own K/V inside the decode grid (the split holding
position ctx - 1 folded that row in from registers and wrote it, saving store_kv's launch per layer):
HF's tokens on an H100 but not faster (reference workload's decode steps the same to 2% slower;
Qwen3-8B batch 1 0.8% faster, batch 64 1.4% slower; bench/results/decode_store/).

Tried and dropped: decode tiles on a hand-written register pipeline (tile i + 1's K/V and tile
i + 2's page ids loaded before tile i's math, since Triton's two-stage pipeline issues the next
tile's loads only after this tile's math): 7-12% slower than the default at every shape measured
(BLOCK_N 64 / 32, 2 or 4 warps; one H200, bench/results/decode_prefetch/).

CUDA-graph safe: no host reads of tensor values; grids depend on shapes, B, max_query_len,
max_context_len only; partial buffers come from torch.empty.

Performance (designed for, and measured on one H100 80GB HBM3, triton 3.6.0, torch 2.11, whose
device-to-device copy reaches 2.95 TB/s; bench/kernels/attention.py's `bench_paged_decode`, CUDA-graph
replays, do_bench median with L2 flushed, random data in shuffled pages):
  * target: decode at 4k context, batch >= 32, Qwen3-0.6B attention (16 q / 8 kv heads, head_dim
    128, bf16 KV, block 16) >= 2.5 TB/s of K+V read.
  * measured, that shape at 4k: batch 1 0.83 TB/s (20 us, latency bound), 8 2.04, 16 ~2.44,
    32 2.74, 64 2.89, 128 2.96, 256 3.0 TB/s. Decode config sweep: BLOCK_N 128, 4 warps, 2 stages
    was best or within 2% at every batch; splitting past ~2 programs per SM lost bandwidth.
  * short ragged contexts (the offline workload's; 2026-12-07, bench/results/decode_policy-20261207-1025.json,
    calls made as the engine's graphs are, max_context_len 2049): batch 256 at 512 positions 2.69 TB/s,
    at 517 2.55 (5 tiles a program instead of 4: a program's fixed cost shows), 128..2048 2.80; batch
    64 / 32 / 16 at 128..2048 2.30 / 2.04 / 1.57. Tried and dropped: one masked loop for every tile
    (the partial last tile inside the pipeline) measured the same or 1-3% slower; splits of a fixed 2 /
    4 / 8 tiles (short sequences get fewer splits) lost 5-25% at batch 256, gained <= 5% at 16-64.
  * MLA decode (16 heads, K = 576 = latent 512 + rope 64, V = latent view, block 64): 2.3 TB/s of
    latent+rope read at batch 64 (S = 4), 1.9 at batch 32. Reusing the K tile as V (tl.trans, so
    HBM/L2 is read once; flag _V_FROM_K) measured 10-25% slower than loading V again (L1/L2 hits).
  * prefill (fresh 4096-token chunk, 32/8 heads hd 128): ~270 TFLOP/s causal; 4 x 2048 on a 2048
    prefix: ~310; 16 x 512: ~140; head_dim 80 (64 + 16 blocks): ~200-230. 16 / 8 heads, 1 x 4096
    (2026-12-07, bench/results/prefill_varlen-20261207-224109.json): 216 TFLOP/s on 128-row tiles
    and 4 warps, which spill, 239 on 8 warps (the config for chunks of 2048+ rows since).
    PREFILL_LONGEST_FIRST (off, not yet timed) launches the last, longest tiles first.

FP8 KV (--kv-dtype fp8): e4m3 pools plus one f32 scale per (token, kv head) ([NB, BS, KVH]; MLA:
one per token over the whole [latent | k_rope] entry, shared by K and V), dynamic: store_kv
quantizes each row by its own amax, bitwise as fp8.quantize_kv. The read path keeps the bf16 one's
grids, tiles and tensor-core dots: K's scales multiply the score columns (folded with the softmax
scale: one [BLOCK_N] vector), V's the probability columns before p is cast for the PV dot, so no
[BLOCK_N, D] dequantize runs; padding scales are masked at load like the values. e4m3 tiles reach
the 16-bit dots by moving bits, not through Triton's cast (slow on Hopper's conversion pipe): see
attention_fp8.py. With f32 queries (CPU interpreter tests) tiles are cast to f32. Constexpr
KV_SCALED / KV_BITS: the bf16 variants compile as before (same SASS, offline sm_90 build). Only the
bytes halve (decode is memory bound); not yet measured on a GPU.

Not handled here: sliding windows, soft-capping, sinks.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..fp8 import FP8
from .attention_fp8 import PV_WIDEN, _exp2i
from .attention_tiles import _kv_tile
from .host_math import cdiv
from .kv_store import _pow2, store_kv  # noqa: F401 - store_kv: part of this module's API
from .mla import mla_attention
from .pdl import pdl_args, pdl_enter

FP8_WIDEN_BY_BITS = True  # FP8 KV, 16-bit queries: widen e4m3 tiles by moving bits (attention_fp8.py); False:
# Triton's e4m3 -> query-dtype cast (the conversion pipe), kept as the fallback and the bench's baseline
# prefill grid order: a causal tile's work grows with its position, so launching the last tiles of the
# step (and every kv head of one tile together) first keeps the longest programs off the tail of the grid
PREFILL_LONGEST_FIRST = False
MAX_DECODE_Q = 8  # rows per sequence the split-K decode grid serves (spec-decode verify rows)
TARGET_PROGRAMS_PER_SM = 2  # decode: split until about this many programs per SM
MAX_SPLITS = 32
MIN_SPLIT_TOKENS = 128  # a split reads at least this many positions

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8


# ---------------------------------------------------------------------------------------------
# paged attention
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "s_bt"])
def _paged_attn_kernel(
        q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr, pacc_ptr, pm_ptr, pl_ptr, qs_ptr, ctx_ptr, bt_ptr, ord_ptr,
        qk_scale, num_seqs, num_heads, num_splits,
        s_qt, s_qh, s_qd, s_kb, s_ko, s_kh, s_kd, s_vb, s_vo, s_vh, s_vd, s_ot, s_oh, s_od, s_bt,
        s_ksb, s_kso, s_ksh, s_vsb, s_vso, s_vsh,
        G: tl.constexpr, HB: tl.constexpr, NHC: tl.constexpr, BQ: tl.constexpr, BLOCK_M: tl.constexpr,
        DK: tl.constexpr, DV: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
        BLOCK_DV: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
        DECODE: tl.constexpr, SPLIT: tl.constexpr, DEC_Q: tl.constexpr,
        V_FROM_K: tl.constexpr, DOT_PREC: tl.constexpr, KV_SCALED: tl.constexpr, KV_BITS: tl.constexpr,
        PV_SHIFT: tl.constexpr, PV_SCALE: tl.constexpr, L_SCALE: tl.constexpr, LONGEST_FIRST: tl.constexpr,
        ORDERED: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    if LONGEST_FIRST:  # prefill grid (KVH * NHC, tiles): heads fastest, the last tiles (most keys) first
        pid0 = tl.num_programs(1) - 1 - tl.program_id(1)
        pid1 = tl.program_id(0)
    else:
        pid0 = tl.program_id(0)
        pid1 = tl.program_id(1)
    kvh = pid1 // NHC
    hc = pid1 % NHC
    if DECODE:
        if ORDERED:  # program pid0 serves the sequence decode_order names (longest context first)
            b = tl.load(ord_ptr + pid0)
        else:
            b = pid0
        split = tl.program_id(2)
    else:  # tile pid0 belongs to the last sequence b with query_start[b] // BQ + b <= pid0
        lo_b = pid0 * 0
        hi_b = num_seqs - 1
        while lo_b < hi_b:
            mid_b = (lo_b + hi_b + 1) // 2
            ok = tl.load(qs_ptr + mid_b) // BQ + mid_b <= pid0
            lo_b = tl.where(ok, mid_b, lo_b)
            hi_b = tl.where(ok, hi_b, mid_b - 1)
        b = lo_b
    q_start = tl.load(qs_ptr + b)
    q_len = tl.load(qs_ptr + b + 1) - q_start
    if DECODE:
        if (q_len == 0) | (q_len > BQ):
            return
        q0 = 0
    else:
        if q_len <= DEC_Q:
            return
        q0 = (pid0 - (q_start // BQ + b)) * BQ
        if q0 >= q_len:
            return
    ctx = tl.load(ctx_ptr + b)

    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // HB
    g = hc * HB + offs_m % HB
    row_ok = (tok < BQ) & (q0 + tok < q_len) & (g < G)
    head = kvh * G + g
    q_row = (q_start + q0 + tok).to(tl.int64)
    q_pos = tl.where(row_ok, ctx - q_len + q0 + tok, ctx - 1)

    d1 = tl.arange(0, DK1)
    q_ptrs = q_ptr + q_row[:, None] * s_qt + head[:, None] * s_qh
    q1 = tl.load(q_ptrs + d1[None, :] * s_qd, mask=row_ok[:, None] & (d1[None, :] < DK), other=0.0)
    if DK2 > 0:
        d2 = DK1 + tl.arange(0, DK2)
        q2 = tl.load(q_ptrs + d2[None, :] * s_qd, mask=row_ok[:, None] & (d2[None, :] < DK), other=0.0)
    else:
        q2 = q1
    if KV_BITS:  # K tiles come as e4m3 * 2^-8 in f16: q * 2^(8 - e) in f16 (e = exponent of max|q|, so
        # |q| < 2^9 and the products stay near q / max|q| * k); 2^e goes into the softmax scale
        qa = tl.max(tl.max(tl.abs(q1.to(tl.float32)), 1), 0)
        if DK2 > 0:
            qa = tl.maximum(qa, tl.max(tl.max(tl.abs(q2.to(tl.float32)), 1), 0))
        e = tl.maximum(((qa.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -119)
        q1 = (q1.to(tl.float32) * _exp2i(8 - e)).to(tl.float16)
        if DK2 > 0:
            q2 = (q2.to(tl.float32) * _exp2i(8 - e)).to(tl.float16)
        else:
            q2 = q1
        qk_scale = qk_scale * _exp2i(e)

    if DECODE:  # this split's share of the sequence's own context, tile aligned
        n_tiles = tl.cdiv(ctx, BLOCK_N)
        per = tl.cdiv(n_tiles, num_splits)
        lo = split * per * BLOCK_N
        hi = tl.minimum(lo + per * BLOCK_N, ctx)
        if lo >= hi:
            return
    else:
        lo = 0
        hi = ctx - q_len + tl.minimum(q0 + BQ, q_len)
    first = ctx - q_len + q0  # position of the tile's first row: keys <= first need no mask
    mid = lo + (tl.maximum(tl.minimum(hi, first + 1) - lo, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    k_base = k_ptr + kvh.to(tl.int64) * s_kh
    v_base = v_ptr + kvh.to(tl.int64) * s_vh
    ks_base = ks_ptr + kvh.to(tl.int64) * s_ksh
    vs_base = vs_ptr + kvh.to(tl.int64) * s_vsh
    for start in range(lo, mid, BLOCK_N):
        acc, m_i, l_i = _kv_tile(acc, m_i, l_i, q1, q2, start, ctx, q_pos, bt_row, k_base, v_base, ks_base,
                                 vs_base, qk_scale, s_kb, s_ko, s_kd, s_vb, s_vo, s_vd, s_ksb, s_kso, s_vsb,
                                 s_vso, DK, DV, DK1, DK2, BLOCK_DV, BS, BLOCK_N, False, V_FROM_K, DOT_PREC,
                                 KV_SCALED, KV_BITS, PV_SHIFT, PV_SCALE)
    for start in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _kv_tile(acc, m_i, l_i, q1, q2, start, ctx, q_pos, bt_row, k_base, v_base, ks_base,
                                 vs_base, qk_scale, s_kb, s_ko, s_kd, s_vb, s_vo, s_vd, s_ksb, s_kso, s_vsb,
                                 s_vso, DK, DV, DK1, DK2, BLOCK_DV, BS, BLOCK_N, True, V_FROM_K, DOT_PREC,
                                 KV_SCALED, KV_BITS, PV_SHIFT, PV_SCALE)

    if KV_BITS:
        l_i = l_i * L_SCALE  # acc carries p * v * L_SCALE
    dv = tl.arange(0, BLOCK_DV)
    if SPLIT:
        prow = ((b.to(tl.int64) * BQ + tok) * num_heads + head) * num_splits + split
        tl.store(pm_ptr + prow, m_i, mask=row_ok)
        tl.store(pl_ptr + prow, l_i, mask=row_ok)
        tl.store(pacc_ptr + prow[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & (dv[None, :] < DV))
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(o_ptr + q_row[:, None] * s_ot + head[:, None] * s_oh + dv[None, :] * s_od,
                 o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(o_ptr, pacc_ptr, pm_ptr, pl_ptr, qs_ptr, ctx_ptr, num_heads, num_splits,
                   s_ot, s_oh, s_od,
                   DV: tl.constexpr, BLOCK_DV: tl.constexpr, BQ: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """Combine the split-K partials (max, sum, acc) of one (sequence, head, query row)."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    tok = tl.program_id(2)
    q_start = tl.load(qs_ptr + b)
    q_len = tl.load(qs_ptr + b + 1) - q_start
    if (tok >= q_len) | (q_len > BQ):
        return
    ctx = tl.load(ctx_ptr + b)
    n_tiles = tl.cdiv(ctx, BLOCK_N)
    per = tl.maximum(tl.cdiv(n_tiles, num_splits), 1)
    n_valid = tl.cdiv(n_tiles, per)  # splits that had work (and wrote partials)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_valid
    prow = ((b.to(tl.int64) * BQ + tok) * num_heads + h) * num_splits + s
    m = tl.load(pm_ptr + prow, mask=s_ok, other=float("-inf"))
    l = tl.load(pl_ptr + prow, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    denom = tl.sum(l * w, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    dv = tl.arange(0, BLOCK_DV)
    acc = tl.load(pacc_ptr + prow[:, None] * DV + dv[None, :], mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
    o = tl.sum(acc * w[:, None], 0) / denom
    tl.store(o_ptr + (q_start + tok).to(tl.int64) * s_ot + h * s_oh + dv * s_od,
             o.to(o_ptr.dtype.element_ty), mask=dv < DV)


def _split_dk(dk: int) -> tuple[int, int]:
    """Head dim -> two power-of-two column blocks (DK1 >= 16 leading, DK2 tail or 0)."""
    d1 = max(16, 1 << (dk.bit_length() - 1))
    rest = dk - d1
    return d1, (max(16, _pow2(rest)) if rest > 0 else 0)


def _num_splits(batch: int, programs_per_seq: int, max_context_len: int, device: torch.device) -> int:
    progs = max(1, batch * programs_per_seq)
    s = (TARGET_PROGRAMS_PER_SM * _sm_count(device)) // progs  # round down: a 2nd wave barely pays
    s = min(s, MAX_SPLITS, max(1, max_context_len // MIN_SPLIT_TOKENS))
    return max(1, s)


_DECODE_CFG_OVERRIDE: tuple[int, int, int] | None = None  # set by the tuning sweeps
_PREFILL_CFG_OVERRIDE: tuple[int, int, int, int] | None = None
_MLA_CFG = (32, 4, 2)
_V_FROM_K = False  # reuse the K tile as V when V aliases K[..., :Dv]: measured slower (see docstring)


def _decode_cfg(dk1: int, dk2: int, dv_block: int, elem: int, v_from_k: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the decode grid."""
    if _DECODE_CFG_OVERRIDE is not None:
        return _DECODE_CFG_OVERRIDE
    # bytes per position per tile; an e4m3 tile is widened to 16 bits in registers, so it gets bf16's
    # tiles (half the bytes per stage). FP8 unmeasured: bench.kernels.attention._tune_decode(kv_dtype="fp8")
    width = (dk1 + dk2 + (0 if v_from_k else dv_block)) * max(elem, 2)
    if _INTERPRET:
        return 16, 4, 1
    if width <= 512:  # head_dim <= 128 at bf16: 128 positions (8 pages of 16), 64 KiB per stage
        return 128, 4, 2
    if width <= 1024:
        return 64, 4, 2
    return _MLA_CFG


def _prefill_cfg(dk1: int, dk2: int, dv_block: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill grid."""
    if _PREFILL_CFG_OVERRIDE is not None:
        return _PREFILL_CFG_OVERRIDE
    if _INTERPRET:
        return 16, 16, 4, 1
    if max(dk1 + dk2, dv_block) <= 128:  # 128 rows x 128 f32 accumulators on 4 warps spill (test_decode_sass.py)
        return (128, 64, 8 if dv_block == 128 else 4, 3) if max_query_len >= 2048 else (64, 64, 4, 3)
    if max(dk1 + dk2, dv_block) <= 256:
        return 64, 32, 4, 2
    return 32, 32, 8, 1


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor, *,
                    scale: float, max_query_len: int, max_context_len: int,
                    out: torch.Tensor | None = None, num_splits: int | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    min_query_len: int = 0, decode_order: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the flat mixed batch over the paged cache -> out [T, H, Dv].

    q [T, H, Dk]; k_cache [NB, BS, KVH, Dk]; v_cache [NB, BS, KVH, Dv] (any strides, may alias
    k_cache); rows query_start[b] .. query_start[b+1]-1 are positions context_lens[b] - q_len ..
    context_lens[b] - 1 of sequence b and attend to its positions 0 .. context_lens[b] - 1 (this
    step's K/V already stored). `num_splits` forces the decode split count (tests, tuning).
    `min_query_len` (0: unknown): the shortest row count of a sequence; a mixed batch with none of
    one row launches no decode grid (a prefill step: one launch less a layer).
    FP8 KV: e4m3 caches with k_scale / v_scale [NB, BS, KVH] f32, one per (token, kv head) (may be
    the same tensor, MLA); without scales a float8 cache is read unscaled."""
    T, H, DK = q.shape
    NB, BS, KVH, DK_ = k_cache.shape
    assert DK_ == DK, f"q head dim {DK} != k_cache head dim {DK_}"
    assert v_cache.shape[:3] == k_cache.shape[:3], "k_cache and v_cache must share [NB, BS, KVH]"
    assert H % KVH == 0, f"{H} query heads are not a multiple of {KVH} kv heads"
    DV = v_cache.shape[-1]
    B = context_lens.shape[0]
    scaled = k_scale is not None
    if scaled:
        assert k_cache.dtype == v_cache.dtype == FP8, "k_scale / v_scale come with e4m3 caches"
        assert v_scale is not None and k_scale.shape == v_scale.shape == (NB, BS, KVH), \
            f"k_scale / v_scale must be [NB, BS, KVH] = {(NB, BS, KVH)}"
    ks, vs = (k_scale, v_scale) if scaled else (k_cache, k_cache)  # unused pointers without scales
    if out is None:
        out = q.new_empty(T, H, DV)
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    G = H // KVH
    DK1, DK2 = _split_dk(DK)
    BLOCK_DV = max(16, _pow2(DV))
    bits = scaled and FP8_WIDEN_BY_BITS and q.dtype in (torch.bfloat16, torch.float16)  # _widen, not a cast
    v_from_k = (_V_FROM_K and not bits and v_cache.data_ptr() == k_cache.data_ptr()
                and v_cache.stride() == k_cache.stride() and DV == DK1 and DK1 <= DK)
    dot_prec = "ieee" if q.dtype == torch.float32 else None
    qk_scale = float(scale) * 1.4426950408889634  # log2(e): softmax in base 2
    common = dict(DK=DK, DV=DV, DK1=DK1, DK2=DK2, BLOCK_DV=BLOCK_DV, BS=BS, V_FROM_K=v_from_k, DOT_PREC=dot_prec,
                  KV_SCALED=scaled, KV_BITS=bits, PV_SHIFT=PV_WIDEN[0], PV_SCALE=PV_WIDEN[1] if bits else 1.0,
                  L_SCALE=PV_WIDEN[2] if bits else 1.0, **pdl_args(q))
    strides = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), block_tables.stride(0),
               *(k_scale.stride() + v_scale.stride() if scaled else (0,) * 6))

    mixed = max_query_len > MAX_DECODE_Q
    BQ = 1 if mixed else _pow2(max_query_len)
    if not mixed or min_query_len <= BQ:  # decode grid: every row of a decode batch, a mixed one's single rows
        _decode_grid(q, k_cache, v_cache, out, ks=ks, vs=vs, query_start=query_start, context_lens=context_lens,
                     block_tables=block_tables, qk_scale=qk_scale, strides=strides, common=common, BQ=BQ, G=G,
                     KVH=KVH, DV=DV, num_splits=num_splits, max_context_len=max_context_len, v_from_k=v_from_k,
                     decode_order=decode_order)
    if mixed:
        BLOCK_M, BLOCK_N, warps, stages = _prefill_cfg(DK1, DK2, BLOCK_DV, max_query_len)
        HBp = min(_pow2(G), BLOCK_M)
        NHCp = cdiv(G, HBp)
        BQp = BLOCK_M // HBp
        tiles = T // BQp + B
        lpt = PREFILL_LONGEST_FIRST and tiles <= 65535  # a grid's y extent is at most 65535
        _paged_attn_kernel[(KVH * NHCp, tiles, 1) if lpt else (tiles, KVH * NHCp, 1)](
            q, k_cache, v_cache, ks, vs, out, out, out, out, query_start, context_lens, block_tables, query_start,
            qk_scale, B, H, 1, *strides,
            G=G, HB=HBp, NHC=NHCp, BQ=BQp, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            DECODE=False, SPLIT=False, DEC_Q=1, LONGEST_FIRST=lpt, ORDERED=False, **common,
            num_warps=warps, num_stages=stages)
    return out


def _decode_grid(q, k_cache, v_cache, out, *, ks, vs, query_start, context_lens, block_tables, qk_scale, strides,
                 common, BQ, G, KVH, DV, num_splits, max_context_len, v_from_k, decode_order) -> None:
    """The split-K decode grid (and its reduce) over the sequences of at most BQ rows."""
    B, H = context_lens.shape[0], q.shape[1]
    BLOCK_DV = common["BLOCK_DV"]
    HB = min(_pow2(G), max(1, 16384 // (BQ * BLOCK_DV)), 64)
    NHC = cdiv(G, HB)
    S = num_splits or _num_splits(B, KVH * NHC, max_context_len, q.device)
    BLOCK_N, warps, stages = _decode_cfg(common["DK1"], common["DK2"], BLOCK_DV, k_cache.element_size(), v_from_k)
    split = S > 1
    if split:
        pacc = torch.empty(B * BQ * H * S * DV, device=q.device, dtype=torch.float32)
        pm = torch.empty(B * BQ * H * S, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    else:
        pacc = pm = pl = out
    _paged_attn_kernel[(B, KVH * NHC, S)](
        q, k_cache, v_cache, ks, vs, out, pacc, pm, pl, query_start, context_lens, block_tables,
        query_start if decode_order is None else decode_order, qk_scale, B, H, S, *strides,
        G=G, HB=HB, NHC=NHC, BQ=BQ, BLOCK_M=max(16, BQ * HB), BLOCK_N=BLOCK_N,
        DECODE=True, SPLIT=split, DEC_Q=0, LONGEST_FIRST=False, ORDERED=decode_order is not None, **common,
        num_warps=warps, num_stages=stages)
    if split:
        _reduce_kernel[(B, H, BQ)](
            out, pacc, pm, pl, query_start, context_lens, H, S, *out.stride(),
            DV=DV, BLOCK_DV=BLOCK_DV, BQ=BQ, BLOCK_S=MAX_SPLITS, BLOCK_N=BLOCK_N, **pdl_args(q), num_warps=4)


# ---------------------------------------------------------------------------------------------
# provider entry
# ---------------------------------------------------------------------------------------------
def attention(q, k, v, *, ctx, kind, layer, scale, kv_b_proj=None, kv_stored=False, **a):
    """Same signature and semantics as torch_ref.attention: store this step's K/V into the paged
    pool (unless qk_rope_store did), then causal attention per sequence. q [T, H*Dk], k/v 2-D;
    returns [T, H*Dv]. An FP8 pool (e4m3 values + f32 scales per token and kv head) is quantized at
    store and scaled at read."""
    T = q.shape[0]
    if kind == "gqa":
        h, kvh, d = a["heads"], a["kv_heads"], a["head_dim"]
        k_cache, v_cache, *scales = ctx.kv[layer]
        ks, vs = scales or (None, None)
        if not kv_stored:
            store_kv(k_cache, v_cache, k.reshape(T, kvh, d), v.reshape(T, kvh, d), ctx.slot_mapping, ks, vs)
        o = paged_attention(q.reshape(T, h, d), k_cache, v_cache, ctx.query_start, ctx.context_lens,
                            ctx.block_tables, scale=scale, max_query_len=ctx.max_query_len,
                            max_context_len=ctx.max_context_len, k_scale=ks, v_scale=vs,
                            min_query_len=ctx.host.q_range[0] if ctx.host is not None else 0,
                            decode_order=ctx.decode_order)
        return o.view(T, h * d)
    return mla_attention(q, k, v, ctx, layer=layer, scale=scale, kv_b_proj=kv_b_proj, a=a, attend=_paged_latent,
                         absorbed_max_q=MAX_DECODE_Q)


def _paged_latent(q_full: torch.Tensor, cache: torch.Tensor, r: int, ctx, scale: float,
                  kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA over the pool with this module's kernel: KVH = 1, V = the latent columns (FP8:
    both scaled by the entry's one kv_scale [NB, BS, 1])."""
    return paged_attention(q_full, cache[:, :, None, :], cache[:, :, None, :r], ctx.query_start, ctx.context_lens,
                           ctx.block_tables, scale=scale, max_query_len=ctx.max_query_len,
                           max_context_len=ctx.max_context_len, k_scale=kv_scale, v_scale=kv_scale)

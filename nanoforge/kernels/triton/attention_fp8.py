"""FP8 (e4m3) KV cache pieces of the paged attention kernels (triton/attention.py): the per-row
quantizer of store_kv and the widening of e4m3 tiles for the tensor-core dots.

Read path (16-bit queries): a tile is widened by moving bits, not converted. An e4m3 byte
s eeee mmm becomes the 16-bit float with the same sign and eeee mmm placed at the top of its
exponent-mantissa field: f16 (shift 7) = e4m3 * 2^-8, bf16 (shift 4) = e4m3 * 2^-120, exact for
every value, subnormals included (the exponent biases differ by exactly those powers of two). The
callers fold the power of two into scales they apply anyway: QK runs in f16 with q * 2^(8 - e)
(e = exponent of max|q|, one per program) and 2^e in the softmax scale; PV runs in bf16 with
p * v_scale * 2^104 (finite for any v_scale < 2^24) and 2^-16 left on acc and l. Why bits: Triton's
e4m3 -> bf16 cast is cvt.f16x2.e4m3x2 plus two F2F.BF16.F16, 1.5 instructions a value on Hopper's
16/clk/SM conversion pipe: decode at batch 128 x 4k (Qwen3-0.6B shapes) would need ~0.43 ms of that
pipe against ~0.37 ms of HBM time for the e4m3 bytes. The widening is 4 integer ops per 2 values
(prmt, and, shr, and-or) on the ALU. Offline sm_90 builds (triton 3.6 + its ptxas, no GPU), decode
kernel, hd 128, BLOCK_N 128: bf16 KV 2944 SASS instructions; FP8 with the cast 4386 (512 F2F, 256
F2FP); FP8 with this widening 3304 (no conversion-pipe work, 158 registers, no spills). Unmeasured.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .fp8_gemm import _round_to_e4m3

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ASM = tl.constexpr(not _INTERPRET)  # _widen in inline PTX (the interpreter runs the same bit ops in Triton)
# FP8 KV, 16-bit queries: the PV product's e4m3 widening (_widen shift) and its scales: bf16 V = e4m3 *
# 2^-120, p * v_scale * 2^104 (finite in bf16 for any v_scale < 2^24), so acc and l carry 2^-16. The
# interpreter has no bf16 dot: f16 there (e4m3 * 2^-8, p * v_scale * 2^8).
PV_WIDEN = (7, 2.0 ** 8, 1.0) if _INTERPRET else (4, 2.0 ** 104, 2.0 ** -16)


def _widen_ptx(shift: int) -> str:
    """4 e4m3 values ($2, value i in byte i) -> 4 16-bit floats ($0 = values 0, 1; $1 = 2, 3): each byte
    goes to the high byte of a 16-bit lane (prmt), its exponent-mantissa bits move right by 8 - shift."""
    return ("{ .reg .b32 a, b, c, d;\n prmt.b32 a, $2, 0, 0x1404;\n prmt.b32 b, $2, 0, 0x3424;\n"
            " and.b32 c, a, 0x7F007F00;\n and.b32 d, b, 0x7F007F00;\n"
            f" shr.b32 c, c, {8 - shift};\n shr.b32 d, d, {8 - shift};\n"
            " and.b32 a, a, 0x80008000;\n and.b32 b, b, 0x80008000;\n or.b32 $0, a, c;\n or.b32 $1, b, d; }")


_WIDEN_PTX_BF16 = tl.constexpr(_widen_ptx(4))
_WIDEN_PTX_F16 = tl.constexpr(_widen_ptx(7))


@triton.jit
def _quant_rows(x, BLOCK_H: tl.constexpr, EPS: tl.constexpr):
    """x [BLOCK_H, D] f32 (masked columns 0) -> (values rounded to e4m3 in f32, f32 scale per row),
    bitwise as fp8.quantize_kv: div_rn (`/` is approximate on NVIDIA) and explicit round-to-nearest-even,
    so the cast to e4m3 after it is exact."""
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 1), EPS), tl.full([BLOCK_H], 448.0, tl.float32))
    q = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    return _round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0)), scale


@triton.jit
def _exp2i(n):
    """2.0 ** n as f32 for integer n in [-126, 127], exactly (built from the exponent bits)."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _widen(x, SHIFT: tl.constexpr):
    """e4m3 tile -> 16-bit tile for tl.dot by moving bits (sign | exponent-mantissa << SHIFT), exact with
    subnormals: SHIFT 4 gives bf16 = e4m3 * 2^-120, SHIFT 7 f16 = e4m3 * 2^-8 (the callers fold the
    power of two into their scales). 4 integer ops per 2 values; Triton's e4m3 -> bf16 cast (cvt to f16,
    then F2F, 1.5 conversions a value on Hopper's slow conversion pipe) would cap decode below the
    bandwidth the halved bytes allow. is_pure=False keeps the conversion on the loaded (row-contiguous)
    tile: a pure one is hoisted past the shared-memory load into the dot layout, where V's transposed
    bytes are then read one at a time (+35% instructions, offline sm_90 build)."""
    if _ASM:
        if SHIFT == 4:
            y = tl.inline_asm_elementwise(_WIDEN_PTX_BF16, "=r,=r,r", [x.to(tl.uint8, bitcast=True)],
                                          dtype=tl.bfloat16, is_pure=False, pack=4)
        else:
            y = tl.inline_asm_elementwise(_WIDEN_PTX_F16, "=r,=r,r", [x.to(tl.uint8, bitcast=True)],
                                          dtype=tl.float16, is_pure=False, pack=4)
    else:
        u = x.to(tl.uint8, bitcast=True).to(tl.uint16)
        u = ((u & 0x80) << 8) | ((u & 0x7F) << SHIFT)
        if SHIFT == 4:
            y = u.to(tl.bfloat16, bitcast=True)
        else:
            y = u.to(tl.float16, bitcast=True)
    return y

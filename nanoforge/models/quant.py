"""What a checkpoint's `quantization_config` says about its weights, checked against what we run.

Supported: DeepSeek-V3 / Kimi-K2 / GLM-5's block FP8 (`quant_method: "fp8"`, e4m3 values, one f32
`<weight>_scale_inv` per 128x128 block, activations quantized dynamically). Every other scheme is
refused at compile time with its name: casting its packed tensors to bf16 would run, silently,
with garbage weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NanoForgeError

FP8_BLOCK = (128, 128)
SUPPORTED = "fp8 with weight_block_size [128, 128] (block FP8, as DeepSeek-V3, Kimi-K2 and GLM-5 ship)"


@dataclass(frozen=True)
class WeightQuant:
    """A checkpoint's weight quantization: block FP8."""

    method: str  # "fp8"
    block: tuple[int, int]  # rows x columns of a weight that share one scale
    keep: tuple[str, ...] = ()  # module name fragments left in high precision (modules_to_not_convert)


def weight_quant_of(config: dict[str, Any]) -> WeightQuant | None:
    """The checkpoint's quantization (None: plain weights), or a one-line error naming what is not
    supported."""
    q = config.get("quantization_config") or config.get("compression_config")
    if q is None:
        return None
    where = "config.json quantization_config"
    if not isinstance(q, dict):
        raise NanoForgeError(f"{where}: expected an object, got {type(q).__name__}")
    method = q.get("quant_method") or q.get("format") or "?"
    if method != "fp8":
        raise NanoForgeError(f"{where}: quant_method {method!r} is not supported; supported: {SUPPORTED}")
    block = q.get("weight_block_size")
    if block is None:
        raise NanoForgeError(f"{where}: fp8 without weight_block_size (one scale per tensor) is not supported; "
                             f"supported: {SUPPORTED}")
    if list(block) != list(FP8_BLOCK):
        raise NanoForgeError(f"{where}: fp8 weight_block_size {list(block)} is not supported; supported: {SUPPORTED}")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise NanoForgeError(f"{where}: fp8 fmt {fmt!r} is not supported; supported: {SUPPORTED}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise NanoForgeError(f"{where}: activation_scheme {q['activation_scheme']!r} (static activation scales) is "
                             f"not supported; supported: {SUPPORTED}")
    return WeightQuant("fp8", FP8_BLOCK, tuple(q.get("modules_to_not_convert") or ()))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale tensor of a weight (its last two dims in blocks, partial edge blocks included)."""
    *lead, rows, cols = (int(d) for d in shape)
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))

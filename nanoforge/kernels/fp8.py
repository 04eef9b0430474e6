"""Block FP8 in plain torch: one f32 scale per `block` rows x columns of a weight's last two dims
(partial edge blocks included), values in e4m3. `dequantize` is the reference every FP8 kernel
is checked against and what the loader uses to widen an FP8 checkpoint; `quantize` is what
`compile --quantize fp8` does to a high-precision checkpoint at load."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _expand(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over its rows x columns, cut to the weight's size."""
    return s.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | list[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w (fp8, [..., rows, cols]) times its block scales, in `dtype`."""
    rows, cols = w.shape[-2:]
    return (w.to(torch.float32) * _expand(scale_inv.to(torch.float32), rows, cols, tuple(block))).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, f32 scale_inv per block) with each block's largest magnitude at FP8_MAX."""
    b0, b1 = block
    *lead, rows, cols = w.shape
    nr, nc = -(-rows // b0), -(-cols // b1)
    padded = w.new_zeros(*lead, nr * b0, nc * b1, dtype=torch.float32)
    padded[..., :rows, :cols] = w.to(torch.float32)
    blocks = padded.view(*lead, nr, b0, nc, b1)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [..., nr, nc]
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(*lead, nr * b0, nc * b1)
    return q[..., :rows, :cols].to(FP8).contiguous(), scale_inv

"""Block FP8 in plain torch: one f32 scale per `block` rows x columns of a weight's last two dims
(partial edge blocks included), values in e4m3. `dequantize` is the reference every FP8 kernel
is checked against and what the loader uses to widen an FP8 checkpoint; `quantize` is what
`compile --quantize fp8` does to a high-precision checkpoint at load. `quantize_activations` is
the per-token, per-128-column activation quantization of the W8A8 GEMMs (DeepGEMM's format), and
`w8a8_linear` their math in torch: the reference of triton/fp8_gemm.py and what the torch provider
runs for a linear whose plan asks for quantized activations (attr act_quant)."""
from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_EPS = 1e-10  # an all-zero group gets this amax, not a division by zero


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


def quantize_activations(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 [..., K] e4m3, x_scale [..., ceil(K/group)] f32): per token, per 1 x group slice of
    K, scale = max(amax, SCALE_EPS) / 448 and x_fp8 = e4m3(clamp(x / scale, +-448)), IEEE f32 division,
    round to nearest even. The last group of a K that `group` does not divide covers the tail only."""
    *lead, k = x.shape
    m, g = math.prod(lead), -(-k // group)
    xf = x.reshape(m, k).to(torch.float32)
    if g * group != k:
        xf = torch.nn.functional.pad(xf, (0, g * group - k))
    v = xf.view(m, g, group)
    amax = v.abs().amax(dim=-1).clamp(min=SCALE_EPS)
    # tensor / tensor: torch's CUDA `tensor / python float` multiplies by the rounded reciprocal
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (v / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(m, g * group)[:, :k]
    return q.reshape(*lead, k).contiguous(), scale.reshape(*lead, g)


def fake_quantize_activations(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x as the W8A8 GEMMs see it (quantized per token and `group` columns, widened back), in x's dtype:
    how the widened-weight expert kernels take part in the plan's W8A8 math (attr act_quant)."""
    q, s = quantize_activations(x, group)
    return dequantize(q, s, (1, group)).to(x.dtype)


def w8a8_linear(x: torch.Tensor, w: torch.Tensor, w_scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, group: int = 128) -> torch.Tensor:
    """x quantized per token and `group` columns, both operands dequantized to f32, f32 matmul (+ bias)."""
    *lead, k = x.shape
    xq, xs = quantize_activations(x.reshape(-1, k), group)
    y = dequantize(xq, xs, (1, group)) @ dequantize(w, w_scale_inv, (group, group)).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).view(*lead, w.shape[0])


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 KV cache entries: x [T, H, D] -> (e4m3 [T, H, D], f32 scale [T, H]), one dynamic scale per
    token and head (an MLA latent entry: H = 1), computed as quantize_activations does (scale =
    max(amax, SCALE_EPS) / 448, IEEE division, round to nearest even), so the Triton KV store can be
    bitwise equal to it. Needs no calibration: each entry is scaled by its own largest magnitude."""
    t, h, d = x.shape
    q, s = quantize_activations(x.reshape(t * h, d), group=max(d, 1))
    return q.view(t, h, d), s.view(t, h)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quantize_kv's inverse: q [..., H, D] e4m3 times scale [..., H], in `dtype`."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)

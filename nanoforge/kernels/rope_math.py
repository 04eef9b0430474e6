"""Rotary frequencies, including the scaled variants (linear, llama3, YaRN).

Shared by every rope provider so that they differ only in how they apply the rotation.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..ir.rope import yarn_mscale


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    orig = s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast", 32.0), s.get("beta_slow", 1.0)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = math.floor(correction_dim(beta_fast)) if s.get("truncate", True) else correction_dim(beta_fast)
    high = math.ceil(correction_dim(beta_slow)) if s.get("truncate", True) else correction_dim(beta_slow)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = yarn_mscale(factor, s["mscale"]) / yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attn = yarn_mscale(factor)
    return inv, float(attn)


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(is_mid, mid, scaled)


@lru_cache(maxsize=64)
def _frequencies(dim: int, base: float, scaling_items: tuple) -> tuple[torch.Tensor, float]:
    s = dict(scaling_items)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = s.get("type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv, s), 1.0
    if kind == "yarn":
        return _yarn(inv, dim, base, s)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def rope_frequencies(rotary_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inv_freq f32[rotary_dim/2], attention_factor multiplying cos and sin)."""
    return _frequencies(rotary_dim, float(theta), _items(scaling))


def _items(scaling: dict | None) -> tuple:
    return tuple(sorted((k, v) for k, v in (scaling or {}).items() if not isinstance(v, (list, dict))))


_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def rope_frequencies_on(rotary_dim: int, theta: float, scaling: dict | None,
                        device: torch.device | str) -> tuple[torch.Tensor, float]:
    """rope_frequencies with inv_freq already on `device`, copied there once per (key, device): a
    reference kernel run inside a CUDA graph copies nothing host -> device (a capture forbids it). The
    first call must be eager (the runner's warm-up before each capture is)."""
    inv, factor = rope_frequencies(rotary_dim, theta, scaling)
    device = torch.device(device)
    if device.type == "cpu":
        return inv, factor
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (int(rotary_dim), float(theta), _items(scaling), device)
    hit = _ON_DEVICE.get(key)
    if hit is None:
        hit = _ON_DEVICE[key] = inv.to(device)
    return hit, factor

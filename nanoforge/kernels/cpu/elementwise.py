"""Norms and rope for the CPU target: torch_ref's math in fewer tensor ops.

On the CPU a small model's decode step is host-bound: every aten call costs microseconds whatever
its size, and torch_ref's rms_norm is six of them, its rope two dozen (cos/sin rebuilt per layer,
q and k rotated apart). Here an f32 norm is one `torch.rms_norm` (bit-equal to torch_ref's chain), and
rope reads cos/sin built once per step (cached on the step's positions tensor, which every layer
shares) and rotates q and k together as one strided view when they sit side by side in the fused
q/k/v projection's output, as `x * cos + roll(x, half) * sin_signed`: four ops, bit-equal to
rotate_half's (negation is exact). From SPLIT_ROWS rows (a prefill) the halves are rotated in place
instead, (x1 c - x2 s, x2 c + x1 s): the same products and sums, without roll's copy (1.5x at 2k
rows). Other dtypes and layouts fall back to torch_ref's code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import torch_ref
from ..rope_math import rope_frequencies

_CACHE = "_nanoforge_rope"  # attribute of a step's positions tensor: {(dim, theta, scaling, dtype): (cos, sin)}
SPLIT_ROWS = 256  # rows from which rope rotates the halves in place (below: roll, fewer calls)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int | None = None, **a) -> torch.Tensor:
    if x.dtype != torch.float32 or weight.dtype != torch.float32:  # torch_ref rounds to x's dtype before the gain
        return torch_ref.rms_norm(x, weight, eps, group=group, **a)
    if group is None:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)  # F.rms_norm without its Python wrapper
    shape = x.shape
    return torch.rms_norm(x.reshape(*shape[:-1], shape[-1] // group, group), (group,), weight, eps).reshape(shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 **a) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm(s, weight, eps), s


def silu_mul(gate: torch.Tensor, up: torch.Tensor, **_) -> torch.Tensor:
    return F.silu(gate).mul_(up)  # the product into silu's fresh output: one allocation fewer


def _tables(positions: torch.Tensor, rotary_dim: int, theta: float, scaling: dict | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) as torch_ref.rope builds them, once per step and rope config: [T, 1, rotary_dim] with
    sin's first half negated (rotate_half's sign) for _rotate, or from SPLIT_ROWS rows their first
    halves (the second ones are equal), [T, 1, 1, rotary_dim / 2], for _rotate_split."""
    cache = positions.__dict__.setdefault(_CACHE, {})
    key = (rotary_dim, theta, None if scaling is None else repr(scaling), dtype)
    tables = cache.get(key)
    if tables is None:
        inv_freq, attn_factor = rope_frequencies(rotary_dim, theta, scaling)
        freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
        if positions.shape[0] >= SPLIT_ROWS:
            cos, sin = (freqs.cos() * attn_factor).to(dtype), (freqs.sin() * attn_factor).to(dtype)
            tables = cache[key] = (cos[:, None, None, :], sin[:, None, None, :])
            return tables
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = (emb.cos() * attn_factor).to(dtype), (emb.sin() * attn_factor).to(dtype)
        sin[:, : rotary_dim // 2].neg_()
        tables = cache[key] = (cos[:, None, :], sin[:, None, :])
    return tables


def _side_by_side(q: torch.Tensor, k: torch.Tensor, heads: int, kv_heads: int, d: int) -> torch.Tensor | None:
    """q [T, heads*d] and k [T, kv_heads*d] as one [T, heads+kv_heads, d] view, when k's columns
    directly follow q's in one buffer (split of the fused projection); else None."""
    if q.dim() != 2 or q.stride(1) != 1 or k.stride() != q.stride() or q.dtype != k.dtype or q.shape[0] != k.shape[0]:
        return None
    if k.data_ptr() != q.data_ptr() + heads * d * q.element_size():
        return None
    if q.shape[0] > 1 and q.stride(0) < (heads + kv_heads) * d:
        return None
    return q.as_strided((q.shape[0], heads + kv_heads, d), (q.stride(0), d, 1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, d], neox halves, full rotary: x * cos + rotate_half(x) * sin."""
    if cos.dim() == 4:
        return _rotate_split(x, cos, sin)
    out = x * cos
    return out.add_(torch.roll(x, x.shape[-1] // 2, dims=-1).mul_(sin))  # not addcmul: its FMA rounds apart


def _rotate_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """_rotate with half tables [T, 1, 1, d / 2]: (x1 cos - x2 sin, x2 cos + x1 sin), the same
    roundings (x1 cos + (-x2) sin is x1 cos - x2 sin exactly)."""
    t, n, d = x.shape
    halves = x.view(t, n, 2, d // 2)
    out, rot = halves * cos, halves * sin
    lo, hi = out.unbind(2)
    rot_lo, rot_hi = rot.unbind(2)
    lo.sub_(rot_hi)
    hi.add_(rot_lo)
    return out.view(t, n, d)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, heads: int, kv_heads: int, q_head_dim: int,
         k_head_dim: int, rotary_dim: int, style: str, theta: float, scaling: dict | None = None,
         **a) -> tuple[torch.Tensor, torch.Tensor]:
    if style != "neox" or not (rotary_dim == q_head_dim == k_head_dim) or q.dtype != torch.float32:
        return torch_ref.rope(q, k, positions, heads=heads, kv_heads=kv_heads, q_head_dim=q_head_dim,
                              k_head_dim=k_head_dim, rotary_dim=rotary_dim, style=style, theta=theta,
                              scaling=scaling, **a)
    cos, sin = _tables(positions, rotary_dim, theta, scaling, q.dtype)
    t, d = q.shape[0], q_head_dim
    both = _side_by_side(q, k, heads, kv_heads, d)
    if both is not None:
        out = _rotate(both, cos, sin)
        return out[:, :heads].reshape(t, heads * d), out[:, heads:].reshape(t, kv_heads * d)
    return (_rotate(q.reshape(t, heads, d), cos, sin).reshape(q.shape),
            _rotate(k.reshape(t, kv_heads, d), cos, sin).reshape(k.shape))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, q_norm: torch.Tensor,
                 k_norm: torch.Tensor, eps: float, **attrs) -> tuple[torch.Tensor, torch.Tensor]:
    q = rms_norm(q, q_norm, eps, group=attrs["q_head_dim"])
    k = rms_norm(k, k_norm, eps, group=attrs["k_head_dim"])
    return rope(q, k, positions, **attrs)

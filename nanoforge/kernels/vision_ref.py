"""Torch reference of the vision-language ops (Qwen3-VL; re-exported by `torch_ref`): the vision tower's
patch embedding, resampled position table, 2-D rotary attention within each image and patch merge, and
the language model's interleaved multimodal rope plus the two ops that take the encoder's outputs in.

The encoder ops read `grid` (i64[I, 3]: t, h, w patches per image) on the host: an encode step is a
handful of images, never captured in a CUDA graph. Numerics follow transformers' modeling_qwen3_vl.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope_math import rope_frequencies_on


def patch_embed(pixels, weight, bias, **_):
    """Conv3d with stride = kernel, as HF runs it (view each row as a (C, t, p, p) patch)."""
    x = pixels.view(-1, *weight.shape[1:]).to(weight.dtype)
    return F.conv3d(x, weight, bias, stride=weight.shape[2:]).view(-1, weight.shape[0])


def _merge_order(h: int, w: int, merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each patch of an h x w grid in merge-block order (block rows, block cols, in-block)."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    return rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()


def _taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps and weights of target positions `index` on an axis of `size`."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def vision_pos_embed(x, grid, weight, merge, **_):
    side = int(weight.shape[0] ** 0.5)
    out = []
    for t, h, w in grid.tolist():
        row, col = _merge_order(h, w, merge, x.device)
        (ht, hw), (wt, ww) = _taps(row, h, side), _taps(col, w, side)
        idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wts = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        out.append((F.embedding(idx, weight) * wts[:, :, None]).sum(1).repeat(t, 1))
    return x + torch.cat(out).to(x.dtype)


def layer_norm(x, weight, bias, eps, **_):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gelu(x, approximate, **_):
    return F.gelu(x, approximate=approximate)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


ROPE_TABLES = "_nanoforge_vision_rope"  # attribute of a forward's grid tensor: its 2-D rotary tables


def _rope_tables(grid: torch.Tensor, head_dim: int, theta: float, merge: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(cos, sin [P, 1, head_dim], patches per frame) of the images in `grid`, built once a forward: every
    block reads the same grid tensor, so the tables hang on it (a new forward brings a new grid). Built in
    each block they cost ~10 small kernels per image per block, most of a 448x448 batch's launches."""
    cache = grid.__dict__.setdefault(ROPE_TABLES, {})
    key = (head_dim, theta, merge, str(device))
    if key not in cache:
        half, dims = head_dim // 2, grid.tolist()
        inv = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))
        pos = torch.cat([torch.stack(_merge_order(h, w, merge, device), -1).repeat(t, 1) for t, h, w in dims])
        freqs = pos.float()[:, :, None] * inv  # [P, 2 (row, col), head_dim / 4]
        emb = torch.cat([freqs[:, 0], freqs[:, 1]], -1)
        emb = torch.cat([emb, emb], -1)[:, None, :]
        cache[key] = (emb.cos(), emb.sin(), [h * w for t, h, w in dims for _ in range(t)])
    return cache[key]


def vision_attention(qkv, grid, heads, head_dim, theta, merge, **_):
    n = qkv.shape[0]
    q, k, v = qkv.view(n, 3, heads, head_dim).unbind(1)
    cos, sin, lens = _rope_tables(grid, head_dim, theta, merge, qkv.device)
    qf, kf = q.float(), k.float()
    q = (qf * cos + _rotate_half(qf) * sin).to(qkv.dtype)
    k = (kf * cos + _rotate_half(kf) * sin).to(qkv.dtype)
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):  # one frame of one image at a time
        # 4-D [1, heads, len, dim]: torch's flash and memory-efficient SDPA take only 4-D inputs; 3-D falls
        # back to the math kernel, which materialises every image's len x len scores (7x slower on an H100)
        o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                           vs.transpose(0, 1)[None], scale=head_dim ** -0.5)
        outs.append(o[0].transpose(0, 1).reshape(-1, heads * head_dim))
    return torch.cat(outs)


def merge_patches(x, factor, **_):
    return x.reshape(-1, x.shape[-1] * factor)


def _mrope_axes(half: int, section: list[int], device) -> torch.Tensor:
    """Which position axis (0 t, 1 h, 2 w) each of the half rotary frequencies reads (interleaved)."""
    j = torch.arange(half, device=device)  # torch.where, not a masked store: no host sync inside a CUDA graph
    axis = torch.where((j % 3 == 1) & (j < 3 * section[1]), 1, 0)
    return torch.where((j % 3 == 2) & (j < 3 * section[2]), 2, axis)


def _rotate(x, cos, sin, heads: int, head_dim: int, rotary_dim: int):
    """Neox rotation of the last rotary_dim dims of each head (torch_ref's rope, without importing it)."""
    t = x.reshape(x.shape[0], heads, head_dim)
    keep, r = t[..., : head_dim - rotary_dim], t[..., head_dim - rotary_dim:]
    r = r * cos[:, None, :] + _rotate_half(r) * sin[:, None, :]
    return torch.cat([keep, r], dim=-1).reshape(x.shape)


def mrope(q, k, positions, *, heads, kv_heads, q_head_dim, k_head_dim, rotary_dim, style, theta, mrope_section,
          scaling=None, ctx=None, **_):
    inv_freq, factor = rope_frequencies_on(rotary_dim, theta, scaling, q.device)
    vision = getattr(ctx, "vision", None)
    pos3 = vision.mrope_positions if vision is not None else positions[None].expand(3, -1)
    freqs = pos3.float()[:, :, None] * inv_freq  # [3, T, rotary_dim / 2]
    axis = _mrope_axes(freqs.shape[-1], mrope_section, q.device)
    freqs = freqs.gather(0, axis[None, None, :].expand(1, freqs.shape[1], -1))[0]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * factor).to(q.dtype), (emb.sin() * factor).to(q.dtype)
    return _rotate(q, cos, sin, heads, q_head_dim, rotary_dim), _rotate(k, cos, sin, kv_heads, k_head_dim, rotary_dim)


def vision_embed(x, ctx=None, **_):
    vision = getattr(ctx, "vision", None)
    if vision is None or vision.rows.numel() == 0:
        return x
    x = x.clone()
    x[vision.rows] = vision.embeds.to(x.dtype)
    return x


def deepstack_add(x, level, ctx=None, **_):
    vision = getattr(ctx, "vision", None)
    if vision is None or vision.rows.numel() == 0 or level >= len(vision.deepstack):
        return x
    x = x.clone()
    x[vision.rows] += vision.deepstack[level].to(x.dtype)
    return x

"""Qwen3-Next's fused Gated DeltaNet input projections on disk shown as Qwen3.5's four, so one builder
(models/qwen3_5_moe.py) binds both checkpoint layouts to the same `gdn` node.

Qwen3NextGatedDeltaNet stores `...linear_attn.in_proj_qkvz.weight` [Hk * (2 Dk + 2 r Dv), H] and
`...linear_attn.in_proj_ba.weight` [Hk * 2 r, H] grouped by key head (r = Hv / Hk value heads per key
head; transformers' fix_query_key_value_ordering): key head g owns the rows

    in_proj_qkvz:  [ q_g (Dk) | k_g (Dk) | v_g (r Dv) | z_g (r Dv) ]
    in_proj_ba:    [ b_g (r) | a_g (r) ]

Qwen3.5 (and the IR's gdn) reads `in_proj_qkv` rows [q of every head | k | v], `in_proj_z`, `in_proj_b`,
`in_proj_a`, each in head order. The reader replaces each fused tensor with views under those names; a
view is a list of row runs of its source, gathered when read. Both tensors are small (a few MB per
layer), so a sharded rank reads the whole source and cuts its slice from the gathered view."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import NanoForgeError
from .tensor_info import TensorInfo

QKVZ, BA = "linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight"
DIMS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")


@dataclass(frozen=True)
class RowsView:
    source: str                         # the fused tensor's key
    runs: tuple[tuple[int, int], ...]   # its row ranges [start, stop), concatenated in this order

    def source_rows(self) -> tuple[slice, ...]:
        return slice(None), slice(None)

    def cut(self, part: torch.Tensor) -> torch.Tensor:
        """This view of the source read with source_rows() (the whole tensor)."""
        return torch.cat([part[a:b] for a, b in self.runs])


def _dims(config: dict, key: str) -> tuple[int, int, int, int]:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dims = [text.get(k) for k in DIMS]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise NanoForgeError(f"config.json: fused GDN projections ('{key}') need positive integers {', '.join(DIMS)}")
    hk, hv, dk, dv = dims
    if hv % hk:
        raise NanoForgeError(f"config.json: linear_num_value_heads {hv} is not a multiple of linear_num_key_heads {hk}")
    return hk, hv, dk, dv


def _runs(groups: int, width: int, start: int, stop: int) -> tuple[tuple[int, int], ...]:
    """Rows [start, stop) of each of `groups` consecutive blocks of `width` rows."""
    return tuple((g * width + start, g * width + stop) for g in range(groups))


def _check(info: TensorInfo, rows: int) -> None:
    if len(info.shape) != 2 or info.shape[0] != rows:
        raise NanoForgeError(f"tensor '{info.key}' in {info.file} has shape {list(info.shape)}; config.json implies "
                             f"[{rows}, hidden_size]")


def split_fused_gdn(tensors: dict[str, TensorInfo], config: dict
                    ) -> tuple[dict[str, TensorInfo], dict[str, RowsView], dict[str, TensorInfo]]:
    """(tensors with each fused projection replaced by its views, view key -> view, fused key -> its info)."""
    fused = [k for k in tensors if k.endswith((QKVZ, BA))]
    if not fused:
        return tensors, {}, {}
    hk, hv, dk, dv = _dims(config, fused[0])
    r = hv // hk
    out, views, sources = dict(tensors), {}, {}
    for key in fused:
        info, prefix = tensors[key], key.rsplit(".", 2)[0] + "."
        if key.endswith(QKVZ):
            w = 2 * dk + 2 * r * dv
            _check(info, hk * w)
            q, k, v = _runs(hk, w, 0, dk), _runs(hk, w, dk, 2 * dk), _runs(hk, w, 2 * dk, 2 * dk + r * dv)
            parts = {"in_proj_qkv": q + k + v, "in_proj_z": _runs(hk, w, 2 * dk + r * dv, w)}
        else:
            _check(info, hk * 2 * r)
            parts = {"in_proj_b": _runs(hk, 2 * r, 0, r), "in_proj_a": _runs(hk, 2 * r, r, 2 * r)}
        for name, runs in parts.items():
            view = f"{prefix}{name}.weight"
            if view in tensors:
                raise NanoForgeError(f"checkpoint has both '{key}' and '{view}': one GDN layout per layer")
            views[view] = RowsView(key, runs)
            out[view] = replace(info, key=view, shape=(sum(b - a for a, b in runs), info.shape[1]))
        sources[key] = out.pop(key)
    return out, views, sources

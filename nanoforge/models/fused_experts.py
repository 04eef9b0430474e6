"""Fused MoE expert tensors on disk shown as per-expert keys, so `StackedExperts` binds every MoE the same way.

Qwen3-VL-MoE checkpoints store a layer's experts as two 3-D tensors, `...mlp.experts.gate_up_proj` (gate, then
up) and `...mlp.experts.down_proj`, in one of two orientations: the hub's [E, H, 2I] and [E, I, H], or
transformers' in-memory [E, 2I, H] and [E, H, I], which save_pretrained writes for a model it did not load
(it only reverts conversions it applied). Like transformers (Transpose(check_dims=True)), a tensor whose
shape is the in-memory one is taken as is and any other is transposed; H and I come from config.json.
The reader replaces each pair with views named `...mlp.experts.{e}.{gate,up,down}_proj.weight` in
nn.Linear's (out, in) orientation; reading a view reads its expert's rows of the fused tensor (one
contiguous cut, as slice_reader.py needs) and takes the part."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import NanoForgeError
from .tensor_info import TensorInfo

GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


@dataclass(frozen=True)
class ExpertView:
    source: str  # the fused tensor's key
    expert: int
    start: int   # rows [start, stop) of the expert's (out, in) matrix
    stop: int
    transposed: bool  # stored (in, out): the hub's orientation

    def take(self, matrix: torch.Tensor) -> torch.Tensor:
        """This view of one expert's 2-D matrix of the fused tensor."""
        if self.transposed:
            return matrix[:, self.start:self.stop].t().contiguous()
        return matrix[self.start:self.stop].contiguous()

    def source_rows(self) -> tuple[slice, slice, slice]:
        return slice(self.expert, self.expert + 1), slice(None), slice(None)

    def cut(self, part: torch.Tensor) -> torch.Tensor:
        """This view of the source read with source_rows() (the expert's [1, ., .] rows)."""
        return self.take(part[0])


def _transposed(info: TensorInfo, out: int, inp: int) -> bool:
    """Whether a fused [E, ., .] tensor of (out, in) matrices is stored (in, out); any other shape is an error."""
    if len(info.shape) == 3 and info.shape[1:] in ((out, inp), (inp, out)):
        return info.shape[1:] != (out, inp)
    raise NanoForgeError(f"tensor '{info.key}' in {info.file} has shape {list(info.shape)}; config.json implies "
                         f"[E, {out}, {inp}] or [E, {inp}, {out}]")


def split_fused_experts(tensors: dict[str, TensorInfo], config: dict
                        ) -> tuple[dict[str, TensorInfo], dict[str, ExpertView], dict[str, TensorInfo]]:
    """(tensors with each fused pair replaced by per-expert views, view key -> view, fused key -> its info)."""
    pairs = [k for k in tensors if k.endswith(GATE_UP) and k.removesuffix(GATE_UP) + DOWN in tensors]
    if not pairs:
        return tensors, {}, {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden, inter = text.get("hidden_size"), text.get("moe_intermediate_size")
    if not isinstance(hidden, int) or not isinstance(inter, int):
        raise NanoForgeError(f"config.json: fused experts ('{pairs[0]}') need integer hidden_size and "
                             "moe_intermediate_size")
    out, views, sources = dict(tensors), {}, {}
    for gk in pairs:
        prefix = gk.removesuffix("gate_up_proj")
        dk = prefix + "down_proj"
        g, d = tensors[gk], tensors[dk]
        tg, td = _transposed(g, 2 * inter, hidden), _transposed(d, hidden, inter)
        if g.shape[0] != d.shape[0]:
            raise NanoForgeError(f"tensors '{gk}' {list(g.shape)} and '{dk}' {list(d.shape)} hold different "
                                 "numbers of experts")
        for e in range(g.shape[0]):
            for kind, src, info, (a, b), t, shape in (
                    ("gate_proj", gk, g, (0, inter), tg, (inter, hidden)),
                    ("up_proj", gk, g, (inter, 2 * inter), tg, (inter, hidden)),
                    ("down_proj", dk, d, (0, hidden), td, (hidden, inter))):
                key = f"{prefix}{e}.{kind}.weight"
                views[key] = ExpertView(src, e, a, b, t)
                out[key] = replace(info, key=key, shape=shape)
        sources[gk], sources[dk] = out.pop(gk), out.pop(dk)
    return out, views, sources

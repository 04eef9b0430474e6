"""Bind a module's params to checkpoint tensors: check at compile time (headers only), load
at engine start (stacking experts, casting, moving to the device)."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..codegen.kernels.context import TORCH_DTYPES
from ..errors import NanoForgeError
from ..ir.graph import Module, Param
from ..models.checkpoint import Checkpoint


def _expected_key_shape(p: Param, i: int) -> tuple[int, ...]:
    shape = tuple(int(d) for d in p.type.shape)
    return shape[1:] if p.layout == "stack" else shape


def check_bindings(module: Module, ckpt: Checkpoint) -> list[str]:
    """Raise on the first param whose tensor is missing or mis-shaped; return unused keys."""
    used: set[str] = set()
    for p in module.params.values():
        for i, key in enumerate(p.keys):
            info = ckpt.tensors.get(key)
            if info is None:
                raise NanoForgeError(f"checkpoint {ckpt.path} has no tensor '{key}' (needed for ${p.name})")
            expect = _expected_key_shape(p, i)
            if p.layout == "cat":
                ok = tuple(info.shape[1:]) == expect[1:]
            else:
                ok = tuple(info.shape) == expect
            if not ok:
                raise NanoForgeError(f"tensor '{key}' in {info.file} has shape {list(info.shape)} but the config "
                                     f"implies {list(expect)}")
            used.add(key)
        if p.layout == "cat" and sum(ckpt.tensors[k].shape[0] for k in p.keys) != int(p.type.shape[0]):
            raise NanoForgeError(f"tensors {p.keys} do not concatenate to {p.type} for ${p.name}")
    return sorted(set(ckpt.tensors) - used)


def load_params(module: Module, ckpt: Checkpoint, device: str | torch.device = "cpu",
                progress: bool = True) -> dict[str, torch.Tensor]:
    """Read every param's tensors once, combine them per the param's layout, cast and place."""
    check_bindings(module, ckpt)
    wanted: dict[str, list[tuple[Param, int]]] = defaultdict(list)
    for p in module.params.values():
        for i, key in enumerate(p.keys):
            wanted[key].append((p, i))
    parts: dict[str, list[torch.Tensor | None]] = {p.name: [None] * len(p.keys) for p in module.params.values()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in ckpt.read(list(wanted), progress=progress):
        for p, i in wanted[key]:
            dtype = TORCH_DTYPES[p.type.dtype]
            parts[p.name][i] = tensor.to(device=device, dtype=dtype)
            if all(t is not None for t in parts[p.name]):
                ts = parts.pop(p.name)
                out[p.name] = ts[0] if p.layout == "single" else (
                    torch.stack(ts) if p.layout == "stack" else torch.cat(ts))
    if parts:
        raise NanoForgeError(f"checkpoint {ckpt.path} did not yield the tensors of ${next(iter(parts))}")
    return out

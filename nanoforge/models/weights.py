"""Bind a module's params to checkpoint tensors: check at compile time (headers only), load
at engine start (stacking experts, casting, moving to the device). A sharded module's rank reads
only its slice of each tensor (parallel/shard_spec.py) through Checkpoint.read_slices, never a
whole tensor it does not need (models/slice_reader.py)."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..kernels.context import TORCH_DTYPES
from ..errors import NanoForgeError
from ..ir.graph import Module, Param
from .checkpoint import Checkpoint
from ..facts import layout_of
from ..parallel.shard_spec import ShardSpec, key_slices, local_key_shape, parse_spec


def _spec(module: Module, p: Param) -> tuple[ShardSpec | None, int]:
    """The param's shard spec and the size of the group it is split over (1 if replicated)."""
    if not p.shard:
        return None, 1
    try:
        spec = parse_spec(p.shard)
        return spec, layout_of(module).rank_in_group(spec.group, 0)[1]
    except ValueError as e:
        raise NanoForgeError(f"${p.name}: {e}") from None


def _expected_key_shape(p: Param, spec: ShardSpec | None, key_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The global shape the checkpoint tensor of one key must have (cat: its own rows, our columns)."""
    shape = [int(d) for d in p.type.shape]
    if spec is not None and not (p.layout == "cat" and spec.dim == 0):
        shape[spec.dim] *= spec.counts[0]
    if p.layout == "stack":
        return tuple(shape[1:])
    return (key_shape[0], *shape[1:]) if p.layout == "cat" else tuple(shape)


def check_bindings(module: Module, ckpt: Checkpoint) -> list[str]:
    """Raise on the first param whose tensor is missing, mis-shaped or does not split as its
    shard spec says; return the checkpoint keys no param uses."""
    used: set[str] = set()
    for p in module.params.values():
        spec, world = _spec(module, p)
        if spec is not None and ckpt.kind == "gguf":
            raise NanoForgeError(f"{ckpt.no_slices_reason()}; compile without --tp")
        rows = read = 0
        for i, key in enumerate(p.keys):
            info = ckpt.tensors.get(key)
            if info is None:
                raise NanoForgeError(f"checkpoint {ckpt.path} has no tensor '{key}' (needed for ${p.name})")
            expect = _expected_key_shape(p, spec, tuple(info.shape))
            if tuple(info.shape) != expect:
                raise NanoForgeError(f"tensor '{key}' in {info.file} has shape {list(info.shape)} but the config "
                                     f"implies {list(expect)}")
            try:
                local = local_key_shape(p, spec, i, info.shape, world)
            except ValueError as e:
                raise NanoForgeError(f"tensor '{key}': {e}") from None
            if local is not None:
                rows, read = rows + local[0], read + 1
            used.add(key)
        if p.layout == "cat" and rows != int(p.type.shape[0]):
            raise NanoForgeError(f"tensors {p.keys} do not concatenate to {p.type} for ${p.name}")
        if p.layout == "stack" and read != int(p.type.shape[0]):
            raise NanoForgeError(f"${p.name} {p.type}: shard {p.shard} gives each rank {read} of its tensors")
    return sorted(set(ckpt.tensors) - used)


def load_params(module: Module, ckpt: Checkpoint, device: str | torch.device = "cpu",
                progress: bool = True, rank: int = 0) -> dict[str, torch.Tensor]:
    """Read what rank `rank` needs of every param's tensors once, combine them per the param's
    layout, cast and place. Unsharded plans read whole tensors; sharded ones only their slices."""
    check_bindings(module, ckpt)
    wanted: dict[tuple[str, str], list[tuple[Param, int]]] = defaultdict(list)
    requests: dict[tuple[str, str], tuple[str, tuple[slice, ...] | None]] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    for p in module.params.values():
        spec, _ = _spec(module, p)
        index, world = layout_of(module).rank_in_group(spec.group, rank) if spec else (0, 1)
        slots = []
        for i, key in enumerate(p.keys):
            sl = key_slices(p, spec, i, ckpt.tensors[key].shape, index, world) if spec else None
            if spec is not None and sl is None:
                continue  # an expert another rank holds
            req = (key, repr(sl))
            requests[req] = (key, sl)
            wanted[req].append((p, len(slots)))
            slots.append(None)
        parts[p.name] = slots
    if all(sl is None for _, sl in requests.values()):
        stream = ((k, t) for k, t in ckpt.read([k for k, _ in requests.values()], progress=progress))
        stream = (((k, repr(None)), t) for k, t in stream)
    elif not hasattr(ckpt, "read_slices"):
        raise NanoForgeError(f"checkpoint {ckpt.path} ({ckpt.kind}) cannot read slices of tensors, which a sharded "
                             "plan needs")
    else:
        reqs = list(requests)
        stream = ((reqs[i], t) for i, t in ckpt.read_slices([requests[r] for r in reqs], progress=progress))
    out: dict[str, torch.Tensor] = {}
    for req, tensor in stream:
        for p, i in wanted[req]:
            parts[p.name][i] = tensor.to(device=device, dtype=TORCH_DTYPES[p.type.dtype])
            if all(t is not None for t in parts[p.name]):
                ts = parts.pop(p.name)
                out[p.name] = ts[0] if p.layout == "single" else (
                    torch.stack(ts) if p.layout == "stack" else torch.cat(ts))
    if parts:
        raise NanoForgeError(f"checkpoint {ckpt.path} did not yield the tensors of ${next(iter(parts))}")
    return out

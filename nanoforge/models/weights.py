"""Bind a module's params to checkpoint tensors: check at compile time (headers only), load
at engine start (stacking experts, casting, moving to the device). A sharded module's rank reads
only its slice of each tensor (parallel/shard_spec.py) through Checkpoint.read_slices, never a
whole tensor it does not need (models/slice_reader.py).

Block-FP8 params (passes/quantize_weights.py, `Param.quant`) load three ways: an fp8 param over an
F8 tensor reads it and its `_scale_inv` as stored; an fp8 param over a high-precision tensor is
block-quantized here and its scales computed; a `dequant` param reads the F8 tensor with its
scales and widens it. An F8 tensor anywhere else is an error: its scales would be ignored."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import NanoForgeError
from ..facts import layout_of
from ..ir.graph import Module, Param
from ..kernels import fp8
from ..kernels.context import TORCH_DTYPES
from ..parallel.shard_spec import ShardSpec, key_slices, local_key_shape, parse_spec
from .checkpoint import Checkpoint
from .quant import scale_shape

F8_DTYPES = ("F8_E4M3", "F8_E5M2")


def quant_of(p: Param) -> tuple[str | None, tuple[int, int]]:
    """(fp8 | scale | dequant | None, block) of a param (passes/quantize_weights.py)."""
    if not p.quant:
        return None, (0, 0)
    kind, _, block = p.quant.partition(":")
    rows, _, cols = block.partition("x")
    return ("fp8" if kind == "fp8_e4m3" else kind), (int(rows), int(cols))


def _stored_fp8(ckpt: Checkpoint, p: Param) -> bool:
    """Whether the param's checkpoint tensors are F8 (the first key tells: checked per key below)."""
    info = ckpt.tensors.get(p.keys[0])
    return info is not None and info.dtype in F8_DTYPES


def _check_scales(ckpt: Checkpoint, key: str, shape: tuple[int, ...], block: tuple[int, int]) -> None:
    info = ckpt.tensors.get(f"{key}_scale_inv")
    want = scale_shape(shape, block)
    if info is None:
        raise NanoForgeError(f"checkpoint {ckpt.path} has no tensor '{key}_scale_inv': the block scales of the FP8 "
                             f"tensor '{key}' (expected f32 {list(want)})")
    if tuple(info.shape) != want or info.dtype != "F32":
        raise NanoForgeError(f"tensor '{key}_scale_inv' in {info.file} is {info.dtype} {list(info.shape)}; the FP8 "
                             f"tensor '{key}' {list(shape)} in {block[0]}x{block[1]} blocks needs F32 {list(want)} "
                             "(ceil(rows/128) x ceil(cols/128))")

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


def check_bindings(module: Module, ckpt: Checkpoint, storage: bool = True) -> list[str]:
    """Raise on the first param whose tensor is missing, mis-shaped or does not split as its
    shard spec says, or (with `storage`) is F8 where the module does not read it as block FP8;
    return the checkpoint keys no param uses."""
    used: set[str] = set()
    for p in module.params.values():
        kind, block = quant_of(p)
        if kind == "scale" and not _stored_fp8(ckpt, module.params[p.name.removesuffix("_scale_inv")]):
            continue  # scales of a high-precision tensor, computed at load
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
            if storage:
                _check_storage(ckpt, p, kind, block, key, info)
            used.add(key)
            if kind == "dequant" and info.dtype in F8_DTYPES:
                used.add(f"{key}_scale_inv")
        if p.layout == "cat" and rows != int(p.type.shape[0]):
            raise NanoForgeError(f"tensors {p.keys} do not concatenate to {p.type} for ${p.name}")
        if p.layout == "stack" and read != int(p.type.shape[0]):
            raise NanoForgeError(f"${p.name} {p.type}: shard {p.shard} gives each rank {read} of its tensors")
    return sorted(set(ckpt.tensors) - used)


def _check_storage(ckpt: Checkpoint, p: Param, kind: str | None, block: tuple[int, int], key: str, info) -> None:
    """An F8 tensor only where the plan reads it as FP8 (with its scales checked), never plain."""
    f8 = info.dtype in F8_DTYPES
    if kind == "fp8" and f8 != _stored_fp8(ckpt, p):
        raise NanoForgeError(f"tensor '{key}' in {info.file} is {info.dtype}, unlike the other tensors of ${p.name}")
    if f8 and kind in ("fp8", "dequant"):
        _check_scales(ckpt, key, tuple(info.shape), block)
    elif f8 and kind is None:
        raise NanoForgeError(f"tensor '{key}' in {info.file} is stored as {info.dtype}, but config.json has no "
                             "quantization_config saying how to scale it (block FP8 needs quant_method fp8 and "
                             "weight_block_size [128, 128])")


def load_params(module: Module, ckpt: Checkpoint, device: str | torch.device = "cpu",
                progress: bool = True, rank: int = 0) -> dict[str, torch.Tensor]:
    """Read what rank `rank` needs of every param's tensors once, combine them per the param's
    layout, cast and place. Unsharded plans read whole tensors; sharded ones only their slices."""
    check_bindings(module, ckpt)
    wanted: dict[tuple[str, str], list[tuple[Param, int, bool]]] = defaultdict(list)  # -> (param, slot, is scale)
    requests: dict[tuple[str, str], tuple[str, tuple[slice, ...] | None]] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}
    scales: dict[str, list[torch.Tensor | None]] = {}  # dequant params: the scales of each part

    def ask(key: str, sl: tuple[slice, ...] | None, p: Param, slot: int, scale: bool) -> None:
        req = (key, repr(sl))
        requests[req] = (key, sl)
        wanted[req].append((p, slot, scale))

    for p in module.params.values():
        kind, _ = quant_of(p)
        if kind == "scale" and not _stored_fp8(ckpt, module.params[p.name.removesuffix("_scale_inv")]):
            continue  # made with its weight's quantization below
        spec, _ = _spec(module, p)
        index, world = layout_of(module).rank_in_group(spec.group, rank) if spec else (0, 1)
        widen = kind == "dequant" and _stored_fp8(ckpt, p)
        slots: list[torch.Tensor | None] = []
        for i, key in enumerate(p.keys):
            sl = key_slices(p, spec, i, ckpt.tensors[key].shape, index, world) if spec else None
            if spec is not None and sl is None:
                continue  # an expert another rank holds
            if widen and sl is not None and any(x != slice(None) for x in sl):
                raise NanoForgeError(f"${p.name}: an FP8 tensor widened at load cannot be read in slices")
            ask(key, sl, p, len(slots), False)
            if widen:
                ask(f"{key}_scale_inv", None, p, len(slots), True)
            slots.append(None)
        parts[p.name] = slots
        if widen:
            scales[p.name] = [None] * len(slots)
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
        for p, i, is_scale in wanted[req]:
            (scales if is_scale else parts)[p.name][i] = _placed(p, tensor, device, is_scale or p.name in scales)
            if all(t is not None for t in parts[p.name] + scales.get(p.name, [])):
                _finish(p, parts.pop(p.name), _combine(p, scales.pop(p.name, None)), out)
    if parts:
        raise NanoForgeError(f"checkpoint {ckpt.path} did not yield the tensors of ${next(iter(parts))}")
    return out


def _placed(p: Param, tensor: torch.Tensor, device: str | torch.device, raw: bool):
    """On the device in the param's dtype; kept as read for a widening, in f32 for a quantization
    (one expert of a stack quantized as it arrives, as (values, scales): blocks never cross experts,
    and stacking first would hold the whole layer's experts in f32, tens of GB at DeepSeek-V3's size)."""
    if raw:
        return tensor.to(device=device)
    if p.type.dtype == "fp8_e4m3" and tensor.dtype != fp8.FP8:
        wide = tensor.to(device=device, dtype=torch.float32)
        return fp8.quantize(wide, quant_of(p)[1]) if p.layout == "stack" else wide
    return tensor.to(device=device, dtype=TORCH_DTYPES[p.type.dtype])


def _combine(p: Param, ts: list | None) -> torch.Tensor | None:
    if ts is None:
        return None
    return ts[0] if p.layout == "single" else (torch.stack(ts) if p.layout == "stack" else torch.cat(ts))


def _finish(p: Param, parts: list, scale: torch.Tensor | None, out: dict) -> None:
    kind, block = quant_of(p)
    if isinstance(parts[0], tuple):  # experts quantized one by one (_placed)
        out[p.name], out[f"{p.name}_scale_inv"] = (torch.stack(list(ts)) for ts in zip(*parts))
        return
    t = _combine(p, parts)
    if scale is not None:  # an F8 tensor widened to the param's dtype
        t = fp8.dequantize(t, scale, block, TORCH_DTYPES[p.type.dtype])
    elif kind == "fp8" and t.dtype != fp8.FP8:  # a high-precision tensor quantized here, with its scales
        t, out[f"{p.name}_scale_inv"] = fp8.quantize(t, block)
    out[p.name] = t

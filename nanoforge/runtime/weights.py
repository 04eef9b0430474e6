"""Bind a module's params to checkpoint tensors: check at compile time (headers only), load
at engine start (stacking experts, casting, moving to the device). A sharded module's rank reads
only its slice of each tensor (parallel/shard_spec.py), never a whole tensor it does not need:
from safetensors files with positioned reads into tensors of its own (no mmap, whose touched pages
would count against the rank: a column slice touches every page of its tensor)."""
from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from typing import Iterator

import torch
from tqdm import tqdm

from ..codegen.kernels.context import TORCH_DTYPES
from ..errors import NanoForgeError
from ..ir.graph import Module, Param
from ..models.checkpoint import Checkpoint
from ..parallel.shard_spec import ShardSpec, key_slices, local_key_shape, parse_spec, rank_in_group


def _spec(module: Module, p: Param) -> tuple[ShardSpec | None, int]:
    """The param's shard spec and the size of the group it is split over (1 if replicated)."""
    if not p.shard:
        return None, 1
    try:
        spec = parse_spec(p.shard)
        return spec, rank_in_group(module.meta, spec.group, 0)[1]
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
            raise NanoForgeError(f"{ckpt.path.name}: a sharded plan reads slices of tensors, which needs a "
                                 "safetensors checkpoint (GGUF tensors are dequantized whole); compile without --tp")
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
        index, world = rank_in_group(module.meta, spec.group, rank) if spec else (0, 1)
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
        read = read_slices if ckpt.kind == "hf" else ckpt.read_slices
        stream = ((reqs[i], t) for i, t in read([requests[r] for r in reqs], progress=progress, **(
            {"ckpt": ckpt} if read is read_slices else {})))
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


ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
            "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}
CHUNK = 16 << 20  # bytes of whole rows read at once to cut a column slice from


def read_slices(requests: list[tuple[str, tuple[slice, ...] | None]], ckpt: Checkpoint,
                progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (request index, CPU tensor) for (key, slices) requests on a safetensors checkpoint:
    a row range is one read straight into the result, a column slice is cut from chunks of whole
    rows (CHUNK bytes at a time), so memory holds the slices plus one chunk."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, (k, _) in enumerate(requests):
        by_file[ckpt.tensors[k].file].append(i)
    total = sum(_slice_numel(ckpt.tensors[k].shape, sl) * ST_TORCH[ckpt.tensors[k].dtype].itemsize
                for k, sl in requests)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {ckpt.path.name} (shard)",
              disable=not progress, leave=False) as bar:
        for file, idx in by_file.items():
            path = ckpt.path / file
            try:
                with open(path, "rb", buffering=0) as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
                    for i in idx:
                        key, sl = requests[i]
                        h = header[key]
                        t = _read_slice(f.fileno(), 8 + n + h["data_offsets"][0], tuple(h["shape"]),
                                        ST_TORCH[h["dtype"]], sl, path)
                        bar.update(t.nbytes)
                        yield i, t
            except (OSError, KeyError, ValueError) as e:
                raise NanoForgeError(f"{path}: cannot read tensors ({e})") from e


def _slice_numel(shape: tuple[int, ...], sl: tuple[slice, ...] | None) -> int:
    n = 1
    for d, s in zip(shape, sl or [slice(None)] * len(shape)):
        n *= len(range(*s.indices(d)))
    return n


def _pread(fd: int, out: torch.Tensor, offset: int, path: object) -> None:
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise NanoForgeError(f"{path} is truncated: a tensor's bytes end past the end of the file")
        done += got


def _read_slice(fd: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype,
                sl: tuple[slice, ...] | None, path: object) -> torch.Tensor:
    """One tensor's slice (contiguous steps only; at most one dim cut, as shard specs cut)."""
    ranges = [range(*s.indices(d)) for s, d in zip(sl or [slice(None)] * len(shape), shape)]
    cut = [d for d, (r, n) in enumerate(zip(ranges, shape)) if len(r) != n]
    if any(r.step != 1 for r in ranges) or len(cut) > 1:
        raise NanoForgeError(f"{path}: slice {sl} of a {list(shape)} tensor: one contiguous cut only")
    out = torch.empty([len(r) for r in ranges], dtype=dtype)
    size = dtype.itemsize
    if not cut or cut[0] == 0:  # whole rows: one read into place
        row = out[0].numel() * size if len(shape) else size
        if out.numel():
            _pread(fd, out, offset + (ranges[0].start if cut else 0) * row, path)
        return out
    d = cut[0]
    outer, inner = 1, 1
    for n in shape[:d]:
        outer *= n
    for n in shape[d + 1:]:
        inner *= n
    whole = out.new_empty(0)
    rows_per_chunk = max(CHUNK // (shape[d] * inner * size), 1)
    src_rows = out.view(outer, len(ranges[d]) * inner)
    for first in range(0, outer, rows_per_chunk):
        n = min(rows_per_chunk, outer - first)
        whole = torch.empty(n, shape[d] * inner, dtype=dtype) if whole.shape[0:1] != (n,) else whole
        _pread(fd, whole, offset + first * shape[d] * inner * size, path)
        src_rows[first:first + n] = whole[:, ranges[d].start * inner:ranges[d].stop * inner]
    return out

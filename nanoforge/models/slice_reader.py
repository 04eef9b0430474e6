"""Slices of safetensors tensors read with positioned reads into tensors of their own, for the
ranks of a sharded plan: no mmap, whose touched pages would count against the rank (a column slice
touches every page of its tensor). A row range is one read straight into the result; a column
slice is cut from chunks of whole rows (CHUNK bytes at a time), so memory holds the slices plus
one chunk."""
from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ..errors import NanoForgeError

ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
            "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}
CHUNK = 16 << 20  # bytes of whole rows read at once to cut a column slice from


def read_slices(root: Path, tensors: dict, requests: list[tuple[str, tuple[slice, ...] | None]],
                progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (request index, CPU tensor) for (key, slices) requests (None: the whole tensor) on the
    safetensors files under `root`; `tensors` maps keys to their TensorInfo (file, shape, dtype)."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, (k, _) in enumerate(requests):
        by_file[tensors[k].file].append(i)
    total = sum(_slice_numel(tensors[k].shape, sl) * ST_TORCH[tensors[k].dtype].itemsize for k, sl in requests)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {root.name} (shard)",
              disable=not progress, leave=False) as bar:
        for file, idx in by_file.items():
            path = root / file
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

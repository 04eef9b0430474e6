"""Open a checkpoint without reading its weights: an HF directory (config.json + safetensors,
sharded or not) or a GGUF file. Opening parses headers only and validates them, so a broken or
truncated download fails at compile time with the file named; `read` loads tensors later."""
from __future__ import annotations

import hashlib
import json
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from tqdm import tqdm

from ..errors import NanoForgeError
from .fused_experts import ExpertView, split_fused_experts
from .fused_gdn import RowsView, split_fused_gdn
from .tensor_info import TensorInfo

if TYPE_CHECKING:
    from .gguf_file import GGUFFile

# safetensors dtype -> bytes per element
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100_000_000  # the safetensors format's own limit
GGUF_HASHED = 1 << 20     # a GGUF's metadata and tensor table sit in its first bytes


@dataclass
class Checkpoint:
    path: Path                           # the directory, or the .gguf file
    kind: str                            # "hf" or "gguf"
    config: dict                         # HF-style config (config.json, or synthesized from GGUF metadata)
    tensors: dict[str, TensorInfo]       # every tensor by HF key (empty when opened config_only)
    gguf: GGUFFile | None = field(default=None, repr=False, compare=False)  # open reader, GGUF only
    views: dict[str, ExpertView | RowsView] = field(default_factory=dict, repr=False)  # keys cut from fused tensors
    sources: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # the fused tensors themselves

    def fingerprint(self) -> dict:
        """Sizes and header hashes of the files that define the model: cheap, data only."""
        files = []
        if self.kind == "gguf":
            with open(self.path, "rb") as f:
                head = f.read(GGUF_HASHED)
            files.append(_entry(self.path.name, self.path.stat().st_size, head, self.path))
        else:
            files.append(_entry("config.json", (self.path / "config.json").stat().st_size,
                                (self.path / "config.json").read_bytes()))
            for name in _shard_names(self.path, strict=False):
                p = self.path / name
                if p.is_file():
                    files.append(_entry(name, p.stat().st_size, _header_bytes(p), p))
        return {"kind": self.kind, "files": files}

    def read(self, keys: list[str], dtype: torch.dtype | None = None,
             progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF key, CPU tensor) for `keys`, one file open at a time, with a progress bar in bytes."""
        for k in keys:
            if k not in self.tensors:
                raise NanoForgeError(f"checkpoint {self.path} has no tensor '{k}'")
        derived: dict[str, list[str]] = defaultdict(list)  # fused tensor -> the views of it asked for
        for k in dict.fromkeys(keys):
            derived[self.views[k].source if k in self.views else k].append(k)
        info = {**self.tensors, **self.sources}
        by_file: dict[str, list[str]] = defaultdict(list)
        for k in derived:
            by_file[info[k].file].append(k)
        size = {k: _nbytes(info[k], self.kind) for k in derived}
        total = sum(size.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {self.path.name}",
                  disable=not progress, leave=False) as bar:
            for file, ks in by_file.items():
                for k, t in self._read_file(file, ks):
                    bar.update(size[k])
                    for want in derived[k]:
                        view = self.views.get(want)
                        out = t if view is None else view.cut(t[view.source_rows()])
                        yield want, (out if dtype is None else out.to(dtype))

    def no_slices_reason(self) -> str:
        return (f"{self.path.name}: a sharded plan reads slices of tensors, which needs a safetensors checkpoint "
                "(GGUF tensors are dequantized whole)")

    def read_slices(self, requests: list[tuple[str, tuple[slice, ...] | None]],
                    progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (request index, CPU tensor) for (key, slices) requests (None: the whole tensor),
        reading only those bytes (models/slice_reader.py): what one rank of a sharded plan needs."""
        if self.kind == "gguf":
            raise NanoForgeError(self.no_slices_reason())
        for k, _ in requests:
            if k not in self.tensors:
                raise NanoForgeError(f"checkpoint {self.path} has no tensor '{k}'")
        from .slice_reader import read_slices

        if not self.views:
            yield from read_slices(self.path, self.tensors, requests, progress)
            return
        raw = [(self.views[k].source, self.views[k].source_rows()) if k in self.views else (k, sl)
               for k, sl in requests]
        for i, t in read_slices(self.path, {**self.tensors, **self.sources}, raw, progress):
            k, sl = requests[i]
            if k in self.views:  # the view's rows of the fused tensor, then the view's part and slice
                t = self.views[k].cut(t)
                t = t if sl is None else t[sl].contiguous()
            yield i, t

    def _read_file(self, file: str, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.kind == "gguf":
            from .gguf_file import read_tensors
            yield from read_tensors(self.gguf, keys, self.config)
            return
        from safetensors import safe_open
        try:
            with safe_open(str(self.path / file), framework="pt", device="cpu") as f:
                for k in keys:
                    yield k, f.get_tensor(k)
        except (OSError, RuntimeError) as e:
            raise NanoForgeError(f"{self.path / file}: cannot read tensors ({e})") from e

    def generation_config(self) -> dict:
        p = self.path / "generation_config.json" if self.kind == "hf" else None
        return _read_json(p) if p is not None and p.is_file() else {}


def open_checkpoint(path: str | Path, config_only: bool = False) -> Checkpoint:
    """An HF directory or a .gguf file; `config_only` reads just the config (dry-run compiles)."""
    path = Path(path)
    if not path.exists():
        raise NanoForgeError(f"checkpoint not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf" and _magic(path) != b"GGUF":
            raise NanoForgeError(f"{path}: not a checkpoint directory or a .gguf file")
        from .gguf_file import llama_config, open_gguf, tensor_infos
        g = open_gguf(path)
        return Checkpoint(path, "gguf", llama_config(g), {} if config_only else tensor_infos(g), gguf=g)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise NanoForgeError(f"checkpoint: config.json not found in {path}")
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise NanoForgeError(f"{cfg_path}: expected a JSON object")
    if config_only:
        return Checkpoint(path, "hf", config, {})
    tensors: dict[str, TensorInfo] = {}
    for name in _shard_names(path, strict=True):
        for key, info in _read_header(path / name).items():
            if key in tensors:
                raise NanoForgeError(f"tensor '{key}' is in both {tensors[key].file} and {name}")
            tensors[key] = info
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for key, file in _read_json(index).get("weight_map", {}).items():
            if key not in tensors or tensors[key].file != file:
                raise NanoForgeError(f"{index.name}: says tensor '{key}' is in {file}, but {file} has no such tensor")
    tensors, views, sources = split_fused_experts(tensors, config)
    tensors, gdn_views, gdn_sources = split_fused_gdn(tensors, config)
    return Checkpoint(path, "hf", config, tensors, views={**views, **gdn_views}, sources={**sources, **gdn_sources})


def fingerprint_mismatches(expected: dict, actual: dict) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they agree."""
    out = []
    if expected.get("kind") != actual.get("kind"):
        out.append(f"checkpoint kind {expected.get('kind')} != {actual.get('kind')}")
    exp = {f["name"]: f for f in expected.get("files", [])}
    act = {f["name"]: f for f in actual.get("files", [])}
    for name, e in exp.items():
        a = act.get(name)
        if a is None:
            out.append(f"{name}: missing")
        elif e["size"] != a["size"]:
            out.append(f"{name}: size {e['size']} != {a['size']}")
        elif e["header_sha256"] != a["header_sha256"]:
            out.append(f"{name}: header sha256 {e['header_sha256'][:12]} != {a['header_sha256'][:12]}")
        elif e.get("sample_sha256") != a.get("sample_sha256"):
            out.append(f"{name}: same header but different weights (sampled sha256 "
                       f"{str(e.get('sample_sha256'))[:12]} != {str(a.get('sample_sha256'))[:12]})")
    out += [f"{name}: not expected" for name in act if name not in exp]
    return out


# --- safetensors headers ---------------------------------------------------------------------

def _shard_names(path: Path, strict: bool) -> list[str]:
    """Safetensors files of a directory: the index's weight_map values, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise NanoForgeError(f"{index}: no 'weight_map' object")
        names = sorted(set(wm.values()))
        for n in names:
            if strict and not (path / n).is_file():
                raise NanoForgeError(f"{n}: shard named in {index.name} not found in {path}")
        return names
    names = sorted(p.name for p in path.glob("*.safetensors"))
    if strict and not names:
        raise NanoForgeError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    return names


def _header_len(p: Path, size: int, head: bytes) -> int:
    if len(head) < 8:
        raise NanoForgeError(f"{p.name} is not a safetensors file: only {size} bytes")
    n = struct.unpack("<Q", head[:8])[0]
    if n > MAX_HEADER or 8 + n > size:
        raise NanoForgeError(f"{p.name} is not a valid safetensors file: header length {n} "
                             f"does not fit in the file's {size} bytes")
    return n


def _header_bytes(p: Path) -> bytes:
    with open(p, "rb") as f:
        head = f.read(8)
        n = _header_len(p, p.stat().st_size, head)
        return head + f.read(n)


def _read_header(p: Path) -> dict[str, TensorInfo]:
    size = p.stat().st_size
    raw = _header_bytes(p)
    try:
        header = json.loads(raw[8:])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoForgeError(f"{p.name}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise NanoForgeError(f"{p.name}: safetensors header is not a JSON object")
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = v["dtype"], tuple(int(d) for d in v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise NanoForgeError(f"{p.name}: malformed header entry for tensor '{key}'") from e
        if dtype not in ST_DTYPES:
            raise NanoForgeError(f"{p.name}: tensor '{key}' has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * ST_DTYPES[dtype] or begin < 0:
            raise NanoForgeError(f"{p.name}: tensor '{key}' spans bytes {begin}..{end} but "
                                 f"{dtype}{list(shape)} needs {numel * ST_DTYPES[dtype]}")
        if len(raw) + end > size:
            raise NanoForgeError(f"{p.name} is truncated: tensor '{key}' ends at byte {len(raw) + end} "
                                 f"but the file has {size} bytes")
        out[key] = TensorInfo(key, shape, dtype, p.name)
    return out


# --- small helpers ---------------------------------------------------------------------------

def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoForgeError(f"{p}: invalid JSON ({e})") from e
    except OSError as e:
        raise NanoForgeError(f"{p}: cannot read ({e.strerror})") from e


def _magic(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(4)


def _entry(name: str, size: int, head: bytes, path: Path | None = None) -> dict:
    entry = {"name": name, "size": size, "header_sha256": hashlib.sha256(head).hexdigest()}
    if path is not None:
        entry["sample_sha256"] = _sample_hash(path, len(head), size)
    return entry


def _sample_hash(path: Path, start: int, size: int, window: int = 1 << 16) -> str:
    """sha256 of three 64 KiB windows of the weights (first, middle, last): headers alone cannot
    tell two checkpoints of the same shapes apart, and hashing every byte would cost a full read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({start, max(start, (start + size) // 2 - window // 2), max(start, size - window)}):
            f.seek(offset)
            h.update(f.read(window))
    return h.hexdigest()


def _nbytes(t: TensorInfo, kind: str) -> int:
    numel = 1
    for d in t.shape:
        numel *= d
    return numel * (4 if kind == "gguf" else ST_DTYPES[t.dtype])  # GGUF tensors arrive as float32

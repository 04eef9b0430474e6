"""A checkpoint of random weights for a config, made on the fly: benchmarks of real model shapes
(Qwen3-0.6B, Qwen3-8B) without fetching or writing gigabytes. It offers the Checkpoint
interface the compiler and the weight loader use, with tensors generated on the target device."""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ..errors import NanoForgeError
from ..kernels.context import TORCH_DTYPES
from . import trace_model
from .checkpoint import TensorInfo


class RandomCheckpoint:
    kind = "random"

    def __init__(self, config: dict[str, Any], name: str, dtype: str = "bf16", seed: int = 0,
                 device: str = "cpu"):
        self.config, self.path, self.seed, self.device = dict(config), Path(name), seed, device
        self.dtype = dtype
        self.tensors: dict[str, TensorInfo] = {}
        for p in trace_model(self.config, dtype).params.values():
            shape = tuple(int(d) for d in (p.type.shape[1:] if p.layout == "stack" else p.type.shape))
            for key in p.keys:
                self.tensors[key] = TensorInfo(key, shape, p.type.dtype, "random")

    def fingerprint(self) -> dict:
        return {"kind": "random", "files": [{"name": str(self.path), "size": 0, "header_sha256": f"seed{self.seed}"}]}

    def generation_config(self) -> dict:
        return {}

    def _make(self, key: str, dtype: torch.dtype | None) -> torch.Tensor:
        """N(0, 0.02) matrices and 1 + N(0, 0.02) vectors (norm gains), made on self.device from a
        seed per key, so every rank of a sharded plan sees the same weights."""
        info = self.tensors[key]
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        t = torch.randn(info.shape, generator=g, device=self.device, dtype=torch.float32) * 0.02
        if len(info.shape) == 1:
            t += 1
        return t.to(dtype or TORCH_DTYPES[info.dtype])

    def read(self, keys: list[str], dtype: torch.dtype | None = None,
             progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        for key in tqdm(keys, desc="random weights", unit="tensor", disable=not progress, leave=False):
            yield key, self._make(key, dtype)

    def read_slices(self, requests: list[tuple[str, tuple[slice, ...] | None]],
                    progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Each key is made whole, then cut: there is no file to read only a slice of."""
        for i, (key, sl) in enumerate(tqdm(requests, desc="random weights", unit="tensor", disable=not progress,
                                           leave=False)):
            t = self._make(key, None)
            yield i, (t if sl is None else t[sl].clone())


def preset_checkpoint(name: str, dtype: str = "auto", device: str = "cpu", seed: int = 0,
                      flag: str = "--model-preset") -> RandomCheckpoint:
    """Random weights of a preset (models/presets.py), so an engine runs at a real model's shapes
    without its checkpoint. dtype auto: f32 on CPU (bf16 matmuls are many times slower there), bf16
    on CUDA. Engines built from the same name and seed hold the same weights (PD pairs must)."""
    from .presets import PRESETS

    if name not in PRESETS:
        raise NanoForgeError(f"{flag} {name!r}: not a preset; known: {', '.join(PRESETS)}")
    if dtype == "auto":
        dtype = "f32" if device == "cpu" else "bf16"
    return RandomCheckpoint(PRESETS[name], name, dtype, seed, device)

"""What a checkpoint says about one tensor before reading it; shared by the safetensors and
GGUF readers (its own module, so neither reader imports the other)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TensorInfo:
    key: str                 # HF name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]   # HF orientation (as torch holds it)
    dtype: str               # safetensors dtype ("BF16", ...) or, for GGUF, the quant type ("Q4_1", "F32")
    file: str                # file name relative to the checkpoint dir (or the gguf file name)

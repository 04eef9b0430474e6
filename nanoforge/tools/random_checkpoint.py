"""Write a safetensors checkpoint with random weights for a config: every tensor the traced model
binds, with the shapes of the on-disk layout (per-expert tensors, HF key names)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..codegen.kernels.context import TORCH_DTYPES
from ..models import DTYPES, trace_model


def write_random_checkpoint(config: dict, out: Path, dtype: str = "bf16", seed: int = 0,
                            shard_bytes: int = 2 << 30) -> Path:
    """Random N(0, 0.02) matrices and 1 + N(0, 0.02) vectors (norm gains), saved in shards."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    module = trace_model(config, dtype)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    tensors = [(key, p) for p in module.params.values() for key in p.keys]
    for key, p in tqdm(tensors, desc="random weights", unit="tensor"):
        shape = [int(d) for d in (p.type.shape[1:] if p.layout == "stack" else p.type.shape)]
        t = torch.randn(shape, generator=g) * 0.02
        t = (t + 1) if len(shape) == 1 else t
        t = t.to(TORCH_DTYPES[p.type.dtype])
        if size + t.nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    torch_dtype = {v: k for k, v in DTYPES.items()}[dtype]
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": torch_dtype}, indent=1))
    return out

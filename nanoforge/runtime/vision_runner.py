"""The runtime half of vision-language plans: run the plan's `encode` function once per distinct image
(embeddings cached by image hash), and give each step's `forward` what its `vision_embed`, `deepstack_add`
and `mrope` nodes read from the batch context: the flat-batch rows of image tokens, their embeddings and
deepstack features, and every row's (t, h, w) rope position.

An image is encoded when a prefill chunk first reaches its tokens (chunked prefill takes the slice it
needs; a preempted sequence finds its images in the cache). Sequences with images run without prefix
caching (block_manager.py): block hashes cover token ids only, and two different images have the same ids.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import defaults
from ..codegen.pysource import compile_function, prepare_params
from ..ir.graph import Module
from ..models.weights import load_params
from .vision_inputs import ImageInput, VisionSpec, expand_placeholders, image_spans, mrope_positions


@dataclass
class MultimodalPrompt:
    """A sequence's images (in prompt order), where their placeholder runs start, and the prompt's
    (t, h, w) positions; generated tokens sit at index + delta on all three axes."""

    images: list[ImageInput]
    starts: list[int]
    positions: np.ndarray  # i64[3, num_prompt]
    delta: int

    @classmethod
    def build(cls, token_ids: list[int], images: list[ImageInput], spec: VisionSpec) -> tuple[list[int], "MultimodalPrompt"]:
        """(the prompt with each placeholder expanded, its multimodal record)."""
        ids = expand_placeholders(token_ids, images, spec.image_token_id)
        starts = image_spans(ids, images, spec.image_token_id)
        pos, delta = mrope_positions(len(ids), images, starts, spec.merge_size)
        return ids, cls(images, starts, pos, delta)


@dataclass
class VisionBatch:
    """ctx.vision for one step (kernels/vision_ref.py reads it)."""

    rows: torch.Tensor  # i64[V]: flat-batch rows of image tokens
    embeds: torch.Tensor  # [V, hidden]
    deepstack: list[torch.Tensor]  # per level, [V, hidden]
    mrope_positions: torch.Tensor  # i64[3, T]


@dataclass
class VisionEncoder:
    """The compiled `encode` function over the runner's params, with an LRU cache of its outputs."""

    fn: Any
    params: dict[str, torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    capacity: int = defaults.IMAGE_CACHE_ENTRIES
    cache: OrderedDict = field(default_factory=OrderedDict)
    encoded: int = 0  # images run through the encoder (cache misses)
    widths: list[int] = field(default_factory=list)  # of each output: what embeddings made elsewhere must match

    @classmethod
    def of(cls, module, params: dict[str, torch.Tensor], device: torch.device) -> "VisionEncoder":
        dtype = next(p for p in params.values() if p.is_floating_point()).dtype
        widths = [int(v.type.shape[1]) for v in module.functions["encode"].outputs]
        return cls(compile_function(module, "encode"), params, device, dtype, widths=widths)

    @classmethod
    def load(cls, module, ckpt, device: torch.device, progress: bool = False) -> "VisionEncoder":
        """The encoder alone (an encode engine): only the params `encode` reads are loaded, no KV pool."""
        fn = module.functions["encode"]
        used = {name for node in fn.nodes for name in node.params.values()}
        sub = Module(dict(module.meta), {k: p for k, p in module.params.items() if k in used}, {"encode": fn})
        params = load_params(sub, ckpt, device, progress=progress)
        prepare_params([fn], params)
        return cls.of(sub, params, device)

    def embeddings(self, image: ImageInput) -> tuple[torch.Tensor, ...]:
        """(merged embeddings [num_tokens, hidden], deepstack features...) of one image; an image that
        comes with its embeddings (an encode engine ran it) is never run through the tower here."""
        if image.embeds is not None:
            return image.embeds
        hit = self.cache.get(image.hash)
        if hit is not None:
            self.cache.move_to_end(image.hash)
            return hit
        grid = torch.tensor([image.grid], dtype=torch.long)  # on the host: the ops read it with tolist(), which on
        # a CUDA tensor would sync twice a block (vision_ref.py) and keep the host from queueing ahead
        with torch.inference_mode():
            out = self.fn(self.params, None, image.pixels.to(self.device, self.dtype), grid)
        out = out if isinstance(out, tuple) else (out,)
        self.encoded += 1
        self.cache[image.hash] = out
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return out


def vision_batch(items: list[tuple[Any, int]], encoder: VisionEncoder, device: torch.device) -> VisionBatch | None:
    """The step's VisionBatch for (sequence, new tokens) items, each starting at seq.num_computed;
    None when no sequence in it has images (a text-only step: mrope reads the 1-D positions)."""
    if not any(getattr(seq, "mm", None) is not None for seq, _ in items):
        return None
    rows, embeds, pos, row0 = [], [], [], 0
    for seq, n in items:
        start, mm = seq.num_computed, seq.mm
        idx = np.arange(start, start + n)
        if mm is None:
            pos.append(np.broadcast_to(idx, (3, n)))
        else:
            p = np.broadcast_to(idx + mm.delta, (3, n)).copy()
            inside = idx < mm.positions.shape[1]
            p[:, inside] = mm.positions[:, idx[inside]]
            pos.append(p)
            for image, first in zip(mm.images, mm.starts):
                lo, hi = max(first, start), min(first + image.num_tokens, start + n)
                if lo < hi:
                    out = encoder.embeddings(image)
                    rows.append(torch.arange(lo - start, hi - start) + row0)
                    embeds.append([o[lo - first:hi - first] for o in out])
        row0 += n
    levels = len(embeds[0]) if embeds else 0
    return VisionBatch(
        rows=(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)).to(device),
        embeds=torch.cat([e[0] for e in embeds]) if embeds else torch.zeros(0),
        deepstack=[torch.cat([e[i] for e in embeds]) for i in range(1, levels)],
        mrope_positions=torch.from_numpy(np.concatenate(pos, axis=1)).to(device))

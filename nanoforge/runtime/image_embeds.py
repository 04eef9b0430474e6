"""Image embeddings that travel between engines (EPD: encode, prefill, decode on different engines).

An encode engine runs only the plan's `encode` function (ImageEncoder: preprocessing + the vision tower,
its outputs cached by image hash) and answers each image as a plain map of msgpack-ready values:

    {"hash": str, "grid": [t, h, w], "num_tokens": int, "dtype": "f32" | "bf16" | "f16",
     "shapes": [[num_tokens, width], ...], "data": [bytes, ...]}

one shape and buffer per encoder output (the merged embeddings, then each deepstack feature). A prefill
(or decode) engine turns such a map back into an ImageInput that carries its embeddings, so its own
vision tower never runs for it. Every field is checked against what this plan's encoder makes (count,
widths, the token count the grid implies, byte sizes): a bad map is a NanoForgeError naming the field,
never a crash inside a step. Raw little-endian bytes, never pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NanoForgeError
from .vision_inputs import ImageInput, VisionSpec, check_image_count, preprocess
from .vision_runner import VisionEncoder

WIRE_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
MAX_HASH_CHARS = 128


def embeds_to_wire(image: ImageInput, outputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """One encoded image as a map of msgpack-ready values (see the module docstring)."""
    dtype = _NAMES.get(outputs[0].dtype)
    if dtype is None:
        raise NanoForgeError(f"image embeddings in {outputs[0].dtype} cannot be sent (f32, bf16 or f16 only)")
    host = [o.detach().contiguous().to("cpu") for o in outputs]
    return {"hash": image.hash, "grid": list(image.grid), "num_tokens": image.num_tokens, "dtype": dtype,
            "shapes": [list(o.shape) for o in host], "data": [o.view(torch.uint8).numpy().tobytes() for o in host]}


def _int(v: Any, where: str) -> int:
    if type(v) is not int or v < 1:
        raise NanoForgeError(f"{where} must be a positive integer, got {v!r}")
    return v


def image_from_wire(d: Any, spec: VisionSpec, encoder: VisionEncoder, where: str = "image_embeds[0]") -> ImageInput:
    """An ImageInput carrying the embeddings of an encode engine's map, on `encoder`'s device and dtype;
    raises naming the first field that does not fit this plan's encoder."""
    if not isinstance(d, dict):
        raise NanoForgeError(f"{where} must be a map, got {type(d).__name__}")
    h = d.get("hash")
    if not isinstance(h, str) or not 0 < len(h) <= MAX_HASH_CHARS:
        raise NanoForgeError(f"{where}.hash must be a non-empty string of at most {MAX_HASH_CHARS} characters")
    grid = d.get("grid")
    if not isinstance(grid, list) or len(grid) != 3:
        raise NanoForgeError(f"{where}.grid must be [t, h, w]")
    t, gh, gw = (_int(g, f"{where}.grid[{i}]") for i, g in enumerate(grid))
    m = spec.merge_size
    if t != 1 or gh % m or gw % m:
        raise NanoForgeError(f"{where}.grid {grid}: one frame whose sides are multiples of the merge size {m} expected")
    n = _int(d.get("num_tokens"), f"{where}.num_tokens")
    if n != gh * gw // (m * m):
        raise NanoForgeError(f"{where}.num_tokens {n} does not match its grid {grid} ({gh * gw // (m * m)} tokens)")
    dtype = WIRE_DTYPES.get(d.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise NanoForgeError(f"{where}.dtype must be one of {', '.join(WIRE_DTYPES)}, got {d.get('dtype')!r}")
    shapes, data, widths = d.get("shapes"), d.get("data"), encoder.widths
    if not isinstance(shapes, list) or not isinstance(data, list) or len(shapes) != len(widths) or \
            len(data) != len(widths):
        raise NanoForgeError(f"{where}: {len(widths)} outputs of this model's vision encoder expected in shapes and "
                             "data (the merged embeddings, then each deepstack feature)")
    outs = []
    for i, (shape, buf, width) in enumerate(zip(shapes, data, widths)):
        if shape != [n, width]:
            raise NanoForgeError(f"{where}.shapes[{i}] is {shape!r}; this model's encoder makes [{n}, {width}]")
        if not isinstance(buf, (bytes, bytearray)) or len(buf) != n * width * dtype.itemsize:
            raise NanoForgeError(f"{where}.data[{i}] must be {n * width * dtype.itemsize} bytes "
                                 f"({n} x {width} {d['dtype']})")
        x = torch.frombuffer(bytearray(buf), dtype=dtype).view(n, width)
        outs.append(x.to(encoder.device, encoder.dtype))
    if any(not bool(torch.isfinite(o).all()) for o in outs):
        raise NanoForgeError(f"{where}: the embeddings hold NaN or infinite values")
    return ImageInput(None, (t, gh, gw), h, n, tuple(outs))


@dataclass
class ImageEncoder:
    """What an encode engine runs: preprocessing and the vision tower (its LRU cache by image hash means a
    repeated image is encoded once). `images` counts every image asked for, `encoder.encoded` the misses."""

    encoder: VisionEncoder
    spec: VisionSpec
    images: int = 0

    @classmethod
    def load(cls, plan: Any, ckpt: Any, device: str = "cpu", progress: bool = False) -> "ImageEncoder":
        if "encode" not in plan.module.functions:
            raise NanoForgeError(f"--role encode: {getattr(ckpt, 'path', 'the model')} has no vision encoder (its "
                                 "plan has no `encode` function); serve it with --role both, prefill or decode")
        enc = VisionEncoder.load(plan.module, ckpt, torch.device(device), progress)
        return cls(enc, VisionSpec.of(plan.config, getattr(ckpt, "path", None)))

    def encode(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Each encoded image as embeds_to_wire's map; a bad image raises naming it ("image 1: ...")."""
        check_image_count(len(images))
        inputs = [preprocess(b, self.spec, f"image {i}") for i, b in enumerate(images)]
        self.images += len(inputs)
        return [embeds_to_wire(im, self.encoder.embeddings(im)) for im in inputs]

    def stats(self) -> dict[str, int]:
        return {"images": self.images, "images_encoded": self.encoder.encoded,
                "image_cache_hits": self.images - self.encoder.encoded}


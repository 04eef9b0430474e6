"""Images in: open, resize to the model's pixel limits, normalise, patchify (Qwen2-VL / Qwen3-VL image
processing, written with Pillow + numpy and tested against transformers' PIL processor), expand each image
placeholder token to one per merged patch, and lay out the prompt's (t, h, w) multimodal rope positions.

Only images; video input is not supported. Every failure is a NanoForgeError naming the image and the
problem, so the OpenAI server can answer it with a 400.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import defaults
from ..errors import NanoForgeError
from .chat_images import IMAGE_PLACEHOLDER  # noqa: F401 - Qwen-VL's text for one image, re-exported

MAX_IMAGE_SIDE = 16384  # pixels, either side, before resizing (decompression bombs are refused by Pillow too)


@dataclass(frozen=True)
class VisionSpec:
    """What preprocessing needs: the model's patching (vision_config) and the processor's pixel limits
    (preprocessor_config.json beside the checkpoint; else Qwen3-VL's defaults)."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    image_token_id: int
    vision_start_token_id: int

    @classmethod
    def of(cls, config: dict[str, Any], checkpoint_dir: str | Path | None) -> "VisionSpec":
        v = config.get("vision_config") or {}
        pre: dict[str, Any] = {}
        path = Path(checkpoint_dir) / "preprocessor_config.json" if checkpoint_dir else None
        if path is not None and path.is_file():
            pre = json.loads(path.read_text())
        size = pre.get("size") or {}
        return cls(int(v.get("patch_size", 16)), int(v.get("temporal_patch_size", 2)),
                   int(v.get("spatial_merge_size", 2)),
                   int(pre.get("min_pixels") or size.get("shortest_edge", 65536)),
                   int(pre.get("max_pixels") or size.get("longest_edge", 16777216)),
                   tuple(pre.get("image_mean", (0.5, 0.5, 0.5))), tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
                   int(config.get("image_token_id", 151655)), int(config.get("vision_start_token_id", 151652)))


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image: pixels f32[P, C*t*p*p] (P = t*h*w patches, merge-block order), its grid,
    the hash its embeddings are cached under, and how many placeholder tokens it takes. An image an encode
    engine ran (EPD, image_embeds.py) has no pixels but its `embeds`: the encoder's outputs, used as they are."""

    pixels: torch.Tensor | None
    grid: tuple[int, int, int]
    hash: str
    num_tokens: int
    embeds: tuple[torch.Tensor, ...] | None = None


def open_image(image: Any, where: str = "image"):
    """A PIL image from a PIL image, a path, or encoded bytes, in RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise NanoForgeError(f"{where}: no such file {str(image)!r}")
            image = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif not isinstance(image, Image.Image):
            raise NanoForgeError(f"{where}: expected a PIL image, a path or image bytes, got {type(image).__name__}")
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise NanoForgeError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    w, h = image.size
    if max(w, h) > MAX_IMAGE_SIDE:
        raise NanoForgeError(f"{where}: {w}x{h} pixels is too large (at most {MAX_IMAGE_SIDE} a side)")
    if min(w, h) < 1 or max(w, h) / min(w, h) > 200:
        raise NanoForgeError(f"{where}: {w}x{h} pixels: the aspect ratio must be below 200")
    return image if image.mode == "RGB" else image.convert("RGB")  # as HF's convert_to_rgb (alpha dropped)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides multiples of `factor`, the area within [min_pixels, max_pixels], the aspect ratio kept."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess(image: Any, spec: VisionSpec, where: str = "image") -> ImageInput:
    from PIL import Image

    img = open_image(image, where)
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    h, w = smart_resize(img.height, img.width, p * m, spec.min_pixels, spec.max_pixels)
    img = img.resize((w, h), Image.BICUBIC)
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)  # HWC
    x = (x - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # CHW
    c, gh, gw = x.shape[0], h // p, w // p
    patches = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], tp, p, p))
    flat = np.ascontiguousarray(patches.reshape(gh * gw, c * tp * p * p))
    digest = hashlib.blake2b(flat.tobytes() + np.asarray([1, gh, gw], np.int64).tobytes(), digest_size=16).hexdigest()
    return ImageInput(torch.from_numpy(flat), (1, gh, gw), digest, gh * gw // (m * m))


def expand_placeholders(token_ids: list[int], images: list[ImageInput], image_token_id: int) -> list[int]:
    """Each lone image placeholder token (the chat template writes one an image) becomes num_tokens of them."""
    where = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(where) != len(images):
        raise NanoForgeError(f"the prompt has {len(where)} image placeholders (token {image_token_id}) for "
                             f"{len(images)} images")
    out, last = [], 0
    for i, image in zip(where, images):
        out += token_ids[last:i] + [image_token_id] * image.num_tokens
        last = i + 1
    return out + token_ids[last:]


def check_image_count(n: int) -> None:
    if n > defaults.MAX_IMAGES_PER_REQUEST:
        raise NanoForgeError(f"{n} images in one request; at most {defaults.MAX_IMAGES_PER_REQUEST}")


def image_spans(token_ids: list[int], images: list[ImageInput], image_token_id: int) -> list[int]:
    """The first prompt index of each image's run of placeholder tokens (after expansion)."""
    starts, i = [], 0
    for image in images:
        while token_ids[i] != image_token_id:
            i += 1
        if token_ids[i:i + image.num_tokens] != [image_token_id] * image.num_tokens:
            raise NanoForgeError(f"image {len(starts)}: {image.num_tokens} placeholder tokens expected in a row")
        starts.append(i)
        i += image.num_tokens
    return starts


def mrope_positions(num_tokens: int, images: list[ImageInput], starts: list[int], merge: int) -> tuple[np.ndarray, int]:
    """(i64[3, num_tokens] (t, h, w) positions of the prompt, delta): text continues one past the previous
    position on all three axes; an image's tokens sit on its merged grid starting there, and the text after
    it resumes at that start + max(h, w) / merge. Positions past the prompt are index + delta."""
    pos = np.zeros((3, num_tokens), np.int64)
    cur, i = 0, 0
    for image, start in zip(images, starts):
        pos[:, i:start] = np.arange(start - i) + cur
        cur += start - i
        t, h, w = image.grid[0], image.grid[1] // merge, image.grid[2] // merge
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pos[:, start:start + image.num_tokens] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
        cur += max(h, w)
        i = start + image.num_tokens
    pos[:, i:] = np.arange(num_tokens - i) + cur
    return pos, int(pos.max(initial=-1)) + 1 - num_tokens

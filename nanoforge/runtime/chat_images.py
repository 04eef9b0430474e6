"""Images in chat messages, shared by `LLM.chat` and the OpenAI server: take the image content parts out of
the messages (each becomes a bare {"type": "image"} part, so the template never sees pixels or base64), and
render the template so that each image leaves one placeholder where its part was, which the engine then
expands to one token per merged patch (vision_inputs.expand_placeholders).

Torch-free on purpose: an HTTP front end over a remote engine decodes `data:` URLs here without loading
torch; opening the image bytes (not an image, too large) happens in the engine, which names the problem.
"""
from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from .. import defaults
from ..errors import NanoForgeError

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # Qwen-VL's text for one image
MAX_IMAGE_BYTES = 20 << 20  # one encoded image, after base64 decoding
IMAGE_PART_TYPES = ("image_url", "image")
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def part_url(part: dict, where: str) -> str | None:
    """The URL of an {"type": "image_url", "image_url": {"url": ...}} part (a bare string is accepted too)."""
    v = part.get("image_url")
    url = v.get("url") if isinstance(v, dict) else v
    if part.get("type") == "image_url" and not isinstance(url, str):
        raise NanoForgeError(f"{where}: an image_url part needs image_url.url, a string")
    return url if isinstance(url, str) else None


def decode_data_url(url: str, where: str) -> bytes:
    """The image bytes of a `data:image/...;base64,` URL. http(s) URLs are refused: the server fetches
    nothing from the network (a request must not make it reach arbitrary hosts)."""
    if url[:8].lower().startswith(("http://", "https://")):
        raise NanoForgeError(f"{where}: image URLs over http(s) are not fetched by this server; send the image "
                             "inline as a data:image/png;base64,... URL")
    m = _DATA_URL.match(url)
    if m is None:
        raise NanoForgeError(f"{where}: an image URL must be a data:image/...;base64,... URL, got "
                             f"{url[:40]!r}{'...' if len(url) > 40 else ''}")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise NanoForgeError(f"{where}: the data URL's media type is {mime or 'missing'!r}, not an image type "
                             "(image/png, image/jpeg, image/webp, ...)")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise NanoForgeError(f"{where}: the image is too large ({len(payload) * 3 // 4 >> 20} MiB encoded; at "
                             f"most {MAX_IMAGE_BYTES >> 20} MiB)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise NanoForgeError(f"{where}: the image data is not valid base64 ({e})") from None
    if not data:
        raise NanoForgeError(f"{where}: the image data is empty")
    return data


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
MEDIA_FLAG = "--allowed-local-media-path"


def check_media_dir(path: str | Path | None) -> Path | None:
    """The operator's --allowed-local-media-path, resolved; None: no local file is read."""
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NanoForgeError(f"{MEDIA_FLAG} {str(path)!r}: not a directory")
    return root.resolve()


def image_url_bytes(part: dict, where: str, media_dir: Path | None = None) -> bytes:
    """An OpenAI server's image_url part: a data: URL; or, only where the operator allowed a directory
    (check_media_dir), a file:// URL or a plain path (relative ones: to that directory) of a file under it.
    http(s) URLs are refused: the server fetches nothing from the network."""
    if part.get("type") != "image_url":
        raise NanoForgeError(f"{where}: images are sent as image_url parts with a data: URL")
    url = part_url(part, where) or ""
    if url[:7].lower() == "file://" or (url and not _SCHEME.match(url)):
        return _local_file(url, where, media_dir)
    return decode_data_url(url, where)


def _local_file(url: str, where: str, media_dir: Path | None) -> bytes:
    shown = f"{url[:200]!r}{'...' if len(url) > 200 else ''}"
    if media_dir is None:
        raise NanoForgeError(f"{where}: the local file {shown} is not read by this server (its operator can allow "
                             f"a directory with {MEDIA_FLAG} DIR); send the image inline as a data:image/png;base64,"
                             "... URL")
    if url[:7].lower() == "file://":
        u = urlsplit(url)
        if u.netloc not in ("", "localhost") or u.query or u.fragment:
            raise NanoForgeError(f"{where}: {shown} must be a file:///absolute/path URL (no host, query or fragment)")
        raw = unquote(u.path)
    else:
        raw = url
    if "\0" in raw:
        raise NanoForgeError(f"{where}: {shown} is not a valid path")
    path = Path(raw) if Path(raw).is_absolute() else media_dir / raw
    try:  # symlinks resolved first, so one pointing out of the directory is outside it
        real = path.resolve()
    except (OSError, RuntimeError) as e:
        raise NanoForgeError(f"{where}: {shown} cannot be resolved ({e})") from None
    if not real.is_relative_to(media_dir):
        raise NanoForgeError(f"{where}: {shown} is outside {MEDIA_FLAG} {media_dir}")
    if not real.is_file():
        raise NanoForgeError(f"{where}: {shown}: no such file under {MEDIA_FLAG} {media_dir}")
    size = real.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise NanoForgeError(f"{where}: {shown} is too large ({size >> 20} MiB; at most {MAX_IMAGE_BYTES >> 20} MiB)")
    try:
        data = real.read_bytes()
    except OSError as e:
        raise NanoForgeError(f"{where}: {shown} cannot be read ({e.strerror or e})") from None
    if not data:
        raise NanoForgeError(f"{where}: {shown} is empty")
    return data


def take_images(messages: list[dict], load: Callable[[dict, str], Any]) -> tuple[list[dict], list[Any]]:
    """(messages with each image part replaced by {"type": "image"}, the images load(part, where) gave, in
    order). Messages without image parts are returned as they are; more than MAX_IMAGES_PER_REQUEST images
    is refused here, before any is decoded."""
    found = [(i, j) for i, m in enumerate(messages) if isinstance(m, dict) and isinstance(m.get("content"), list)
             for j, p in enumerate(m["content"]) if is_image_part(p)]
    if len(found) > defaults.MAX_IMAGES_PER_REQUEST:
        raise NanoForgeError(f"{len(found)} images in one request; at most {defaults.MAX_IMAGES_PER_REQUEST}")
    out, images = list(messages), []
    for i in sorted({i for i, _ in found}):
        out[i] = {**messages[i], "content": list(messages[i]["content"])}
    for i, j in found:
        images.append(load(out[i]["content"][j], f"messages[{i}].content[{j}]"))
        out[i]["content"][j] = {"type": "image"}
    return out, images


def template_renders_images(tokenizer: Any) -> bool:
    """Whether the chat template writes image parts itself (Qwen-VL's do: `'image' in content` ->
    `<|vision_start|><|image_pad|><|vision_end|>`); a guess from its source."""
    source = getattr(tokenizer, "chat_templates", {}).get("default") or ""
    return "image" in source


def render_chat(tokenizer: Any, messages: list[dict], num_images: int, /, **kwargs: Any) -> str:
    """The chat template's text for messages from take_images. A template that does not render image
    parts (e.g. a text-only model's, or a test tokenizer's) gets each such message's content as one
    string instead: its text parts and IMAGE_PLACEHOLDER for each image, concatenated in order as Qwen-VL's
    template writes them. Either way the text holds one placeholder per image (the engine checks)."""
    if num_images and not template_renders_images(tokenizer):
        messages = [{**m, "content": "".join(IMAGE_PLACEHOLDER if is_image_part(p) else str(p.get("text", ""))
                                             for p in m["content"])}
                    if isinstance(m.get("content"), list) and any(is_image_part(p) for p in m["content"]) else m
                    for m in messages]
    return tokenizer.apply_chat_template(messages, **kwargs)


def load_offline_image(part: dict, where: str) -> Any:
    """LLM.chat's image parts: {"type": "image", "image": PIL image | path | bytes} or an image_url part with a
    data: URL, a local path or a file:// URL (the caller's own machine; http(s) is refused as the server does)."""
    if part.get("type") == "image":
        img = part.get("image", part.get("image_url"))
        if img is None:
            raise NanoForgeError(f"{where}: an image part needs 'image' (a PIL image, a path or bytes)")
        return img
    url = part_url(part, where)
    if url is not None and url[:5].lower() == "data:":
        return decode_data_url(url, where)
    if url is not None and url[:7].lower() == "file://":
        return Path(url[7:])
    if url is not None and not url[:8].lower().startswith(("http://", "https://")):
        return Path(url)
    return decode_data_url(url or "", where)  # raises: http(s), or no URL

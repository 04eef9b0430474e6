"""The engine server's frame format, shared by both ends without importing the engine (a front end
or router need not load torch): one msgpack map per frame with a string "type". Never pickle: a
peer's bytes must never be able to run code here."""
from __future__ import annotations

from typing import Any

import msgpack

PROTOCOL_VERSION = 1


class Malformed(Exception):
    """A frame that is not a msgpack map with a string "type", or lacks what its type needs."""


def pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(frame, raw=False)
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
        raise Malformed(f"frame is not msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise Malformed("frame must be a msgpack map with a string 'type'")
    return msg


def unpack_body(body: list[bytes]) -> dict[str, Any]:
    """The one msgpack frame after a ROUTER socket's identity frame."""
    if len(body) != 1:
        raise Malformed(f"expected one frame after the identity, got {len(body)}")
    return unpack(body[0])


def error_reply(e: Exception, msg: dict[str, Any]) -> dict[str, Any]:
    """What a server answers a frame it could not handle with (a generate's request id included, so
    the router ends that request's stream)."""
    rid = msg.get("request_id")
    return {"type": "error", "error": str(e) or type(e).__name__, "id": msg.get("id"),
            "request_id": rid if isinstance(rid, str) else None}

"""Hermes / Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the
model's text become OpenAI `tool_calls`. A streaming filter, so the raw tags never reach a client as
content and each call goes out whole once its closing tag has arrived."""
from __future__ import annotations

import json
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parse_call(raw: str) -> dict[str, Any] | None:
    """One block's JSON -> an OpenAI tool call, or None when it is not a call (then it stays text)."""
    try:
        obj = json.loads(raw.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def held_prefix(text: str, word: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `word` (text that must wait:
    the next piece may complete the word)."""
    for k in range(min(len(text), len(word) - 1), 0, -1):
        if word.startswith(text[-k:]):
            return k
    return 0


class ToolCallFilter:
    """Feed visible text in pieces; get back (content, completed calls). Text inside an open tag is
    held until the tag closes; at the end an unclosed block is parsed if it is valid JSON, else
    returned as content (the model stopped mid-call: the client should see what it wrote)."""

    def __init__(self) -> None:
        self.buf, self.inside, self.num_calls = "", False, 0

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        self.buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            if not self.inside:
                i = self.buf.find(OPEN)
                if i >= 0:
                    content.append(self.buf[:i])
                    self.buf, self.inside = self.buf[i + len(OPEN):], True
                    continue
                keep = 0 if final else held_prefix(self.buf, OPEN)
                content.append(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            j = self.buf.find(CLOSE)
            if j < 0 and not final:
                break
            raw = self.buf if j < 0 else self.buf[:j]
            self.buf, self.inside = "" if j < 0 else self.buf[j + len(CLOSE):], False
            call = parse_call(raw)
            if call is None:
                content.append(OPEN + raw + ("" if j < 0 else CLOSE))
            else:
                calls.append(call)
            if j < 0:
                break
        self.num_calls += len(calls)
        return "".join(content), calls


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Whole text -> (content without the blocks, calls)."""
    return ToolCallFilter().feed(text, final=True)

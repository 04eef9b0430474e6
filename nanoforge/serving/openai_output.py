"""Engine token deltas -> what one OpenAI choice shows: text decoded incrementally, cut at the first
stop string (streamed text never shows a stop string, nor a prefix of one that the next token may
complete), tool-call blocks lifted out, logprobs in OpenAI's two shapes. Streaming and
non-streaming go through the same code, so the two can only differ in how the text is chunked."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .protocol import TokenDelta
from .tool_parser import ToolCallFilter, held_prefix

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Decode a growing id list at O(1) per token: only a window of the last few ids is decoded
    (whole-text decoding is O(n) per token, O(n^2) per stream). The window keeps CONTEXT ids of
    context so that decoders which strip a leading space (SentencePiece) see the same neighbours as
    a whole decode; it only moves on at a clean UTF-8 boundary, and a trailing U+FFFD (a character
    whose remaining bytes are in the next token) is held back until the character completes."""

    CONTEXT = 4

    def __init__(self, tokenizer: Any):
        self.tok, self.ids, self.start, self.done = tokenizer, [], 0, 0  # done: chars of the window emitted

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        if self.tok is None:  # a checkpoint without tokenizer: token ids only, no text
            return ""
        window = self.tok.decode(self.ids[self.start:])
        stable = window if final else window.rstrip(REPLACEMENT)
        piece = stable[self.done:]
        self.done = max(self.done, len(stable))
        if not window.endswith(REPLACEMENT) and len(self.ids) - self.start > self.CONTEXT:
            self.start = len(self.ids) - self.CONTEXT
            self.done = len(self.tok.decode(self.ids[self.start:]))
        return piece


class TokenNames:
    """id -> its text for logprobs (special tokens shown, not skipped); cached, vocab-bounded."""

    def __init__(self, tokenizer: Any):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tok.decode([i], skip_special_tokens=False) if self.tok else str(i)
        return s


def _lp(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -Infinity


@dataclass
class Update:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # (id, logprob, [[id, lp], ...])
    finish_reason: str | None = None

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls or self.logprobs or self.finish_reason)


class ChoiceStream:
    """One choice's state; push() each delta, get what is new for the client."""

    def __init__(self, index: int, tokenizer: Any, stop: list[str], parse_tools: bool):
        self.index, self.stops = index, list(stop)
        self.maxstop = max((len(s) for s in self.stops), default=0)
        self.detok = Detokenizer(tokenizer)
        self.tools = ToolCallFilter() if parse_tools else None
        self.text, self.sent = "", 0  # decoded text; chars of it past the stop checks
        self.num_tokens = self.num_prompt = self.num_cached = 0
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, d: TokenDelta) -> Update:
        self.num_tokens += len(d.token_ids)
        self.num_prompt, self.num_cached = d.num_prompt_tokens or self.num_prompt, d.num_cached_tokens
        if d.finish_reason == "error":
            self.error, self.finish_reason = d.error or "engine error", "error"
            return Update(finish_reason="error")
        final = d.finish_reason is not None
        self.text += self.detok.push(d.token_ids, final)
        hits = [i for s in self.stops if (i := self.text.find(s, max(0, self.sent - self.maxstop))) >= 0]
        if hits:
            end, reason, final = max(min(hits), self.sent), "stop", True
        elif final:
            end, reason = len(self.text), d.finish_reason
        else:
            end, reason = len(self.text) - max((held_prefix(self.text, s) for s in self.stops), default=0), None
        piece, self.sent = self.text[self.sent:end], max(end, self.sent)
        if final:
            self.text = self.text[:self.sent]
        up = Update(piece, [], [(t, e["token"], e.get("top", [])) for t, e in zip(d.token_ids, d.logprobs or [])])
        if self.tools is not None:
            up.content, up.tool_calls = self.tools.feed(piece, final)
        if final:
            self.finish_reason = "tool_calls" if reason == "stop" and self.tools and self.tools.num_calls else reason
            up.finish_reason = self.finish_reason
        return up


def chat_logprobs(entries: list[tuple[int, float, list]], name: TokenNames) -> dict[str, Any]:
    def one(i: int, lp: float) -> dict[str, Any]:
        s = name(i)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**one(i, lp), "top_logprobs": [one(int(j), v) for j, v in top]} for i, lp, top in entries],
            "refusal": None}


def completion_logprobs(entries: list[tuple[int, float, list]], name: TokenNames, offset: int = 0) -> dict[str, Any]:
    tokens, offsets = [], []
    for i, _, _ in entries:
        offsets.append(offset)
        tokens.append(name(i))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [_lp(lp) for _, lp, _ in entries],
            "top_logprobs": [{name(int(j)): _lp(v) for j, v in top} for _, _, top in entries], "text_offset": offsets}

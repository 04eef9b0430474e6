"""OpenAI request bodies -> prompt token ids + SamplingParams fields, checked by hand so that every
bad field is a 400 in OpenAI's error format naming the field (never FastAPI's 422 shape), before
anything reaches the engine. Bodies are parsed with json only."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NanoForgeError
from ..runtime.chat_images import image_url_bytes, render_chat, take_images
from ..runtime.sampling_params import SamplingParams

MAX_N = 128
RESERVED_TEMPLATE_KEYS = {"messages", "tools", "documents", "add_generation_prompt"}


class APIError(Exception):
    """An error the client caused (or a server fault), rendered as {"error": {...}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    prompts: list[list[int]]
    params: dict[str, Any]  # SamplingParams fields shared by every choice (seed is offset per choice)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    parse_tools: bool = False
    images: list[bytes] | None = None  # encoded images, one per placeholder of the (one) chat prompt
    fit_max_tokens: bool = False  # max_tokens defaulted: the engine fits it to the expanded image prompt


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def load_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


_TYPES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array",
          dict: "an object"}


def get(body: dict, key: str, kind: type, default: Any = None, lo: float | None = None, hi: float | None = None) -> Any:
    """body[key] checked for JSON type (bool is not a number here) and range; None -> default."""
    v = body.get(key)
    if v is None:
        return default
    ok = (isinstance(v, (int, float)) if kind is float else isinstance(v, kind)) and \
        (kind is bool or not isinstance(v, bool))
    if not ok:
        raise APIError(400, f"'{key}' must be {_TYPES[kind]}", param=key)
    if (lo is not None and not v >= lo) or (hi is not None and not v <= hi):
        span = f"[{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise APIError(400, f"'{key}' must be {span}; got {v}", param=key)
    return float(v) if kind is float else v


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _unsupported(body: dict, key: str, ok: Any = (None,)) -> None:
    v = body.get(key)
    if v not in ok and v is not None and v != {} and v != []:
        raise APIError(400, f"'{key}' is not supported by this server", param=key)


def sampling_fields(body: dict, default_max_tokens: int | None, max_tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    """The SamplingParams fields common to both endpoints (vLLM's extra fields included)."""
    max_tokens = default_max_tokens
    for k in max_tokens_keys:
        if body.get(k) is not None:
            max_tokens = get(body, k, int, lo=1)
            break
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or an array of them", param="stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and
                                     all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids)):
        raise APIError(400, "'stop_token_ids' must be an array of integers", param="stop_token_ids")
    for k in ("logit_bias", "suffix", "response_format", "functions", "function_call"):
        _unsupported(body, k, ok=(None, {"type": "text"}))
    p = {"temperature": get(body, "temperature", float, 1.0, 0, 2), "top_p": get(body, "top_p", float, 1.0, 0, 1),
         "presence_penalty": get(body, "presence_penalty", float, 0.0, -2, 2),
         "frequency_penalty": get(body, "frequency_penalty", float, 0.0, -2, 2),
         "top_k": get(body, "top_k", int, 0, -1), "min_p": get(body, "min_p", float, 0.0, 0, 1),
         "repetition_penalty": get(body, "repetition_penalty", float, 1.0),
         "ignore_eos": get(body, "ignore_eos", bool, False), "min_tokens": get(body, "min_tokens", int, 0, 0),
         "seed": get(body, "seed", int), "stop": list(stop or []), "stop_token_ids": list(stop_ids or [])}
    if max_tokens is not None:
        p["max_tokens"] = max_tokens
    return p


def _common(body: dict, req: ParsedRequest, max_model_len: int) -> ParsedRequest:
    req.n = get(body, "n", int, 1, 1, MAX_N)
    if req.n * len(req.prompts) > MAX_N:
        raise APIError(400, f"at most {MAX_N} choices (prompts x n) per request", param="n")
    req.stream = get(body, "stream", bool, False)
    opts = get(body, "stream_options", dict, {})
    req.include_usage = req.stream and get(opts, "include_usage", bool, False)
    best_of = get(body, "best_of", int)
    if best_of is not None and best_of != req.n:
        raise APIError(400, "'best_of' other than n is not supported", param="best_of")
    for ids in req.prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        want = len(ids) + req.params.get("max_tokens", 1)
        if want > max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {want} tokens ({len(ids)} in the prompt, "
                                f"{want - len(ids)} in the completion). Please reduce the length of the prompt "
                                "or the completion.", param="max_tokens", code="context_length_exceeded")
    if req.logprobs is not None:
        req.params["logprobs"] = req.logprobs
    try:
        SamplingParams(**req.params)
    except (NanoForgeError, TypeError, ValueError) as e:
        raise APIError(400, str(e).removeprefix("SamplingParams: ")) from None
    return req


def _text_content(content: Any, where: str) -> str | list[dict]:
    """A string; text parts joined by newlines; or, with images (bare {"type": "image"} parts left by
    take_images), the list of text and image parts for render_chat."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts: list[dict] = []
        for part in content:
            if isinstance(part, dict) and part == {"type": "image"}:
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise APIError(400, f"{where}: only text and image_url content parts are supported", param="messages")
        if any(p["type"] == "image" for p in parts):
            return parts
        return "\n".join(p["text"] for p in parts)
    raise APIError(400, f"{where}: 'content' must be a string or an array of content parts", param="messages")


def _message(m: Any, i: int) -> dict[str, Any]:
    """One chat message, normalized for HF templates: text content, tool-call arguments as dicts."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, f"{where} must be an object with a string 'role'", param="messages")
    out = {**m, "content": _text_content(m.get("content"), where)}
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise APIError(400, f"{where}.tool_calls must be an array", param="messages")
        out["tool_calls"] = []
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, f"{where}.tool_calls: each needs function.name", param="messages")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError:
                    pass  # templates that want a string get the string
            out["tool_calls"].append({**c, "function": {**fn, "arguments": args}})
    return out


def parse_chat(body: dict, tokenizer: Any, max_model_len: int, media_dir: Path | None = None) -> ParsedRequest:
    """`media_dir`: the operator's --allowed-local-media-path (image_url parts may name files under it)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    try:
        messages, images = take_images(messages, lambda part, where: image_url_bytes(part, where, media_dir))
    except NanoForgeError as e:
        raise APIError(400, str(e), param="messages") from None
    msgs = [_message(m, i) for i, m in enumerate(messages)]
    tools = get(body, "tools", list)
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice not in ("auto", "none"):
        raise APIError(400, "only tool_choice 'auto' and 'none' are supported", param="tool_choice")
    if tools is not None and not all(isinstance(t, dict) and t.get("type", "function") == "function" and
                                     isinstance(t.get("function"), dict) and
                                     isinstance(t["function"].get("name"), str) for t in tools):
        raise APIError(400, "'tools' must be an array of {type: function, function: {name, ...}}", param="tools")
    use_tools = bool(tools) and choice == "auto"
    kwargs = get(body, "chat_template_kwargs", dict, {})
    kwargs = {k: v for k, v in kwargs.items() if k not in RESERVED_TEMPLATE_KEYS and str.isidentifier(k)}
    try:
        text = render_chat(tokenizer, msgs, len(images), add_generation_prompt=True,
                           tools=tools if use_tools else None, **kwargs)
    except NanoForgeError as e:
        raise APIError(400, f"cannot format the messages: {e}", param="messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your messages "
                            f"resulted in {len(ids)} tokens.", param="messages", code="context_length_exceeded")
    top = get(body, "top_logprobs", int, None, 0, 20)
    want_lp = get(body, "logprobs", bool, False)
    if top is not None and not want_lp:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    params = sampling_fields(body, max_model_len - len(ids), ("max_completion_tokens", "max_tokens"))
    req = ParsedRequest([ids], params, logprobs=(top or 0) if want_lp else None, parse_tools=use_tools,
                        images=images or None, fit_max_tokens=all(body.get(k) is None for k in
                                                                  ("max_completion_tokens", "max_tokens")))
    return _common(body, req, max_model_len)


def parse_completion(body: dict, tokenizer: Any, max_model_len: int) -> ParsedRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send token ids", param="prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompts = [tokenizer.encode(t) for t in texts]
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(type(t) is int for t in p)
                                                     for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an "
                            "array of such arrays", param="prompt")
    if get(body, "echo", bool, False):
        raise APIError(400, "'echo' is not supported by this server", param="echo")
    lp = get(body, "logprobs", int, None, 0, 20)
    req = ParsedRequest(prompts, sampling_fields(body, 16, ("max_tokens",)), logprobs=lp)
    return _common(body, req, max_model_len)

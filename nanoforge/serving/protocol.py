"""The messages between a front end (HTTP server, router) and an engine: plain dataclasses that
travel as msgpack maps (never pickle), so a process on either side can be replaced."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, AsyncIterator, Protocol

from ..runtime.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    params: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    # PD disaggregation: {"phase": "prefill"} parks the request after its first token, keeping the
    # KV for a decode engine; {"phase": "decode", "source", "source_request_id", "num_prompt",
    # "num_tokens"} continues one whose prompt_ids end with its first token(s), pulling their KV
    pd: dict[str, Any] | None = None
    # vision-language models: the encoded bytes (png, jpeg, webp, ...) of each image placeholder of the
    # prompt, in order; they travel as msgpack bin and are opened by the engine (vision_inputs.py)
    images: list[bytes] | None = None
    fit_max_tokens: bool = False  # max_tokens was defaulted: the engine lowers it to fit the expanded prompt
    # EPD: instead of `images`, what an encode engine made of them (runtime/image_embeds.py maps: grid, hash,
    # dtype, shapes and raw bytes per encoder output), so this engine's vision tower does not run again
    image_embeds: list[dict[str, Any]] | None = None

    @property
    def media(self) -> list[Any] | None:
        """What the engine takes as the request's images: the embeddings when it has them, else the bytes."""
        return self.image_embeds or self.images

    def sampling_params(self) -> SamplingParams:
        known = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(self.params) - known)
        if unknown:
            from ..errors import NanoForgeError

            raise NanoForgeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return SamplingParams(**self.params)


@dataclass
class TokenDelta:
    """The tokens one request got since its previous delta (several when the engine ran several
    steps between two flushes). finish_reason is set on the last delta of a request: "stop",
    "length", "abort", or "error" (then `error` says why, e.g. a bad parameter); a PD prefill
    request ends with "prefilled" and `kv` = {"num_tokens", "block_size", "instance"}: the KV the
    prefill engine keeps for a decode engine to pull."""
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None  # one per new token when asked: {"token": lp, "top": [[id, lp], ...]}
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    kv: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        if d["logprobs"] is not None:  # msgpack has no tuples or int dict keys
            d["logprobs"] = [{"token": e["token"], "top": [list(t) for t in e.get("top", [])]} for e in d["logprobs"]]
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "TokenDelta":
        return cls(**{k: d[k] for k in d if k in cls.__dataclass_fields__})


class EngineClient(Protocol):
    """What a front end needs from an engine, wherever it runs."""

    model_name: str
    max_model_len: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    async def stats(self) -> dict[str, Any]: ...

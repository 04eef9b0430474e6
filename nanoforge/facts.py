"""Typed facts about a module: what tracing and the passes found out, for the layers after them.

A fact is a dataclass with a `KEY`; `write(module, fact)` stores it in the module's meta as plain
JSON (so it prints with the IR, round-trips through the parser and lands in plan.json) and
`read(module, Fact)` gives it back typed and checked. This is the one way facts travel from the
pass that finds them to the plan, the runtime and `inspect`: nobody else indexes `module.meta`.
The KV contract, the biggest fact, has its own module (kv_contract.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import NanoForgeError
from .ir.graph import Module
from .typed_json import from_json, to_json


F = TypeVar("F")  # a fact class: a dataclass with a KEY (to_json / from_json of its own, if it has them)


def write(module: Module, fact: Any) -> None:
    module.meta[type(fact).KEY] = fact.to_json() if hasattr(fact, "to_json") else to_json(fact)


def read(module: Module, cls: type[F]) -> F | None:
    """The fact, or None when no pass wrote it; a malformed one fails naming its field."""
    key = cls.KEY  # type: ignore[attr-defined]
    data = module.meta.get(key)
    if data is None:
        return None
    return cls.from_json(data, key) if hasattr(cls, "from_json") else from_json(cls, data, key)


def require(module: Module, cls: type[F]) -> F:
    fact = read(module, cls)
    if fact is None:
        raise NanoForgeError(f"the module has no {cls.KEY} fact: the pass that writes it "  # type: ignore[attr-defined]
                             "did not run")
    return fact


@dataclass(frozen=True)
class ModelInfo:
    """What tracing read from the HF config."""

    KEY: ClassVar[str] = "model"  # written by models.trace_model
    architecture: str
    dtype: str  # the activations' and weights' dtype (f32 | bf16 | f16)
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_position_embeddings: int
    model_type: str = ""
    mtp_layers: int = 0  # multi-token-prediction layers the checkpoint ships (not traced yet)
    trace_ms: float = 0.0


GROUPS = ("tp", "ep", "dp")


@dataclass(frozen=True)
class ParallelLayout:
    """How ranks are laid out: rank = dp_index * tp + tp_index; the EP group spans consecutive
    ranks (attention-DP x FFN-EP plans have tp = 1 and ffn_ep = attention_dp)."""

    KEY: ClassVar[str] = "parallel"
    tp: int = 1
    attention_dp: int = 1
    ffn_ep: int = 1

    @property
    def world(self) -> int:
        return max(self.tp * self.attention_dp, self.ffn_ep)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def rank_in_group(self, group: str, rank: int) -> tuple[int, int]:
        """(index of `rank` inside its `group`, size of that group)."""
        if group == "tp":
            return rank % self.tp, self.tp
        if group == "ep":
            return rank % self.ffn_ep, self.ffn_ep
        if group == "dp":
            return (rank // self.tp) % self.attention_dp, self.attention_dp
        raise ValueError(f"unknown parallel group {group!r}; groups: {', '.join(GROUPS)}")

    def group_members(self, group: str, rank: int) -> list[int]:
        """The global ranks of `rank`'s group, in group order."""
        index, size = self.rank_in_group(group, rank)
        stride = self.tp if group == "dp" else 1
        base = rank - index * stride
        return [base + i * stride for i in range(size)]

    def describe(self) -> str:
        return " x ".join(f"{k}={v}" for k, v in (("tp", self.tp), ("attention_dp", self.attention_dp),
                                                   ("ffn_ep", self.ffn_ep)) if v > 1) or "one rank"


def layout_of(module: Module) -> ParallelLayout:
    """The module's layout; a module no sharding pass touched runs on one rank."""
    return read(module, ParallelLayout) or ParallelLayout()


@dataclass(frozen=True)
class Target:
    """The machine a plan is compiled for; providers are chosen from it."""

    KEY: ClassVar[str] = "target"
    device: str = "cpu"  # cpu | cuda
    torch: str = ""
    machine: str = ""
    capability: str = ""  # "sm90" on an H100; empty off CUDA

    @property
    def sm(self) -> int:
        """SM version as major * 10 + minor (90 for sm90), 0 when unknown."""
        digits = self.capability.removeprefix("sm")
        return int(digits) if digits.isdigit() else 0


@dataclass(frozen=True)
class ProviderNotes:
    """Per op, why each better-ranked provider was passed over (select_kernels)."""

    KEY: ClassVar[str] = "provider_fallbacks"
    notes: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphBlockers:
    """Reasons, found by passes before plan_cuda_graphs, that decode cannot run in CUDA graphs."""

    KEY: ClassVar[str] = "graph_blockers"
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeepEPPlan:
    """Which DeepEP mode serves which batch sizes (plan_deep_ep)."""

    KEY: ClassVar[str] = "deep_ep"  # written by plan_deep_ep
    low_latency_max_tokens: int
    max_num_seqs: int
    modes: str


@dataclass(frozen=True)
class CudaGraphPlan:
    """Decode batch sizes to capture, or why none (plan_cuda_graphs)."""

    KEY: ClassVar[str] = "cuda_graphs"  # written by plan_cuda_graphs
    sizes: tuple[int, ...] = ()
    reason: str | None = "the plan has no CUDA-graph pass"
    verify_sizes: tuple[int, ...] = ()  # MTP plans: batch sizes of the verify step (K + 1 rows a sequence)


@dataclass(frozen=True)
class SpeculativePlan:
    """The plan drafts with the checkpoint's MTP head (attach_mtp): K drafts a step, chained on the
    head's own outputs; the forward also returns its final hidden state, which the draft reads."""

    KEY: ClassVar[str] = "speculative"  # written by attach_mtp
    method: str  # mtp
    num_tokens: int  # K
    draft_kv_layers: tuple[int, ...]  # the draft's own KV layers in the contract


@dataclass(frozen=True)
class MemoryPlan:
    """What the engine sizes its memory from (plan_memory)."""

    KEY: ClassVar[str] = "memory"  # written by plan_memory
    param_bytes: int  # this rank's weights
    kv_bytes_per_token: int  # KVContract.bytes_per_token()
    activation_bytes_per_token: int  # the peak of values alive at once, per token of a step
    max_num_batched_tokens: int  # the step the peak was planned for

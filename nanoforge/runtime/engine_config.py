"""The engine's options (EngineConfig: what LLM(...) and `serve` flags set), their checks, and the
step metrics the engine keeps (EngineMetrics: what `metrics()` and the benchmarks report)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import defaults
from ..errors import NanoForgeError
from ..plan import Plan
from .block_manager import BlockManager
from .speculative import SpecConfig


@dataclass
class EngineConfig:
    device: str = "cpu"
    num_blocks: int | None = None  # default: kv_cache_memory / bytes per block
    kv_cache_memory: int | None = None  # bytes; default 1 GiB on CPU, on CUDA what gpu_memory_utilization leaves
    gpu_memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION
    max_num_seqs: int = defaults.MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None  # None: defaults.step_tokens (8192 on a card of 70 GiB or more)
    max_prefill_chunk: int | None = None  # None: likewise (the whole step there, else defaults.MAX_PREFILL_CHUNK)
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at what the KV pool holds
    prefix_caching: bool = True
    enforce_eager: bool = False  # never replay CUDA graphs
    overlap_decode: bool = True  # launch decode step N+1 before the host has read step N's tokens
    launcher: str = "local"  # where a sharded plan's worker ranks run: local subprocesses, or ray actors
    ray_address: str | None = None  # launcher ray: the cluster to join (default $RAY_ADDRESS, else this node's)
    speculative: str | None = None  # drafts each decode step verifies: ngram | mtp (speculative.py); None: the plan's
    num_speculative_tokens: int | None = None  # drafts per sequence and step (default: the plan's K, else 3)


@dataclass
class EngineMetrics:
    steps: int = 0
    step_times: list[float] = field(default_factory=list)
    tokens_per_step: list[int] = field(default_factory=list)
    decode_step_times: list[float] = field(default_factory=list)  # steps of one token per sequence
    decode_flags: list[bool] = field(default_factory=list)  # per step: was it decode-only
    rows_per_step: list[int] = field(default_factory=list)  # per step: sequences in the batch
    kv_per_step: list[int] = field(default_factory=list)  # per step: context positions attended, summed over rows
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def summary(self, blocks: BlockManager, preemptions: int, batches: dict | None = None) -> dict:
        n = max(self.steps, 1)
        return {"steps": self.steps, "preemptions": preemptions, "batches": dict(batches or {}),
                "prefix_cache_hit_rate": blocks.hits / blocks.queries if blocks.queries else 0.0,
                "prefix_cache_hit_tokens": blocks.hits,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "mean_tokens_per_step": sum(self.tokens_per_step) / n,
                "mean_step_ms": 1000 * sum(self.step_times) / n,
                "decode_only_steps": len(self.decode_step_times),
                "decode_only_step_s": sum(self.decode_step_times),
                "mixed_step_s": sum(self.step_times) - sum(self.decode_step_times),
                "mixed_step_ms": spread([t for t, n in zip(self.step_times, self.decode_flags) if not n])}


def spread(xs: list[float]) -> dict[str, float] | None:
    """min / median / max in ms: one slow outlier (a kernel compiling mid-run) shows up as max."""
    if not xs:
        return None
    xs = sorted(xs)
    return {"min": 1000 * xs[0], "p50": 1000 * xs[len(xs) // 2], "max": 1000 * xs[-1]}


def check_config(cfg: EngineConfig) -> None:
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise NanoForgeError(f"gpu_memory_utilization must be in (0, 1]; got {cfg.gpu_memory_utilization}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise NanoForgeError(f"{name} must be at least 1; got {getattr(cfg, name)}")
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        raise NanoForgeError(f"max_model_len must be at least 2 (a prompt token and a generated one); got "
                             f"{cfg.max_model_len}")


def with_step_tokens(cfg: EngineConfig) -> EngineConfig:
    """cfg with max_num_batched_tokens and max_prefill_chunk set for its device where left None."""
    if cfg.max_num_batched_tokens is not None and cfg.max_prefill_chunk is not None:
        return cfg
    card = 0
    if cfg.device.startswith("cuda"):
        import torch

        card = torch.cuda.get_device_properties(torch.device(cfg.device)).total_memory
    tokens, chunk = defaults.step_tokens(cfg.device, card)
    tokens = cfg.max_num_batched_tokens or tokens
    return replace(cfg, max_num_batched_tokens=tokens, max_prefill_chunk=cfg.max_prefill_chunk or min(chunk, tokens))


def spec_config(cfg: EngineConfig, plan: Plan) -> SpecConfig:
    """Speculation as asked, or as the plan was compiled for (its MTP head: attach_mtp)."""
    drafts = plan.speculative
    method = cfg.speculative or (drafts.method if drafts else None)
    if cfg.num_speculative_tokens is not None and method is None:
        raise NanoForgeError("--num-speculative-tokens needs --speculative (ngram, or mtp on a plan compiled with it)")
    if method == "mtp" and drafts is None:
        raise NanoForgeError("--speculative mtp: this plan has no MTP draft function; compile the checkpoint with "
                             "--speculative mtp")
    k = cfg.num_speculative_tokens or (drafts.num_tokens if drafts and method == "mtp" else 3)
    return SpecConfig(method, k)

"""plan_cuda_graphs: choose the decode batch sizes to capture as CUDA graphs.

Sizes 1, 2, 4, 8, then every 16 up to max_num_seqs, cut where the largest graph's activations
(graphs share one memory pool, so the largest one sets it) would exceed the budget. When no
graph can be used (CPU target, or a node whose kernel syncs with the host) the plan says why.
A plan with an MTP head (attach_mtp) also gets the verify step's sizes: K + 1 rows a sequence."""
from __future__ import annotations

from dataclasses import dataclass

from .. import defaults
from ..codegen.providers import graph_unsafe_reason
from ..errors import NanoForgeError
from ..facts import CudaGraphPlan, GraphBlockers, ModelInfo, SpeculativePlan, Target, read, require, write
from ..ir.graph import Module
from .manager import Pass
from .plan_memory import peak_activation_bytes


MAX_VERIFY_ROWS = 1024  # speculation pays at small batches; a verify graph past this costs memory for little


def candidate_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


@dataclass(frozen=True)
class Options:
    enabled: bool = True
    max_num_seqs: int = defaults.MAX_NUM_SEQS  # the largest decode batch
    memory_budget: int = 2 << 30  # bytes the largest graph's activations may take


def plan_cuda_graphs(module: Module, opts: Options) -> int:
    if opts.max_num_seqs < 1:
        raise NanoForgeError(f"--max-num-seqs {opts.max_num_seqs}: must be at least 1")
    target = read(module, Target) or Target()
    blockers = read(module, GraphBlockers)
    reason = None
    if target.device != "cuda":
        reason = "the target is not a CUDA device"
    elif not opts.enabled:
        reason = "disabled at compile time"
    elif blockers is not None and blockers.reasons:  # an earlier pass's reason (e.g. plan_deep_ep)
        reason = blockers.reasons[0]
    else:
        for _, node in module.nodes():
            why = graph_unsafe_reason(node.op, node.provider or "torch")
            if why:
                reason = f"{why} @{node.source}"
                break
    sizes: list[int] = []
    if reason is None:
        per_token = max(peak_activation_bytes(f) for f in module.functions.values())
        vocab_bytes = 4 * require(module, ModelInfo).vocab_size  # logits per sequence (the sampler widens to f32)
        sizes = [s for s in candidate_sizes(opts.max_num_seqs) if s * (per_token + vocab_bytes) <= opts.memory_budget]
        if not sizes:
            reason = f"even a batch of 1 needs more than the {opts.memory_budget} B budget"
    verify: list[int] = []
    spec = read(module, SpeculativePlan)
    if spec is not None and sizes:  # the verify step: K + 1 rows a sequence, up to 1024 rows in all
        q = spec.num_tokens + 1
        verify = [s for s in sizes
                  if s * q <= MAX_VERIFY_ROWS and s * q * (per_token + vocab_bytes) <= opts.memory_budget]
    write(module, CudaGraphPlan(tuple(sizes), reason, tuple(verify)))
    return len(sizes) + len(verify)


PASS = Pass("plan_cuda_graphs", plan_cuda_graphs, "decode batch sizes to capture, or why none", Options)

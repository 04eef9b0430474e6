"""Runs the plan's generated forward over one flat batch: builds the token, position and
row tensors plus the batch context, and returns the logits of the rows that need a token.
Decode-only batches replay a captured CUDA graph when the plan planned one; every batch that
runs eagerly instead is counted under its reason. A rank of a sharded plan runs the same code
with its collectives (`comm`) and the KV block count all ranks agreed on (distributed_runner.py)."""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from ..kernels.context import allocate_pool, make_context
from ..codegen.pysource import compile_function
from ..errors import NanoForgeError
from ..models.checkpoint import Checkpoint
from ..parallel.shard_spec import world_size
from ..plan import Plan
from .scheduler import ScheduledBatch
from .weights import load_params

log = logging.getLogger("nanoforge.runner")


def flat_batch(batch: ScheduledBatch, sample_items: list[int], device_tokens: bool = False
               ) -> tuple[list[int], list[tuple[int, int, list[int]]], list[int]]:
    """(token ids, (q_len, ctx_len, blocks) per sequence, rows to sample) of a scheduled batch;
    its tokens are positions ctx_len - q_len .. ctx_len - 1 of each sequence. With device_tokens,
    the token ids are on the device already and the list is empty."""
    tokens: list[int] = []
    seqs, ends, end = [], [], -1
    for seq, n in batch.items:
        start = seq.num_computed
        if not device_tokens:
            tokens += seq.token_ids[start:start + n]
        seqs.append((n, start + n, seq.block_table))
        end += n
        ends.append(end)
    return tokens, seqs, [ends[i] for i in sample_items]


def positions_of(seqs: list[tuple[int, int, list[int]]]) -> list[int]:
    return [p for q, c, _ in seqs for p in range(c - q, c)]


class ModelRunner:
    def __init__(self, plan: Plan, ckpt: Checkpoint, num_blocks: int | None, device: str = "cpu", progress: bool = True,
                 max_model_len: int = 4096, max_num_seqs: int = 256, enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 2048, rank: int = 0):
        if device == "cuda" and not torch.cuda.is_available():
            raise NanoForgeError("--device cuda: no CUDA device is visible")
        self.world = world_size(plan.module.meta)
        if self.world > 1 and not self.one_rank_of_many:  # one rank alone would compute garbage, silently
            raise NanoForgeError(f"the plan is sharded over {self.world} ranks ({plan.module.meta['parallel']}); "
                                 "ModelRunner runs a world of one (Engine runs such plans with DistributedRunner)")
        self.device, self.rank = torch.device(device), rank
        self.comm = None  # this rank's collectives, set by _agree_blocks on a sharded plan
        self.contract = plan.module.meta["kv_contract"]
        self.block_size = self.contract["block_size"]
        self.params = load_params(plan.module, ckpt, self.device, progress=progress, rank=rank)
        self.forward = compile_function(plan.module, "forward")
        if num_blocks is None:
            num_blocks = self._blocks_that_fit(plan, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs)
        self.num_blocks = self._agree_blocks(num_blocks)
        self.pool = allocate_pool(self.contract, max(self.num_blocks, 1), self.device)
        self.warmup_s = self._warmup(max_num_batched_tokens, max_num_seqs) if self.device.type == "cuda" else 0.0
        self.batches = Counter()  # "graph" or the reason a batch ran eagerly
        self.graphs = None
        self.no_graph_reason = self._graph_plan_reason(plan, enforce_eager)
        if self.no_graph_reason is None:
            from .cuda_graphs import DecodeGraphs

            sizes = [s for s in plan.module.meta["cuda_graphs"]["sizes"] if s <= max_num_seqs] or [1]
            self.graphs = DecodeGraphs(self.forward, self.params, self.pool, self.block_size, sizes,
                                       max_model_len, self.device, self.comm)
        else:
            log.info("decode runs without CUDA graphs: %s", self.no_graph_reason)

    one_rank_of_many = False  # True for the ranks of a sharded plan (distributed_runner.py)

    def _agree_blocks(self, num_blocks: int) -> int:
        """The KV block count every rank uses (a world of one: its own)."""
        return num_blocks

    def close(self) -> None:
        """Release what the runner holds beyond memory (a world of one: nothing)."""

    def _warmup(self, max_tokens: int, max_seqs: int) -> float:
        """Run the eager batch shapes once (a full mixed step: decode rows next to a prefill
        chunk, then a short prefill) so kernels compile now, not inside the first requests."""
        start = time.perf_counter()
        bs, free = self.block_size, self.num_blocks
        decode = min(max_seqs - 1, 32, max(free // 4, 0))
        chunk = max(min(max_tokens - decode, (free - 2 * decode) * bs), 1)
        batches = [[(1, bs + 1, [2 * i, 2 * i + 1]) for i in range(decode)]
                   + [(chunk, chunk, list(range(2 * decode, 2 * decode + -(-chunk // bs))))],
                   [(min(chunk, 100), min(chunk, 100), list(range(-(-min(chunk, 100) // bs))))]]
        with torch.inference_mode():
            for seqs in batches:
                if max(max(b) for _, _, b in seqs) >= free:
                    continue
                n = sum(q for q, _, _ in seqs)
                ctx = make_context(self.pool, bs, seqs, self.device, self.comm)
                zeros = torch.zeros(n, dtype=torch.long, device=self.device)
                self.forward(self.params, ctx, zeros, zeros, torch.tensor([n - 1], device=self.device))
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _blocks_that_fit(self, plan: Plan, utilization: float, max_tokens: int, max_seqs: int) -> int:
        """KV blocks in what `utilization` of the card leaves once weights are loaded, minus the
        plan's activation peak for the largest step, the logits and a reserve for CUDA graphs."""
        free, total = torch.cuda.mem_get_info(self.device)
        mem = plan.module.meta["memory"]
        # the plan's live-value peak, doubled for kernel temporaries and allocator rounding
        activations = 2 * mem["activation_bytes_per_token"] * max_tokens + 8 * max_seqs * int(plan.module.meta["vocab_size"])
        reserve = 1 << 30  # CUDA graph pool, library workspaces
        budget = int(total * utilization) - (total - free) - activations - reserve
        block_bytes = mem["kv_bytes_per_token"] * self.block_size
        log.info("KV cache: %.2f GiB for %d blocks", max(budget, 0) / 2**30, max(budget, 0) // block_bytes)
        return max(budget, 0) // block_bytes

    def _graph_plan_reason(self, plan: Plan, enforce_eager: bool) -> str | None:
        if self.device.type != "cuda":
            return "not on a CUDA device"
        if enforce_eager:
            return "enforce_eager is set"
        info = plan.module.meta.get("cuda_graphs") or {"sizes": [], "reason": "the plan has no CUDA-graph pass"}
        return info["reason"] if not info["sizes"] else None

    def execute(self, batch: ScheduledBatch,
                device_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        """Logits f32[R, vocab] for the R sequences whose last token was computed this step,
        and their indices into batch.items. `device_tokens`: a decode batch whose input tokens
        (one per sequence, at position num_computed) are still on the device, not in token_ids."""
        if device_tokens is not None:
            sample_items = list(range(len(batch.items)))
            why = self.no_graph_reason or (None if len(batch.items) <= self.graphs.sizes[-1]  # type: ignore
                                           else "the batch exceeds the largest graph")
        else:
            sample_items = batch.sample_indices()
            why = self.no_graph_reason or self.graphs.why_not(batch)  # type: ignore[union-attr]
        if why is None:
            self.batches["graph"] += 1
            return self.graphs.run(batch, device_tokens), sample_items  # type: ignore[union-attr]
        self.batches[f"eager: {why}"] += 1
        tokens, seqs, rows = flat_batch(batch, sample_items, device_tokens is not None)
        return self.run(tokens, seqs, rows, device_tokens), sample_items

    def run(self, tokens: list[int], seqs: list[tuple[int, int, list[int]]], rows: list[int],
            device_tokens: torch.Tensor | None = None, ep_tokens: int | None = None) -> torch.Tensor:
        """The forward over one flat batch (flat_batch's lists); logits of `rows`. `ep_tokens`:
        the most tokens any rank of the EP group runs this step (sharded plans)."""
        ctx = make_context(self.pool, self.block_size, seqs, self.device, self.comm, ep_tokens)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device)  # noqa: E731
        token_ids = as_tensor(tokens) if device_tokens is None else device_tokens.to(torch.long)
        with torch.inference_mode():
            return self.forward(self.params, ctx, token_ids, as_tensor(positions_of(seqs)), as_tensor(rows))

"""Runs the plan's generated forward over one flat batch: builds the token, position and
row tensors plus the batch context, and returns the logits of the rows that need a token.
Decode-only batches replay a captured CUDA graph when the plan planned one; every batch that
runs eagerly instead is counted under its reason."""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from ..codegen.kernels.context import allocate_pool, make_context
from ..codegen.pysource import compile_function
from ..errors import NanoForgeError
from ..models.checkpoint import Checkpoint
from ..parallel.shard_spec import world_size
from ..plan import Plan
from .scheduler import ScheduledBatch
from .weights import load_params

log = logging.getLogger("nanoforge.runner")


class ModelRunner:
    def __init__(self, plan: Plan, ckpt: Checkpoint, num_blocks: int | None, device: str = "cpu", progress: bool = True,
                 max_model_len: int = 4096, max_num_seqs: int = 256, enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 2048):
        if device == "cuda" and not torch.cuda.is_available():
            raise NanoForgeError("--device cuda: no CUDA device is visible")
        if (world := world_size(plan.module.meta)) > 1:  # one rank alone would compute garbage, silently
            raise NanoForgeError(f"the plan is sharded over {world} ranks ({plan.module.meta['parallel']}); this "
                                 "engine runs a single rank (the multi-process runtime is not built yet)")
        self.device = torch.device(device)
        self.contract = plan.module.meta["kv_contract"]
        self.block_size = self.contract["block_size"]
        self.params = load_params(plan.module, ckpt, self.device, progress=progress)
        self.forward = compile_function(plan.module, "forward")
        if num_blocks is None:
            num_blocks = self._blocks_that_fit(plan, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs)
        self.num_blocks = num_blocks
        self.pool = allocate_pool(self.contract, max(num_blocks, 1), self.device)
        self.warmup_s = self._warmup(max_num_batched_tokens, max_num_seqs) if self.device.type == "cuda" else 0.0
        self.batches = Counter()  # "graph" or the reason a batch ran eagerly
        self.graphs = None
        self.no_graph_reason = self._graph_plan_reason(plan, enforce_eager)
        if self.no_graph_reason is None:
            from .cuda_graphs import DecodeGraphs

            sizes = [s for s in plan.module.meta["cuda_graphs"]["sizes"] if s <= max_num_seqs] or [1]
            self.graphs = DecodeGraphs(self.forward, self.params, self.pool, self.block_size, sizes,
                                       max_model_len, self.device)
        else:
            log.info("decode runs without CUDA graphs: %s", self.no_graph_reason)

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
                ctx = make_context(self.pool, bs, seqs, self.device)
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
        tokens, positions, ends, seqs = [], [], [], []
        for seq, n in batch.items:
            start = seq.num_computed
            tokens += seq.token_ids[start:start + n] if device_tokens is None else [0]
            positions += range(start, start + n)
            seqs.append((n, start + n, seq.block_table))
            ends.append(len(tokens) - 1)
        rows = [ends[i] for i in sample_items]
        ctx = make_context(self.pool, self.block_size, seqs, self.device)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device)  # noqa: E731
        token_ids = as_tensor(tokens) if device_tokens is None else device_tokens.to(torch.long)
        with torch.inference_mode():
            logits = self.forward(self.params, ctx, token_ids, as_tensor(positions), as_tensor(rows))
        return logits, sample_items

"""Runs the plan's generated forward over one flat batch: builds the token, position and
row tensors plus the batch context, and returns the logits of the rows that need a token."""
from __future__ import annotations

import torch

from ..codegen.kernels.context import allocate_pool, make_context
from ..codegen.pysource import compile_function
from ..models.checkpoint import Checkpoint
from ..plan import Plan
from .scheduler import ScheduledBatch
from .weights import load_params


class ModelRunner:
    def __init__(self, plan: Plan, ckpt: Checkpoint, num_blocks: int, device: str = "cpu", progress: bool = True):
        self.device = torch.device(device)
        self.contract = plan.module.meta["kv_contract"]
        self.block_size = self.contract["block_size"]
        self.params = load_params(plan.module, ckpt, self.device, progress=progress)
        self.forward = compile_function(plan.module, "forward")
        self.pool = allocate_pool(self.contract, num_blocks, self.device)

    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits f32[R, vocab] for the R sequences whose last token was computed this step,
        and their indices into batch.items."""
        tokens, positions, ends, seqs = [], [], [], []
        for seq, n in batch.items:
            start = seq.num_computed
            tokens += seq.all_ids[start:start + n]
            positions += range(start, start + n)
            seqs.append((n, start + n, seq.block_table))
            ends.append(len(tokens) - 1)
        sample_items = batch.sample_indices()
        rows = [ends[i] for i in sample_items]
        ctx = make_context(self.pool, self.block_size, seqs, self.device)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        with torch.inference_mode():
            logits = self.forward(self.params, ctx, as_tensor(tokens), as_tensor(positions), as_tensor(rows))
        return logits, sample_items

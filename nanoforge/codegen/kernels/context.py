"""What an attention kernel needs to know about the flat batch: where each sequence's query
tokens sit, how long its context is, which KV blocks hold it, and where to write new K/V.

The runtime fills this once per step; every provider (torch reference, Triton, FlashInfer)
reads the same fields, so the runtime never changes shape when a kernel changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqSlice:
    q_start: int  # first row of this sequence in the flat batch
    q_len: int  # rows (new tokens) this step
    ctx_len: int  # tokens in the KV cache after this step (cached prefix + new)
    block_table: torch.Tensor  # i64[num_blocks_of_seq]


@dataclass
class BatchContext:
    kv: list[tuple[torch.Tensor, ...]]  # per attention layer: the paged KV pool tensors
    block_size: int
    slot_mapping: torch.Tensor  # i64[T]: pool slot for each new token, -1 = do not store
    seqs: list[SeqSlice] = field(default_factory=list)

    def context_slots(self, seq: SeqSlice) -> torch.Tensor:
        """Pool slots of positions 0..ctx_len-1 of one sequence."""
        pos = torch.arange(seq.ctx_len, device=seq.block_table.device)
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

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
    slots: torch.Tensor | None = None  # pool slots of positions 0..ctx_len-1, filled once per step


@dataclass
class BatchContext:
    kv: list[tuple[torch.Tensor, ...]]  # per attention layer: the paged KV pool tensors
    block_size: int
    slot_mapping: torch.Tensor  # i64[T]: pool slot for each new token, -1 = do not store
    seqs: list[SeqSlice] = field(default_factory=list)

    def context_slots(self, seq: SeqSlice) -> torch.Tensor:
        """Pool slots of positions 0..ctx_len-1 of one sequence (shared by every layer)."""
        if seq.slots is None:
            pos = torch.arange(seq.ctx_len, device=seq.block_table.device)
            seq.slots = seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
        return seq.slots


TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn}


def allocate_pool(contract: dict, num_blocks: int, device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, ...]]:
    """The paged KV pool the contract describes: per layer, one tensor per entry shape,
    [num_blocks, block_size, *shape]. Indexed by the attention node's `layer` attr."""
    dtype, bs = TORCH_DTYPES[contract["dtype"]], contract["block_size"]
    pool: list[tuple[torch.Tensor, ...]] = []
    for i, layer in enumerate(contract["layers"]):
        assert layer["layer"] == i, "KV contract layers must be numbered 0..L-1"
        pool.append(tuple(torch.zeros(num_blocks, bs, *shape, dtype=dtype, device=device) for shape in layer["shapes"]))
    return pool


def make_context(pool: list[tuple[torch.Tensor, ...]], block_size: int,
                 seqs: list[tuple[int, int, list[int]]], device: str | torch.device = "cpu") -> BatchContext:
    """Context for a flat batch; each seq is (q_len, ctx_len, block_ids), its new tokens being
    positions ctx_len-q_len .. ctx_len-1."""
    slices, slots, start = [], [], 0
    for q_len, ctx_len, blocks in seqs:
        table = torch.tensor(blocks, dtype=torch.long, device=device)
        slices.append(SeqSlice(start, q_len, ctx_len, table))
        for pos in range(ctx_len - q_len, ctx_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        start += q_len
    return BatchContext(pool, block_size, torch.tensor(slots, dtype=torch.long, device=device), slices)

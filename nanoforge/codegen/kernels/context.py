"""What an attention kernel needs to know about the flat batch: where each sequence's query
tokens sit, how long its context is, which KV blocks hold it, and where to write new K/V.

The runtime fills this once per step; every provider (torch reference, Triton, FlashInfer)
reads the same fields, so the runtime never changes shape when a kernel changes. The tensor
fields live on the model's device and have shapes that depend only on the batch size, so a
captured CUDA graph can replay with new contents.
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
    query_start: torch.Tensor  # i32[B+1]: rows of sequence b are query_start[b] .. query_start[b+1]-1
    context_lens: torch.Tensor  # i32[B]: tokens in the cache after this step (its queries are the last ones)
    block_tables: torch.Tensor  # i32[B, max_blocks]: pool blocks of each sequence, padded with 0
    max_query_len: int  # upper bounds, for grid sizes (a graph keeps the ones it was captured with)
    max_context_len: int
    _host: list[tuple[int, int, list[int]]] = field(default_factory=list, repr=False)  # (q_len, ctx_len, blocks)
    _seqs: list[SeqSlice] | None = field(default=None, repr=False)

    @property
    def seqs(self) -> list[SeqSlice]:
        """Per-sequence view for the torch reference kernels (built on first use)."""
        if self._seqs is None:
            start, out = 0, []
            for q_len, ctx_len, blocks in self._host:
                table = torch.tensor(blocks, dtype=torch.long, device=self.slot_mapping.device)
                out.append(SeqSlice(start, q_len, ctx_len, table))
                start += q_len
            self._seqs = out
        return self._seqs

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
    slots, starts, max_blocks = [], [0], max((len(b) for _, _, b in seqs), default=1)
    table = []
    for q_len, ctx_len, blocks in seqs:
        for pos in range(ctx_len - q_len, ctx_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + q_len)
        table.append(list(blocks) + [0] * (max_blocks - len(blocks)))

    def put(data, dtype):
        return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)

    return BatchContext(
        pool, block_size, put(slots, torch.long), put(starts, torch.int32),
        put([c for _, c, _ in seqs], torch.int32), put(table, torch.int32).reshape(len(seqs), max_blocks),
        max((q for q, _, _ in seqs), default=0), max((c for _, c, _ in seqs), default=0), list(seqs))

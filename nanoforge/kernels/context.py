"""What an attention kernel needs to know about the flat batch: where each sequence's query
tokens sit, how long its context is, which KV blocks hold it, and where to write new K/V.

The runtime fills this once per step; every provider (torch reference, Triton, FlashInfer)
reads the same fields, so the runtime never changes shape when a kernel changes. The tensor
fields live on the model's device and have shapes that depend only on the batch size, so a
captured CUDA graph can replay with new contents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import functools
import itertools
import math

import numpy as np
import torch

from ..kv_contract import KVContract
from .dsa_layouts import alloc_index_keys
from .fp8 import FP8


@dataclass
class SeqSlice:
    q_start: int  # first row of this sequence in the flat batch
    q_len: int  # rows (new tokens) this step
    ctx_len: int  # tokens in the KV cache after this step (cached prefix + new)
    block_table: torch.Tensor  # i64[num_blocks_of_seq]
    slots: torch.Tensor | None = None  # pool slots of positions 0..ctx_len-1, filled once per step


@dataclass(frozen=True)
class HostBatch:
    """make_context's numpy arrays behind query_start, context_lens and block_tables: a CPU kernel
    plans its step from these, not from the tensors read back (about as many calls again)."""
    starts: np.ndarray  # i64[B+1]
    ctx_lens: np.ndarray  # i64[B]
    tables: np.ndarray  # i32[B, max_blocks]
    positions: np.ndarray  # i64[T]: the position of each new token
    q_range: tuple[int, int]  # (shortest, longest) query length (0, 0 for no sequence)
    ctx_range: tuple[int, int]  # (shortest, longest) context


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
    comm: Any = None  # collectives of this rank (parallel/comm.py); None = a world of one
    ep_tokens: int | None = None  # most tokens any rank of the EP group has this step (None: ask the group)
    scratch: dict = field(default_factory=dict, repr=False)  # per-step kernel state shared by layers (a schedule)
    # per-sequence state of recurrent layers (gdn): per such layer the pool tensors allocate_state made,
    # and each sequence's row in them (i64[B]); a sequence whose first row is position 0 starts afresh
    state: list[tuple[torch.Tensor, ...]] = field(default_factory=list, repr=False)
    state_slots: torch.Tensor | None = None
    state_slot_list: list[int] = field(default_factory=list, repr=False)  # the same on the host
    # speculative verify rows (a token and its d drafts): per sequence the first of d extra pool rows that
    # keep the state after each of its first d rows (the last row's goes to its slot), so the runtime can
    # roll the slot back to the last accepted token; -1 (or empty): the sequence keeps no per-row states
    state_history: list[int] = field(default_factory=list, repr=False)
    # vision-language plans: image-token rows, their embeddings and (t, h, w) rope positions of this step
    # (runtime/vision_runner.py VisionBatch); None: a text-only step
    vision: Any = None
    host: HostBatch | None = field(default=None, repr=False)  # set by make_context; None: read the tensors
    # state a kernel keeps from one step to the next of one runner (the CPU decode K/V copies): the runner
    # passes the same dict at every step; None: nothing is kept
    carry: dict | None = field(default=None, repr=False)
    # i32[B]: the order the decode grid's programs take the sequences in, longest context first
    # (decode_order_of); None: sequence order
    decode_order: torch.Tensor | None = None

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


# decode programs take the sequences longest context first, so the longest ones do not start last and
# run alone at the grid's tail (the offline workload's contexts are ragged)
DECODE_LONGEST_FIRST = False


def decode_order_of(ctx_lens: np.ndarray) -> np.ndarray:
    """i32[B]: sequence indices by context length, longest first (ties in sequence order)."""
    return np.argsort(-np.asarray(ctx_lens, np.int64), kind="stable").astype(np.int32)


NUMPY_DTYPES = {torch.long: np.int64, torch.int32: np.int32}
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn}


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """torch.zeros; on the CPU over calloc'ed bytes (np.zeros), whose pages the OS maps on first
    touch: a 1 GiB pool of which a small model writes megabytes costs neither the memset (0.4 s)
    nor the memory."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def allocate_pool(contract: KVContract, num_blocks: int,
                  device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, ...]]:
    """The paged KV pool the contract describes: per layer, one tensor per entry shape in its dtype,
    [num_blocks, block_size, *shape], then one per FP8 tensor's scale shape in the scale dtype:
    GQA (k, v) or (k, v, k_scale, v_scale), MLA (entry,) or (entry, scale), DSA (entry, index_k),
    (entry, index_k, entry_scale, index_k_scale) or, FP8 keys only (--index-kv-dtype fp8), (entry, index_k,
    index_k_scale). Indexed by the attention node's `layer` attr. A DSA layer's FP8 index_k and its
    index_k_scale are views of one buffer, per block the keys then their f32 scales
    (dsa_layouts.alloc_index_keys: DeepGEMM's paged layout)."""
    bs = contract.block_size
    scale_dtype = TORCH_DTYPES[contract.scale_dtype] if contract.scale_dtype else None
    pool: list[tuple[torch.Tensor, ...]] = []
    for i, layer in enumerate(contract.layers):
        assert layer.layer == i, "KV contract layers must be numbered 0..L-1"
        dtypes = [TORCH_DTYPES[d] for d in contract.tensor_dtypes(layer)]
        values = [zeros((num_blocks, bs, *shape), dt, device) for shape, dt in zip(layer.shapes, dtypes)]
        scales = [torch.ones(num_blocks, bs, *shape, dtype=scale_dtype, device=device) for shape in layer.scale_shapes]
        if layer.kind == "dsa" and scales and dtypes[1] == FP8 and scale_dtype == torch.float32 \
                and tuple(layer.scale_shapes[-1]) == (1,) and len(layer.shapes[1]) == 1 and layer.shapes[1][0] % 4 == 0:
            values[1], scales[-1] = alloc_index_keys(num_blocks, bs, layer.shapes[1][0], device)
        pool.append(tuple(values + scales))
    return pool


def allocate_state(contract: KVContract, slots: int,
                   device: str | torch.device = "cpu") -> list[tuple[torch.Tensor, ...]]:
    """The per-sequence state pool the contract describes: per recurrent layer, one tensor per state
    shape, [slots, *shape] (a row per running sequence). Indexed by the gdn node's `layer` attr."""
    pool: list[tuple[torch.Tensor, ...]] = []
    for i, st in enumerate(contract.state):
        assert st.layer == i, "KV contract state entries must be numbered 0..N-1"
        pool.append(tuple(torch.zeros(slots, *shape, dtype=TORCH_DTYPES[st.dtype], device=device)
                          for shape in st.shapes))
    return pool


def block_table_array(tables: list[list[int]], widths: np.ndarray | None = None, rows: int = 0,
                      cols: int = 0) -> np.ndarray:
    """i32[max(rows, len), max(cols, widest)] of the tables, zero-padded, filled without a
    per-sequence loop (hundreds of sequences a step)."""
    n = len(tables)
    if widths is None:
        widths = np.fromiter(map(len, tables), np.int64, n)
    width = int(widths.max(initial=0))
    if n and rows <= n and cols <= width and int(widths.min()) == width:  # equal widths (a uniform batch): one copy
        return np.array(tables, np.int32).reshape(n, width)
    out = np.zeros((max(rows, n), max(cols, width, 1)), np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(tables), np.int32, int(widths.sum()))
    row_of = np.repeat(np.arange(n), widths)
    first = np.zeros(n, np.int64)
    np.cumsum(widths[:-1], out=first[1:])
    out[row_of, np.arange(len(flat)) - first[row_of]] = flat
    return out


def host_to_device(data: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host array as a tensor of `dtype` on `device`. On CPU no copy where numpy holds the dtype already;
    on CUDA through pinned memory, so the copy is queued behind the work in flight instead of waiting
    for it (a copy from pageable memory may synchronize with the stream: an eager step's inputs would
    then stall the host until the GPU drained). torch's pinned allocator keeps the block until the copy ran."""
    host = torch.from_numpy(np.ascontiguousarray(data.astype(NUMPY_DTYPES[dtype], copy=False)))
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def make_context(pool: list[tuple[torch.Tensor, ...]], block_size: int,
                 seqs: list[tuple[int, int, list[int]]], device: str | torch.device = "cpu",
                 comm: Any = None, ep_tokens: int | None = None,
                 state: tuple[list[tuple[torch.Tensor, ...]], list[int]] | None = None) -> BatchContext:
    """Context for a flat batch; each seq is (q_len, ctx_len, block_ids), its new tokens being
    positions ctx_len-q_len .. ctx_len-1. Built with numpy, without per-sequence loops: a mixed
    step of hundreds of sequences spends well under a millisecond here. `state`: (the per-sequence
    state pool, each sequence's slot in it), for plans with recurrent layers."""
    n = len(seqs)
    q_list, ctx_list, tables = zip(*seqs) if n else ((), (), ())
    q_range = (min(q_list), max(q_list)) if n else (0, 0)  # Python's min / max: cheaper than numpy's at this size
    ctx_range = (min(ctx_list), max(ctx_list)) if n else (0, 0)
    q_lens, ctx_lens = np.array(q_list, np.int64).reshape(n), np.array(ctx_list, np.int64).reshape(n)
    table = block_table_array(list(tables), np.fromiter(map(len, tables), np.int64, n))
    if q_range == (1, 1):  # decode: a token per sequence, at its last position (lists: fewer numpy calls)
        last = [c - 1 for c in ctx_list]
        slots = np.array([b[p // block_size] * block_size + p % block_size for p, b in zip(last, tables)], np.int64)
        starts, pos = np.arange(n + 1), np.array(last, np.int64)
    else:
        starts = np.zeros(n + 1, np.int64)
        np.cumsum(q_lens, out=starts[1:])
        owner = np.repeat(np.arange(n), q_lens)  # sequence of each new token
        pos = np.arange(int(starts[-1])) - starts[owner] + (ctx_lens - q_lens)[owner]
        slots = table[owner, pos // block_size].astype(np.int64) * block_size + pos % block_size
    put = functools.partial(host_to_device, device=torch.device(device))

    ctx = BatchContext(
        pool, block_size, put(slots, torch.long), put(starts, torch.int32), put(ctx_lens, torch.int32),
        put(table, torch.int32), q_range[1], ctx_range[1], list(seqs), comm=comm, ep_tokens=ep_tokens,
        host=HostBatch(starts, ctx_lens, table, pos, q_range, ctx_range))
    if DECODE_LONGEST_FIRST and ctx.slot_mapping.is_cuda and n > 1:
        ctx.decode_order = put(decode_order_of(ctx_lens), torch.int32)
    if state is not None:
        assert len(state[1]) == n, f"{len(state[1])} state slots for {n} sequences"
        ctx.state, ctx.state_slot_list = state[0], list(state[1])
        ctx.state_slots = put(np.asarray(state[1], np.int64), torch.long)
    return ctx

"""CUDA graphs for decode-only batches: capture the plan's forward once per planned batch size
at start-up, then replay with new contents in static input buffers. A batch is padded to the
next captured size (padding rows write nowhere: slot -1, and their logits are dropped). On a
sharded plan every rank captures the same sizes in the same order, the collectives (NCCL) inside
the graphs, and replays the same size each step."""
from __future__ import annotations

import bisect
import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from ..kernels import context as batch_context
from ..kernels.context import BatchContext, block_table_array, decode_order_of
from .scheduler import ScheduledBatch

log = logging.getLogger("nanoforge.graphs")


def _upload(dst: torch.Tensor, src: np.ndarray) -> None:
    """Host array -> static graph input without waiting on the stream: through pinned memory (a
    copy from pageable memory may wait for the work already queued, i.e. the step in flight).
    torch's pinned allocator keeps the block until the copy has run."""
    dst.copy_(torch.from_numpy(src).pin_memory(), non_blocking=True)


class DecodeGraphs:
    """`q_per_seq` > 1: speculative verify steps, every sequence with its token and q_per_seq - 1
    drafts (rows for all of them come back). `hidden` (width, dtype): the function also reads a
    hidden state per row (an MTP draft head: forward(P, ctx, tokens, positions, hidden, rows)). `state`: the
    per-sequence state pool of recurrent layers (gdn); each replay writes the sequences' rows of it into a
    static slot buffer, padding rows -1 (their kernels read a zero state and store none)."""

    def __init__(self, forward: Callable, params: dict, pool: list, block_size: int, sizes: list[int], *,
                 max_model_len: int, device: torch.device, comm: Any = None, q_per_seq: int = 1,
                 hidden: tuple[int, torch.dtype] | None = None, state: list | None = None):
        self.sizes, self.comm, self.q = sorted(sizes), comm, q_per_seq
        assert not state or q_per_seq == 1, "recurrent state in verify graphs: rejected drafts would corrupt it"
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        n, q = self.sizes[-1], q_per_seq
        i64, i32 = dict(dtype=torch.long, device=device), dict(dtype=torch.int32, device=device)
        self.tokens = torch.zeros(n * q, **i64)
        self.positions = torch.zeros(n * q, **i64)
        self.slots = torch.full((n * q,), -1, **i64)
        self.context_lens = torch.full((n,), q, **i32)
        self.block_tables = torch.zeros(n, self.max_blocks, **i32)
        self.query_start = torch.arange(0, n * q + 1, q, **i32)
        self.rows = torch.arange(n * q, **i64)
        self.order = torch.arange(n, **i32) if batch_context.DECODE_LONGEST_FIRST else None
        self.hidden = None if hidden is None else torch.zeros(n * q, hidden[0], dtype=hidden[1], device=device)
        self.state = state or None
        self.state_slots = torch.full((n,), -1, **i64) if self.state else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(device)[0]
        mempool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            t = size * q
            ctx = BatchContext(pool, block_size, self.slots[:t], self.query_start[:size + 1],
                               self.context_lens[:size], self.block_tables[:size], q, max_model_len, comm=comm,
                               ep_tokens=t)
            if self.state:
                ctx.state, ctx.state_slots = self.state, self.state_slots[:size]  # type: ignore[index]
            if self.order is not None:
                ctx.decode_order = self.order[:size]
            extra = () if self.hidden is None else (self.hidden[:t],)
            args = (params, ctx, self.tokens[:t], self.positions[:t], *extra, self.rows[:t])
            with torch.inference_mode():
                forward(*args)  # warm-up: compiles kernels, fills caches outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    out = forward(*args)
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start
        self.capture_bytes = free_before - torch.cuda.mem_get_info(device)[0]
        kind = "draft" if hidden is not None else "decode" if q == 1 else f"verify ({q} tokens a sequence)"
        log.info("captured %d %s graphs (sizes %s) in %.2f s, %.1f MiB", len(self.sizes), kind, self.sizes, self.capture_s,
                 self.capture_bytes / 2**20)

    def why_not(self, batch: ScheduledBatch) -> str | None:
        """None if the batch can replay a graph, else the reason it runs eagerly."""
        q = self.q
        if q > 1 and any(batch.drafts.get(i) != q - 1 for i in range(len(batch.items))):
            return f"not every sequence has {q - 1} drafts"
        if any(n != q or seq.num_computed + q != seq.num_tokens for seq, n in batch.items):
            return "the batch has prefill tokens" if not batch.drafts or q > 1 else "speculative verify rows"
        if len(batch.items) > self.sizes[-1]:
            return f"{len(batch.items)} sequences exceed the largest graph ({self.sizes[-1]})"
        if any(seq.mm is not None and seq.num_computed < seq.num_prompt for seq, _ in batch.items):
            return "an image request's prompt tokens"  # image rows and their (t, h, w) positions: eager
        return None

    def run(self, batch: ScheduledBatch, device_tokens: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the graph of the next size up: (logits, the final hidden state of every row where
        the plan returns it, for its MTP head); `device_tokens` (one per sequence, on the device)
        replace the host token ids, for a step chained on the previous one's samples."""
        b, q = len(batch.items), self.q
        pos = np.fromiter((seq.num_computed for seq, _ in batch.items), np.int64, b)
        tokens = None if device_tokens is not None else \
            [t for (seq, _), p in zip(batch.items, pos.tolist()) for t in seq.token_ids[p:p + q]]
        slots = [seq.state_slot for seq, _ in batch.items] if self.state else None
        # a vision-language plan's generated tokens sit at index + delta on all three rope axes (its
        # MultimodalPrompt): that is the plain rope position the graph's mrope reads
        shift = np.fromiter((seq.mm.delta if seq.mm is not None else 0 for seq, _ in batch.items), np.int64, b)
        out = self._replay(pos, tokens, [seq.block_table for seq, _ in batch.items], device_tokens,
                           state_slots=slots, shift=shift)
        return out if isinstance(out, tuple) else (out, None)

    def run_flat(self, tokens: list[int], seqs: list[tuple[int, int, list[int]]],
                 device_tokens: torch.Tensor | None = None, pad_to: int = 0, hidden: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """run() for a flat batch (q_len 1, ctx_len, blocks) per sequence, on the graph of the
        size that holds max(len(seqs), pad_to): every rank of a sharded plan replays the same one,
        its collectives included (an idle attention-DP replica: no sequences, all padding).
        `hidden`: the rows' hidden states, for graphs captured with one."""
        assert not self.state, "run_flat carries no state slots: graphs of recurrent layers replay through run()"
        pos = np.fromiter((c - 1 for _, c, _ in seqs), np.int64, len(seqs))
        if hidden is not None:
            self.hidden[:len(seqs)].copy_(hidden)  # type: ignore[index]
        return self._replay(pos, None if device_tokens is not None else tokens, [t for _, _, t in seqs],
                            device_tokens, pad_to)

    def _replay(self, pos: np.ndarray, tokens: list[int] | None, block_tables: list[list[int]],
                device_tokens: torch.Tensor | None, pad_to: int = 0, state_slots: list[int] | None = None,
                shift: np.ndarray | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """`shift`: per sequence, what its rope positions add to its KV positions (0 where None)."""
        b, q = len(pos), self.q
        size = self.sizes[bisect.bisect_left(self.sizes, max(b, pad_to))]
        bs = self.block_size
        tables = block_table_array(block_tables, rows=size)
        width = tables.shape[1]
        host_tokens = np.zeros(size * q, np.int64)
        positions = np.tile(np.arange(q, dtype=np.int64), size)  # padding sequences: positions 0..q-1
        slots = np.full(size * q, -1, np.int64)
        lens = np.full(size, q, np.int32)
        if tokens is not None:
            host_tokens[:b * q] = tokens
        rows = (pos[:, None] + np.arange(q)[None, :]).reshape(-1)  # each sequence's q positions
        positions[:b * q], lens[:b] = rows, pos + q
        if shift is not None:
            positions[:b * q] += np.repeat(shift, q)
        slots[:b * q] = tables[np.repeat(np.arange(b), q), rows // bs].astype(np.int64) * bs + rows % bs
        _upload(self.tokens[:size * q], host_tokens)
        if device_tokens is not None:
            self.tokens[:b].copy_(device_tokens)
        _upload(self.positions[:size * q], positions)
        _upload(self.slots[:size * q], slots)
        _upload(self.context_lens[:size], lens)
        if self.order is not None:
            _upload(self.order[:size], decode_order_of(lens))
        _upload(self.block_tables[:size, :width], tables)
        if self.state_slots is not None:
            assert state_slots is not None and len(state_slots) == b, "a state row per sequence"
            rows_of = np.full(size, -1, np.int64)  # padding rows: no state row
            rows_of[:b] = state_slots
            _upload(self.state_slots[:size], rows_of)
        graph, out = self.graphs[size]
        for hook in getattr(self.comm, "replay_hooks", ()):  # e.g. DeepEP's switch to low-latency mode
            hook()
        graph.replay()
        return tuple(o[:b * q] for o in out) if isinstance(out, tuple) else out[:b * q]

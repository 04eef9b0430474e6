"""A dense copy of the running decode batch's K/V, kept from one step to the next (CPU target).

The gather path of attention.py copies every sequence's whole context out of the paged pool, in
every layer, at every step: memory-bound work that, on a tiny Llama at 32 sequences of ~100 tokens,
costs about what the layer's SDPA call does (two 0.8 MB gathers a layer). A decode step that
continues the previous one (the same sequences in the same order, each one token further, one query
each) attends over last step's keys plus one: here each GQA layer keeps them in [rows, kv_heads,
cap, d] tensors (each head's keys contiguous, as SDPA reads them: 13-15% faster than the pool's
[.., kv_heads, d] order), writes the new key beside its pool store and attends over a view, with no
gather (decode attention 1.2x faster when its data is out of cache, 1.4x in cache). A ragged batch
keeps its rows longest first in segments of one power of two of context (the gather path's buckets),
each with room for its own longest row, and attends segment by segment: a batch of 16..256-token
prompts takes about half the bytes of one rectangle as wide as its longest row (which the budget
refused for SmolLM2's ragged workload: every step gathered).

The pool stays the source of truth. A sequence is known by its block-table list (make_context keeps
the runner's lists; the state holds them, so their ids are not reused; a released sequence gets a
new list); a step that does not continue the last one (a prefill, a changed batch, a verify step,
another caller's lists) only records its rows and gathers, and the first step that continues it
builds the copies with one gather; a row outgrowing its segment rebuilds them. The copies (all
layers, K and V) stay under BUDGET of the pool's bytes and exist only where the pool holds the
compute dtype, so what SDPA reads is bit-equal to the gather's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

KEY = "cpu_decode_kv"  # the state's key in the runner's carry dict (BatchContext.carry)
BUDGET = 0.5  # the copies' bytes at most, as a fraction of the pool's; past it decode steps gather


@dataclass(frozen=True)
class Segment:
    """Copy rows lo..hi, `cap` keys each; the rows before it hold `base` keys per kv head."""
    lo: int
    hi: int
    cap: int
    base: int


@dataclass
class DecodeKV:
    """One runner's copies and the rows they hold."""
    owners: list  # each row's block-table list (the sequence's identity), as the last step listed them
    lens: np.ndarray  # keys of each row after the last step
    step: int = 0  # steps recorded; a layer's copy is current when it was written at the previous one
    segments: list[Segment] = field(default_factory=list)  # the copies' rows by length; empty: none kept
    pool_bytes: int = 0  # the pool's size (the budget's base)
    entry_bytes: int = 0  # a key and a value in every layer the copies could be kept for
    layers: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (step, k, v)
    order: torch.Tensor | None = None  # copy row i holds batch row order[i] (longest context first); None: in order

    def views(self, buf: torch.Tensor, kv_heads: int) -> list[torch.Tensor]:
        """A layer's flat [rows, d] buffer as each segment's [rows, kv_heads, cap, d]."""
        return [buf[g.base * kv_heads: (g.base + (g.hi - g.lo) * g.cap) * kv_heads]
                .view(g.hi - g.lo, kv_heads, g.cap, -1) for g in self.segments]


@dataclass(frozen=True)
class Chunk:
    """One segment's rows attended in one call over their first `keys` columns; mask [m, 1, 1, keys]
    hides the columns past a row's context (None: every row has `keys`)."""
    keys: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class DecodeStep:
    """This step's use of the copies: each row's new key goes to column `pos` (one segment, uniform
    lengths), or to column cols[row] (rows in copy order); chunks[i] attends segments[i]."""
    state: DecodeKV
    keys: int  # keys attended (the longest context)
    pos: int | None
    cols: np.ndarray | None
    chunks: list[Chunk]
    flat: dict[int, torch.Tensor] = field(default_factory=dict)  # kv heads -> rows of the flat [rows, d] buffers

    def flat_rows(self, kv_heads: int) -> torch.Tensor:
        """Where each (row, kv head)'s new key goes in a layer's flat [rows, d] buffer."""
        if kv_heads not in self.flat:
            segs = self.state.segments
            sizes = [g.hi - g.lo for g in segs]
            caps, bases = np.repeat([g.cap for g in segs], sizes), np.repeat([g.base for g in segs], sizes)
            in_seg = np.arange(len(caps)) - np.repeat([g.lo for g in segs], sizes)
            rows = bases[:, None] * kv_heads + (in_seg[:, None] * kv_heads + np.arange(kv_heads)) * caps[:, None]
            self.flat[kv_heads] = torch.from_numpy((rows + self.cols[:, None]).reshape(-1))  # type: ignore[index]
        return self.flat[kv_heads]


def _entry_bytes(kv: list) -> int:
    """Bytes of one key and one value, summed over the layers a copy could be kept for (plain K/V pools)."""
    return sum(sum(t[0, 0].numel() for t in layer) * layer[0].element_size() for layer in kv if len(layer) == 2)


def _pool_bytes(kv: list) -> int:
    return sum(t.numel() * t.element_size() for layer in kv for t in layer)


def plan_step(carry: dict | None, owners: list, ctx_lens: np.ndarray, kv: list,
              ctx_range: tuple[int, int]) -> DecodeStep | None:
    """Once per decode step (ctx_range: the (min, max) context): the step's use of the copies, or None
    (gather), after recording the rows for the next step."""
    if carry is None:
        return None
    st: DecodeKV | None = carry.get(KEY)
    n = len(owners)
    if st is None or len(st.owners) != n or not np.array_equal(st.lens + 1, ctx_lens) \
            or any(a is not b for a, b in zip(st.owners, owners)):
        pool, entry = (_pool_bytes(kv), _entry_bytes(kv)) if st is None else (st.pool_bytes, st.entry_bytes)
        # copy rows longest first (every row grows by one a step, so the order holds while the rows do):
        # each segment of similar lengths is then a slice of the rows
        order = np.argsort(-ctx_lens, kind="stable")
        carry[KEY] = DecodeKV(list(owners), ctx_lens.copy(), 0 if st is None else st.step + 1, pool_bytes=pool,
                              entry_bytes=entry,
                              order=None if np.array_equal(order, np.arange(n)) else torch.from_numpy(order))
        return None
    st.step, st.lens = st.step + 1, ctx_lens.copy()
    lens = ctx_lens if st.order is None else ctx_lens[st.order.numpy()]
    if not st.segments or any(lens[g.lo] > g.cap for g in st.segments):  # new copies, with room to grow
        segs = _segments(lens)
        if _keys(segs) * st.entry_bytes > BUDGET * st.pool_bytes:
            st.segments, st.layers = [], {}
            return None
        st.segments, st.layers = segs, {}
    keys = ctx_range[1]
    if ctx_range[0] == keys and len(st.segments) == 1:
        return DecodeStep(st, keys, keys - 1, None, [Chunk(keys, None)])
    return DecodeStep(st, keys, None, lens - 1, [_chunk(lens[g.lo:g.hi]) for g in st.segments])


def _segments(lens: np.ndarray) -> list[Segment]:
    """Rows of non-increasing context lengths cut where ceil(log2(length)) changes (padding under 2x a
    row, as the gather path's buckets), each with room for its longest row to grow by half (64 at least)."""
    bucket = np.ceil(np.log2(lens)).astype(np.int64)
    cuts = [0, *(np.flatnonzero(np.diff(bucket)) + 1).tolist(), len(lens)]
    out, base = [], 0
    for lo, hi in zip(cuts, cuts[1:]):
        longest = int(lens[lo])
        cap = -(-(longest + max(64, longest // 2)) // 64) * 64
        out.append(Segment(lo, hi, cap, base))
        base += (hi - lo) * cap
    return out


def _keys(segments: list[Segment]) -> int:
    """Keys the copies of `segments` hold per kv head (one layer's K, or V)."""
    return sum((g.hi - g.lo) * g.cap for g in segments)


def _chunk(lens: np.ndarray) -> Chunk:
    """A segment's rows (longest first) over their longest context, the shorter ones masked."""
    keys = int(lens[0])
    past = np.arange(keys) >= lens[:, None]
    return Chunk(keys, torch.from_numpy(~past[:, None, None, :]) if past.any() else None)


def drop(carry: dict | None) -> None:
    """A step that is no decode continuation: forget the rows (the copies go with them)."""
    if carry is not None:
        carry.pop(KEY, None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pools: tuple[torch.Tensor, torch.Tensor],
           step: DecodeStep, layer: int, *, fill, scale: float) -> torch.Tensor | None:
    """One layer's decode attention on its copies: q [n, h, d], k / v [n, kvh, d] (already in the
    layer's K and V `pools`) -> [n, h, d]; `fill(pool)` gathers a layer's context [n, >= keys, kvh, d]
    (padding zeroed) to build the copies. None where the pool does not hold q's dtype (the caller gathers)."""
    k_pool, v_pool = pools
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        return None
    st, n, order, kvh = step.state, q.shape[0], step.state.order, k_pool.shape[2]
    if order is not None:  # batch rows -> copy rows
        q, k, v = q.index_select(0, order), k.index_select(0, order), v.index_select(0, order)
    held = st.layers.get(layer)
    if held is None or held[0] != st.step - 1:  # build from the pool, which has this step's keys already
        bufs = []
        for pool in (k_pool, v_pool):
            buf = pool.new_zeros(_keys(st.segments) * kvh, pool.shape[3])
            ctx = fill(pool)[:, :step.keys]
            ctx = ctx if order is None else ctx.index_select(0, order)
            for g, ch, c in zip(st.segments, step.chunks, st.views(buf, kvh)):
                c[:, :, :ch.keys] = ctx[g.lo:g.hi, :ch.keys].transpose(1, 2)
            bufs.append(buf)
        kb, vb = bufs
    else:
        kb, vb = held[1], held[2]
        if step.pos is not None:
            (km,), (vm,) = st.views(kb, kvh), st.views(vb, kvh)
            km.select(2, step.pos).copy_(k)
            vm.select(2, step.pos).copy_(v)
        else:
            rows = step.flat_rows(kvh)
            kb.index_copy_(0, rows, k.reshape(-1, kb.shape[1]))
            vb.index_copy_(0, rows, v.reshape(-1, vb.shape[1]))
    st.layers[layer] = (st.step, kb, vb)
    parts = [F.scaled_dot_product_attention(q[g.lo:g.hi].unsqueeze(2), km[:, :, :c.keys], vm[:, :, :c.keys],
                                            attn_mask=c.mask, scale=scale, enable_gqa=True)
             for g, c, km, vm in zip(st.segments, step.chunks, st.views(kb, kvh), st.views(vb, kvh))]
    o = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(n, q.shape[1], -1)
    return o if order is None else o.new_empty(o.shape).index_copy_(0, order, o)

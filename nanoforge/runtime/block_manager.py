"""Paged KV block manager with hash-chained prefix caching.

Every full block (prompt or decode) is registered under hash(parent hash, its tokens). A new
sequence reuses the longest chain of registered blocks whose tokens really match, capped so
that at least one prompt token is computed. Freed blocks keep their hash and stay findable
until they are evicted, least recently freed first.

Blocks never handed out yet have no Block object and no free-list entry: ids next_fresh.. are
taken in order before any freed block, as if they headed the free list. A CPU pool of a tiny
model holds millions of blocks, whose objects took seconds to build at every start.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .sequence import Sequence
from .state_slots import StateSlots


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return _hash_bytes(parent, np.asarray(tokens, dtype=np.int64).tobytes())


def _hash_bytes(parent: bytes, token_bytes: bytes) -> bytes:
    """chain_hash of a block whose tokens are already int64 bytes (commit converts a span at once)."""
    return hashlib.blake2b(parent + token_bytes, digest_size=16).digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    tokens: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, state_slots: int = 0):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # a row of the per-sequence state pool goes with a sequence's blocks (plans with recurrent layers);
        # their state after a cached prefix is nowhere, so such plans run without prefix caching
        assert not (state_slots and prefix_caching), "prefix caching cannot restore per-sequence state"
        self.state = StateSlots(state_slots) if state_slots else None
        self.num_blocks = num_blocks
        self.blocks: list[Block] = []  # the blocks handed out at least once: blocks[i].block_id == i
        self.next_fresh = 0  # == len(self.blocks): ids from here on were never handed out
        self.free: OrderedDict[int, None] = OrderedDict()  # freed blocks, least recently freed first
        self.cached: dict[bytes, int] = {}
        self.hits = self.queries = 0  # tokens found in / looked up in the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free) + self.num_blocks - self.next_fresh

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (a benchmark repeating its prompts must recompute them);
        blocks in use keep their contents, freed ones are plain free blocks."""
        self.cached.clear()

    def _take(self, count: int) -> list[int]:
        """`count` blocks, referenced once: fresh ones first, then the least recently freed."""
        fresh = min(count, self.num_blocks - self.next_fresh)  # never handed out: ahead of every freed block
        ids = list(range(self.next_fresh, self.next_fresh + fresh))
        self.blocks.extend(Block(i, 1) for i in ids)
        self.next_fresh += fresh
        for _ in range(count - fresh):
            b = self.blocks[self.free.popitem(last=False)[0]]
            if b.hash is not None and self.cached.get(b.hash) == b.block_id:
                del self.cached[b.hash]
            b.hash, b.tokens, b.ref_count = None, [], 1
            ids.append(b.block_id)
        return ids

    def _ref(self, block_id: int) -> None:
        b = self.blocks[block_id]
        if b.ref_count == 0:
            del self.free[block_id]
        b.ref_count += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks to a new sequence; returns the tokens they cover."""
        assert not seq.block_table and seq.num_computed == 0
        tokens, bs = seq.token_ids, self.block_size
        limit = (len(tokens) - 1) // bs  # leave at least one token to compute
        parent = b""
        if self.prefix_caching and seq.mm is None:  # images are not in the token hashes: no sharing
            self.queries += len(tokens)
            for i in range(limit):
                chunk = tokens[i * bs:(i + 1) * bs]
                h = chain_hash(parent, chunk)
                block_id = self.cached.get(h)
                if block_id is None or self.blocks[block_id].tokens != chunk:
                    break
                self._ref(block_id)
                seq.block_table.append(block_id)
                parent = h
            self.hits += len(seq.block_table) * bs
        seq.num_computed = seq.num_cached = len(seq.block_table) * bs
        seq.num_hashed_blocks, seq.last_block_hash = len(seq.block_table), parent
        return seq.num_computed

    def can_grow(self, seq: Sequence, num_new: int) -> bool:
        if self.state is not None and seq.state_slot < 0 and not self.state.num_free:
            return False
        return self.blocks_needed(seq.num_computed + num_new) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_new: int) -> None:
        """Make the table cover num_computed + num_new tokens (and give the sequence a state row)."""
        if self.state is not None and seq.state_slot < 0:
            seq.state_slot = self.state.take()
        missing = self.blocks_needed(seq.num_computed + num_new) - len(seq.block_table)
        if missing > 0:
            seq.block_table += self._take(missing)

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full (their tokens now have K/V in the pool)."""
        if not self.prefix_caching or seq.mm is not None:
            return
        bs, tokens = self.block_size, seq.token_ids
        first, end = seq.num_hashed_blocks, seq.num_computed // bs
        if end <= first:
            return
        span = np.asarray(tokens[first * bs:end * bs], dtype=np.int64).tobytes()  # one conversion, then slices
        width, parent = bs * 8, seq.last_block_hash
        for i in range(first, end):
            b = self.blocks[seq.block_table[i]]
            if b.hash is None:
                b.tokens = tokens[i * bs:(i + 1) * bs]
                j = (i - first) * width
                b.hash = _hash_bytes(parent, span[j:j + width])
                self.cached.setdefault(b.hash, b.block_id)
            parent = b.hash
        seq.last_block_hash, seq.num_hashed_blocks = parent, end

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the one holding position num_computed (grown for speculative drafts
        that were rejected): never registered, they go back as plain free blocks."""
        keep = self.blocks_needed(seq.num_computed + 1)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            b = self.blocks[block_id]
            b.ref_count -= 1
            assert b.ref_count == 0 and b.hash is None, f"trimmed block {block_id} is shared or cached"
            self.free[block_id] = None

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's references; the tail is freed first, so it is evicted first."""
        for block_id in reversed(seq.block_table):
            b = self.blocks[block_id]
            b.ref_count -= 1
            if b.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = seq.num_hashed_blocks = 0
        if seq.state_slot >= 0 and self.state is not None:
            self.state.give_back(seq.state_slot)
        seq.state_slot = -1
        seq.last_block_hash = b""

    def check_invariants(self, live: list[Sequence]) -> None:
        """Ref counts equal the number of live tables holding each block; free == unreferenced."""
        counts = [0] * len(self.blocks)
        assert len(self.blocks) == self.next_fresh <= self.num_blocks
        for s in live:
            assert len(set(s.block_table)) == len(s.block_table), f"seq {s.seq_id} holds a block twice"
            assert all(self.blocks[b].hash is not None for b in s.block_table[:s.num_hashed_blocks])
            for block_id in s.block_table:
                counts[block_id] += 1
        for b in self.blocks:
            assert b.ref_count == counts[b.block_id], f"block {b.block_id}: ref {b.ref_count} != {counts[b.block_id]}"
            assert (b.ref_count == 0) == (b.block_id in self.free), f"block {b.block_id} free-list mismatch"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"cache entry of block {block_id} is stale"
        if self.state is not None:
            held = [s.state_slot for s in live if s.state_slot >= 0]
            assert len(set(held)) == len(held) and not set(held) & set(self.state.free), "state slot shared or free"
            assert len(held) + self.state.num_free == self.state.num_slots, "state slot leaked"

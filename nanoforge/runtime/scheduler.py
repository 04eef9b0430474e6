"""Continuous batching: every step is one flat batch of prefill chunks and decode tokens under
a token budget (the runtime side of chunked-prefill fusion). Running sequences go first, in
admission order; waiting ones are admitted while budget, seats and blocks last. When the pool
runs out, the newest running sequence is preempted (its blocks freed, recomputed later)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .. import defaults
from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = defaults.MAX_NUM_SEQS
    max_num_batched_tokens: int = defaults.MAX_NUM_BATCHED_TOKENS
    max_prefill_chunk: int = defaults.MAX_PREFILL_CHUNK  # a longer prompt is split over several steps


@dataclass
class ScheduledBatch:
    items: list[tuple[Sequence, int]]  # (sequence, tokens to compute this step)
    replicas: list[int] | None = None  # attention-DP: items of replica 0, 1, ... in turn (dp_scheduler.py)
    drafts: dict[int, int] = field(default_factory=dict)  # item -> speculative drafts at its end (rows to return)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def sample_indices(self) -> list[int]:
        """Items whose last token is computed this step, so a new token is sampled for them."""
        return [i for i, (seq, n) in enumerate(self.items) if seq.num_computed + n == seq.num_tokens]


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def readmit(self, seq: Sequence) -> None:
        """First in line: a sequence whose migrated KV just arrived (or is to be recomputed)."""
        self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.cfg.max_num_batched_tokens
        items: list[tuple[Sequence, int]] = []
        bs = self.blocks.block_size
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted below to make room for an older one
                continue
            if (budget > 0 and len(seq.token_ids) - seq.num_computed == 1
                    and seq.num_computed < len(seq.block_table) * bs):
                items.append((seq, 1))  # a decode token whose slot is already allocated: the hot path
                budget -= 1
                continue
            n = min(seq.remaining, budget, self.cfg.max_prefill_chunk)
            if n <= 0:
                break
            while not self.blocks.can_grow(seq, n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, n)
            items.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:  # a sequence migrated in (PD) arrives with its blocks
                self.blocks.match_prefix(seq)
            n = min(seq.remaining, budget, self.cfg.max_prefill_chunk)
            if not self.blocks.can_grow(seq, n):
                self.blocks.release(seq)
                seq.num_cached = 0
                break
            self.waiting.popleft()
            self.blocks.grow(seq, n)
            seq.status = Status.RUNNING
            self._arrivals += 1
            seq.arrival = self._arrivals
            self.running.append(seq)
            items.append((seq, n))
            budget -= n
        return ScheduledBatch(items)

    def detach(self, seq: Sequence) -> None:
        """Stop scheduling `seq` but leave its blocks allocated (a prefilled sequence parked for
        a decode engine to pull its KV)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

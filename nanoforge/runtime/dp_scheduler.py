"""Attention-DP replicas (attention_dp x ffn_ep plans): each DP rank runs attention on its own
requests over its own KV pool, so the driver keeps one Scheduler and BlockManager per replica
behind the interfaces Engine uses. A new request goes to the replica holding the fewest; a step
is every replica's batch in turn (ScheduledBatch.replicas says where each ends), run in lockstep
by DistributedRunner: a replica with nothing to do runs an empty batch, since the MoE layers'
collectives need every rank each step. PD: a decode engine places a migrated request on a replica
before its KV arrives (`place`), and a prefill engine's parked requests keep theirs until released."""
from __future__ import annotations

from ..errors import NanoForgeError
from .block_manager import BlockManager
from .scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import Sequence


class DPBlocks:
    """BlockManager calls routed to the replica of the sequence. Sizes read as one replica's pool
    (what one request may use); usage as the mean over replicas, prefix-cache counts summed."""

    def __init__(self, sched: "DPScheduler"):
        self.sched = sched
        self.managers = [r.blocks for r in sched.replicas]
        self.block_size = self.managers[0].block_size
        self.num_blocks = self.managers[0].num_blocks

    def _of(self, seq: Sequence) -> BlockManager:
        d = self.sched.owner.get(seq.seq_id)
        if d is None:
            raise NanoForgeError(f"sequence {seq.seq_id} belongs to no attention-DP replica (requests enter an "
                                 "attention-DP engine through add_request only)")
        return self.managers[d]

    @property
    def num_free(self) -> int:
        return sum(m.num_free for m in self.managers) // len(self.managers)

    @property
    def hits(self) -> int:
        return sum(m.hits for m in self.managers)

    @property
    def queries(self) -> int:
        return sum(m.queries for m in self.managers)

    def reset_prefix_cache(self) -> None:
        for m in self.managers:
            m.reset_prefix_cache()

    def blocks_needed(self, num_tokens: int) -> int:
        return self.managers[0].blocks_needed(num_tokens)

    def match_prefix(self, seq: Sequence) -> int:
        return self._of(seq).match_prefix(seq)

    def can_grow(self, seq: Sequence, num_new: int) -> bool:
        return self._of(seq).can_grow(seq, num_new)

    def grow(self, seq: Sequence, num_new: int) -> None:
        self._of(seq).grow(seq, num_new)

    def commit(self, seq: Sequence) -> None:
        self._of(seq).commit(seq)

    def release(self, seq: Sequence) -> None:
        self._of(seq).release(seq)
        if seq.seq_id in self.sched.detached:  # parked or migrating in: out of every replica now
            self.sched.detached.discard(seq.seq_id)
            self.sched.owner.pop(seq.seq_id, None)

    def trim(self, seq: Sequence) -> None:
        self._of(seq).trim(seq)


class DPScheduler:
    def __init__(self, cfg: SchedulerConfig, num_blocks: int, block_size: int, prefix_caching: bool, dp: int):
        self.replicas = [Scheduler(cfg, BlockManager(num_blocks, block_size, prefix_caching)) for _ in range(dp)]
        self.owner: dict[int, int] = {}  # seq_id -> replica
        self.detached: set[int] = set()  # sequences holding blocks outside the schedulers (PD)
        self.blocks = DPBlocks(self)

    def place(self, seq: Sequence) -> int:
        """Choose the replica with the fewest sequences (queued, running or holding KV for PD) to own
        `seq`, without scheduling it: a migrated request's KV is written there first (add_migrated)."""
        if seq.seq_id not in self.owner:
            load = [0] * len(self.replicas)
            for d in self.owner.values():
                load[d] += 1
            self.owner[seq.seq_id] = load.index(min(load))
            self.detached.add(seq.seq_id)
        return self.owner[seq.seq_id]

    def add(self, seq: Sequence) -> None:
        self.detached.discard(seq.seq_id)
        self.owner.pop(seq.seq_id, None)
        d = self.place(seq)
        self.detached.discard(seq.seq_id)
        self.replicas[d].add(seq)

    def readmit(self, seq: Sequence) -> None:
        """A placed sequence (its KV migrated in, or to recompute) goes first in its replica's queue."""
        self.detached.discard(seq.seq_id)
        self.replicas[self.place(seq)].readmit(seq)

    def schedule(self) -> ScheduledBatch:
        batches = [r.schedule() for r in self.replicas]
        return ScheduledBatch([it for b in batches for it in b.items], [len(b.items) for b in batches])

    def has_work(self) -> bool:
        return any(r.has_work() for r in self.replicas)

    @property
    def running(self) -> list[Sequence]:
        return [s for r in self.replicas for s in r.running]

    @property
    def waiting(self) -> list[Sequence]:
        return [s for r in self.replicas for s in r.waiting]

    @property
    def num_preemptions(self) -> int:
        return sum(r.num_preemptions for r in self.replicas)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.replicas[self.owner.pop(seq.seq_id)].finish(seq, reason)

    def detach(self, seq: Sequence) -> None:
        self.replicas[self.owner[seq.seq_id]].detach(seq)
        self.detached.add(seq.seq_id)

"""Collectives a rank's kernels call through `ctx.comm`: summing and gathering over a named group
("tp", "ep", "dp"; parallel/shard_spec.py says which ranks form it).

SimulatedComm runs every rank of a world as a thread of one process (the numeric check of
sharding passes, tests); TorchDistComm is the same interface over torch.distributed (gloo on
CPU, NCCL on GPU), one process per rank. Both reduce in rank order, so every rank of a group
gets bit-identical results."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..facts import ParallelLayout
from ..ir.ops import GROUPS


@dataclass
class _Room:
    barrier: threading.Barrier
    slots: dict[int, torch.Tensor] = field(default_factory=dict)


class SimulatedHub:
    """Where the threads of one simulated world meet: one room (a barrier and a slot per rank)
    for each group of ranks. A rank that fails calls `abort`, so the others stop waiting."""

    def __init__(self, world: int, timeout_s: float = 120.0):
        self.world, self.timeout_s = world, timeout_s
        self._rooms: dict[tuple[int, ...], _Room] = {}
        self._lock = threading.Lock()
        self.aborted = False  # a room made after abort() is born broken, so no rank waits for a dead one

    def exchange(self, members: list[int], rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's tensor, in group order, once all of them have arrived."""
        with self._lock:
            room = self._rooms.setdefault(tuple(members), _Room(threading.Barrier(len(members))))
            if self.aborted:
                room.barrier.abort()
        room.slots[rank] = x
        room.barrier.wait(self.timeout_s)
        out = [room.slots[m] for m in members]
        room.barrier.wait(self.timeout_s)  # nobody deposits the next tensor before all have read this one
        return out

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            for room in self._rooms.values():
                room.barrier.abort()


class SimulatedComm:
    def __init__(self, hub: SimulatedHub, rank: int, layout: ParallelLayout):
        self.hub, self.rank, self.layout = hub, rank, layout

    def group_position(self, group: str) -> tuple[int, int]:
        """(this rank's index in `group`, the group's size)."""
        return self.layout.rank_in_group(group, self.rank)

    def _gather_list(self, x: torch.Tensor, group: str) -> list[torch.Tensor]:
        members = self.layout.group_members(group, self.rank)
        return [x] if len(members) == 1 else self.hub.exchange(members, self.rank, x)

    def all_reduce(self, x: torch.Tensor, group: str) -> torch.Tensor:
        parts = self._gather_list(x, group)
        total = parts[0].clone()
        for t in parts[1:]:
            total += t
        return total

    def all_gather(self, x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
        return torch.cat(self._gather_list(x, group), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, group: str) -> torch.Tensor:
        """The sum over the group of x [size * n, ...], this member's n rows of it."""
        me, size = self.group_position(group)
        n = x.shape[0] // size
        return self.all_reduce(x, group)[me * n:(me + 1) * n]

    def all_to_all(self, x: torch.Tensor, group: str, send_counts: list[int],
                   recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Rows of x grouped by destination (send_counts[d] rows for member d, in group order) ->
        the rows every member sent here, grouped by source, and how many came from each.
        `recv_counts`, when the caller knows them (a reply), skip the exchange of counts."""
        members = self.layout.group_members(group, self.rank)
        if len(members) == 1:
            return x, list(send_counts)
        me = members.index(self.rank)
        sent = self.hub.exchange(members, self.rank, torch.tensor(send_counts))
        starts = [int(c[:me].sum()) for c in sent]
        recv = [int(c[me]) for c in sent]
        parts = self.hub.exchange(members, self.rank, x)
        return torch.cat([p[s:s + n] for p, s, n in zip(parts, starts, recv)]), recv


class TorchDistComm:
    """torch.distributed with one process group per named group; the caller has already run
    dist.init_process_group (gloo on CPU, nccl on GPU) over the layout's world of ranks."""

    def __init__(self, layout: ParallelLayout, rank: int):
        import torch.distributed as dist

        self.dist, self.rank, self.layout = dist, rank, layout
        self.groups: dict[str, Any] = {}
        self.replay_hooks: list[Callable[[], None]] = []  # host work before a CUDA graph replays (DeepEP)
        for group in GROUPS:  # every rank creates every process group, in the same order
            lists = sorted({tuple(layout.group_members(group, r)) for r in range(layout.world)})
            for members in lists:
                if len(members) == 1:
                    continue
                pg = dist.new_group(list(members))
                if rank in members:
                    self.groups[group] = pg

    def group_position(self, group: str) -> tuple[int, int]:
        return self.layout.rank_in_group(group, self.rank)

    def all_reduce(self, x: torch.Tensor, group: str) -> torch.Tensor:
        if group not in self.groups:
            return x
        x = x.contiguous()
        self.dist.all_reduce(x, group=self.groups[group])  # in place: the partial sum is dead after this
        return x

    def all_gather(self, x: torch.Tensor, group: str, dim: int) -> torch.Tensor:
        if group not in self.groups:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.group_position(group)[1])]
        self.dist.all_gather(parts, x, group=self.groups[group])
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, group: str) -> torch.Tensor:
        """As SimulatedComm.reduce_scatter (gloo has none: an all_reduce, then this rank's rows)."""
        if group not in self.groups:
            return x
        me, size = self.group_position(group)
        x = x.contiguous()
        if x.device.type != "cuda":
            self.dist.all_reduce(x, group=self.groups[group])
            return x[me * (x.shape[0] // size):(me + 1) * (x.shape[0] // size)]
        out = x.new_empty(x.shape[0] // size, *x.shape[1:])
        self.dist.reduce_scatter_tensor(out, x, group=self.groups[group])
        return out

    def all_to_all(self, x: torch.Tensor, group: str, send_counts: list[int],
                   recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """As SimulatedComm.all_to_all; the counts go first (one int per pair), then the rows."""
        if group not in self.groups:
            return x, list(send_counts)
        pg, counts = self.groups[group], recv_counts
        if counts is None:
            send = torch.tensor(send_counts, dtype=torch.long, device=x.device)
            recv = torch.empty_like(send)
            self.dist.all_to_all_single(recv, send, group=pg)
            counts = recv.tolist()
        out = x.new_empty(sum(counts), *x.shape[1:])
        self.dist.all_to_all_single(out, x.contiguous(), counts, list(send_counts), group=pg)
        return out, counts

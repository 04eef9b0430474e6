"""One rank of a sharded plan: the ModelRunner of its slices, joined to the other ranks, and the
per-step protocol by which rank 0 (distributed_runner.py) sends every rank its batch.

Per-step protocol, over a gloo group of all ranks (CPU tensors, also under NCCL):

    header i64[4 + 4 * dp]  op (1 step, 0 stop), device-token flag, step number, dp, then for
                            each DP replica d: T_d tokens, B_d sequences, K_d block ids, R_d rows
    body   i64[...]         for each replica d: token ids (T_d; absent with the flag) | q_len (B_d)
                            | ctx_len (B_d) | blocks of each sequence (B_d) | block ids (K_d) |
                            rows to sample (R_d); positions are ctx_len - q_len .. ctx_len - 1
    with the flag           the token ids (one per sequence, the previous step's samples) follow
                            on the default group, on the device: an overlapped decode step never
                            waits for the host (NCCL on GPU, gloo on CPU)

PD moves a request's KV between engines through rank 0 (runtime/kv_shards.py): a header with op
2 (read) or 3 (write), dp, then the replica and K block ids at [4] and [5]; the body is the K ids.
A read gathers every rank's flat blocks to rank 0 (ranks of other replicas send zeros); a write
scatters each rank its blocks from rank 0, and the ranks of the replica write them to their pool.

Rank r runs replica dp_index(r): TP plans have one; attention-DP replicas each have a scheduler
of their own (runtime/dp_scheduler.py) and an idle one runs an empty batch. A TP plan all_gathers
its logits, so rank 0 has every row; with attention-DP replicas each replica's first rank holds
its rows, gathered to rank 0 (padded to the largest R_d). All ranks (of a replica) hold identical
KV block tables, which the driver's block manager decides, over pools of one size: the minimum of
what each rank fits (an all_reduce MIN at start-up).

On CUDA every rank captures the plan's decode graphs (NCCL collectives inside) and replays one
when the step is a decode batch that fits; each rank decides from the same broadcast batch."""
from __future__ import annotations

import datetime
import gc
import logging
import os

import torch
import torch.distributed as dist

from ..models.checkpoint import Checkpoint
from ..parallel.comm import TorchDistComm
from ..plan import Plan
from .kv_shards import pack_local, unpack_local
from .kv_transfer import block_nbytes
from .model_runner import ModelRunner, RunnerConfig

log = logging.getLogger("nanoforge.distributed")

OP_STOP, OP_STEP, OP_KV_READ, OP_KV_WRITE = 0, 1, 2, 3
STEP_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("NANOFORGE_DIST_TIMEOUT", 600)))
IDLE_TIMEOUT = datetime.timedelta(days=30)  # a worker waits this long for the next step (an idle server)
START_TIMEOUT_S = float(os.environ.get("NANOFORGE_DIST_START_TIMEOUT", 1800))


class RankRunner(ModelRunner):
    """One rank of a sharded plan: the ModelRunner of its slices, joined to the other ranks
    (store rendezvous, process groups, the agreed KV block count) and able to receive steps."""

    one_rank_of_many = True

    def __init__(self, plan: Plan, ckpt: Checkpoint, cfg: RunnerConfig, rank: int, store: dist.Store):
        self.layout, self.store = plan.parallel, store
        self.dp, self.tp = self.layout.attention_dp, self.layout.tp
        self.replica = self.layout.rank_in_group("dp", rank)[0]
        super().__init__(plan, ckpt, cfg, rank)

    def _rendezvous(self) -> None:
        self.store.set(f"ready/{self.rank}", "1")  # weights loaded; the driver waits for every rank's key

    def _agree_blocks(self, num_blocks: int) -> int:
        self._rendezvous()
        cuda = self.device.type == "cuda"
        device_id = None
        if cuda:
            device_id = torch.device("cuda", self.device.index if self.device.index is not None
                                     else torch.cuda.current_device())
        dist.init_process_group("nccl" if cuda else "gloo", store=self.store, rank=self.rank, world_size=self.world,
                                timeout=STEP_TIMEOUT, device_id=device_id)
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.comm = TorchDistComm(self.layout, self.rank)
        n = torch.tensor([num_blocks], dtype=torch.long)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=self.control)
        return int(n)

    def _header_len(self) -> int:
        return 4 + 4 * self.dp

    def serve(self) -> None:
        """A worker's loop: receive a step, run this rank's forward, until the stop header."""
        header = torch.empty(self._header_len(), dtype=torch.long)
        while True:
            dist.broadcast(header, 0, group=self.control)
            op, flag, _, dp, *sizes = header.tolist()
            if op == OP_STOP:
                return
            if op in (OP_KV_READ, OP_KV_WRITE):
                ids = torch.empty(sizes[1], dtype=torch.long)
                dist.broadcast(ids, 0, group=self.control)
                self.kv_collective(op, sizes[0], ids.tolist())
                continue
            counts = replica_counts(sizes, dp)
            body = torch.empty(sum(body_len(c, flag) for c in counts), dtype=torch.long)
            dist.broadcast(body, 0, group=self.control)
            tokens, seqs, rows = unpack_step(body, counts, flag, self.replica)
            device_tokens = None
            if flag:
                device_tokens = torch.empty(counts[self.replica][1], dtype=torch.long, device=self.device)
                dist.broadcast(device_tokens, 0)
            logits = self.run_step(tokens, seqs, rows, device_tokens, counts)
            if self.dp > 1:
                self._gather_logits(logits, [c[3] for c in counts])

    def kv_collective(self, op: int, replica: int, block_ids: list[int],
                      outgoing: list[torch.Tensor] | None = None) -> list[torch.Tensor] | None:
        """This rank's part of a KV read (every rank's flat blocks gathered to rank 0, returned
        there) or write (rank 0 scatters `outgoing`, one buffer per rank) of `replica`'s blocks."""
        mine, size = self.replica == replica, len(block_ids) * block_nbytes(self.pool)
        if op == OP_KV_READ:
            buf = pack_local(self.pool, block_ids) if mine else torch.zeros(size, dtype=torch.uint8)
            parts = [torch.empty(size, dtype=torch.uint8) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(buf, parts, dst=0, group=self.control)
            return parts
        buf = torch.empty(size, dtype=torch.uint8)
        dist.scatter(buf, outgoing if self.rank == 0 else None, src=0, group=self.control)
        if mine:
            unpack_local(self.pool, block_ids, buf)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return None

    def leave(self) -> None:
        """Free the process groups. CUDA graphs that captured NCCL collectives go first: with one
        alive, ncclCommDestroy never returns (pytorch/pytorch#115388)."""
        if getattr(self, "graphs", None) is not None:
            self.graphs = None
            gc.collect()
            torch.cuda.synchronize(self.device)
        if dist.is_initialized():
            dist.destroy_process_group()

    def run_step(self, tokens: list[int], seqs: list[tuple[int, int, list[int]]], rows: list[int],
                 device_tokens: torch.Tensor | None, counts: list[list[int]]) -> torch.Tensor:
        """This rank's forward of a step: a graph replay when every replica's batch is a decode
        batch the graphs fit, else eager. Every rank decides alike from the step header (`counts`:
        T, B, K, R of each replica), and replays the size of the largest replica's batch: the EP
        collectives inside need the same shapes on every rank (an idle replica pads all its rows)."""
        most = max(b for _, b, _, _ in counts)
        decode = all(t == b == r for t, b, _, r in counts)  # one token per sequence, each sampled
        if self.graphs is not None and decode and 0 < most <= self.graphs.sizes[-1]:
            self.batches["graph"] += 1
            return self.graphs.run_flat(tokens, seqs, device_tokens, pad_to=most)
        self.batches[f"eager: {self.no_graph_reason or 'not a decode batch a graph fits'}"] += 1
        return self.run(tokens, seqs, rows, device_tokens, ep_tokens=max(t for t, _, _, _ in counts))

    def _gather_logits(self, logits: torch.Tensor, rows: list[int]) -> list[torch.Tensor] | None:
        """Every rank's logits on rank 0, each padded to the most rows of any replica."""
        most = max(rows)
        if most == 0:
            return None
        mine = logits.new_zeros(most, logits.shape[-1])
        mine[:logits.shape[0]] = logits
        parts = [torch.empty_like(mine) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(mine, parts, dst=0)
        return parts


def replica_counts(sizes: list[int], dp: int) -> list[list[int]]:
    """The header's (T, B, K, R) of each DP replica."""
    return [sizes[4 * d:4 * d + 4] for d in range(dp)]


def body_len(c: list[int], flag: int) -> int:
    t, b, k, r = c
    return (0 if flag else t) + 3 * b + k + r


def pack_step(parts: list[tuple[list[int], list[tuple[int, int, list[int]]], list[int]]]) -> tuple[list[int], list[int]]:
    """(header sizes, body) of each replica's (tokens, seqs, rows)."""
    sizes, body = [], []
    for tokens, seqs, rows in parts:
        blocks = [b for _, _, table in seqs for b in table]
        sizes += [sum(q for q, _, _ in seqs), len(seqs), len(blocks), len(rows)]
        body += tokens
        body += [q for q, _, _ in seqs]
        body += [c for _, c, _ in seqs]
        body += [len(t) for _, _, t in seqs]
        body += blocks
        body += rows
    return sizes, body


def unpack_step(body: torch.Tensor, counts: list[list[int]], flag: int, replica: int):
    """This replica's (tokens, seqs, rows) out of a step's body."""
    start = sum(body_len(c, flag) for c in counts[:replica])
    t, b, k, r = counts[replica]
    xs = body[start:start + body_len(counts[replica], flag)].tolist()
    tokens, xs = ([], xs) if flag else (xs[:t], xs[t:])
    q_lens, ctx_lens, widths, xs = xs[:b], xs[b:2 * b], xs[2 * b:3 * b], xs[3 * b:]
    seqs, at = [], 0
    for q, c, w in zip(q_lens, ctx_lens, widths):
        seqs.append((q, c, xs[at:at + w]))
        at += w
    return tokens, seqs, xs[k:k + r]

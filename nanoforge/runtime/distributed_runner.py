"""A sharded plan runs as one process per rank. The driver (the engine's process) is rank 0: it
holds the scheduler and runs rank 0's share of the model; ranks 1..N-1 are worker processes
(runtime/worker.py) started with plain command-line arguments (plan dir, checkpoint path, rank,
world, store address) that load only their slices; a launcher (runtime/launchers.py) starts them
as subprocesses of this host (local) or as Ray actors on a cluster's nodes (ray). Every step the
driver broadcasts the batch as int64 tensors, then every rank runs the same forward with its
TorchDistComm; rank 0 samples.

Per-step protocol, over a gloo group of all ranks (CPU tensors, also under NCCL):

    header i64[4 + 4 * dp]  op (1 step, 0 stop), device-token flag, step number, dp, then for
                            each DP replica d: T_d tokens, B_d sequences, K_d block ids, R_d rows
    body   i64[...]         for each replica d: token ids (T_d; absent with the flag) | q_len (B_d)
                            | ctx_len (B_d) | blocks of each sequence (B_d) | block ids (K_d) |
                            rows to sample (R_d); positions are ctx_len - q_len .. ctx_len - 1
    with the flag           the token ids (one per sequence, the previous step's samples) follow
                            on the default group, on the device: an overlapped decode step never
                            waits for the host (NCCL on GPU, gloo on CPU)

Rank r runs replica dp_index(r): TP plans have one; attention-DP replicas each have a scheduler
of their own (runtime/dp_scheduler.py) and an idle one runs an empty batch. A TP plan all_gathers
its logits, so rank 0 has every row; with attention-DP replicas each replica's first rank holds
its rows, gathered to rank 0 (padded to the largest R_d). All ranks (of a replica) hold identical
KV block tables, which the driver's block manager decides, over pools of one size: the minimum of
what each rank fits (an all_reduce MIN at start-up).

A worker that fails exits; its sockets close, the driver's next collective raises, and the driver
names the rank and the last line of its log (every later step raises the same error). Workers
leave when the driver stops them, when their stdin pipe from the driver closes, or when their
parent changes (the driver died; they delete its temp dir); Ray actors die with the driver's job.

On CUDA every rank captures the plan's decode graphs (NCCL collectives inside) and replays one
when the step is a decode batch that fits; each rank decides from the same broadcast batch."""
from __future__ import annotations

import atexit
import datetime
import gc
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import NanoForgeError
from ..models.checkpoint import Checkpoint
from ..parallel.comm import TorchDistComm
from ..parallel.shard_spec import parallel_of, rank_in_group, world_size
from ..plan import Plan
from .launchers import make_launcher
from .model_runner import ModelRunner, flat_batch
from .scheduler import ScheduledBatch

log = logging.getLogger("nanoforge.distributed")

OP_STOP, OP_STEP = 0, 1
STEP_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("NANOFORGE_DIST_TIMEOUT", 600)))
IDLE_TIMEOUT = datetime.timedelta(days=30)  # a worker waits this long for the next step (an idle server)
START_TIMEOUT_S = float(os.environ.get("NANOFORGE_DIST_START_TIMEOUT", 1800))


class RankRunner(ModelRunner):
    """One rank of a sharded plan: the ModelRunner of its slices, joined to the other ranks
    (store rendezvous, process groups, the agreed KV block count) and able to receive steps."""

    one_rank_of_many = True

    def __init__(self, plan: Plan, ckpt: Checkpoint, num_blocks: int | None, device: str, progress: bool,
                 max_model_len: int, max_num_seqs: int, enforce_eager: bool, gpu_memory_utilization: float,
                 max_num_batched_tokens: int, rank: int, store: dist.Store):
        self.meta, self.store = plan.module.meta, store
        self.dp = parallel_of(self.meta)["attention_dp"]
        self.replica = rank_in_group(self.meta, "dp", rank)[0]
        self.tp = parallel_of(self.meta)["tp"]
        super().__init__(plan, ckpt, num_blocks, device, progress, max_model_len, max_num_seqs, enforce_eager,
                         gpu_memory_utilization, max_num_batched_tokens, rank)

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
        self.comm = TorchDistComm(self.meta, self.rank)
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
            counts = _replica_counts(sizes, dp)
            body = torch.empty(sum(_body_len(c, flag) for c in counts), dtype=torch.long)
            dist.broadcast(body, 0, group=self.control)
            tokens, seqs, rows = _unpack(body, counts, flag, self.replica)
            device_tokens = None
            if flag:
                device_tokens = torch.empty(counts[self.replica][1], dtype=torch.long, device=self.device)
                dist.broadcast(device_tokens, 0)
            logits = self.run_step(tokens, seqs, rows, device_tokens, counts)
            if self.dp > 1:
                self._gather_logits(logits, [c[3] for c in counts])

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


def _replica_counts(sizes: list[int], dp: int) -> list[list[int]]:
    """The header's (T, B, K, R) of each DP replica."""
    return [sizes[4 * d:4 * d + 4] for d in range(dp)]


def _body_len(c: list[int], flag: int) -> int:
    t, b, k, r = c
    return (0 if flag else t) + 3 * b + k + r


def _pack(parts: list[tuple[list[int], list[tuple[int, int, list[int]]], list[int]]]) -> tuple[list[int], list[int]]:
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


def _unpack(body: torch.Tensor, counts: list[list[int]], flag: int, replica: int):
    """This replica's (tokens, seqs, rows) out of a step's body."""
    start = sum(_body_len(c, flag) for c in counts[:replica])
    t, b, k, r = counts[replica]
    xs = body[start:start + _body_len(counts[replica], flag)].tolist()
    tokens, xs = ([], xs) if flag else (xs[:t], xs[t:])
    q_lens, ctx_lens, widths, xs = xs[:b], xs[b:2 * b], xs[2 * b:3 * b], xs[3 * b:]
    seqs, at = [], 0
    for q, c, w in zip(q_lens, ctx_lens, widths):
        seqs.append((q, c, xs[at:at + w]))
        at += w
    return tokens, seqs, xs[k:k + r]


class DistributedRunner(RankRunner):
    """Rank 0 in the driver, and the worker processes of ranks 1..N-1, started by `launcher`
    ("local" or "ray"). The ModelRunner interface: execute(batch, device_tokens) -> (logits of the
    sampled rows, their item indices)."""

    def __init__(self, plan: Plan, ckpt: Checkpoint, num_blocks: int | None, device: str = "cpu",
                 progress: bool = True, max_model_len: int = 4096, max_num_seqs: int = 256,
                 enforce_eager: bool = False, gpu_memory_utilization: float = 0.9,
                 max_num_batched_tokens: int = 2048, launcher: str = "local", ray_address: str | None = None):
        world = world_size(plan.module.meta)
        kind = getattr(ckpt, "kind", None)
        if not (kind == "random" or kind == "hf" and Path(ckpt.path).is_dir()):
            raise NanoForgeError(f"a plan sharded over {world} ranks needs a safetensors checkpoint directory that "
                                 f"each rank opens itself; got {ckpt.path} ({kind or '?'})")
        if dist.is_initialized():
            raise NanoForgeError("this process already runs a distributed engine (torch.distributed is "
                                 "initialized); close that LLM first")
        self.launcher = None
        self.error: NanoForgeError | None = None
        self.closed, self.steps, self.lock = False, 0, threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="nanoforge-ranks-"))
        opts = {"num_blocks": -1 if num_blocks is None else num_blocks, "max_model_len": max_model_len,
                "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens,
                "gpu_memory_utilization": gpu_memory_utilization}
        try:
            plan.save(self.tmp / "plan")  # the workers read the plan from here (it may exist only in memory)
            source = self._checkpoint_arg(ckpt)
            self.launcher = make_launcher(launcher, self.tmp, world, device, ray_address)
            atexit.register(self.close)  # after ray.init's exit hook, so this one runs first
            store = dist.TCPStore(self.launcher.store_host, 0, world, is_master=True, wait_for_workers=False,
                                  timeout=STEP_TIMEOUT)
            for rank in range(1, world):
                argv = [str(self.tmp / "plan"), source, "--rank", str(rank), "--world", str(world),
                        "--host", self.launcher.store_host, "--port", str(store.port),
                        "--device", self.launcher.device(rank, device)] + ["--enforce-eager"] * enforce_eager
                self.launcher.start(rank, argv + [x for k, v in opts.items()
                                                  for x in (f"--{k.replace('_', '-')}", str(v))])
            if not self.launcher.logs_in_run_dir:  # the ranks got its files as bytes: nothing left to read here
                shutil.rmtree(self.tmp, ignore_errors=True)
            super().__init__(plan, ckpt, num_blocks, self.launcher.driver_device(device), progress, max_model_len,
                             max_num_seqs, enforce_eager, gpu_memory_utilization, max_num_batched_tokens, 0, store)
        except BaseException as e:
            if isinstance(e, (RuntimeError, dist.DistError)) and self.workers:
                self._fail(e)  # names the worker that went away, if one did
            self.error = NanoForgeError(f"start-up failed: {e}")  # no stop header: the ranks may be mid-handshake
            self.close()
            raise
        log.info("%d ranks up (%s launcher): %s", world, launcher, self.launcher.describe())

    @property
    def workers(self) -> list:
        """The worker ranks 1..N-1: subprocess.Popen (local launcher) or Ray actor handles."""
        return getattr(self.launcher, "workers", getattr(self.launcher, "actors", []))

    def _checkpoint_arg(self, ckpt: Checkpoint) -> str:
        """What a worker opens: the checkpoint directory, or for random weights (benchmarks) a
        JSON file of their config and seed, from which every rank makes the same tensors."""
        if getattr(ckpt, "kind", None) != "random":
            return str(Path(ckpt.path).resolve())
        spec = {"config": ckpt.config, "name": str(ckpt.path), "dtype": ckpt.dtype, "seed": ckpt.seed,
                "on_cuda": str(ckpt.device).startswith("cuda")}  # CPU and CUDA generators differ
        (self.tmp / "random.json").write_text(json.dumps(spec))
        return f"random:{self.tmp / 'random.json'}"

    def _rendezvous(self) -> None:
        """Wait until every worker has loaded its slices, failing at once if one exits."""
        keys = [f"ready/{r}" for r in range(1, self.world)]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.store.check(keys):
            self._check_workers()
            if time.monotonic() > deadline:
                raise NanoForgeError(f"worker ranks did not load their weights within {START_TIMEOUT_S:g} s "
                                     f"(NANOFORGE_DIST_START_TIMEOUT); logs in {self.tmp}")
            time.sleep(0.05)

    # -- steps -------------------------------------------------------------------------------------
    def execute(self, batch: ScheduledBatch,
                device_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
        with self.lock:  # close() from another thread waits for the step
            if self.error is not None or self.closed:
                raise self.error or NanoForgeError("the distributed engine is closed")
            self._check_workers()
            return self._step(batch, device_tokens)

    def _step(self, batch: ScheduledBatch, device_tokens: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        sample_items = list(range(len(batch.items))) if device_tokens is not None else batch.sample_indices()
        flag = device_tokens is not None
        parts, at = [], 0
        for n in batch.replicas or [len(batch.items)]:
            part = ScheduledBatch(batch.items[at:at + n])
            parts.append(flat_batch(part, [i - at for i in sample_items if at <= i < at + n], flag))
            at += n
        if len(parts) != self.dp or (flag and self.dp > 1):
            raise NanoForgeError(f"a step of {self.dp} attention-DP replicas needs each replica's items "
                                 "(ScheduledBatch.replicas) and no overlapped decode")
        sizes, body = _pack(parts)
        self.steps += 1
        try:
            dist.broadcast(torch.tensor([OP_STEP, int(flag), self.steps, self.dp, *sizes], dtype=torch.long), 0,
                           group=self.control)
            dist.broadcast(torch.tensor(body, dtype=torch.long), 0, group=self.control)
            if flag:
                dist.broadcast(device_tokens.to(torch.long).contiguous(), 0)
            logits = self.run_step(*parts[0], device_tokens, _replica_counts(sizes, self.dp))
            if self.dp > 1:
                rows = [len(p[2]) for p in parts]
                gathered = self._gather_logits(logits, rows)
                logits = logits if gathered is None else \
                    torch.cat([gathered[d * self.tp][:r] for d, r in enumerate(rows)])
        except (RuntimeError, dist.DistError) as e:
            self._fail(e)
        except BaseException:  # e.g. KeyboardInterrupt: the ranks are out of step now
            self.error = NanoForgeError("distributed engine stopped: a step was interrupted")
            raise
        return logits, sample_items

    # -- failures and shutdown ---------------------------------------------------------------------
    def _check_workers(self) -> None:
        if self.launcher.any_dead():
            self._fail(None)

    def _fail(self, cause: BaseException | None) -> None:
        """Name the worker that went away (waiting briefly for it to exit), stop the others, and
        raise; every later step raises the same error."""
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not self.launcher.any_dead():
            time.sleep(0.05)
        reports = self.launcher.reports()
        what = "; ".join(reports) if reports else f"{type(cause).__name__}: {cause}"
        self.error = NanoForgeError(f"distributed engine stopped: {what}")
        self._stop(graceful=False)
        raise self.error from cause

    def _stop(self, graceful: bool) -> None:
        stopped = False  # the workers were sent the stop header: give them time to leave
        if graceful and dist.is_initialized() and getattr(self, "control", None) is not None:
            try:
                dist.broadcast(torch.tensor([OP_STOP, 0, 0, self.dp] + [0] * 4 * self.dp, dtype=torch.long), 0,
                               group=self.control)
                stopped = True
            except (RuntimeError, dist.DistError):
                pass
        if self.launcher is not None:
            self.launcher.stop(10.0 if stopped else 0.0)
        self.leave()

    def close(self) -> None:
        """Stop the workers (a stop header, then a kill after 10 s) and free the process groups."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        idle = self.lock.acquire(timeout=5.0)
        try:
            self._stop(graceful=idle and self.error is None)
        finally:
            if idle:
                self.lock.release()
        if self.error is None or not self.workers:  # kept after a failure for the workers' logs
            shutil.rmtree(self.tmp, ignore_errors=True)

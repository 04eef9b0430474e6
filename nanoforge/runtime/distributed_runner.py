"""A sharded plan runs as one process per rank. The driver (the engine's process) is rank 0: it
holds the scheduler and runs rank 0's share of the model; ranks 1..N-1 are worker processes
(runtime/worker.py) started with the plan dir, the checkpoint and their RunnerConfig as JSON,
that load only their slices; a launcher (runtime/launchers.py) starts them as subprocesses of
this host (local) or as Ray actors on a cluster's nodes (ray). Every step the driver broadcasts
the batch as int64 tensors (rank_runner.py has the protocol), then every rank runs the same
forward with its TorchDistComm; rank 0 samples.

A worker that fails exits; its sockets close, the driver's next collective raises, and the driver
names the rank and the last line of its log (every later step raises the same error). Workers
leave when the driver stops them, when their stdin pipe from the driver closes, or when their
parent changes (the driver died; they delete its temp dir); Ray actors die with the driver's job."""
from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import NanoForgeError
from ..models.checkpoint import Checkpoint
from ..plan import Plan
from .kv_shards import KVShards, kv_parts, one_rank_contract
from .kv_transfer import KVStore, block_nbytes
from .launchers import make_launcher
from .model_runner import RunnerConfig, flat_batch
from .rank_runner import (OP_KV_READ, OP_KV_WRITE, OP_STEP, OP_STOP, START_TIMEOUT_S, STEP_TIMEOUT, RankRunner,
                          pack_step, replica_counts)
from .scheduler import ScheduledBatch

log = logging.getLogger("nanoforge.distributed")


class DistributedRunner(RankRunner):
    """Rank 0 in the driver, and the worker processes of ranks 1..N-1, started by `launcher`
    ("local" or "ray"). The ModelRunner interface: execute(batch, device_tokens) -> (logits of the
    sampled rows, their item indices)."""

    def __init__(self, plan: Plan, ckpt: Checkpoint, cfg: RunnerConfig, launcher: str = "local",
                 ray_address: str | None = None):
        world = plan.parallel.world
        kind = getattr(ckpt, "kind", None)
        if not (kind == "random" or kind == "hf" and Path(ckpt.path).is_dir()):
            raise NanoForgeError(f"a plan sharded over {world} ranks needs a safetensors checkpoint directory that "
                                 f"each rank opens itself; got {ckpt.path} ({kind or '?'})")
        if dist.is_initialized():
            raise NanoForgeError("this process already runs a distributed engine (torch.distributed is "
                                 "initialized); close that LLM first")
        self.launcher = None
        self.module, self._kv = plan.module, None  # the module: which TP part of the KV each rank holds (PD)
        self.error: NanoForgeError | None = None
        self.closed, self.steps, self.lock = False, 0, threading.Lock()
        self.tmp = Path(tempfile.mkdtemp(prefix="nanoforge-ranks-"))
        try:
            plan.save(self.tmp / "plan")  # the workers read the plan from here (it may exist only in memory)
            source = self._checkpoint_arg(ckpt)
            self.launcher = make_launcher(launcher, self.tmp, world, cfg.device, ray_address)
            atexit.register(self.close)  # after ray.init's exit hook, so this one runs first
            store = dist.TCPStore(self.launcher.store_host, 0, world, is_master=True, wait_for_workers=False,
                                  timeout=STEP_TIMEOUT)
            for rank in range(1, world):
                mine = replace(cfg, device=self.launcher.device(rank, cfg.device), progress=False)
                self.launcher.start(rank, [str(self.tmp / "plan"), source, "--rank", str(rank), "--world", str(world),
                                           "--host", self.launcher.store_host, "--port", str(store.port),
                                           "--config", json.dumps(mine.to_json())])
            if not self.launcher.logs_in_run_dir:  # the ranks got its files as bytes: nothing left to read here
                shutil.rmtree(self.tmp, ignore_errors=True)
            super().__init__(plan, ckpt, replace(cfg, device=self.launcher.driver_device(cfg.device)), 0, store)
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
            part = ScheduledBatch(batch.items[at:at + n], drafts={i - at: d for i, d in batch.drafts.items()
                                                                  if at <= i < at + n})
            parts.append(flat_batch(part, [i - at for i in sample_items if at <= i < at + n], flag))
            at += n
        if len(parts) != self.dp or (flag and self.dp > 1):
            raise NanoForgeError(f"a step of {self.dp} attention-DP replicas needs each replica's items "
                                 "(ScheduledBatch.replicas) and no overlapped decode")
        sizes, body = pack_step(parts)
        self.steps += 1
        try:
            dist.broadcast(torch.tensor([OP_STEP, int(flag), self.steps, self.dp, *sizes], dtype=torch.long), 0,
                           group=self.control)
            dist.broadcast(torch.tensor(body, dtype=torch.long), 0, group=self.control)
            if flag:
                dist.broadcast(device_tokens.to(torch.long).contiguous(), 0)
            logits = self.run_step(*parts[0], device_tokens, replica_counts(sizes, self.dp))
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

    # -- PD: a request's KV in the one-rank layout ---------------------------------------------------
    def kv_store(self) -> KVStore:
        """The pool as PD migration sees it: blocks gathered from (scattered to) the ranks of a replica."""
        if self._kv is None:
            parts = kv_parts(self.module, self.layout, self.contract)
            self._shards = KVShards(self.pool, parts, self.tp)
            self._kv = KVStore(one_rank_contract(self.contract, parts), self.layout.describe(), self.pool,
                               self.read_kv, self.write_kv, sharded=True)
        return self._kv

    def _replica_ranks(self, replica: int) -> list[int]:
        return [r for r in range(self.world) if self.layout.rank_in_group("dp", r)[0] == replica][:self.tp]

    def read_kv(self, replica: int, block_ids: list[int], ready=None) -> list[memoryview]:
        if ready is not None:
            ready.synchronize()
        parts = self._kv_op(OP_KV_READ, replica, block_ids, None)
        empty = [torch.empty(0, dtype=torch.uint8)] * self.tp
        return self._shards.combine(empty if parts is None else [parts[r] for r in self._replica_ranks(replica)],
                                    len(block_ids))

    def write_kv(self, replica: int, block_ids: list[int], buffers: list) -> int:
        per_tp = self._shards.split(buffers, len(block_ids))  # checks the sizes before any rank is told
        ranks, zeros = self._replica_ranks(replica), torch.zeros(len(block_ids) * block_nbytes(self.pool),
                                                                 dtype=torch.uint8)
        self._kv_op(OP_KV_WRITE, replica, block_ids,
                    [per_tp[ranks.index(r)] if r in ranks else zeros for r in range(self.world)])
        return sum(memoryview(b).nbytes for b in buffers)

    def _kv_op(self, op: int, replica: int, block_ids: list[int], outgoing) -> list[torch.Tensor] | None:
        if not 0 <= replica < self.dp:
            raise NanoForgeError(f"KV of attention-DP replica {replica}: this engine has {self.dp}")
        if not block_ids:
            return None
        with self.lock:  # between steps: the ranks take the KV op in the same order as everyone
            if self.error is not None or self.closed:
                raise self.error or NanoForgeError("the distributed engine is closed")
            self._check_workers()
            try:
                header = [op, 0, 0, self.dp, replica, len(block_ids)] + [0] * (4 * self.dp - 2)
                dist.broadcast(torch.tensor(header, dtype=torch.long), 0, group=self.control)
                dist.broadcast(torch.tensor(block_ids, dtype=torch.long), 0, group=self.control)
                return self.kv_collective(op, replica, block_ids, outgoing)
            except (RuntimeError, dist.DistError) as e:
                self._fail(e)
        return None

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

"""Where the worker ranks of a sharded plan run: how they are started, watched and stopped.
The driver (rank 0) runs DistributedRunner in its own process either way; a launcher starts
ranks 1..N-1 on the same command line (`worker.main(argv)`), says whether one has died and
why, and stops them. The per-step protocol is torch.distributed in both cases.

    local  subprocesses of this host (`python -m nanoforge.runtime.worker ...`), logs in the
           driver's temp dir; they leave when the driver's stdin pipe closes or it dies.
    ray    one Ray actor per rank, placed by a placement group (PACK: on as few nodes as fit,
           spread over more when they don't). The actor gets the driver's run files (plan dir,
           random-weights spec) as bytes and writes them to a temp dir of its own node; the
           checkpoint must be at the same path on every node. Ray kills the actors of a driver
           that dies (they are owned by its job)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import NanoForgeError

log = logging.getLogger("nanoforge.distributed")

LAUNCHERS = ("local", "ray")
PLACE_TIMEOUT_S = float(os.environ.get("NANOFORGE_RAY_PLACE_TIMEOUT", 120))
FORWARDED_ENV = ("NANOFORGE_", "NCCL_", "NVSHMEM_", "TORCH_", "TRITON_", "GLOO_")  # to Ray actors, as to subprocesses


def check_launcher(name: str) -> None:
    if name not in LAUNCHERS:
        raise NanoForgeError(f"unknown launcher {name!r}: choose one of {', '.join(LAUNCHERS)}")


def make_launcher(name: str, run_dir: Path, world: int, device: str, ray_address: str | None = None):
    check_launcher(name)
    return RayLauncher(run_dir, world, device, ray_address) if name == "ray" else LocalLauncher(run_dir)


class LocalLauncher:
    """Ranks 1..N-1 as subprocesses of this host, one GPU each (cuda:RANK)."""

    store_host = "127.0.0.1"
    logs_in_run_dir = True

    def __init__(self, run_dir: Path):
        self.run_dir, self.workers = run_dir, []  # list[subprocess.Popen], rank 1 first

    def device(self, rank: int, device: str) -> str:
        return f"cuda:{rank}" if device.startswith("cuda") else device

    def driver_device(self, device: str) -> str:
        return device

    def start(self, rank: int, argv: list[str]) -> None:
        argv = argv + ["--driver-pid", str(os.getpid())]  # the worker leaves when this pid goes away
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": argv[argv.index("--port") + 1]}
        with open(self.run_dir / f"rank{rank}.log", "wb") as out:
            # own session: a Ctrl-C at the terminal reaches the driver, which stops the workers
            self.workers.append(subprocess.Popen([sys.executable, "-m", "nanoforge.runtime.worker", *argv],
                                                 stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True))

    def any_dead(self) -> bool:
        return any(p.poll() is not None for p in self.workers)

    def reports(self) -> list[str]:
        return [r for rank, p in enumerate(self.workers, 1) if (r := self._report(rank, p))]

    def _report(self, rank: int, proc: subprocess.Popen) -> str:
        code = proc.returncode
        if code is None:
            return ""
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        lines = [ln for ln in _tail(self.run_dir / f"rank{rank}.log").splitlines() if ln.strip()]
        last = f": {lines[-1].strip()}" if lines and code > 0 else ""
        return f"worker rank {rank} (pid {proc.pid}) {how}{last} (log: {self.run_dir / f'rank{rank}.log'})"

    def stop(self, wait_s: float) -> None:
        """Wait up to wait_s for the workers to leave (they were sent the stop header), then kill."""
        import time

        deadline = time.monotonic() + wait_s
        for p in self.workers:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdin is not None:
                p.stdin.close()

    def describe(self) -> str:
        return f"worker pids {[p.pid for p in self.workers]}"


class _RankActor:
    """A worker rank in a Ray actor's own process: the driver's run files are written to a temp
    dir of this node, then `worker.main` runs on them until the driver's stop header."""

    def where(self) -> dict[str, Any]:
        import ray

        return {"actor": ray.get_runtime_context().get_actor_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def serve(self, files: dict[str, bytes], argv: list[str], driver_run_dir: str) -> tuple[int, str]:
        """(exit status, the error's one-line summary) of worker.main on this node's copy of the files."""
        from . import worker

        mine = Path(tempfile.mkdtemp(prefix="nanoforge-rank-"))  # read at start-up only: deleted once loaded
        try:
            for rel, data in files.items():
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise ValueError(f"run file {rel!r} is not inside the run dir")
                (mine / rel).parent.mkdir(parents=True, exist_ok=True)
                (mine / rel).write_bytes(data)
            errors: list[str] = []
            code = worker.main([a.replace(driver_run_dir, str(mine)) for a in argv], errors,
                               loaded=lambda: shutil.rmtree(mine, ignore_errors=True))
            return code, errors[-1] if errors else ""
        finally:
            shutil.rmtree(mine, ignore_errors=True)


class _GpuSeat:
    """Holds the GPU that the driver's rank 0 uses, on the driver's node, so that Ray gives it to
    no worker rank."""

    def gpus(self) -> list[str]:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]


class RayLauncher:
    """Ranks 1..N-1 as Ray actors (num_gpus=1 on CUDA, where Ray sets CUDA_VISIBLE_DEVICES so a
    rank's device is cuda:0; num_cpus=1 each), in one PACK placement group. Their output goes to
    Ray's worker logs on their node; a failed rank's last error line comes back with its task."""

    logs_in_run_dir = False

    def __init__(self, run_dir: Path, world: int, device: str, address: str | None):
        try:
            import ray
        except ImportError:
            raise NanoForgeError("--launcher ray needs Ray, which is not installed: pip install ray") from None
        self.ray, self.run_dir, self.cuda = ray, run_dir, device.startswith("cuda")
        self.actors, self.refs, self.where, self.seat, self.pg, self.seat_gpus = [], [], [], None, None, []
        self.own_session = not ray.is_initialized()  # ours to disconnect (and stop, if we started it) on close
        if self.own_session:
            _connect(ray, address)
        try:
            self._place(world)
        except BaseException:
            self.stop(0)
            raise

    def _place(self, world: int) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        ray, run_dir = self.ray, self.run_dir
        bundle = {"CPU": 1, "GPU": 1} if self.cuda else {"CPU": 1}
        env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}}
        if self.cuda:  # rank 0 runs here, outside Ray: hold its GPU so that no worker rank gets it too
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.seat = ray.remote(_GpuSeat).options(num_cpus=0, num_gpus=1, scheduling_strategy=here).remote()
        self.pg = placement_group([bundle] * (world - 1), strategy="PACK", name=f"nanoforge-{run_dir.name}")
        try:
            ray.get(self.pg.ready(), timeout=PLACE_TIMEOUT_S)
            self.seat_gpus = ray.get(self.seat.gpus.remote(), timeout=PLACE_TIMEOUT_S) if self.seat else []
            for rank in range(1, world):
                place = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank - 1)
                self.actors.append(ray.remote(_RankActor).options(
                    num_cpus=1, num_gpus=1 if self.cuda else 0, scheduling_strategy=place, runtime_env=env,
                    name=f"nanoforge-{run_dir.name}-rank{rank}").remote())
            self.where = ray.get([a.where.remote() for a in self.actors], timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise NanoForgeError(f"Ray could not start {world - 1} worker ranks of {bundle}"
                                 f"{' plus a GPU for rank 0 on this node' if self.cuda else ''} within "
                                 f"{PLACE_TIMEOUT_S:g} s (NANOFORGE_RAY_PLACE_TIMEOUT); the cluster has "
                                 f"{ray.cluster_resources()}") from None
        ip = ray.util.get_node_ip_address()
        # the store listens on every interface; workers on other nodes reach it at this node's address
        self.store_host = "127.0.0.1" if all(w["ip"] == ip for w in self.where) else ip

    def device(self, rank: int, device: str) -> str:
        return "cuda:0" if self.cuda else device  # Ray set CUDA_VISIBLE_DEVICES to the actor's GPU

    def driver_device(self, device: str) -> str:
        """Rank 0's device: the GPU Ray reserved for it, as this process numbers its visible GPUs."""
        if not self.cuda:
            return device
        gpu, visible = self.seat_gpus[0], os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [g.strip() for g in visible.split(",")] if visible is not None else None
        if ids is not None and gpu not in ids:
            raise NanoForgeError(f"Ray reserved GPU {gpu} of this node for rank 0, but this process sees only "
                                 f"CUDA_VISIBLE_DEVICES={visible}")
        return f"cuda:{ids.index(gpu) if ids is not None else int(gpu)}"

    def start(self, rank: int, argv: list[str]) -> None:
        files = {str(p.relative_to(self.run_dir)): p.read_bytes() for p in sorted(self.run_dir.rglob("*"))
                 if p.is_file() and p.suffix != ".log"}
        self.refs.append(self.actors[rank - 1].serve.remote(files, argv, str(self.run_dir)))

    def any_dead(self) -> bool:
        return bool(self.refs) and bool(self.ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[0])

    def reports(self) -> list[str]:
        ready = set(self.ray.wait(self.refs, num_returns=len(self.refs), timeout=0)[0]) if self.refs else set()
        out = []
        for rank, (ref, w) in enumerate(zip(self.refs, self.where), 1):
            if ref not in ready:
                continue
            who = f"worker rank {rank} (actor {w['actor'][:12]}, pid {w['pid']} on {w['ip']})"
            try:
                code, last = self.ray.get(ref, timeout=5)
                out.append(f"{who} exited with status {code}{f': {last}' if last else ''}")
            except self.ray.exceptions.RayError as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("\t")]
                out.append(f"{who} died: {lines[-1] if lines else type(e).__name__}")
        return out

    def stop(self, wait_s: float) -> None:
        """Wait up to wait_s for the ranks to leave (they were sent the stop header), then kill the
        actors, free their placement group and leave the Ray session if this launcher joined it."""
        ray = self.ray
        if not ray.is_initialized():  # shut down already (at exit): the actors went with the job
            return
        if self.refs and wait_s > 0:
            ray.wait(self.refs, num_returns=len(self.refs), timeout=wait_s)
        for a in [*self.actors, self.seat]:
            if a is not None:
                ray.kill(a)
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
        if self.own_session:
            ray.shutdown()

    def describe(self) -> str:
        return "Ray actors " + ", ".join(f"{w['actor'][:12]} (pid {w['pid']} on {w['ip']})" for w in self.where)


def _connect(ray, address: str | None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS, or the one running on this node); start a
    local one when there is none and no address was given."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as e:
            raise NanoForgeError(f"cannot reach the Ray cluster at {address}: {e}") from None
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        log.warning("no running Ray cluster found (ray.init(address='auto')); starting a local one on this node")
        ray.init(include_dashboard=False)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, 2) - n, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return ""

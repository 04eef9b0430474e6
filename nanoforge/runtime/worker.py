"""One worker rank of a sharded plan, started by DistributedRunner's launcher with everything on
its command line: `python -m nanoforge.runtime.worker PLAN_DIR CHECKPOINT --rank R --world N
--host H --port P --config JSON` (a subprocess; JSON is its RunnerConfig), or `main(argv)` in a Ray actor. It loads its slices, joins
the other ranks and runs the steps the driver broadcasts until the stop header. A subprocess
(`--driver-pid`) exits by itself when the driver goes away (its stdin pipe closes, or its parent
changes), so a killed driver leaves no worker behind; Ray kills the actors of a dead driver."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable


def _watch_driver(driver_pid: int, run_dir: Path) -> None:
    def leave(why: str) -> None:
        print(f"worker {os.getpid()}: {why}; exiting", file=sys.stderr, flush=True)
        if run_dir.name.startswith("nanoforge-ranks-"):  # the driver's temp dir (plan copy, logs): nobody left to
            shutil.rmtree(run_dir, ignore_errors=True)   # read it if the driver died without cleaning up
        os._exit(1)

    def stdin_closed() -> None:
        try:
            while os.read(0, 4096):  # the raw fd: a buffered reader's lock would stall interpreter shutdown
                pass
        except OSError:
            pass
        leave("the driver closed its pipe")

    def parent_changed() -> None:
        while os.getppid() == driver_pid:
            time.sleep(0.5)
        leave(f"the driver (pid {driver_pid}) is gone")

    for fn in (stdin_closed, parent_changed):
        threading.Thread(target=fn, name=fn.__name__, daemon=True).start()


def _open_source(arg: str, device: str):
    """The checkpoint directory, or `random:SPEC.json` (random weights of a config, made on the
    rank's device from the same seed as the driver's)."""
    from ..models.checkpoint import open_checkpoint

    if not arg.startswith("random:"):
        return open_checkpoint(arg)
    from ..models.random_checkpoint import RandomCheckpoint

    spec = json.loads(Path(arg[len("random:"):]).read_text())
    return RandomCheckpoint(spec["config"], spec["name"], spec["dtype"], spec["seed"],
                            device=device if spec["on_cuda"] else "cpu")


def main(argv: list[str] | None = None, errors: list[str] | None = None,
         loaded: Callable[[], None] | None = None) -> int:
    """Serve the steps until the stop header: 0, or 1 after printing the error (its one-line
    summary last, also appended to `errors`). `loaded()` is called once the plan and the
    checkpoint spec have been read (the files are not needed after that)."""
    p = argparse.ArgumentParser(prog="python -m nanoforge.runtime.worker")
    p.add_argument("plan")
    p.add_argument("checkpoint", help="a checkpoint directory, or random:SPEC.json")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="the driver's TCPStore address (default %(default)s)")
    p.add_argument("--port", type=int, required=True, help="the driver's TCPStore port")
    p.add_argument("--config", required=True, help="this rank's RunnerConfig as JSON (device, num_blocks, ...)")
    p.add_argument("--driver-pid", type=int, help="a subprocess of this driver: leave when it goes away "
                   "(or closes stdin)")
    a = p.parse_args(argv)
    if a.driver_pid is not None:
        _watch_driver(a.driver_pid, Path(a.plan).resolve().parent)
    try:
        import datetime

        import torch
        import torch.distributed as dist

        from ..plan import read_plan
        from .model_runner import RunnerConfig
        from .rank_runner import STEP_TIMEOUT, RankRunner

        cfg = RunnerConfig.from_json(json.loads(a.config))
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(cfg.device))
        plan, ckpt = read_plan(a.plan), _open_source(a.checkpoint, cfg.device)
        if loaded is not None:
            loaded()
        store = dist.TCPStore(a.host, a.port, a.world, is_master=False,
                              timeout=max(STEP_TIMEOUT, datetime.timedelta(seconds=60)))
        runner = RankRunner(plan, ckpt, cfg, a.rank, store)
        runner.serve()
        runner.leave()
        return 0
    except BaseException as e:  # noqa: BLE001 - the driver reads the last line of this log
        traceback.print_exc()
        line = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        print(line, file=sys.stderr, flush=True)
        if errors is not None:
            errors.append(line)
        return 1


if __name__ == "__main__":
    sys.exit(main())

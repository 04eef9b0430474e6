"""A private CUDA MPS daemon for PD on one GPU (`bench pd --mps-split P`).

Without MPS, two engine processes on one GPU are time-sliced: while the prefill engine has work
queued, the decode engine's kernels wait for its time slice, so decode steps stretch to the slice
length and PD's TPOT is no better than co-located's. Under MPS both processes' kernels run at once,
and CUDA_MPS_ACTIVE_THREAD_PERCENTAGE caps the SMs each may use: the prefill engine gets P% of the
SMs and the decode engine the rest, so decode steps never queue behind a prefill chunk.

The daemon is this run's own (its pipe and log directories are a temporary folder, passed to the
engines through CUDA_MPS_PIPE_DIRECTORY), so it neither needs nor touches a system-wide one, and it
is told to quit when the run ends. It changes no setting of the card (compute mode stays as found).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import Iterator

from ..errors import NanoForgeError

CONTROL = "nvidia-cuda-mps-control"


def check_split(percent: int | None, device: str) -> None:
    """The flag's one-line errors, before anything starts."""
    if percent is None:
        return
    if device != "cuda":
        raise NanoForgeError(f"--mps-split {percent}: MPS shares a GPU; it needs --device cuda")
    if not 1 <= percent <= 99:
        raise NanoForgeError(f"--mps-split must be the prefill engine's percent of the SMs, 1..99; got {percent}")


@contextlib.contextmanager
def mps_daemon() -> Iterator[dict[str, str]]:
    """Start a private MPS control daemon; yield the environment its clients need; quit it on exit."""
    exe = shutil.which(CONTROL)
    if exe is None:
        raise NanoForgeError(f"--mps-split: {CONTROL} is not on PATH (it ships with the NVIDIA driver utilities)")
    folder = tempfile.mkdtemp(prefix="nanoforge-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}
    for d in env.values():
        os.makedirs(d)
    full = {**os.environ, **env}
    started = subprocess.run([exe, "-d"], env=full, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise NanoForgeError(f"--mps-split: {CONTROL} -d failed ({(started.stderr or started.stdout).strip()})")
    try:
        yield env
    finally:
        subprocess.run([exe], input="quit\n", env=full, capture_output=True, text=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def client_env(daemon_env: dict[str, str], percent: int) -> dict[str, str]:
    """An MPS client's environment: the daemon's pipe, and its share of the SMs."""
    return {**daemon_env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percent)}

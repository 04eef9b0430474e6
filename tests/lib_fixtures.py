"""Shared helpers of the library-provider tests (tests/test_lib_*.py): not a test module.

Targets and the gpu mark; `_fake` (a stand-in module with a spec, so find_spec sees it); the fixtures
`_fresh_probe_cache` (autouse where imported: each test sees fresh probes) and `isolated` (adapters
imported against fakes do not leak into other tests); random tensors, tolerances and paged KV caches;
on the GPU, `_adapter` (skips without the GPU, arch or library) and CUDA-graph capture / replay.
Test modules import what they use by name (fixtures included: pytest finds them in the module)."""
from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import pytest
import torch

from nanoforge.kernels import libs
from nanoforge.facts import Target

SM90 = Target("cuda", capability="sm90")
CPU = Target("cpu")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # Triton (moe_align) runs interpreted on CPU
gpu = pytest.mark.gpu


def _fake(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    return m


@pytest.fixture(autouse=True)
def _fresh_probe_cache():
    libs.import_error.cache_clear()
    yield
    libs.import_error.cache_clear()


@pytest.fixture
def isolated(monkeypatch):
    """Adapters imported here (against fakes) must not leak into other tests."""
    names = [lib.adapter.rsplit(".", 1)[1] for lib in libs.LIBS.values()]
    for lib, name in zip(libs.LIBS.values(), names):
        monkeypatch.delitem(sys.modules, lib.adapter, raising=False)
        monkeypatch.delattr(libs, name, raising=False)
    yield monkeypatch
    for lib, name in zip(libs.LIBS.values(), names):  # monkeypatch then restores the originals
        sys.modules.pop(lib.adapter, None)
        libs.__dict__.pop(name, None)



def _rand(*shape, dtype=torch.bfloat16, scale=1.0, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _close(out, ref, tol=2e-2):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if not ref.numel():
        return
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * max(1.0, ref.float().abs().max().item()), err


def _paged(ctx_lens, kv_heads, head_dim, block_size, seed, dtype=torch.bfloat16, device="cuda"):
    """Random K/V caches, and a block table of shuffled pages padded with page 0."""
    pages = [math.ceil(c / block_size) for c in ctx_lens]
    nb = sum(pages) + 3
    perm = (torch.randperm(nb - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    table = torch.zeros(len(ctx_lens), max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        table[b, :n], perm = torch.tensor(perm[:n], dtype=torch.int32), perm[n:]
    k, v = (_rand(nb, block_size, kv_heads, head_dim, dtype=dtype, seed=seed + i, device=device) for i in (0, 1))
    return k, v, table.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device)


def _slots(table, b, ctx_len, bs):
    pos = torch.arange(ctx_len, device=table.device)
    return table[b, pos // bs].long() * bs + pos % bs


def _adapter(name: str, archs: tuple[int, ...] | None = None):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    if archs is not None and major * 10 + minor not in archs:
        pytest.skip(f"needs sm{'/sm'.join(map(str, archs))}")
    return pytest.importorskip(f"nanoforge.kernels.libs.{name}", exc_type=ImportError)


def _capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # JIT compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _replays_like_eager(fn, x):
    """Capture fn (reading x), refill x, replay: bit-equal to an eager call (no host state baked in)."""
    graph, out = _capture(fn)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())


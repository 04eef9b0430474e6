"""Skinny decode GEMM (x [M, K] @ W[N, K]^T, M <= 16) against torch.

CPU CI runs the unmarked tests in Triton's interpreter (fp32, tiny shapes with N and K off the
block sizes); the `gpu` tests take bf16 at the Qwen3-8B / 0.6B projection shapes, and a CUDA graph.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from nanoforge.kernels.triton import gemv as G  # noqa: E402

ROOT = str(Path(__file__).resolve().parent.parent)  # bench/ is not installed: import it from the repo root
if ROOT not in sys.path:
    sys.path.append(ROOT)
from bench.kernels import gemv as BG  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# the interpreter's run-time loop bound (K) goes through int(ndarray of shape [1]); numpy < 2.4 warns
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def check(out, ref, rtol, atol):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


# ---- interpreter-sized (CPU CI), fp32 --------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 3, 16])  # the bodies: GEMV, M = 2 broadcast, tl.dot (3 and 16)
@pytest.mark.parametrize("n,k", [(50, 100), (16, 64), (7, 33)])
def test_skinny_fp32(m, n, k):
    x, w = rnd(m, k), rnd(n, k)
    check(G.skinny_matmul(x, w), x @ w.T, 1e-5, 1e-5)


def test_out_and_strided_views():
    x_big, w = rnd(3, 2 * 70), rnd(45, 70)
    x = x_big[:, :70]  # row stride 140
    out_big = torch.full((3, 64), float("nan"), device=DEV)
    out = out_big[:, 5:50]  # row stride 64
    res = G.skinny_matmul(x, w, out=out)
    assert res.data_ptr() == out.data_ptr()
    check(out, x @ w.T, 1e-5, 1e-5)
    assert torch.isnan(out_big[:, :5]).all() and torch.isnan(out_big[:, 50:]).all()  # nothing outside written


def test_is_one_launch(monkeypatch):
    launches = []
    kernel = G._skinny_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(G, "_skinny_kernel", Counting())
    x, w = rnd(5, 70), rnd(40, 70)
    check(G.skinny_matmul(x, w), x @ w.T, 1e-5, 1e-5)
    assert len(launches) == 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="MAX_M"):
        G.skinny_matmul(rnd(G.MAX_M + 1, 8), rnd(4, 8))
    with pytest.raises(ValueError, match="dtype"):
        G.skinny_matmul(rnd(1, 8), rnd(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        G.skinny_matmul(rnd(8, 2).T, rnd(4, 8))
    assert G.skinny_matmul(rnd(0, 8), rnd(4, 8)).shape == (0, 4)


# ---- GPU: bf16 at real shapes, CUDA graphs ---------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def check_bf16(out, x, w):
    ref = x.float() @ w.float().T
    assert out.dtype == x.dtype
    # bf16 output rounding (2^-8 relative) plus fp32 order-of-summation noise ~ sqrt(K) * |x||w| eps
    check(out, ref, 2e-2, 1e-3 * math.sqrt(x.shape[1]))


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 7, 16])
@pytest.mark.parametrize("name", list(BG.SHAPES))
def test_gpu_skinny_bf16(m, name):
    n, k = BG.SHAPES[name]
    x, w = rnd(m, k, dtype=torch.bfloat16), rnd(n, k, dtype=torch.bfloat16)
    check_bf16(G.skinny_matmul(x, w), x, w)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gpu_cuda_graph_replay(m):
    bf = torch.bfloat16
    x, w = rnd(m, 4096, dtype=bf), rnd(6144, 4096, dtype=bf)
    out = torch.empty(m, 6144, dtype=bf, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        G.skinny_matmul(x, w, out=out)  # eager warm-up compiles the kernel
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.skinny_matmul(x, w)
    for _ in range(2):  # new contents in the captured buffers, then replay
        x.copy_(rnd(m, 4096, dtype=bf))
        w.copy_(rnd(6144, 4096, dtype=bf))
        graph.replay()
        torch.cuda.synchronize()
        check_bf16(y, x, w)


@gpu
@needs_cuda
def test_gpu_bench_keys():
    r = BG.bench_skinny(1, 1024, 2048, rep=5)
    for key in ("ms", "TB/s", "torch_ms", "torch_TB/s", "copy_TB/s", "device", "config"):
        assert key in r
    assert r["ms"] > 0 and r["torch_ms"] > 0 and 0 < r["TB/s"] < 20


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 7])
def test_gpu_pdl_chain_in_graph(m, monkeypatch):
    """PDL (pdl.ENABLED): the second call starts while the first runs and must still read the first's output."""
    from nanoforge.kernels.triton import pdl

    monkeypatch.setattr(pdl, "ENABLED", True)
    bf, k = torch.bfloat16, 4096
    x = rnd(m, k, dtype=bf)
    w1, w2 = (rnd(k, k) / math.sqrt(k)).to(bf), (rnd(k, k) / math.sqrt(k)).to(bf)
    G.skinny_matmul(G.skinny_matmul(x, w1), w2)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1 = G.skinny_matmul(x, w1)
        y2 = G.skinny_matmul(y1, w2)
    for _ in range(3):
        x.copy_(rnd(m, k, dtype=bf))
        graph.replay()
        torch.cuda.synchronize()
        check_bf16(y1, x, w1)
        check_bf16(y2, y1, w2)

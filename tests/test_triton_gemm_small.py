"""Small-batch decode GEMM (x [M, K] @ W[N, K]^T, 16 < M <= 256) against torch.

CPU CI runs the unmarked tests in Triton's interpreter (fp32 and fp16, small shapes with M off powers
of two, N off BLOCK_N, K off BLOCK_K, split-K on and off through _CFG_OVERRIDE); the `gpu` tests take
bf16 at the Qwen3-0.6B / 8B projection shapes, and a CUDA graph.
"""
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from nanoforge.kernels.triton import gemm_small as G  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# the interpreter's run-time loop bounds go through int(ndarray of shape [1]); numpy < 2.4 warns
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, dtype=torch.float32).to(dtype)


def check(out, ref, rtol, atol):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


@pytest.fixture
def override(monkeypatch):
    def set_cfg(*cfg):
        monkeypatch.setattr(G, "_CFG_OVERRIDE", G.Cfg(*cfg))
    return set_cfg


# ---- interpreter-sized (CPU CI) --------------------------------------------------------------------

# (M, N, K): M off powers of two (17, 40: one M tile; 70: three 32-row tiles), N off BLOCK_N, K off
# BLOCK_K (split 3 of 5 K blocks: 2 + 2 + 1, the last one partial)
SHAPES = [(17, 50, 100), (40, 64, 160), (70, 45, 64), (33, 16, 150)]


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp32(m, n, k, split, override):
    override(32, 32, 32, split, 4, 1)
    x, w = rnd(m, k), rnd(n, k)
    check(G.gemm_small(x, w), x @ w.T, 1e-5, 1e-4)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("m,n,k", [(17, 50, 100), (70, 45, 64)])
def test_fp16(m, n, k, split, override):
    override(0, 32, 32, split, 4, 1)  # block_m 0: the power of two covering M (32, 128)
    x, w = rnd(m, k, dtype=torch.float16), rnd(n, k, dtype=torch.float16)
    out = G.gemm_small(x, w)
    assert out.dtype == torch.float16
    # fp32 accumulation of exact fp16 products, one rounding to fp16 at the end (2^-11 relative)
    check(out, x.float() @ w.float().T, 2e-3, 2e-3)


def test_default_config():
    """No override: the interpreter's default tiles with the automatic split (4 'SMs' on CPU)."""
    m, n, k = 24, 40, 256
    plan = G._plan(m, n, k, sms=4)
    assert plan.block_m == 32 and plan.split_k > 1
    x, w = rnd(m, k), rnd(n, k)
    check(G.gemm_small(x, w), x @ w.T, 1e-5, 1e-4)


def test_plan_rules():
    saved, G._INTERPRET = G._INTERPRET, False  # the H100 table
    try:
        for m in (17, 32, 64, 100, 128, 200, 256):
            for n, k in ((4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (6144, 4096), (24576, 4096)):
                c = G._plan(m, n, k, sms=132)
                assert c.block_m >= 16 and c.block_m & (c.block_m - 1) == 0
                assert c.block_m >= min(triton_next_pow2(m), G.MAX_AUTO_BLOCK_M)
                kb = -(-k // c.block_k)
                assert 1 <= c.split_k <= kb and (c.split_k - 1) * -(-kb // c.split_k) < kb  # no empty split
                assert 8 * c.split_k * m * n <= 4 * n * k or c.split_k == 1
        assert G._plan(32, 1024, 2048, sms=132).split_k > 1  # 16 N tiles: split
        assert G._plan(32, 24576, 4096, sms=132).split_k == 1  # 384 tiles: no split
    finally:
        G._INTERPRET = saved


def triton_next_pow2(v):
    return 1 << (v - 1).bit_length()


def test_out_and_strided_views(override):
    override(32, 32, 32, 2, 4, 1)
    x_big, w_big = rnd(20, 2 * 70), rnd(45, 80)
    x, w = x_big[:, :70], w_big[:, 5:75]  # row strides 140, 80
    out_big = torch.full((20, 64), float("nan"), device=DEV)
    out = out_big[:, 5:50]  # row stride 64
    res = G.gemm_small(x, w, out=out)
    assert res.data_ptr() == out.data_ptr()
    check(out, x @ w.T, 1e-5, 1e-4)
    assert torch.isnan(out_big[:, :5]).all() and torch.isnan(out_big[:, 50:]).all()  # nothing outside written


@pytest.mark.parametrize("split,launches", [(1, 1), (2, 2)])
def test_launch_count(split, launches, override, monkeypatch):
    override(32, 32, 32, split, 4, 1)
    seen = []
    for name in ("_gemm_kernel", "_reduce_kernel"):
        kernel = getattr(G, name)

        class Counting:
            def __getitem__(self, grid, kernel=kernel, name=name):
                seen.append((name, grid))
                return kernel[grid]

        monkeypatch.setattr(G, name, Counting())
    x, w = rnd(20, 96), rnd(40, 96)
    check(G.gemm_small(x, w), x @ w.T, 1e-5, 1e-4)
    assert len(seen) == launches
    assert seen[0] == ("_gemm_kernel", (2, split))


def test_bad_inputs():
    with pytest.raises(ValueError, match="dtype"):
        G.gemm_small(rnd(20, 8), rnd(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        G.gemm_small(rnd(8, 20).T, rnd(4, 8))
    with pytest.raises(ValueError, match="expects"):
        G.gemm_small(rnd(20, 8), rnd(4, 9))
    with pytest.raises(ValueError, match="out must be"):
        G.gemm_small(rnd(20, 8), rnd(4, 8), out=torch.empty(20, 5, device=DEV))
    assert G.gemm_small(rnd(0, 8), rnd(4, 8)).shape == (0, 4)
    assert (G.gemm_small(rnd(20, 0), rnd(4, 0)) == 0).all()


# ---- GPU: bf16 at real shapes, CUDA graphs ---------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
GPU_SHAPES = {"0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.down": (1024, 3072),
              "8b.o": (4096, 4096), "8b.gate_up": (24576, 4096)}


def check_bf16(out, x, w):
    assert out.dtype == x.dtype
    # bf16 output rounding (2^-8 relative) plus fp32 order-of-summation noise ~ sqrt(K) * |x||w| eps
    check(out, x.float() @ w.float().T, 2e-2, 1e-3 * math.sqrt(x.shape[1]))


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [17, 64, 100, 256])
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_bf16(m, name):
    n, k = GPU_SHAPES[name]
    x, w = rnd(m, k, dtype=torch.bfloat16), rnd(n, k, dtype=torch.bfloat16)
    check_bf16(G.gemm_small(x, w), x, w)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [40, 256])
def test_gpu_cuda_graph_replay(m):
    bf, n, k = torch.bfloat16, 1024, 2048  # 0.6B o_proj: split-K at every M
    x, w = rnd(m, k, dtype=bf), rnd(n, k, dtype=bf)
    G.gemm_small(x, w)  # eager warm-up compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = G.gemm_small(x, w)
    for _ in range(2):  # new contents in the captured buffers, then replay
        x.copy_(rnd(m, k, dtype=bf))
        w.copy_(rnd(n, k, dtype=bf))
        graph.replay()
        torch.cuda.synchronize()
        check_bf16(y, x, w)
        assert torch.equal(y, G.gemm_small(x, w))  # deterministic split-K: replay == eager, bit for bit

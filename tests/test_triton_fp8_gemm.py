"""Block-FP8 W8A8 GEMM (nanoforge/kernels/triton/fp8_gemm.py) against its torch references.

CPU (always): the torch references: per-token 1x128 activation quantization round-trips within
e4m3 precision, scale shapes for K not a multiple of 128, all-zero rows; W8A8 against the
weight-only reference F.linear(x, fp8.dequantize(w, s)) on shapes with partial edge blocks.
Interpreter (CPU CI under TRITON_INTERPRET=1, which tests/conftest.py sets; the compiled kernels on
a GPU): the Triton GEMM, split-K included, against block_fp8_linear_ref, and the quantizer's scales.
GPU (-m gpu): the quantizer bitwise (<= 1 e4m3 ulp), the GEMM at DeepSeek-V3's linear shapes for
M in (1, 7, 64, 300, 4096), bf16 and f32, and CUDA-graph capture + replay."""
from __future__ import annotations

import functools
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from nanoforge.kernels import fp8

DEV = "cuda" if torch.cuda.is_available() else "cpu"

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
# the interpreter turns run-time loop bounds into 1-element arrays; numpy 2.x warns on int() of them
interp_warnings = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _M():
    # imported lazily, after conftest set TRITON_INTERPRET (triton.jit reads it at decoration time)
    return importlib.import_module("nanoforge.kernels.triton.fp8_gemm")


def _randn(*shape, seed=0, device="cpu", dtype=torch.float32, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _weights(n, k, seed=1, device="cpu"):
    """fp8 weights and their 128x128 block scales, as a DeepSeek checkpoint ships them."""
    return fp8.quantize(_randn(n, k, seed=seed, device=device, scale=k ** -0.5), (128, 128))


def _rel(y, ref):
    y, ref = y.float(), ref.float()
    return ((y - ref).abs().max() / ref.abs().max()).item(), ((y - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------------
# CPU: torch references
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 300), (4, 1024), (2, 3, 7168), (5, 100)])
def test_quantize_ref_round_trip(shape):
    M = _M()
    x = _randn(*shape, seed=3) * 3
    x = torch.where(x == 0, torch.ones_like(x), x)  # never zeros: the relative bound below needs x != 0
    q, s = M.quantize_activations_ref(x)
    k = shape[-1]
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], -(-k // 128))
    scale = s.repeat_interleave(128, -1)[..., :k]
    xd = q.float() * scale
    # round to nearest e4m3: half an ulp is 2^-4 relative for normals, 2^-10 * scale for subnormals
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10)
    assert ((xd - x).abs() <= bound * (1 + 1e-6)).all()
    # each group's largest magnitude lands on +-448 (the scale is amax / 448, no clipping)
    assert (q.float().abs().amax(-1) == 448).all()
    assert ((xd - x).norm() / x.norm()).item() < 0.035  # ~2.6% rms
    # the scale is the group's amax / 448, the tail group's over its own columns only
    xg = F.pad(x, (0, s.shape[-1] * 128 - k)).unflatten(-1, (-1, 128))
    amax = xg.abs().amax(-1)
    assert torch.equal(s, amax / torch.full_like(amax, 448.0))


def test_quantize_ref_scale_shapes_and_dtypes():
    M = _M()
    for k, g in [(1, 1), (127, 1), (128, 1), (129, 2), (300, 3), (448, 4), (7168, 56)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            q, s = M.quantize_activations_ref(_randn(3, k, seed=k, dtype=dt))
            assert q.shape == (3, k) and s.shape == (3, g) and s.dtype == torch.float32
    q, s = M.quantize_activations_ref(torch.empty(0, 300))
    assert q.shape == (0, 300) and s.shape == (0, 3)


def test_quantize_ref_zero_rows_and_groups():
    M = _M()
    x = _randn(4, 300, seed=5)
    x[1] = 0  # a whole row
    x[2, 128:256] = 0  # one group of a row
    x[3, 256:] = 0  # the partial tail group
    q, s = M.quantize_activations_ref(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(q.float()).all()
    assert (q[1].float() == 0).all() and (q[2, 128:256].float() == 0).all() and (q[3, 256:].float() == 0).all()
    assert s[1].eq(M.SCALE_EPS / 448.0).all()
    y = M.block_fp8_linear_ref(x, *_weights(64, 300))
    assert torch.isfinite(y).all() and (y[1] == 0).all()


# measured 2.6% (Frobenius) and 2.4-3.0% (largest element / largest |y|): e4m3's rounding of x
W8A8_FRO_TOL, W8A8_MAX_TOL = 0.035, 0.06


@pytest.mark.parametrize("m,n,k", [(7, 200, 300), (5, 576, 448), (16, 130, 129), (1, 256, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_w8a8_close_to_weight_only(m, n, k, dtype):
    M = _M()
    x = _randn(m, k, seed=m + n + k, dtype=dtype)
    w, s = _weights(n, k)
    assert s.shape == (-(-n // 128), -(-k // 128))
    y = M.block_fp8_linear_ref(x, w, s, out_dtype=torch.float32)
    mx, fro = _rel(y, F.linear(x.float(), fp8.dequantize(w, s, (128, 128))))
    assert fro < W8A8_FRO_TOL and mx < W8A8_MAX_TOL, (fro, mx)
    # and it is W8A8 exactly: the weight-only reference on the dequantized quantized x (+ bias)
    bias = _randn(n, seed=9, dtype=dtype)
    y = M.block_fp8_linear_ref(x, w, s, bias, out_dtype=torch.float32)
    xq, xs = M.quantize_activations_ref(x)
    exact = F.linear(fp8.dequantize(xq, xs, (1, 128)), fp8.dequantize(w, s, (128, 128)), bias.float())
    torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)
    assert M.block_fp8_linear_ref(x, w, s).dtype == dtype


@interp_warnings
def test_cpu_block_fp8_linear():
    """On CPU tensors: the Triton GEMM under TRITON_INTERPRET=1, else the torch reference."""
    M = _M()
    x = _randn(3, 2, 300, seed=4)
    w, s = _weights(200, 300)
    y = M.block_fp8_linear(x, w, s)
    assert y.shape == (3, 2, 200) and y.dtype == x.dtype
    torch.testing.assert_close(y, M.block_fp8_linear_ref(x, w, s), rtol=1e-5, atol=1e-5)
    assert M.block_fp8_linear(x[:0], w, s).shape == (0, 2, 200)


# ---------------------------------------------------------------------------------------------------
# Triton kernels: interpreter on CPU, compiled on a GPU
# ---------------------------------------------------------------------------------------------------
def _splits(M, cfg, m, n, k):
    return M._split_k(cfg, m, n, k, 4)


@pytest.mark.parametrize("m,n,k,cfg", [
    (7, 200, 300, None),  # the decode bucket's table config: partial M, N and K blocks
    (7, 200, 300, (16, 64, 4, 1, 1, 3)),  # split-K over the 3 K blocks, the last one partial
    (1, 576, 448, (16, 32, 4, 1, 1, 2)),  # 2 splits of 2 K blocks; BLOCK_N 32
    (33, 130, 256, (32, 64, 4, 1, 2, None)),  # 2 row tiles, GROUP_M swizzle
    (70, 300, 384, (64, 128, 4, 1, 8, 2)),  # 2 row tiles x 3 column tiles, split-K
])
@pytest.mark.parametrize("bias", [False, True])
@needs_triton
@interp_warnings
def test_triton_gemm_against_reference(m, n, k, cfg, bias):
    M = _M()
    cfg = M.Cfg(*cfg) if cfg is not None else None
    x = _randn(m, k, seed=m * k, device=DEV)
    w, s = _weights(n, k, device=DEV)
    b = _randn(n, seed=2, device=DEV) if bias else None
    y = M.block_fp8_linear(x, w, s, b, config=cfg)
    ref = M.block_fp8_linear_ref(x, w, s, b)
    assert y.shape == (m, n) and y.dtype == x.dtype
    mx, fro = _rel(y, ref)
    assert mx < 1e-3 and fro < 1e-3, (mx, fro)
    if cfg is not None and cfg.split_k:
        assert _splits(M, cfg, m, n, k) == cfg.split_k


@needs_triton
@interp_warnings
def test_triton_gemm_edge_cases():
    M = _M()
    w, s = _weights(200, 300, device=DEV)
    x = _randn(5, 300, seed=1, device=DEV)
    assert M.block_fp8_linear(x[:0], w, s).shape == (0, 200)  # M = 0: no launch
    x3 = _randn(2, 3, 300, seed=2, device=DEV)
    y3 = M.block_fp8_linear(x3, w, s, out_dtype=torch.float32)
    assert y3.shape == (2, 3, 200) and y3.dtype == torch.float32
    assert _rel(y3, M.block_fp8_linear_ref(x3, w, s, out_dtype=torch.float32))[0] < 1e-3
    with pytest.raises(ValueError, match="scales"):
        M.fp8_gemm(*M.quantize_activations_ref(x), w, s[:, :2])
    with pytest.raises(ValueError, match="BLOCK_N"):
        M.block_fp8_linear(x, w, s, config=M.Cfg(16, 48, 4, 1))


@needs_triton
@interp_warnings
@pytest.mark.parametrize("shape", [(7, 300), (3, 1100), (2, 2, 128)])
def test_triton_quantize_indexing(shape):
    """Scales and values bitwise (the kernel rounds to the e4m3 grid itself, so neither a cast through
    f16 on the GPU nor the interpreter's cast, which loses the carry of a round-up to a power of two,
    can differ from torch's), negative zeros, subnormals and ties included."""
    M = _M()
    x = _randn(*shape, seed=11, device=DEV) * 3
    x[0, ..., :128] = 0
    x[-1, ..., :4] = torch.tensor([-1e-9, 7.75, -7.75, 3.0 * 2 ** -10], device=DEV)  # -0, carries, a subnormal
    q, s = M._quantize_triton(x)
    qr, sr = M.quantize_activations_ref(x)
    assert q.shape == qr.shape and s.shape == sr.shape
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
DSV3 = {  # DeepSeek-V3's linears (N, K): MLA projections, and gate / up / down of the shared expert
          # (the routed experts' shapes too); "odd" has partial blocks in N and K
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o_proj": (7168, 16384),
    "gate_up": (2048, 7168), "down": (7168, 2048), "odd": (200, 300),
}


@functools.cache
def _gpu_weights(n, k):
    """(w fp8, scale, w dequantized f32) on the GPU, once per shape."""
    w, s = _weights(n, k, seed=n + k, device="cuda")
    return w, s, fp8.dequantize(w, s, (128, 128), torch.float32)


def _gpu_ref(x, n, k):
    """block_fp8_linear_ref in f32 with the cached dequantized weight."""
    M = _M()
    _, _, wd = _gpu_weights(n, k)
    xq, xs = M.quantize_activations_ref(x)
    return fp8.dequantize(xq, xs, (1, 128), torch.float32) @ wd.T


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,k", [(1, 7168), (7, 300), (300, 1536), (4096, 7168), (64, 16384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_gpu_quantize_matches_reference(m, k, dtype):
    M = _M()
    x = _randn(m, k, seed=m + k, device="cuda", dtype=dtype) * 4
    x[0, :128] = 0
    if m > 1:
        x[1] = 0
        x[-1, -1] = 1e4 if dtype != torch.float16 else 6e4  # one outlier: the rest of its group near 0
    q, s = M.quantize_activations(x)
    qr, sr = M.quantize_activations_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k) and s.shape == (m, -(-k // 128))
    assert torch.equal(s, sr)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", list(DSV3), ids=list(DSV3))
@pytest.mark.parametrize("m", [1, 7, 64, 300, 4096])
def test_gpu_block_fp8_linear(m, shape, dtype):
    M = _M()
    n, k = DSV3[shape]
    w, s, _ = _gpu_weights(n, k)
    x = _randn(m, k, seed=m + n, device="cuda", dtype=dtype)
    y = M.block_fp8_linear(x, w, s)
    assert y.shape == (m, n) and y.dtype == dtype
    mx, fro = _rel(y, _gpu_ref(x, n, k))
    # f32: summation order and Hopper's fp8 MMA accumulation; bf16: + the output's rounding (2^-9)
    tol = 1e-3 if dtype == torch.float32 else 8e-3
    assert mx < tol and fro < tol, (mx, fro)


@pytest.mark.gpu
@needs_cuda
def test_gpu_bias_f16_and_empty():
    M = _M()
    n, k = DSV3["kv_a"]
    w, s, wd = _gpu_weights(n, k)
    x = _randn(2, 5, k, seed=3, device="cuda", dtype=torch.float16)
    b = _randn(n, seed=4, device="cuda", dtype=torch.float16)
    y = M.block_fp8_linear(x, w, s, b)
    assert y.shape == (2, 5, n) and y.dtype == torch.float16
    ref = _gpu_ref(x.view(10, k), n, k) + b.float()
    assert _rel(y.view(10, n), ref)[0] < 8e-3
    assert M.block_fp8_linear(x[:, :0], w, s, b).shape == (2, 0, n)
    # and W8A8 stays within the stated distance of the weight-only reference on the GPU too
    mx, fro = _rel(y.view(10, n), F.linear(x.view(10, k).float(), wd, b.float()))
    assert fro < W8A8_FRO_TOL and mx < W8A8_MAX_TOL


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,shape", [(7, "kv_a"), (64, "q_a"), (300, "down")])  # split-K, split-K, one pass
def test_gpu_cuda_graph_replay(m, shape):
    M = _M()
    n, k = DSV3[shape]
    w, s, _ = _gpu_weights(n, k)
    b = _randn(n, seed=5, device="cuda", dtype=torch.bfloat16)
    x = _randn(m, k, seed=6, device="cuda", dtype=torch.bfloat16)
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        M.block_fp8_linear(x, w, s, b)  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = M.block_fp8_linear(x, w, s, b)
    for seed in (7, 8):
        x.copy_(_randn(m, k, seed=seed, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        eager = M.block_fp8_linear(x, w, s, b)
        assert torch.equal(out, eager)  # the same kernels, a fixed summation order
        assert _rel(out, _gpu_ref(x, n, k) + b.float())[0] < 8e-3

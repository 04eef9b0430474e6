"""Small-batch block-FP8 fused experts (nanoforge/kernels/triton/moe_fp8.py) against torch's W8A8 math.

The reference (`_ref`) is written from the definition in plain torch: x quantized per token and 128
columns (fp8.quantize_activations), weights dequantized per 128x128 block (fp8.dequantize), f32
products; g and u rounded to x.dtype, silu(g) * u in x.dtype, quantized again before the down
product, y rounded to x.dtype, and the routing-weighted sum over a token's slots rounded once. Block
scales vary by 2^+-3 across blocks, so a tile reading another block's scale is far off.

CPU (TRITON_INTERPRET=1, tests/conftest.py): the kernels interpreted in f32 and f16 (the interpreter's
f32 -> bf16 cast truncates, so bf16 is checked on the GPU), partial 128 blocks, an expert with more pairs
than a block, another EP rank's slots, renormalization and scaling, w_gate / w_up as views of one
[E, 2I, H] tensor, other tile configs; and the input checks. GPU (-m gpu, sm89+): bf16 / f32 at small and
DeepSeek-V3 sizes (H 7168, I 2048, top-8, 32 experts), CUDA-graph replay bit-equal to eager, the
deep_gemm provider's dispatch, and the benchmark's smoke run."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from nanoforge.kernels import fp8, torch_ref

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs CUDA or TRITON_INTERPRET=1")
interp_warnings = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _M():
    # imported lazily, after conftest set TRITON_INTERPRET (triton.jit reads it at decoration time)
    return importlib.import_module("nanoforge.kernels.triton.moe_fp8")


def _fp8_weights(shape, fan, gen):
    """e4m3 weights [E, rows, cols] with 128x128 block scales that differ by up to 2^3 either way."""
    w = torch.randn(*shape, generator=gen, device=gen.device) * fan ** -0.5
    nb = (-(-shape[1] // 128), -(-shape[2] // 128))
    spread = 2.0 ** (torch.rand(shape[0], *nb, generator=gen, device=gen.device) * 6 - 3)
    w *= spread.repeat_interleave(128, 1)[:, :shape[1]].repeat_interleave(128, 2)[:, :, :shape[2]]
    return fp8.quantize(w, (128, 128))


def _problem(T, E, H, I, top_k, dtype, seed=0, device=DEV):
    """x ~ N(0, 1), experts as a DeepSeek checkpoint ships them (made on `device`: DeepSeek-sized ones are
    large), random routing weights, distinct ids per row."""
    g = torch.Generator().manual_seed(seed)
    p = {"x": torch.randn(T, H, generator=g).to(device, dtype)}
    gd = torch.Generator(device=device).manual_seed(seed)
    for k, shape, fan in (("w_gate", (E, I, H), H), ("w_up", (E, I, H), H), ("w_down", (E, H, I), I)):
        p[k], p[f"{k}_s"] = _fp8_weights(shape, fan, gd)
    p["weights"] = (torch.rand(T, top_k, generator=g) + 0.1).to(device)
    p["ids"] = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]).to(device)
    return p


def _scales(p):
    return p["w_gate_s"], p["w_up_s"], p["w_down_s"]


def _ref(p, num_experts, renormalize=False, scale=1.0):
    x, ids = p["x"], p["ids"]
    dt = x.dtype
    w = p["weights"].float()
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = (w * scale).to(dt).float()
    xd = fp8.dequantize(*fp8.quantize_activations(x), (1, 128))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if e >= num_experts:  # another EP rank's expert
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)

        def deq(k):
            return fp8.dequantize(p[k][e], p[f"{k}_s"][e], (128, 128))

        g, u = (xd[tok] @ deq("w_gate").T).to(dt), (xd[tok] @ deq("w_up").T).to(dt)
        hd = fp8.dequantize(*fp8.quantize_activations(F.silu(g) * u), (1, 128))
        out.index_add_(0, tok, (hd @ deq("w_down").T).to(dt).float() * w[tok, slot, None])
    return out.to(dt)


def _run(p, num_experts, **kw):
    return _M().fused_experts_fp8(p["x"], p["weights"], p["ids"], p["w_gate"], p["w_up"], p["w_down"], _scales(p),
                                  num_experts=num_experts, **kw)


def _rel(out, ref):
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item(), ((out - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# CPU: the kernels under the interpreter (compiled on a GPU)
# ---------------------------------------------------------------------------------------------
@needs_triton
@interp_warnings
@pytest.mark.parametrize("T,E,H,I,top_k,dtype,kw", [
    (3, 4, 256, 128, 2, torch.float16, {}),
    (5, 6, 300, 200, 3, torch.float32, dict(renormalize=True, scale=2.5)),  # partial blocks in H and I
    (1, 8, 384, 256, 4, torch.float32, dict(config=(32, 32, 128, 4, 2))),  # other tiles
    (2, 5, 130, 129, 2, torch.float16, dict(renormalize=True, config=(16, 128, 32, 4, 3))),
])
def test_small_fp8_experts_match_w8a8_reference(T, E, H, I, top_k, dtype, kw):
    M = _M()
    p = _problem(T, E, H, I, top_k, dtype, seed=T + E)
    if "config" in kw:
        kw = {**kw, "config": M.SmallCfg(*kw["config"])}
    ref = _ref(p, E, kw.get("renormalize", False), kw.get("scale", 1.0))
    out = _run(p, E, **kw)
    assert out.shape == (T, H) and out.dtype == dtype and (ref.abs().amax(1) > 0).all()
    fro, mx = _rel(out, ref)
    assert fro < 1e-4 and mx < 1e-4, (fro, mx)
    if dtype == torch.float32:  # and the project's reference op (torch_ref's W8A8 expert loop) agrees
        w = p["weights"] / p["weights"].sum(-1, keepdim=True) if kw.get("renormalize") else p["weights"]
        wide = torch_ref.expert_weights(p["x"], p["w_gate"], p["w_up"], p["w_down"], {
            "fp8_block": [128, 128], **{f"{k}_scale_inv": p[f"{k}_s"] for k in ("w_gate", "w_up", "w_down")}})
        other = torch_ref._experts(p["x"], w * kw.get("scale", 1.0), p["ids"], *wide, act_quant=128)
        assert max(_rel(out, other)) < 1e-4


@needs_triton
@interp_warnings
def test_small_fp8_experts_blocks_ep_slots_and_fused_gate_up():
    """Expert 0 gets 20 pairs (two 16-row blocks); slots naming expert E (another EP rank's) add nothing,
    a row with only such slots comes out zero; gate and up as views of one [E, 2I, H] tensor, and x with
    a row stride, give the same result bit for bit."""
    M = _M()
    T, E, H, I = 20, 3, 256, 256
    p = _problem(T, E, H, I, 2, torch.float32, seed=3)
    p["ids"] = torch.stack([torch.zeros(T, dtype=torch.long), 1 + torch.arange(T) % 2], 1).to(DEV)
    p["ids"][4, 1] = E
    p["ids"][7] = E
    out = _run(p, E)
    ref = _ref(p, E)
    assert torch.equal(out[7], torch.zeros_like(out[7])) and ref[4].abs().max() > 0
    assert max(_rel(out, ref)) < 1e-4
    w13 = torch.cat([p["w_gate"].view(torch.uint8), p["w_up"].view(torch.uint8)], 1).view(torch.float8_e4m3fn)
    s13 = torch.cat([p["w_gate_s"], p["w_up_s"]], 1)
    fused = M.fused_experts_fp8(p["x"], p["weights"], p["ids"], w13[:, :I], w13[:, I:], p["w_down"],
                                (s13[:, :2], s13[:, 2:], p["w_down_s"]), num_experts=E)
    assert torch.equal(fused, out)
    strided = torch.cat([p["x"], p["x"]], 1)[:, H:]  # x with row stride 2H
    assert torch.equal(_run({**p, "x": strided}, E), out)
    assert M.fused_experts_fp8(p["x"][:0], p["weights"][:0], p["ids"][:0], p["w_gate"], p["w_up"], p["w_down"],
                               _scales(p), num_experts=E).shape == (0, H)


def test_small_fp8_experts_input_errors():
    M = _M()
    p = _problem(2, 4, 256, 128, 2, torch.float32)
    with pytest.raises(ValueError, match="scales must be"):
        M.fused_experts_fp8(p["x"], p["weights"], p["ids"], p["w_gate"], p["w_up"], p["w_down"],
                            (p["w_gate_s"], p["w_up_s"], p["w_down_s"][:, :1]), num_experts=4)
    with pytest.raises(ValueError, match="w_down"):
        M.fused_experts_fp8(p["x"], p["weights"], p["ids"], p["w_gate"], p["w_up"], p["w_gate"], _scales(p),
                            num_experts=4)
    with pytest.raises(ValueError, match="x \\[T, 256\\]"):
        M.fused_experts_fp8(p["x"][:, :128], p["weights"], p["ids"], p["w_gate"], p["w_up"], p["w_down"],
                            _scales(p), num_experts=4)
    with pytest.raises(ValueError, match="same strides"):
        up = torch.empty(4, 256, 128, dtype=p["w_up"].dtype, device=DEV).transpose(1, 2)
        M.fused_experts_fp8(p["x"], p["weights"], p["ids"], p["w_gate"], up, p["w_down"], _scales(p),
                            num_experts=4)
    with pytest.raises(ValueError, match="weights, ids"):
        M.fused_experts_fp8(p["x"], p["weights"][:, :1], p["ids"], p["w_gate"], p["w_up"], p["w_down"], _scales(p),
                            num_experts=4)
    with pytest.raises(ValueError, match="unit stride"):
        down_t = p["w_down"].transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, I] with stride 1 along H
        M.fused_experts_fp8(p["x"], p["weights"], p["ids"], p["w_gate"], p["w_up"], down_t, _scales(p),
                            num_experts=4)
    with pytest.raises(ValueError, match="must divide 128"):
        _run(p, 4, config=M.SmallCfg(gu_block_n=48))
    block = [128, 128]
    assert not M.small_fp8_ok(p["x"], p["w_gate"], p["w_up"], p["w_down"], _scales(p), [64, 64])
    assert not M.small_fp8_ok(p["x"], p["w_gate"].float(), p["w_up"], p["w_down"], _scales(p), block)
    on_device = p["x"].is_cuda and torch.cuda.get_device_capability() >= (8, 9)
    assert M.small_fp8_ok(p["x"], p["w_gate"], p["w_up"], p["w_down"], _scales(p), block) == (
        on_device or (not p["x"].is_cuda and os.environ.get("TRITON_INTERPRET") == "1"))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def _needs_fp8_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs fp8 dots (sm89+)")


# Hopper's fp8 MMA accumulates each 128-wide block in reduced precision (~1e-4 relative against the f32
# reference's products), which moves a few bf16 roundings of g and u and through them e4m3 codes of h (a
# group's scale too, where its largest element moves). Simulated on CPU (relative noise 1e-4 on g, u and y
# before rounding): 0.2-0.9% Frobenius, 0.4-1.4% of max |ref| at these shapes; DeepGEMM's experts are held
# to the same bounds (tests/test_lib_deep_gemm.py). A tile reading a wrong block scale is off by 10s of %.
GPU_FRO, GPU_MAX = 2e-2, 4e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("H,I", [(512, 256), (300, 200)])
def test_gpu_small_fp8_experts(T, dtype, H, I):
    _needs_fp8_gpu()
    p = _problem(T, 8, H, I, 2, dtype, seed=T, device="cuda")
    out = _run(p, 8, renormalize=True, scale=2.5)
    fro, mx = _rel(out, _ref(p, 8, True, 2.5))
    assert fro < GPU_FRO and mx < GPU_MAX, (fro, mx)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 32])
def test_gpu_small_fp8_experts_deepseek_shape(T):
    """DeepSeek-V3's experts (H 7168, I 2048, top-8), 32 of its 256 (1.4 GB of e4m3), bf16."""
    _needs_fp8_gpu()
    p = _problem(T, 32, 7168, 2048, 8, torch.bfloat16, seed=T, device="cuda")
    out = _run(p, 32, renormalize=True, scale=2.5)
    fro, mx = _rel(out, _ref(p, 32, True, 2.5))
    assert fro < GPU_FRO and mx < GPU_MAX, (fro, mx)


@pytest.mark.gpu
def test_gpu_small_fp8_experts_graph_replay():
    """Routing and experts captured in a CUDA graph, replayed on new x (new routing): bit-equal to eager."""
    _needs_fp8_gpu()
    from nanoforge.kernels.triton.moe import select_experts

    p = _problem(4, 16, 1024, 512, 4, torch.bfloat16, seed=9, device="cuda")
    router = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)

    def fn():
        w, ids = select_experts(p["x"], router, None, num_experts=16, top_k=4, scoring="softmax")
        return _M().fused_experts_fp8(p["x"], w, ids, p["w_gate"], p["w_up"], p["w_down"], _scales(p),
                                      num_experts=16, renormalize=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for seed in (1, 2):
        p["x"].copy_(torch.randn(p["x"].shape, generator=torch.Generator().manual_seed(seed)).to(p["x"]))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn())


@pytest.mark.gpu
@pytest.mark.parametrize("T", [3, 40])
@pytest.mark.parametrize("H,I", [(512, 256), (300, 200)])
def test_gpu_deep_gemm_dispatches_small_batches_here(T, H, I):
    """deep_gemm_ops.moe: up to SMALL_MAX_T tokens exactly this kernel's result (H and I of any size),
    above it DeepGEMM's grouped GEMMs (or, for H or I off multiples of 128, the Triton provider's widened
    experts), all within the W8A8 bound of the reference."""
    _needs_fp8_gpu()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("DeepGEMM's FP8 experts run on SM90")
    D = pytest.importorskip("nanoforge.kernels.libs.deep_gemm_ops", exc_type=ImportError)
    p = _problem(T, 8, H, I, 2, torch.bfloat16, seed=T, device="cuda")
    router = torch.randn(8, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    attrs = dict(num_experts=8, top_k=2, scoring="softmax", norm_topk_prob=True, fp8_block=[128, 128],
                 act_quant=128, **{f"{k}_scale_inv": p[f"{k}_s"] for k in ("w_gate", "w_up", "w_down")})
    out = D.moe(p["x"], router, p["w_gate"], p["w_up"], p["w_down"], **attrs)
    p["weights"], p["ids"] = torch_ref.select_experts(p["x"], router, None, num_experts=8, top_k=2,
                                                      scoring="softmax")
    small = _run(p, 8, renormalize=True)
    assert torch.equal(out, small) == (T <= D.SMALL_MAX_T)
    fro, mx = _rel(out, _ref(p, 8, True))
    assert fro < GPU_FRO and mx < GPU_MAX, (fro, mx)


@pytest.mark.gpu
def test_gpu_small_fp8_bench_runs():
    _needs_fp8_gpu()
    from bench.kernels.libs import bench_fp8_experts_small

    rows = bench_fp8_experts_small((1, 4), E=16, top_k=4, H=512, I=256, configs=2)
    assert [r["T"] for r in rows["rows"]] == [1, 4]
    assert all(r["triton_small_ms"] > 0 and r["triton_small_gbps"] > 0 for r in rows["rows"]), rows

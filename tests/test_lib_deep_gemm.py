"""DeepGEMM provider (kernels/libs/deep_gemm_ops.py): bf16 and block-FP8 (W8A8) grouped experts, linears.

CPU: the adapter's plumbing (the m-grouped contiguous and masked layouts, gather and combine, this EP
rank's experts) runs against torch stand-ins of DeepGEMM's grouped GEMMs; selection ranks it first for
W8A8 experts on SM90, and the experts fall back where the FP8 GEMMs do not apply. GPU (-m gpu, skipped
without an sm90/sm100 GPU or the library): linears and experts against torch references on random data,
CUDA-graph replays, and the benchmarks run. Shared helpers and fixtures: tests/lib_fixtures.py."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lib_fixtures import (CPU, DEV, SM90, _adapter, _close, _fake, _fresh_probe_cache,  # noqa: F401 - fixtures
                          _rand, _replays_like_eager, gpu, isolated)
from nanoforge.codegen import providers
from nanoforge.kernels import libs, torch_ref


# ---------------------------------------------------------------------------------------------
# bf16 experts: plumbing against a torch stand-in of DeepGEMM's m-grouped GEMM (CPU)
# ---------------------------------------------------------------------------------------------
def _moe_problem(T, E, H, I, scoring, dtype, device):
    shapes = dict(router=((E, H), H), w_gate=((E, I, H), H), w_up=((E, I, H), H), w_down=((E, H, I), I))
    p = {k: _rand(*s, dtype=dtype, scale=fan ** -0.5, seed=i, device=device)
         for i, (k, (s, fan)) in enumerate(shapes.items())}
    p["x"] = _rand(T, H, dtype=dtype, seed=100 + T, device=device)
    attrs = dict(num_experts=E, top_k=4, scoring=scoring, norm_topk_prob=True)
    if scoring == "sigmoid":  # DeepSeek-V3 style: selection bias, group-limited, scaled
        p["score_bias"] = _rand(E, dtype=torch.float32, scale=0.3, seed=5, device=device)
        attrs.update(n_group=4, topk_group=2, routed_scaling_factor=2.5)
    return p, attrs


def _fake_grouped(a, b, d, m_idx):
    """DeepGEMM's m-grouped contiguous contract: a 64-row block uses the group of its first row and
    is skipped (left unwritten: NaN here) when that is -1."""
    d.fill_(float("nan"))
    for r in range(0, a.shape[0], 64):
        if (e := int(m_idx[r])) >= 0:
            d[r: r + 64] = a[r: r + 64] @ b[e].T


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
def test_deep_gemm_adapter_plumbing_with_fake_kernels(isolated):  # noqa: F811 - the fixture
    """Device-side contiguous layout, gather and combine against the reference (fp32), for moe and for
    this EP rank's grouped_experts (other ranks' experts skipped); linear on CPU tensors falls back to
    torch, and so do the experts where `experts_ok` says no (CPU tensors)."""
    isolated.setitem(sys.modules, "deep_gemm", _fake("deep_gemm", __version__=libs.DEEP_GEMM.version,
                                                     m_grouped_bf16_gemm_nt_contiguous=_fake_grouped,
                                                     get_mk_alignment_for_contiguous_layout=lambda: 128))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    p, attrs = _moe_problem(5, 8, 32, 16, "softmax", torch.float32, DEV)
    assert torch.equal(M.moe(**p, **attrs), torch_ref.moe(**p, **attrs))  # not taken on CPU: the reference
    isolated.setattr(M, "bf16_experts_ok", lambda *a: True)
    for T, scoring in [(1, "softmax"), (45, "sigmoid"), (90, "softmax")]:  # 90 * 4 pairs: multi-program align
        p, attrs = _moe_problem(T, 8, 32, 16, scoring, torch.float32, DEV)
        torch.testing.assert_close(M.moe(**p, **attrs), torch_ref.moe(**p, **attrs), rtol=1e-4, atol=1e-5)
        w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
        local = {k: p[k][4:] for k in ("w_gate", "w_up", "w_down")}  # rank 1 of 2: experts 4..7
        got = M.grouped_experts(p["x"], w, ids, **local, ctx=_ep_ctx(1, 2), num_experts=8)
        torch.testing.assert_close(got, torch_ref.grouped_experts(p["x"], w, ids, **local, ctx=_ep_ctx(1, 2)),
                                   rtol=1e-4, atol=1e-5)
    x, w = _rand(3, 64, dtype=torch.float32, device="cpu"), _rand(8, 64, dtype=torch.float32, device="cpu")
    assert torch.equal(M.linear(x, w), F.linear(x, w))


# ---------------------------------------------------------------------------------------------
# DeepGEMM's block-FP8 experts (W8A8): plumbing against torch stand-ins of its grouped FP8 GEMMs
# ---------------------------------------------------------------------------------------------
def _ep_ctx(rank: int, size: int):
    return types.SimpleNamespace(comm=types.SimpleNamespace(group_position=lambda group: (rank, size)))


def _fp8_moe_problem(T, E, H, I, scoring, device, top_k=2, seed=0):
    """_moe_problem's layer (bf16 x) with block-FP8 experts: e4m3 weights, f32 128x128 scales as a
    DeepSeek-V3 checkpoint ships them, attrs fp8_block and act_quant=128 (a W8A8 plan's, quantize_weights)."""
    from nanoforge.kernels import fp8

    p, attrs = _moe_problem(T, E, H, I, scoring, torch.bfloat16, device)
    for i, k in enumerate(("w_gate", "w_up", "w_down")):
        fan = I if k == "w_down" else H
        w = _rand(*p[k].shape, dtype=torch.float32, scale=fan ** -0.5, seed=seed + 10 + i, device=device)
        p[k], p[f"{k}_scale_inv"] = fp8.quantize(w, (128, 128))
    attrs.update(top_k=top_k, fp8_block=[128, 128], act_quant=128)
    return p, attrs


def _weight_only(attrs: dict) -> dict:
    """The same node in a weight-only plan (no act_quant): widened weights, bf16 x and h."""
    return {k: v for k, v in attrs.items() if k != "act_quant"}


def _w8a8_experts_ref(x, weights, ids, p, first=0):
    """torch_ref._experts' loop with torch_ref's W8A8 linears (act_quant=128: x and h quantized per
    token and 128 columns, f32 products of the dequantized operands, bf16 out): the math the FP8
    grouped GEMMs run, on the same quantized activations."""
    def lin(h, e, k):
        return torch_ref.linear(h, p[k][e], weight_scale_inv=p[f"{k}_scale_inv"][e], fp8_block=[128, 128],
                                act_quant=128)

    out, wt = torch.zeros_like(x), weights.to(x.dtype)
    for e in ids.unique().tolist():
        if not first <= e < first + p["w_gate"].shape[0]:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        i = e - first
        out.index_add_(0, tok, lin(F.silu(lin(x[tok], i, "w_gate")) * lin(x[tok], i, "w_up"), i, "w_down")
                       * wt[tok, slot, None])
    return out


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _fp8_scales(p: dict) -> tuple:
    return p["w_gate_scale_inv"], p["w_up_scale_inv"], p["w_down_scale_inv"]


def _fake_fp8_deep_gemm(calls: list) -> types.ModuleType:
    """m_grouped_fp8_gemm_nt_contiguous / _masked as DeepGEMM's SM90 kernels define them, in torch:
    a = (e4m3 [M, K] or [E, M, K], f32 per-token 1x128 scales), b = (e4m3 [E, N, K], f32 [E, N/128,
    K/128] contiguous), d bf16 = dequant(a) @ dequant(b[e]).T. Contiguous: a 64-row half-tile takes
    the expert of its first row and is left unwritten (NaN here) when that is -1. Masked: expert e
    computes ceil(masked_m[e] / 64) whole 64-row tiles of its M rows (garbage rows included), the rest
    stays NaN; M must be a multiple of the tile."""
    from nanoforge.kernels import fp8

    def check(a, b, d, disable_ue8m0_cast):
        (aq, sa), (bq, sb) = a, b
        k = aq.shape[-1]
        assert disable_ue8m0_cast and aq.dtype == bq.dtype == torch.float8_e4m3fn and d.dtype == torch.bfloat16
        assert sa.shape == (*aq.shape[:-1], -(-k // 128)) and sa.dtype == sb.dtype == torch.float32
        assert sb.shape == (bq.shape[0], -(-bq.shape[1] // 128), -(-k // 128)) and sb.is_contiguous()
        assert aq.stride(-1) == 1 and bq.is_contiguous() and d.shape[-1] == bq.shape[1] and k == bq.shape[2]

    def contiguous(a, b, d, m_idx, disable_ue8m0_cast=False):
        check(a, b, d, disable_ue8m0_cast)
        assert m_idx.dtype == torch.int32 and m_idx.is_contiguous() and m_idx.shape == (a[0].shape[0],) == d.shape[:1]
        calls.append("contiguous")
        af = fp8.dequantize(a[0], a[1], (1, 128))
        d.fill_(float("nan"))
        for r in range(0, af.shape[0], 64):
            if (e := int(m_idx[r])) >= 0:
                d[r: r + 64] = (af[r: r + 64] @ fp8.dequantize(b[0][e], b[1][e], (128, 128)).T).to(d.dtype)

    def masked(a, b, d, masked_m, expected_m, disable_ue8m0_cast=False):
        check(a, b, d, disable_ue8m0_cast)
        G, m = a[0].shape[:2]
        assert masked_m.dtype == torch.int32 and masked_m.shape == (G,) and d.shape[:2] == (G, m) and m % 64 == 0
        assert isinstance(expected_m, int) and 0 < expected_m <= m
        calls.append(("masked", masked_m.tolist()))
        d.fill_(float("nan"))
        for g, c in enumerate(masked_m.tolist()):
            assert c <= m
            rows = -(-c // 64) * 64
            d[g, :rows] = (fp8.dequantize(a[0][g, :rows], a[1][g, :rows], (1, 128))
                           @ fp8.dequantize(b[0][g], b[1][g], (128, 128)).T).to(d.dtype)

    return _fake("deep_gemm", __version__=libs.DEEP_GEMM.version, m_grouped_fp8_gemm_nt_contiguous=contiguous,
                 m_grouped_fp8_gemm_nt_masked=masked, get_mk_alignment_for_contiguous_layout=lambda: 128)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
def test_deep_gemm_fp8_layouts(isolated):  # noqa: F811 - the fixture
    """masked_layout: each pair's row in its expert's slab in pair order, counts per expert (a full
    slab of MASKED_M rows included), other ranks' pairs to dump rows of their own past the slabs;
    contiguous_layout: every kept pair lands on a row of its expert, skipped pairs on row 0."""
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm([]))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    mm = M.MASKED_M
    assert M.MASKED_MAX_T <= mm and mm % 128 == 0
    ids = torch.tensor([[3, 0], [3, 5], [7, 3], [1, 4]])  # 5 and 7: another rank's (num_experts=5)
    slot, counts, keep = M.masked_layout(ids, 5)
    assert counts.tolist() == [1, 1, 0, 3, 1] and counts.dtype == torch.int32
    assert keep.tolist() == [True, True, True, False, False, True, True, True]
    assert slot.tolist() == [3 * mm, 0, 3 * mm + 1, 5 * mm + 3, 5 * mm + 4, 3 * mm + 2, mm, 4 * mm]
    full = torch.full((mm, 1), 2)
    slot, counts, keep = M.masked_layout(full, 4)
    assert counts.tolist() == [0, 0, mm, 0] and slot.tolist() == list(range(2 * mm, 3 * mm)) and keep.all()
    rows, m_idx, pair_row = M.contiguous_layout(ids.to(DEV), 5)
    rows, m_idx, pair_row = rows.cpu(), m_idx.cpu(), pair_row.cpu()
    kept = [p for p, e in enumerate(ids.reshape(-1).tolist()) if e < 5]
    assert sorted(rows[rows >= 0].tolist()) == kept and int(m_idx.numel()) % 128 == 0
    for p, e in enumerate(ids.reshape(-1).tolist()):
        r = int(pair_row[p])
        assert (int(rows[r]), int(m_idx[r])) == (p, e) if e < 5 else r == 0


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
@pytest.mark.parametrize("T,scoring,layout", [(1, "softmax", "masked"), (7, "sigmoid", "masked"),
                                              (128, "softmax", "masked"), (129, "sigmoid", "contiguous"),
                                              (300, "softmax", "contiguous"),  # 600 pairs: multi-program align
                                              (5, "sigmoid", "small")])  # the Triton small-batch kernels
def test_deep_gemm_fp8_moe_plumbing_with_fake_kernels(T, scoring, layout, isolated):  # noqa: F811 - the fixture
    """moe with block-FP8 experts on the fake FP8 grouped GEMMs (bf16, E=8, top_k=2, H=256, I=128):
    the layout MASKED_MAX_T picks (SMALL_MAX_T 0: DeepGEMM at every size), or up to SMALL_MAX_T tokens
    no DeepGEMM call (triton/moe_fp8.py, interpreted on CPU); the result equals the reference's routing
    and expert loop with W8A8 linears (same quantized activations: bf16 rounding only); within a few
    percent of torch_ref.moe, which widens the weights and keeps x and h in bf16."""
    calls: list = []
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm(calls))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    isolated.setattr(M, "fp8_experts_ok", lambda *a: True)
    if layout != "small":
        isolated.setattr(M, "SMALL_MAX_T", 0)
    else:
        assert T <= M.SMALL_MAX_T
    p, attrs = _fp8_moe_problem(T, 8, 256, 128, scoring, DEV, seed=T)
    out = M.moe(**p, **attrs)
    if layout == "small":
        assert calls == []
    else:
        assert {c if isinstance(c, str) else c[0] for c in calls} == {layout} and len(calls) == 3  # gate, up, down
    if layout == "masked":
        assert sum(calls[0][1]) == 2 * T
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    ref = _w8a8_experts_ref(p["x"], w, ids, p)
    assert (ref.abs().amax(1) > 0).all() and out.dtype == torch.bfloat16  # every token gets something
    if layout == "small" and not out.is_cuda:  # the interpreter's f32 -> bf16 cast truncates (3% here): the
        assert _rel(out, ref) < 0.05  # kernels' exact checks run in f16 / f32, tests/test_triton_moe_fp8.py
        return
    _close(out, ref, 1e-2)
    assert _rel(out, ref) < 5e-3
    assert _rel(out, torch_ref.moe(**p, **_weight_only(attrs))) < 0.06
    # gate and up as one GEMM over cat([w_gate, w_up], 1) and its scales (what a fused checkpoint layout gives)
    calls.clear()

    def cat(k):  # gate's rows then up's, per expert; through bytes (cat of fp8 is not on every device)
        return torch.cat([p[f"w_gate{k}"].view(torch.uint8), p[f"w_up{k}"].view(torch.uint8)], dim=1).view(
            p[f"w_gate{k}"].dtype)

    w13 = M.fused_experts(p["x"], w, ids, p["w_gate"], p["w_up"], p["w_down"], num_experts=8,
                          scales=_fp8_scales(p), w13=cat(""), w13_scale_inv=cat("_scale_inv"))
    assert len(calls) == (0 if layout == "small" else 2)
    _close(w13, ref, 1e-2)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
@pytest.mark.parametrize("T", [7, 150])
def test_deep_gemm_fp8_grouped_experts_ep_with_fake_kernels(T, isolated):  # noqa: F811 - the fixture
    """grouped_experts, the Triton provider's EP contract: rank 1 of 2 holds experts 4..7 of 8 and their
    scales; routed, weighted rows in; slots naming experts 0..3 add nothing (a row routed to those only
    comes out zero); both layouts against the W8A8 reference of the same experts."""
    calls: list = []
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm(calls))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    isolated.setattr(M, "fp8_experts_ok", lambda *a: True)
    isolated.setattr(M, "SMALL_MAX_T", 0)  # DeepGEMM's layouts (the small-batch kernels: tests/test_triton_moe_fp8.py)
    p, attrs = _fp8_moe_problem(T, 8, 128, 256, "sigmoid", DEV, seed=T)
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    ids[0] = torch.tensor([0, 3])  # row 0: no expert of this rank
    local = {k: v[4:] for k, v in p.items() if k.startswith("w_")}
    out = M.grouped_experts(p["x"], w, ids, **local, ctx=_ep_ctx(1, 2), num_experts=8, fp8_block=[128, 128],
                            act_quant=128)
    assert calls and {c if isinstance(c, str) else c[0] for c in calls} == {"masked" if T <= M.MASKED_MAX_T else
                                                                           "contiguous"}
    ref = _w8a8_experts_ref(p["x"], w, ids, local, first=4)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and ref[1:].abs().max() > 0
    _close(out, ref, 1e-2)
    assert _rel(out, ref) < 5e-3
    assert M.grouped_experts(p["x"][:0], w[:0], ids[:0], **local, ctx=_ep_ctx(1, 2), num_experts=8,
                             fp8_block=[128, 128], act_quant=128).shape == (0, 128)  # an idle rank


def test_fp8_experts_fall_back_off_sm90_or_in_weight_only_plans(isolated):  # noqa: F811 - the fixture
    """Where the FP8 grouped GEMMs do not apply (here: CPU tensors), and in a weight-only plan (no
    act_quant) even where they would, the experts are the fallback's (torch_ref on CPU, the Triton
    provider's on CUDA), bit for bit, and DeepGEMM is not called."""
    calls: list = []
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm(calls))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    p, attrs = _fp8_moe_problem(3, 8, 256, 128, "softmax", "cpu")
    assert not M.fp8_experts_ok(p["x"], p["w_gate"], p["w_up"], p["w_down"], _fp8_scales(p), [128, 128])
    assert torch.equal(M.moe(**p, **attrs), torch_ref.moe(**p, **attrs))
    isolated.setattr(M, "fp8_experts_ok", lambda *a: True)
    weight_only = _weight_only(attrs)
    assert torch.equal(M.moe(**p, **weight_only), torch_ref.moe(**p, **weight_only)) and not calls


def test_deep_gemm_ranks_first_for_fp8_experts(isolated):  # noqa: F811 - the fixture
    """Where deep_gemm imports on an SM90 target it ranks first for W8A8 block-FP8 experts (moe /
    grouped_experts with act_quant=128, as quantize_weights marks a W8A8 plan's) and W8A8 linears; other
    nodes, weight-only FP8 ones included, keep triton first, CPU targets torch; without the library
    triton runs the FP8 experts."""
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm([]))

    def first(op, target, attrs):
        return [n for n, why in providers.candidates(op, target, attrs) if why is None][0]

    moe_attrs = {"num_experts": 8, "top_k": 2, "scoring": "softmax"}
    w8a8 = {**moe_attrs, "fp8_block": [128, 128], "act_quant": 128}
    for op in ("moe", "grouped_experts"):
        assert first(op, SM90, w8a8) == "deep_gemm"
        assert first(op, SM90, moe_attrs) == "triton"
        assert first(op, SM90, _weight_only(w8a8)) == "triton"  # FP8 weights, bf16 activations: the widened math
        assert first(op, CPU, w8a8) == "torch"
    assert first("linear", SM90, {"fp8_block": [128, 128], "act_quant": 128}) == "deep_gemm"
    M = importlib.import_module(libs.DEEP_GEMM.adapter)  # inspect's note names the small-batch dispatch size
    assert f"up to {M.SMALL_MAX_T} tokens on the Triton small-batch" in providers.BY_NAME["deep_gemm"].first_note
    assert first("linear", SM90, {"fp8_block": [128, 128]}) == "triton"
    assert providers.graph_unsafe_reason("moe", "deep_gemm") is None
    assert providers.graph_unsafe_reason("grouped_experts", "deep_gemm") is None
    isolated.setitem(sys.modules, "deep_gemm", None)
    libs.import_error.cache_clear()
    assert first("moe", SM90, w8a8) == "triton"

# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("M_,N,K", [(1, 4096, 1024), (7, 1024, 3072), (300, 152, 256), (1000, 4096, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_deep_gemm_linear(M_, N, K, bias):
    M = _adapter("deep_gemm_ops", (90, 100))
    x, w = _rand(M_, K, seed=M_), _rand(N, K, scale=K ** -0.5, seed=N)
    b = _rand(N, seed=3) if bias else None
    _close(M.linear(x, w, b), F.linear(x, w, b))
    _close(M.linear(x.view(1, M_, K), w, b), F.linear(x, w, b).view(1, M_, N))
    assert torch.equal(M.linear(x[:, :100], w[:, :100]), F.linear(x[:, :100], w[:, :100]))  # K % 64: torch
    _replays_like_eager(lambda: M.linear(x, w, b), x)


@gpu
@pytest.mark.parametrize("M_,N,K", [(1, 576, 7168), (7, 1536, 1024), (300, 256, 512), (0, 576, 256)])
def test_gpu_deep_gemm_fp8_linear(M_, N, K):
    """A W8A8 linear (act_quant=128) on fp8_gemm_nt equals fp8.w8a8_linear, the reference."""
    from nanoforge.kernels import fp8

    M = _adapter("deep_gemm_ops", (90,))
    x, w = _rand(M_, K, seed=M_ + 1), _rand(N, K, scale=K ** -0.5, seed=N)
    q, s = fp8.quantize(w.float(), (128, 128))
    want = fp8.w8a8_linear(x, q, s)
    _close(M.linear(x, q, None, s, [128, 128], act_quant=128), want)
    if M_:
        _replays_like_eager(lambda: M.linear(x, q, None, s, [128, 128], act_quant=128), x)


@gpu
@pytest.mark.parametrize("T", [1, 37, 600])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gpu_deep_gemm_moe(T, scoring):
    M = _adapter("deep_gemm_ops", (90, 100))
    p, attrs = _moe_problem(T, 16, 512, 256, scoring, torch.bfloat16, "cuda")
    out = M.moe(**p, **attrs).float()
    # reference: the reference's routing on the bf16 inputs, experts in fp32 from the same weights
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    w, (x, wg, wu, wd) = w.to(torch.bfloat16).float(), (p[k].float() for k in ("x", "w_gate", "w_up", "w_down"))
    ref = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        ref.index_add_(0, tok, (F.silu(x[tok] @ wg[e].T) * (x[tok] @ wu[e].T)) @ wd[e].T * w[tok, slot, None])
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() / ref.abs().max().item() < 2e-2


@gpu
def test_gpu_deep_gemm_bench_runs():
    from bench.kernels.libs import bench_deep_gemm_grouped

    _adapter("deep_gemm_ops", (90, 100))  # skips without an sm90/sm100 GPU or the library
    r = bench_deep_gemm_grouped(64, 32, 4, 512, 256, layers=2)
    assert r["ms"] > 0 and "experts_ms" in r, r


@gpu
@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_gpu_deep_gemm_fp8_moe(T, scoring, monkeypatch):
    """Block-FP8 experts (E=8, top_k=2, H=512, I=256) on the FP8 grouped GEMMs (masked up to
    MASKED_MAX_T rows, contiguous above) against the W8A8 reference on the same quantized activations:
    they differ by DeepGEMM's fp8 products promoted to f32 every 128 columns vs torch's f32 GEMM (1e-4
    for one linear on an H100, bench/results/fp8/), then by bf16 roundings of g and u that this moves,
    which may flip an e4m3 rounding of h (estimated: well under 1% relative);
    within a few percent of torch_ref.moe (weights widened, x and h in bf16: 4.2-4.6% here on CPU)."""
    M = _adapter("deep_gemm_ops", (90,))
    monkeypatch.setattr(M, "SMALL_MAX_T", 0)  # DeepGEMM at every T (small-batch kernels: test_triton_moe_fp8.py)
    p, attrs = _fp8_moe_problem(T, 8, 512, 256, scoring, "cuda", seed=T)
    assert M.fp8_experts_ok(p["x"], p["w_gate"], p["w_up"], p["w_down"], _fp8_scales(p), [128, 128])
    out = M.moe(**p, **attrs)
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    ref = _w8a8_experts_ref(p["x"], w, ids, p)
    _close(out, ref, 3e-2)
    assert _rel(out, ref) < 2e-2, _rel(out, ref)
    assert _rel(out, torch_ref.moe(**p, **_weight_only(attrs))) < 0.06


@gpu
@pytest.mark.parametrize("T", [64, 300])
def test_gpu_deep_gemm_fp8_moe_deepseek_shape(T):
    """DeepSeek-V3's experts (H=7168, I=2048, sigmoid routing, top_k=8), 16 of its 256 (0.7 GB of e4m3)."""
    M = _adapter("deep_gemm_ops", (90,))
    p, attrs = _fp8_moe_problem(T, 16, 7168, 2048, "sigmoid", "cuda", top_k=8, seed=T)
    out = M.moe(**p, **attrs)
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    ref = _w8a8_experts_ref(p["x"], w, ids, p)
    _close(out, ref, 3e-2)
    assert _rel(out, ref) < 2e-2, _rel(out, ref)


@gpu
@pytest.mark.parametrize("T", [7, 300])
def test_gpu_deep_gemm_fp8_grouped_experts_ep(T, monkeypatch):
    """This EP rank's experts 4..7 of 8 (rank 1 of 2): other ranks' slots add nothing, both layouts."""
    M = _adapter("deep_gemm_ops", (90,))
    monkeypatch.setattr(M, "SMALL_MAX_T", 0)  # DeepGEMM at every T (small-batch kernels: test_triton_moe_fp8.py)
    p, attrs = _fp8_moe_problem(T, 8, 512, 256, "sigmoid", "cuda", seed=T)
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    local = {k: v[4:] for k, v in p.items() if k.startswith("w_")}
    out = M.grouped_experts(p["x"], w, ids, **local, ctx=_ep_ctx(1, 2), num_experts=8, fp8_block=[128, 128],
                            act_quant=128)
    ref = _w8a8_experts_ref(p["x"], w, ids, local, first=4)
    _close(out, ref, 3e-2)
    assert _rel(out, ref) < 2e-2, _rel(out, ref)


@gpu
@pytest.mark.parametrize("T", [7, 300])
def test_gpu_deep_gemm_fp8_moe_graph_replay(T, monkeypatch):
    """Captured in a CUDA graph (T=7: the masked layout, its counts computed on the device; T=300: the
    contiguous one), replayed on new x (so new routing): bit-equal to an eager call."""
    M = _adapter("deep_gemm_ops", (90,))
    monkeypatch.setattr(M, "SMALL_MAX_T", 0)  # DeepGEMM at every T (small-batch kernels: test_triton_moe_fp8.py)
    p, attrs = _fp8_moe_problem(T, 8, 512, 256, "sigmoid", "cuda", seed=T)
    _replays_like_eager(lambda: M.moe(**p, **attrs), p["x"])


@gpu
def test_gpu_deep_gemm_fp8_bench_runs():
    from bench.kernels.libs import bench_deep_gemm_fp8_grouped

    _adapter("deep_gemm_ops", (90,))  # skips without an sm90 GPU or the library
    [r] = bench_deep_gemm_fp8_grouped([64], E=16, top_k=4, H=512, I=256)
    assert r["deep_gemm_ms"] > 0 and r["deep_gemm_w13_ms"] > 0 and r["triton_bf16_ms"] > 0, r
    assert r["layout"] == "masked" and r["rel_diff"] < 0.08, r

"""Triton MoE provider (EP=1) against torch_ref.moe.

CPU CI: tiny fp32 problems under TRITON_INTERPRET=1 (tests/conftest.py sets it). GPU (-m gpu): bf16
at Qwen3-30B-A3B and DeepSeek-like layer sizes, and CUDA-graph capture + replay."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from nanoforge.kernels import torch_ref

pytestmark = [
    pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                       reason="needs CUDA or TRITON_INTERPRET=1"),
    # the interpreter turns run-time loop bounds into 1-element arrays; numpy 2.x warns on int() of them
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _M():
    # the module (the package's __init__ re-exports the function `moe` under the same name);
    # imported lazily, after conftest set TRITON_INTERPRET
    return importlib.import_module("nanoforge.kernels.triton.moe")


def _problem(T, E, H, I, dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)

    p = dict(x=r(T, H), router=r(E, H, scale=H ** -0.5), w_gate=r(E, I, H, scale=H ** -0.5),
             w_up=r(E, I, H, scale=H ** -0.5), w_down=r(E, H, I, scale=I ** -0.5))
    p["score_bias"] = (torch.randn(E, generator=g) * 0.3).to(DEV) if bias else None
    return p


def _check_fp32(p, attrs, **kw):
    M = _M()
    out = M.moe(**p, **attrs, **kw)
    ref = torch_ref.moe(**p, **attrs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk(norm):
    p = _problem(T=7, E=8, H=32, I=48, seed=1)
    _check_fp32(p, dict(num_experts=8, top_k=2, scoring="softmax", norm_topk_prob=norm))


def test_single_token_and_ragged_dims():
    # T=1; H=48 and I=24 are not multiples of the K / N tiles (masked K loop, clamped N columns)
    p = _problem(T=1, E=4, H=48, I=24, seed=2)
    _check_fp32(p, dict(num_experts=4, top_k=2, scoring="softmax", norm_topk_prob=True))


def test_top1():
    p = _problem(T=5, E=4, H=16, I=16, seed=3)
    _check_fp32(p, dict(num_experts=4, top_k=1, scoring="softmax", norm_topk_prob=False))


def test_deepseek_sigmoid_groups_with_bias():
    T, E = 9, 8
    attrs = dict(num_experts=E, top_k=3, scoring="sigmoid", norm_topk_prob=True, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5)
    p = _problem(T=T, E=E, H=64, I=32, seed=4, bias=True)
    # the bias must change the routed experts of some tokens, or the test would not see it
    _, ids_b = torch_ref._route(p["x"], p["router"], p["score_bias"], **attrs)
    _, ids_0 = torch_ref._route(p["x"], p["router"], None, **attrs)
    assert (ids_b.sort(-1)[0] != ids_0.sort(-1)[0]).any(-1).sum() >= 1
    _check_fp32(p, attrs)


def test_empty_experts_and_multiprogram_align():
    # 2 tokens x top-2 over 8 experts: at least 4 experts get no token
    M = _M()
    attrs = dict(num_experts=8, top_k=2, scoring="softmax", norm_topk_prob=True)
    p = _problem(T=2, E=8, H=32, I=32, seed=5)
    _, ids = torch_ref._route(p["x"], p["router"], None, **attrs)
    assert (torch.bincount(ids.reshape(-1).cpu(), minlength=8) == 0).sum() >= 4
    _check_fp32(p, attrs)
    # the same through the two-kernel (count + atomic scatter) align used for large batches
    p = _problem(T=6, E=8, H=32, I=32, seed=6)
    w, ids = torch_ref._route(p["x"], p["router"], None, **attrs)
    out = M.fused_experts(p["x"], w, ids, p["w_gate"], p["w_up"], p["w_down"], num_experts=8, align_single_max=0)
    ref = torch_ref.moe(**p, **attrs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("single_max", [10 ** 9, 0])
def test_grouped_experts_of_one_ep_rank(single_max):
    """Rank 1 of 2 holds experts 4..7: the rows that reached it (routed over all 8) get the
    reference's contribution of those experts only; slots naming rank 0's experts add nothing."""
    from types import SimpleNamespace

    M = _M()
    attrs = dict(num_experts=8, top_k=3, scoring="softmax", norm_topk_prob=True)
    p = _problem(T=11, E=8, H=32, I=48, seed=8)
    w, ids = torch_ref._route(p["x"], p["router"], None, **attrs)
    comm = SimpleNamespace(group_position=lambda group: (1, 2))
    ctx = SimpleNamespace(comm=comm)
    local = {k: p[k][4:] for k in ("w_gate", "w_up", "w_down")}
    want = torch_ref.grouped_experts(p["x"], w, ids, **local, num_experts=8, ctx=ctx)
    assert want.abs().sum() > 0 and ((ids >= 4).any(-1) & (ids < 4).any(-1)).any()
    got = M.grouped_experts(p["x"], w, ids, **local, num_experts=8, ctx=ctx, align_single_max=single_max)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert M.grouped_experts(p["x"][:0], w[:0], ids[:0], **local, ctx=ctx).shape == (0, 32)


@pytest.mark.parametrize("single_max", [10 ** 9, 0])
def test_align_invariants(single_max):
    M = _M()
    E, T, k, BM = 6, 9, 3, 16
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEV)
    ids[:, 0] = 2  # make one expert span more than one block
    ids[ids == 5] = 4  # and expert 5 empty
    _assert_aligned(M, ids, E, BM, single_max)


def _assert_aligned(M, ids, E, BM, single_max):
    n = ids.numel()
    sorted_ids, expert_ids, npp = M.moe_align(ids, E, BM, single_max=single_max)
    sorted_ids, expert_ids, npp, flat = sorted_ids.cpu(), expert_ids.cpu(), int(npp.item()), ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=E)
    assert npp == int(((counts + BM - 1) // BM * BM).sum()) and npp % BM == 0
    assert sorted_ids.numel() >= npp and expert_ids.numel() * BM == sorted_ids.numel()
    live = sorted_ids[:npp]
    assert sorted(live[live < n].tolist()) == list(range(n))  # every pair exactly once
    assert (live[live >= n] == n).all()  # padding = sentinel N
    blocks = live.view(-1, BM)
    eids = expert_ids[: npp // BM]
    assert (eids[1:] > eids[:-1]).logical_or(eids[1:] == eids[:-1]).all()  # segments in expert order
    for b, e in enumerate(eids.tolist()):
        rows = blocks[b][blocks[b] < n]
        assert len(rows) > 0 and (flat[rows] == e).all()
    assert (expert_ids[npp // BM:] == -1).all()


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def _ref_bf16_in_fp32(p, attrs):
    """Routing exactly as the reference does it on the bf16 inputs; experts in fp32 from the same
    bf16 weights (the routing weight rounded to bf16, as the reference does)."""
    w, ids = torch_ref._route(p["x"], p["router"], p["score_bias"], **attrs)
    w = w.to(p["x"].dtype).float()
    x, wg, wu, wd = (p[k].float() for k in ("x", "w_gate", "w_up", "w_down"))
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        h = torch.nn.functional.silu(x[tok] @ wg[e].T) * (x[tok] @ wu[e].T)
        out.index_add_(0, tok, (h @ wd[e].T) * w[tok, slot, None])
    return out


def _check_bf16(p, attrs):
    out = _M().moe(**p, **attrs).float()
    ref = _ref_bf16_in_fp32(p, attrs)
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    assert err < 2e-2, err


QWEN3_30B = dict(num_experts=128, top_k=8, scoring="softmax", norm_topk_prob=True)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 256, 2048])
def test_gpu_qwen3_30b_a3b_bf16(T):
    p = _problem(T=T, E=128, H=2048, I=768, dtype=torch.bfloat16, seed=T)
    _check_bf16(p, QWEN3_30B)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [3, 300])
def test_gpu_deepseek_like_bf16(T):
    # E=64, top-6, 8 groups keep 3; I=1408 is not a multiple of the N/K tiles
    attrs = dict(num_experts=64, top_k=6, scoring="sigmoid", norm_topk_prob=True, n_group=8, topk_group=3,
                 routed_scaling_factor=2.5)
    p = _problem(T=T, E=64, H=2048, I=1408, dtype=torch.bfloat16, seed=100 + T, bias=True)
    p["score_bias"] = p["score_bias"].float()
    _check_bf16(p, attrs)


@pytest.mark.gpu
def test_gpu_align_large():
    M = _M()
    g = torch.Generator(device="cpu").manual_seed(8)
    ids = torch.randint(0, 128, (4096, 8), generator=g)
    ids[:100] = torch.arange(8)  # skew
    _assert_aligned(M, ids.cuda(), 128, 64, single_max=256)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8, 64])  # single-program align (N=64) and count+scatter align (N=512)
def test_gpu_cuda_graph_replay(T):
    M = _M()
    p = _problem(T=T, E=128, H=2048, I=768, dtype=torch.bfloat16, seed=9)
    x = p.pop("x")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        M.moe(x, **p, **QWEN3_30B)  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = M.moe(x, **p, **QWEN3_30B)
    for seed in (10, 11):
        x.copy_(torch.randn(T, 2048, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        eager = M.moe(x, **p, **QWEN3_30B)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        ref = _ref_bf16_in_fp32(dict(p, x=x), QWEN3_30B)
        assert (out.float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_select_experts_matches_reference_route(scoring):
    # the provider's selection must be torch_ref._route's, bit for bit, before renormalisation
    M = _M()
    attrs = dict(num_experts=8, top_k=3, scoring=scoring, n_group=4 if scoring == "sigmoid" else 1,
                 topk_group=2 if scoring == "sigmoid" else 1)
    p = _problem(T=9, E=8, H=32, I=16, seed=12, bias=scoring == "sigmoid")
    w, ids = M.select_experts(p["x"], p["router"], p["score_bias"], **attrs)
    w_ref, ids_ref = torch_ref._route(p["x"], p["router"], p["score_bias"], norm_topk_prob=False, **attrs)
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)


def test_fp8_experts_w8a8_match_the_reference():
    """Block-FP8 experts with act_quant (the plan's W8A8): the Triton provider widens the weights and
    quantizes x and silu(g) * u like the FP8 GEMMs; equal to torch_ref's, and unlike weight-only."""
    from nanoforge.kernels import fp8

    M = _M()
    p = _problem(T=9, E=4, H=160, I=136, seed=11)
    q = {}
    for k in ("w_gate", "w_up", "w_down"):
        p[k], q[f"{k}_scale_inv"] = fp8.quantize(p[k].cpu(), (128, 128))
        p[k], q[f"{k}_scale_inv"] = p[k].to(DEV), q[f"{k}_scale_inv"].to(DEV)
    attrs = dict(num_experts=4, top_k=2, scoring="softmax", norm_topk_prob=True, fp8_block=[128, 128], **q)
    ref = torch_ref.moe(**p, **attrs, act_quant=128)
    out = M.moe(**p, **attrs, act_quant=128)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    weight_only = torch_ref.moe(**p, **attrs)
    assert (weight_only - ref).abs().max() > 1e-3 * ref.abs().max()  # the activations really were quantized

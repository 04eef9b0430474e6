"""Library providers (kernels/libs): FlashInfer, DeepGEMM, FlashMLA.

CPU: probes give a clear reason (CPU target, arch, library absent, wrong version) and never raise;
forcing a library provider where it cannot run is a one-line NanoForgeError; defaults do not change;
the adapters' own plumbing (page tables, grouped-GEMM layout) runs against torch stand-ins of the
libraries. GPU (-m gpu, skipped per library that does not import): bf16 results against torch
references on random data, and CUDA-graph replays."""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from nanoforge.codegen import providers
from nanoforge.kernels import libs, torch_ref
from nanoforge.errors import NanoForgeError
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


# ---------------------------------------------------------------------------------------------
# CPU: probes and selection
# ---------------------------------------------------------------------------------------------
def test_probe_target_reasons():
    dg, fi = providers.BY_NAME["deep_gemm"].probe, providers.BY_NAME["flashinfer"].probe
    assert dg(CPU) == "deep_gemm needs a CUDA target (compile with --device cuda)"
    assert fi(CPU) == "flashinfer needs a CUDA target (compile with --device cuda)"
    assert dg(Target("cuda", capability="sm80")) == "deep_gemm needs sm90/sm100; the target is sm80"
    assert fi(Target("cuda", capability="sm75")) == "flashinfer needs sm80+; the target is sm75"
    assert "no GPU was visible" in dg(Target("cuda"))
    sm100 = Target("cuda", capability="sm100")
    assert libs.probe(libs.FLASH_MLA, sm100) == "flash_mla needs sm90; the target is sm100"


@pytest.mark.parametrize("lib", list(libs.LIBS.values()), ids=list(libs.LIBS))
def test_probe_library_absent(lib, monkeypatch):
    monkeypatch.setitem(sys.modules, lib.module, None)  # find_spec -> None, import -> ImportError
    assert libs.probe(lib, SM90) == f"{lib.module} is not installed (pip install --no-deps {lib.wheel}=={lib.version})"


@pytest.mark.parametrize("lib", list(libs.LIBS.values()), ids=list(libs.LIBS))
@pytest.mark.parametrize("version", ["0.0.1", None])
def test_wrong_version_is_an_import_error(lib, version, isolated):
    isolated.setitem(sys.modules, lib.module, _fake(lib.module, **({"__version__": version} if version else {})))
    want = f"{lib.module}: installed version {version or 'unknown'}, NanoForge needs {lib.wheel}=={lib.version}"
    assert libs.probe(lib, SM90).startswith(want)  # a probe reports, never raises
    with pytest.raises(ImportError, match=f"installed version {version or 'unknown'}"):
        importlib.import_module(lib.adapter)


def test_defaults_unchanged():
    """Library providers rank after torch (which runs every op): used only when forced."""
    names = [p.name for p in providers.PROVIDERS]
    assert names.index("torch") < min(names.index("flashinfer"), names.index("deep_gemm"))
    for target in (CPU, SM90):
        for op in ("linear", "rms_norm", "add_rms_norm"):
            assert [n for n, why in providers.candidates(op, target) if why is None][0] in ("triton", "torch")
    assert providers.graph_unsafe_reason("linear", "deep_gemm") is None  # no host sync per call


def _select(force: dict, target: dict):
    from nanoforge.models import trace_model
    from nanoforge.passes import PASSES, PIPELINES, PassContext, PassManager
    from test_ir import config_dict  # tests/ is on sys.path (conftest)

    from nanoforge.passes import select_kernels

    ctx = PassContext(options={"select_kernels": select_kernels.Options(target, force)})
    PassManager(PASSES, PIPELINES["default"], ctx).run(trace_model(config_dict("qwen3"), "f32"))


@pytest.mark.parametrize("op,name,target,msg", [
    ("linear", "deep_gemm", CPU, "^--provider linear=deep_gemm: deep_gemm needs a CUDA target"),
    ("rms_norm", "flashinfer", CPU, "^--provider rms_norm=flashinfer: flashinfer needs a CUDA target"),
    ("attention", "deep_gemm", CPU, "^--provider attention=deep_gemm: deep_gemm does not implement attention"),
    ("linear", "deep_gemm", SM90, r"^--provider linear=deep_gemm: deep_gemm is not installed \(pip install"),
])
def test_forced_library_where_it_cannot_run_fails_clearly(op, name, target, msg, monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_gemm", None)
    with pytest.raises(NanoForgeError, match=msg):
        _select({op: name}, target)


def test_cli_provider_linear_deep_gemm_on_cpu(tmp_path, capsys):
    import json

    from test_cli import QWEN3_8B, fails_with

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(QWEN3_8B))
    fails_with(capsys, ["compile", str(tmp_path / "ckpt"), "-o", str(tmp_path / "plan"), "--config-only",
                        "--provider", "linear=deep_gemm"], "--provider linear=deep_gemm", "needs a CUDA target")
    assert not (tmp_path / "plan").exists()


# ---------------------------------------------------------------------------------------------
# helpers, and the adapters' plumbing against torch stand-ins of the libraries (CPU)
# ---------------------------------------------------------------------------------------------
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


def _decode_ref(q, k_cache, v_cache, table, ctx_lens, scale):
    bs, kvh, d = k_cache.shape[1:]
    return torch.cat([torch_ref._attend(q[b: b + 1].float(), k_cache.view(-1, kvh, d)[s].float(),
                                        v_cache.view(-1, kvh, d)[s].float(), c, scale)
                      for b, c in enumerate(ctx_lens) for s in [_slots(table, b, c, bs)]])


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


class _FakeDecode:
    """FlashInfer's documented CSR paged-KV decode contract (NHD), in torch."""

    def __init__(self, workspace, layout, use_tensor_cores=False, backend="auto", **_):
        assert layout == "NHD" and backend == "fa2"

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):
        self.p = indptr.tolist(), indices.tolist(), last_page_len.tolist(), page_size, kw["sm_scale"]

    def run(self, q, kv, out=None):
        (k, v), (indptr, indices, last, ps, scale), rows = kv, self.p, []
        for b in range(q.shape[0]):
            pages = indices[indptr[b]: indptr[b + 1]]
            fill = [ps] * (len(pages) - 1) + [last[b]]
            s = torch.tensor([pg * ps + o for pg, n in zip(pages, fill) for o in range(n)])
            rows.append(torch_ref._attend(q[b: b + 1], k.flatten(0, 1)[s], v.flatten(0, 1)[s], len(s), scale))
        return torch.cat(rows) if out is None else out.copy_(torch.cat(rows))


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
def test_deep_gemm_adapter_plumbing_with_fake_kernels(isolated):
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
def test_deep_gemm_fp8_layouts(isolated):
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
                                              (300, "softmax", "contiguous")])  # 600 pairs: multi-program align
def test_deep_gemm_fp8_moe_plumbing_with_fake_kernels(T, scoring, layout, isolated):
    """moe with block-FP8 experts on the fake FP8 grouped GEMMs (bf16, E=8, top_k=2, H=256, I=128):
    the layout MASKED_MAX_T picks, and the result equals the reference's routing and expert loop with
    W8A8 linears (same quantized activations: bf16 rounding only); within a few percent of torch_ref.moe,
    which widens the weights and keeps x and h in bf16."""
    calls: list = []
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm(calls))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    isolated.setattr(M, "fp8_experts_ok", lambda *a: True)
    p, attrs = _fp8_moe_problem(T, 8, 256, 128, scoring, DEV, seed=T)
    out = M.moe(**p, **attrs)
    assert {c if isinstance(c, str) else c[0] for c in calls} == {layout} and len(calls) == 3  # gate, up, down
    if layout == "masked":
        assert sum(calls[0][1]) == 2 * T
    w, ids = torch_ref._route(p["x"], p["router"], p.get("score_bias"), **attrs)
    ref = _w8a8_experts_ref(p["x"], w, ids, p)
    assert (ref.abs().amax(1) > 0).all() and out.dtype == torch.bfloat16  # every token gets something
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
    assert len(calls) == 2
    _close(w13, ref, 1e-2)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
@pytest.mark.parametrize("T", [7, 150])
def test_deep_gemm_fp8_grouped_experts_ep_with_fake_kernels(T, isolated):
    """grouped_experts, the Triton provider's EP contract: rank 1 of 2 holds experts 4..7 of 8 and their
    scales; routed, weighted rows in; slots naming experts 0..3 add nothing (a row routed to those only
    comes out zero); both layouts against the W8A8 reference of the same experts."""
    calls: list = []
    isolated.setitem(sys.modules, "deep_gemm", _fake_fp8_deep_gemm(calls))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    isolated.setattr(M, "fp8_experts_ok", lambda *a: True)
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


def test_fp8_experts_fall_back_off_sm90_or_in_weight_only_plans(isolated):
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


def test_deep_gemm_ranks_first_for_fp8_experts(isolated):
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
    assert first("linear", SM90, {"fp8_block": [128, 128]}) == "triton"
    assert providers.graph_unsafe_reason("moe", "deep_gemm") is None
    assert providers.graph_unsafe_reason("grouped_experts", "deep_gemm") is None
    isolated.setitem(sys.modules, "deep_gemm", None)
    libs.import_error.cache_clear()
    assert first("moe", SM90, w8a8) == "triton"


def test_flashinfer_adapter_plumbing_with_fake_library(isolated):
    """csr_pages + PagedDecode against FlashInfer's documented CSR contract; rms_norm on CPU tensors
    falls back to the reference."""
    norm = _fake("flashinfer.norm")
    isolated.setitem(sys.modules, "flashinfer", _fake("flashinfer", __version__=libs.FLASHINFER.version, norm=norm,
                                                      BatchDecodeWithPagedKVCacheWrapper=_FakeDecode))
    isolated.setitem(sys.modules, "flashinfer.norm", norm)
    M = importlib.import_module(libs.FLASHINFER.adapter)
    isolated.setattr(M, "workspace", lambda device: torch.empty(0))
    indptr, indices, last = M.csr_pages(torch.tensor([[5, 2, 0], [7, 0, 0]]), torch.tensor([33, 16]), 16)
    assert indptr.tolist() == [0, 3, 4] and indices.tolist() == [5, 2, 0, 7] and last.tolist() == [1, 16]
    lens = [1, 16, 17, 100]
    k, v, table, ctx = _paged(lens, 2, 8, 16, seed=1, dtype=torch.float32, device="cpu")
    q = _rand(4, 4, 8, dtype=torch.float32, seed=2, device="cpu")
    torch.testing.assert_close(M.paged_decode(q, k, v, table, ctx, 0.3), _decode_ref(q, k, v, table, lens, 0.3))
    x, wn = _rand(3, 16, dtype=torch.float32, device="cpu"), _rand(16, dtype=torch.float32, device="cpu")
    assert torch.equal(M.rms_norm(x, wn, 1e-6), torch_ref.rms_norm(x, wn, 1e-6))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
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


@gpu
def test_gpu_probes_pass():
    """An installed library of the pinned version probes usable (or is ruled out by its arch only)."""
    from nanoforge.compiler import target_of

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for lib in libs.LIBS.values():
        if importlib.util.find_spec(lib.module) is not None:
            why = libs.probe(lib, target_of("cuda"))
            assert why is None or "needs sm" in why, why


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 7, 300])
def test_gpu_flashinfer_rms_norm(T, dtype):
    M = _adapter("flashinfer_attn")
    x, w = _rand(T, 1024, dtype=dtype, scale=3, seed=T), _rand(1024, dtype=dtype, scale=0.1, seed=1) + 1
    _close(M.rms_norm(x, w, 1e-6), torch_ref.rms_norm(x, w, 1e-6))
    q, wq = _rand(T, 32 * 128, dtype=dtype, seed=2)[:, : 16 * 128], _rand(128, dtype=dtype, seed=3) + 1  # strided
    _close(M.rms_norm(q, wq, 1e-6, group=128), torch_ref.rms_norm(q, wq, 1e-6, group=128))
    r = _rand(T, 1024, dtype=dtype, seed=4)
    (y, s), (y_ref, s_ref) = M.add_rms_norm(x, r, w, 1e-6), torch_ref.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, s_ref)
    _close(y, y_ref)
    y2, s2 = M.add_rms_norm_(x.clone(), r.clone(), w, 1e-6)
    _close(y2, y_ref)
    _close(s2, s_ref, 1e-2)
    assert torch.equal(M.rms_norm(x.float(), w.float(), 1e-6), torch_ref.rms_norm(x.float(), w.float(), 1e-6))
    _replays_like_eager(lambda: M.rms_norm(x, w, 1e-5), x)


@gpu
@pytest.mark.parametrize("tensor_cores", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(16, 8, 128, 16), (32, 8, 128, 16), (32, 4, 64, 64)])
def test_gpu_flashinfer_paged_decode(heads, kv_heads, head_dim, block_size, tensor_cores):
    M = _adapter("flashinfer_attn")
    lens = [1, 15, 16, 17, 130, 1000, 4096]
    k_cache, v_cache, table, ctx = _paged(lens, kv_heads, head_dim, block_size, seed=heads + head_dim)
    q, scale = _rand(len(lens), heads, head_dim, seed=9), head_dim ** -0.5
    out = M.paged_decode(q, k_cache, v_cache, table, ctx, scale, use_tensor_cores=tensor_cores)
    _close(out, _decode_ref(q, k_cache, v_cache, table, lens, scale))


@gpu
def test_gpu_flashinfer_decode_graph_replan():
    """A captured run, re-planned outside the graph (new lengths, same batch), replays correctly."""
    M = _adapter("flashinfer_attn")
    H, KVH, D, BS = 16, 8, 128, 16
    k_cache, v_cache, table, ctx = _paged([1000, 37, 2048, 5], KVH, D, BS, seed=11)
    q, scale = _rand(4, H, D, seed=12), D ** -0.5
    dec = M.PagedDecode("cuda", graph_batch=4, max_pages=table.numel())
    dec.plan(table, ctx, BS, H, KVH, D, q.dtype, k_cache.dtype, scale)
    graph, out = _capture(lambda: dec.run(q, k_cache, v_cache))
    for new in ([1000, 37, 2048, 5], [3, 900, 17, 2048]):  # rows past a sequence's pages read page 0
        new_ctx = torch.tensor(new, dtype=torch.int32, device="cuda")
        dec.plan(table, new_ctx, BS, H, KVH, D, q.dtype, k_cache.dtype, scale)
        q.copy_(_rand(4, H, D, seed=sum(new)))
        graph.replay()
        torch.cuda.synchronize()
        _close(out, _decode_ref(q, k_cache, v_cache, table, new, scale))


@gpu
def test_gpu_flashinfer_bench_keys():
    from bench.kernels.attention import bench_paged_decode
    from bench.kernels.libs import bench_flashinfer_decode

    _adapter("flashinfer_attn")  # skips without a GPU or the library
    r, t = bench_flashinfer_decode(4, 512), bench_paged_decode(4, 512)
    assert set(t) <= set(r) and r["kv_bytes"] == t["kv_bytes"] and r["tb_s"] > 0


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
def test_gpu_deep_gemm_fp8_moe(T, scoring):
    """Block-FP8 experts (E=8, top_k=2, H=512, I=256) on the FP8 grouped GEMMs (masked up to
    MASKED_MAX_T rows, contiguous above) against the W8A8 reference on the same quantized activations:
    they differ by DeepGEMM's fp8 products promoted to f32 every 128 columns vs torch's f32 GEMM (1e-4
    for one linear on an H100, bench/results/fp8/), then by bf16 roundings of g and u that this moves,
    which may flip an e4m3 rounding of h (estimated: well under 1% relative);
    within a few percent of torch_ref.moe (weights widened, x and h in bf16: 4.2-4.6% here on CPU)."""
    M = _adapter("deep_gemm_ops", (90,))
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
def test_gpu_deep_gemm_fp8_grouped_experts_ep(T):
    """This EP rank's experts 4..7 of 8 (rank 1 of 2): other ranks' slots add nothing, both layouts."""
    M = _adapter("deep_gemm_ops", (90,))
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
def test_gpu_deep_gemm_fp8_moe_graph_replay(T):
    """Captured in a CUDA graph (T=7: the masked layout, its counts computed on the device; T=300: the
    contiguous one), replayed on new x (so new routing): bit-equal to an eager call."""
    M = _adapter("deep_gemm_ops", (90,))
    p, attrs = _fp8_moe_problem(T, 8, 512, 256, "sigmoid", "cuda", seed=T)
    _replays_like_eager(lambda: M.moe(**p, **attrs), p["x"])


@gpu
def test_gpu_deep_gemm_fp8_bench_runs():
    from bench.kernels.libs import bench_deep_gemm_fp8_grouped

    _adapter("deep_gemm_ops", (90,))  # skips without an sm90 GPU or the library
    [r] = bench_deep_gemm_fp8_grouped([64], E=16, top_k=4, H=512, I=256)
    assert r["deep_gemm_ms"] > 0 and r["deep_gemm_w13_ms"] > 0 and r["triton_bf16_ms"] > 0, r
    assert r["layout"] == "masked" and r["rel_diff"] < 0.08, r


def _mla_ref(q, cache, lens, table, scale):
    """Plain torch MLA decode, absorbed form: q [B, s_q, H, 576] scores against the pool entries
    [latent 512 | rope 64], V = latent; row i of s_q sees positions <= ctx - s_q + i."""
    outs = []
    for b, c in enumerate(lens):
        kv = cache.view(-1, cache.shape[-1])[_slots(table, b, c, 64)].float()
        s = torch.einsum("qhd,ld->qhl", q[b].float(), kv) * scale
        s_q, pos = q.shape[1], torch.arange(c, device=q.device)
        mask = pos[None, :] > (c - s_q + torch.arange(s_q, device=q.device))[:, None]
        p = torch.softmax(s.masked_fill(mask[:, None], float("-inf")), dim=-1)
        outs.append(torch.einsum("qhl,ld->qhd", p, kv[:, :512]))
    return torch.stack(outs)


@gpu
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("s_q", [1, 2])
def test_gpu_flash_mla_decode(heads, s_q):
    M = _adapter("flash_mla_decode", (90,))
    lens = [2, 64, 65, 1500]
    k, _, table, ctx = _paged(lens, 1, 576, 64, seed=heads)
    cache, scale = k[:, :, 0, :], 192 ** -0.5  # our MLA pool [NB, 64, 576]; DeepSeek's qk head dim
    q = _rand(len(lens), s_q, heads, 576, seed=s_q)
    out, ref = M.mla_decode(q if s_q > 1 else q[:, 0], cache, table, ctx, scale), _mla_ref(q, cache, lens, table, scale)
    _close(out, ref if s_q > 1 else ref[:, 0])


@gpu
def test_gpu_flash_mla_graph_replay_new_lengths():
    M = _adapter("flash_mla_decode", (90,))
    k, _, table, ctx = _paged([700, 64, 1500], 1, 576, 64, seed=3)
    cache, q, scale = k[:, :, 0, :], _rand(3, 16, 576, seed=4), 192 ** -0.5
    graph, out = _capture(lambda: M.mla_decode(q, cache, table, ctx, scale))
    new = [5, 64, 1200]  # shorter: fits the same pages; the scheduler metadata is recomputed on replay
    ctx.copy_(torch.tensor(new, dtype=torch.int32))
    q.copy_(_rand(3, 16, 576, seed=5))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, _mla_ref(q.unsqueeze(1), cache, new, table, scale)[:, 0])


# ---------------------------------------------------------------------------------------------
# FlashMLA as the attention provider of MLA layers (CPU: selection, block size, plumbing vs fakes)
# ---------------------------------------------------------------------------------------------
def _fake_flash_mla() -> types.ModuleType:
    """FlashMLA's dense decode contract in torch (q [B, 1, H, 576], cache [NB, 64, 1, 576], V = the
    first v_dim columns), with a scheduler meta that records how often it was handed out."""
    def with_kvcache(q, cache, table, lens, v_dim, sched, softmax_scale, causal, use_legacy):
        assert use_legacy and not causal and q.shape[1] == 1 and table.dtype == lens.dtype == torch.int32
        sched.uses += 1
        out = _mla_ref(q, cache[:, :, 0, :], lens.tolist(), table, softmax_scale).to(q.dtype)
        return out, torch.zeros(q.shape[0], q.shape[2], 1)

    return _fake("flash_mla", __version__=libs.FLASH_MLA.version, has_legacy=lambda: True,
                 get_mla_metadata=lambda: (types.SimpleNamespace(uses=0), None), flash_mla_with_kvcache=with_kvcache)


def _with_importable_flash_mla(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_mla", _fake_flash_mla())
    monkeypatch.setattr(libs, "import_error", lambda adapter: None)


def test_flash_mla_ranks_first_for_mla_attention_only(monkeypatch):
    _with_importable_flash_mla(monkeypatch)
    first = lambda attrs: [n for n, why in providers.candidates("attention", SM90, attrs) if why is None][0]
    mla = {"kind": "mla", "kv_lora_rank": 512, "qk_rope_head_dim": 64, "out_dtype": "bf16", "heads": 128}
    assert first(mla) == "flash_mla"
    for other in ({"kv_lora_rank": 256}, {"qk_rope_head_dim": 32}, {"out_dtype": "f32"}, {"kind": "gqa"},
                  {"heads": 16}):  # 16 heads: slower than Triton (bench/kernels/mla_decode.py)
        assert first({**mla, **other}) == "triton", other  # shapes and dtypes its dense kernel lacks
    assert [n for n, why in providers.candidates("attention", CPU, mla) if why is None][0] == "cpu"


def _mla_plan_block_size(monkeypatch, **opts) -> tuple[set[str], int]:
    from nanoforge.compiler import CompileOptions, compile_checkpoint
    from nanoforge.models.random_checkpoint import RandomCheckpoint
    from test_ir import config_dict

    _with_importable_flash_mla(monkeypatch)
    monkeypatch.setattr("nanoforge.compiler.target_of", lambda device: SM90)
    config = {**config_dict("deepseek_v3"), "kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 64}
    plan = compile_checkpoint("ds", CompileOptions(device="cuda", dtype="bf16", **opts),
                              ckpt=RandomCheckpoint(config, "ds", "bf16"))
    used = {n.provider for _, n in plan.module.nodes() if n.op == "attention"}
    if used == {"flash_mla"}:  # inspect says why
        assert any(n.startswith("flash_mla: MLA decode with >= 64 heads on FlashMLA") for n in plan.provider_notes["attention"])
    return used, plan.kv_contract.block_size


def test_flash_mla_plans_get_64_token_blocks(monkeypatch):
    assert _mla_plan_block_size(monkeypatch) == ({"flash_mla"}, 64)
    assert _mla_plan_block_size(monkeypatch, block_size=64) == ({"flash_mla"}, 64)
    # an explicit other size: FlashMLA is passed over (with the reason), not the size
    assert _mla_plan_block_size(monkeypatch, block_size=16) == ({"triton"}, 16)
    with pytest.raises(NanoForgeError, match=r"^--provider attention=flash_mla: flash_mla needs --block-size 64 "
                                             r"for attention; the plan asks for 16$"):
        _mla_plan_block_size(monkeypatch, block_size=16, providers={"attention": "flash_mla"})


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
def test_flash_mla_provider_plumbing_with_fake_library(isolated):
    """Decode-only steps: the Triton KV store, W_uk / W_uv absorption around FlashMLA's kernel, one
    schedule shared by the step's layers; the result equals the torch reference's attention."""
    from nanoforge.kernels.context import make_context

    isolated.setitem(sys.modules, "flash_mla", _fake_flash_mla())
    M = importlib.import_module(libs.FLASH_MLA.adapter)
    h, nope, rope, vd, r, dt = 2, 16, 64, 16, 512, torch.float16
    attrs = dict(heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=vd)
    lens = [1, 64, 65, 130]
    g = torch.Generator().manual_seed(7)
    pools = [[(torch.randn(14, 64, r + rope, generator=g).to(dt),) for _ in range(2)] for _ in range(2)]
    pools[1] = [(p.clone(),) for (p,) in pools[0]]
    tables = [[1 + 3 * i + j for j in range(-(-c // 64))] for i, c in enumerate(lens)]
    seqs = [(1, c, t) for c, t in zip(lens, tables)]
    ctx, ref_ctx = (make_context(p, 64, seqs) for p in pools)
    for layer in (0, 1):
        q = torch.randn(len(lens), h * (nope + rope), generator=g).to(dt)
        k, v = torch.randn(len(lens), r, generator=g).to(dt), torch.randn(len(lens), rope, generator=g).to(dt)
        w = (torch.randn(h * (nope + vd), r, generator=g) * r ** -0.5).to(dt)
        assert M.takes(ctx, "mla", layer, k, rope)
        out = M.attention(q, k, v, ctx=ctx, kind="mla", layer=layer, scale=0.1, kv_b_proj=w, **attrs)
        ref = torch_ref.attention(q, k, v, ctx=ref_ctx, kind="mla", layer=layer, scale=0.1, kv_b_proj=w, **attrs)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ctx.kv[layer][0], ref_ctx.kv[layer][0])  # the step's latent stored alike
    assert [s.uses for s in ctx.scratch.values()] == [2]
    mixed = make_context(pools[0], 64, [(3, 70, tables[2])])
    assert not M.takes(mixed, "mla", 0, k, rope)  # prefill rows: the Triton kernel
    assert not M.takes(make_context(pools[0], 64, seqs), "gqa", 0, k, rope)

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
    """Device-side contiguous layout, gather and combine against the reference (fp32); linear on
    CPU tensors falls back to torch."""
    isolated.setitem(sys.modules, "deep_gemm", _fake("deep_gemm", __version__=libs.DEEP_GEMM.version,
                                                     m_grouped_bf16_gemm_nt_contiguous=_fake_grouped,
                                                     get_mk_alignment_for_contiguous_layout=lambda: 128))
    M = importlib.import_module(libs.DEEP_GEMM.adapter)
    for T, scoring in [(1, "softmax"), (45, "sigmoid"), (90, "softmax")]:  # 90 * 4 pairs: multi-program align
        p, attrs = _moe_problem(T, 8, 32, 16, scoring, torch.float32, DEV)
        torch.testing.assert_close(M.moe(**p, **attrs), torch_ref.moe(**p, **attrs), rtol=1e-4, atol=1e-5)
    x, w = _rand(3, 64, dtype=torch.float32, device="cpu"), _rand(8, 64, dtype=torch.float32, device="cpu")
    assert torch.equal(M.linear(x, w), F.linear(x, w))


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

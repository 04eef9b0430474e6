"""Library providers (kernels/libs): probes, selection, FlashInfer.

CPU: probes give a clear reason (CPU target, arch, library absent, wrong version) and never raise;
forcing a library provider where it cannot run is a one-line NanoForgeError; defaults do not change;
FlashInfer's adapter plumbing (page tables) runs against a torch stand-in of the library. GPU (-m gpu,
skipped per library that does not import): probes, FlashInfer's bf16 results against torch references
on random data, and CUDA-graph replays. DeepGEMM: tests/test_lib_deep_gemm.py; FlashMLA:
tests/test_lib_flash_mla.py; shared helpers and fixtures: tests/lib_fixtures.py."""
from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch

from lib_fixtures import (CPU, SM90, _adapter, _capture, _close, _fake, _fresh_probe_cache,  # noqa: F401 - fixtures
                          _paged, _rand, _replays_like_eager, _slots, gpu, isolated)
from nanoforge.codegen import providers
from nanoforge.kernels import libs, torch_ref
from nanoforge.errors import NanoForgeError
from nanoforge.facts import Target


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
def test_wrong_version_is_an_import_error(lib, version, isolated):  # noqa: F811 - the fixture
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
            assert [n for n, why in providers.candidates(op, target) if why is None][0] in ("triton", "cpu", "torch")
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
# helpers, and FlashInfer's adapter plumbing against a torch stand-in of the library (CPU)
# ---------------------------------------------------------------------------------------------
def _decode_ref(q, k_cache, v_cache, table, ctx_lens, scale):
    bs, kvh, d = k_cache.shape[1:]
    return torch.cat([torch_ref._attend(q[b: b + 1].float(), k_cache.view(-1, kvh, d)[s].float(),
                                        v_cache.view(-1, kvh, d)[s].float(), c, scale)
                      for b, c in enumerate(ctx_lens) for s in [_slots(table, b, c, bs)]])


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


def test_flashinfer_adapter_plumbing_with_fake_library(isolated):  # noqa: F811 - the fixture
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

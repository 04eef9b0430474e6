"""FlashMLA provider (kernels/libs/flash_mla_decode.py): MLA decode attention.

CPU: selection (first for MLA attention it can run, 64-token KV blocks in its plans) and the adapter's
plumbing against a torch stand-in of flash_mla. GPU (-m gpu, skipped without an sm90 GPU or the
library): decode against a plain torch MLA reference, and a CUDA-graph replay on new lengths. Shared
helpers and fixtures: tests/lib_fixtures.py."""
from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch

from lib_fixtures import (CPU, SM90, _adapter, _capture, _close, _fake, _fresh_probe_cache,  # noqa: F401 - fixtures
                          _paged, _rand, _slots, gpu, isolated)
from nanoforge.codegen import providers
from nanoforge.kernels import libs, torch_ref
from nanoforge.errors import NanoForgeError


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
def test_flash_mla_provider_plumbing_with_fake_library(isolated):  # noqa: F811 - the fixture
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


def test_flash_mla_provider_mixed_step_with_fake_library(isolated):  # noqa: F811 - the fixture
    """A mixed step (kernels/mla_prefill.py splits prefill rows on CUDA; here on the CPU too): its decode
    rows run FlashMLA as a decode batch of their own (one schedule for the step's layers), its prefill
    chunks (fresh, after a cached prefix) the expanded form; the result equals the torch reference's."""
    from nanoforge.kernels import mla_prefill
    from nanoforge.kernels.context import make_context

    isolated.setitem(sys.modules, "flash_mla", _fake_flash_mla())
    isolated.setattr(mla_prefill, "DEVICES", frozenset({"cpu", "cuda"}))
    M = importlib.import_module(libs.FLASH_MLA.adapter)
    h, nope, rope, vd, r, dt = 2, 16, 64, 16, 512, torch.float16
    attrs = dict(heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=vd)
    spec, g = [(1, 64), (20, 84), (1, 130), (12, 12)], torch.Generator().manual_seed(8)
    pools = [[(torch.randn(10, 64, r + rope, generator=g).to(dt),) for _ in range(2)] for _ in range(2)]
    pools[1] = [(p.clone(),) for (p,) in pools[0]]
    tables = [[9, 2], [3, 7], [1, 5, 8], [4]]
    seqs = [(q, c, t if c > 64 else t[:1]) for (q, c), t in zip(spec, tables)]
    ctx, ref_ctx = (make_context(p, 64, seqs) for p in pools)
    T = sum(q for q, _ in spec)
    for layer in (0, 1):
        q = torch.randn(T, h * (nope + rope), generator=g).to(dt)
        k, v = torch.randn(T, r, generator=g).to(dt), torch.randn(T, rope, generator=g).to(dt)
        w = (torch.randn(h * (nope + vd), r, generator=g) * r ** -0.5).to(dt)
        assert not M.takes(ctx, "mla", layer, k, rope)  # not a decode-only step
        out = M.attention(q, k, v, ctx=ctx, kind="mla", layer=layer, scale=0.1, kv_b_proj=w, **attrs)
        ref = torch_ref.attention(q, k, v, ctx=ref_ctx, kind="mla", layer=layer, scale=0.1, kv_b_proj=w, **attrs)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ctx.kv[layer][0], ref_ctx.kv[layer][0])
    (split,) = ctx.scratch.values()  # the step's plan; FlashMLA never saw the whole mixed batch
    assert [n for _, n, _ in split.expanded] == [20, 12] and split.absorbed_ctx.max_query_len == 1
    assert [s.uses for s in split.absorbed_ctx.scratch.values()] == [2]


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
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


@gpu
def test_gpu_flash_mla_provider_mixed_step():
    """DeepSeek-V3's MLA at its sizes (128 heads, q/k 128 + 64, v 128) on the flash_mla provider: a mixed
    step's decode rows on FlashMLA, its prefill chunks (fresh, and after cached prefixes) in the expanded
    form on torch's SDPA (kernels/mla_prefill.py); against the torch reference. SDPA's fused kernels take
    those shapes (dv != dk) and the bench counts them as attention."""
    M = _adapter("flash_mla_decode", (90,))
    from nanoforge.kernels import mla_prefill
    from nanoforge.kernels.context import make_context

    h, nope, rope, vd, r = 128, 128, 64, 128, 512
    attrs = dict(heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=vd, kv_lora_rank=r)
    spec = [(1, 900), (1, 64), (512, 512), (200, 1500), (1, 2000), (37, 37)]
    k_pages, _, table, _ = _paged([c for _, c in spec], 1, r + rope, 64, seed=21)
    pools = [[(k_pages[:, :, 0, :].clone(),)] for _ in range(2)]
    seqs = [(q, c, table[b, :math.ceil(c / 64)].tolist()) for b, (q, c) in enumerate(spec)]
    ctx, ref_ctx = (make_context(p, 64, seqs, "cuda") for p in pools)
    T = sum(q for q, _ in spec)
    q, k, v = _rand(T, h * (nope + rope), seed=22), _rand(T, r, seed=23), _rand(T, rope, seed=24)
    w = _rand(h * (nope + vd), r, seed=25, scale=r ** -0.5)
    out = M.attention(q, k, v, ctx=ctx, kind="mla", layer=0, scale=(nope + rope) ** -0.5, kv_b_proj=w, **attrs)
    ref = torch_ref.attention(q, k, v, ctx=ref_ctx, kind="mla", layer=0, scale=(nope + rope) ** -0.5, kv_b_proj=w,
                              **attrs)
    _close(out, ref)
    (split,) = ctx.scratch.values()
    assert [n for _, n, _ in split.expanded] == [512, 200, 37] and split.absorbed_ctx.max_query_len == 1
    assert list(split.absorbed_ctx.scratch) == [("flash_mla", False)]  # the decode rows ran FlashMLA
    from bench.deepseek_layers_fit import ATTENTION_KERNEL

    for n, L in [(1024, 1024), (300, 2500)]:  # SDPA's fused kernel (causal, and bottom-right): the bench's attention
        qb, kb, vb = (_rand(1, x, h, d, seed=26 + i).transpose(1, 2)  # [len, h, d] rows, as mla_prefill passes them
                      for i, (x, d) in enumerate([(n, nope + rope), (L, nope + rope), (L, vd)]))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            mla_prefill.causal_sdpa(qb, kb, vb, scale=0.1)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        top = max(kernels, key=lambda e: e.self_device_time_total).key
        assert ATTENTION_KERNEL.search(top), top

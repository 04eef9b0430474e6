"""The `cpu` provider's norms, rope and linears (nanoforge/kernels/cpu/) against torch_ref on fresh
random inputs: the f32 norms and rope bit-equal (they are torch_ref's math in fewer ops), oneDNN's
packed linears within f32 rounding; where a fast path does not apply the reference runs. Then the
load-time packing (which weights, tied ones kept dense) and a tiny Llama with every weight packed
giving HF generate's greedy tokens."""
from __future__ import annotations

import importlib

import pytest
import torch

from nanoforge.codegen.providers import BY_NAME, candidates
from nanoforge.facts import Target
from nanoforge.kernels import torch_ref

ew = importlib.import_module("nanoforge.kernels.cpu.elementwise")
lin = importlib.import_module("nanoforge.kernels.cpu.linear")


def rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_mul_equal_torch_ref(dtype):
    x, r, w = rand(37, 96, seed=1, dtype=dtype, scale=3), rand(37, 96, seed=2, dtype=dtype), rand(96, seed=3,
                                                                                                   dtype=dtype)
    assert torch.equal(ew.rms_norm(x, w, 1e-6), torch_ref.rms_norm(x, w, 1e-6))
    wg = rand(16, seed=4, dtype=dtype)
    assert torch.equal(ew.rms_norm(x, wg, 1e-5, group=16), torch_ref.rms_norm(x, wg, 1e-5, group=16))
    for a, b in zip(ew.add_rms_norm(x, r, w, 1e-5), torch_ref.add_rms_norm(x, r, w, 1e-5)):
        assert torch.equal(a, b)
    assert torch.equal(ew.silu_mul(x, r), torch_ref.silu_mul(x, r))


def _rope_attrs(heads, kv_heads, d, rotary_dim=None, style="neox", scaling=None):
    return dict(heads=heads, kv_heads=kv_heads, q_head_dim=d, k_head_dim=d, rotary_dim=rotary_dim or d, style=style,
                theta=100000.0, scaling=scaling)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1}
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("attrs", [
    _rope_attrs(9, 3, 64), _rope_attrs(4, 4, 32), _rope_attrs(6, 2, 80, scaling=YARN),
    _rope_attrs(4, 2, 32, scaling=LLAMA3), _rope_attrs(4, 2, 32, style="interleaved"), _rope_attrs(4, 2, 64, 32)],
    ids=["gqa", "mha", "yarn", "llama3", "interleaved", "partial"])
def test_rope_equals_torch_ref(attrs):
    h, kvh, d = attrs["heads"], attrs["kv_heads"], attrs["q_head_dim"]
    t = 23
    qkv = rand(t, (h + 2 * kvh) * d, seed=5)
    q, k, _ = torch.split(qkv, [h * d, kvh * d, kvh * d], dim=-1)  # side by side: rotated as one view
    positions = torch.randint(0, 5000, (t,), generator=torch.Generator().manual_seed(6))
    pairs = [(q, k), (q.contiguous(), k.contiguous())] + ([(k, q)] if h == kvh else [])  # (k, q): k's end is not q
    for qs, ks in pairs:
        ref = torch_ref.rope(qs, ks, positions, **attrs)
        out = ew.rope(qs, ks, positions.clone(), **attrs)  # a fresh positions tensor: tables rebuilt
        for a, b in zip(out, ref):
            assert a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(q, qkv[:, :h * d])  # inputs untouched


def test_rope_tables_built_once_per_step():
    attrs = _rope_attrs(4, 2, 32)
    positions = torch.arange(7)
    q, k = rand(7, 128, seed=7), rand(7, 64, seed=8)
    ew.rope(q, k, positions, **attrs)
    (tables,) = positions.__dict__[ew._CACHE].values()
    ew.rope(rand(7, 128, seed=9), rand(7, 64, seed=10), positions, **attrs)  # the next layer
    assert len(positions.__dict__[ew._CACHE]) == 1 and next(iter(positions.__dict__[ew._CACHE].values())) is tables
    ew.rope(q, k, positions, **{**attrs, "theta": 10000.0})  # another rope config: its own tables
    assert len(positions.__dict__[ew._CACHE]) == 2


def test_qk_norm_rope_equals_torch_ref():
    attrs = _rope_attrs(6, 2, 80)
    q, k = rand(11, 480, seed=11), rand(11, 160, seed=12)
    qn, kn, pos = rand(80, seed=13), rand(80, seed=14), torch.arange(30, 41)
    for a, b in zip(ew.qk_norm_rope(q, k, pos, qn, kn, 1e-6, **attrs), torch_ref.qk_norm_rope(q, k, pos, qn, kn, 1e-6,
                                                                                            **attrs)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not lin.ONEDNN, reason="torch built without oneDNN")
@pytest.mark.parametrize("rows", [0, 1, 7, 32, 300])
def test_packed_linear_matches_torch_ref(rows):
    w, b = rand(576, 192, seed=15, scale=0.05), rand(576, seed=16)
    x = rand(rows, 192, seed=17)
    packed = lin.pack(w)
    for bias in (None, b):
        ref = torch_ref.linear(x, w, bias)
        out = lin.linear(x, packed, bias)
        assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    rows_ = torch.tensor([i for i in range(rows) if i % 3 == 0], dtype=torch.long)
    w.__dict__[lin.PACKED] = packed  # a tied weight: dense, its packed twin attached
    out = lin.lm_head(x, rows_, w)
    assert out.dtype == torch.float32 and torch.allclose(out, torch_ref.lm_head(x, rows_, w), rtol=1e-5, atol=1e-5)
    if rows > 1:  # batch invariant: a row's output does not depend on the rows beside it
        assert torch.equal(lin.linear(x[:1], packed), lin.linear(x, packed)[:1])


def test_unpacked_weights_run_torch_ref():
    w, x = rand(64, 32, seed=18), rand(5, 32, seed=19)
    assert torch.equal(lin.linear(x, w), torch_ref.linear(x, w))
    rows = torch.tensor([4, 0])
    assert torch.equal(lin.lm_head(x, rows, w), torch_ref.lm_head(x, rows, w))


def _compiled(tiny_ckpt, monkeypatch, pack_min):
    from nanoforge import LLM

    monkeypatch.setattr(lin, "PACK_MIN", pack_min)
    return LLM(tiny_ckpt("llama"), progress=False)


@pytest.mark.skipif(not lin.ONEDNN, reason="torch built without oneDNN")
def test_prepare_packs_what_only_linears_read(tiny_ckpt, monkeypatch):
    llm = _compiled(tiny_ckpt, monkeypatch, 0)
    fn, params = llm.plan.module.functions["forward"], llm.engine.runner.params
    linear_weights = {n.params["weight"] for n in fn.nodes if n.op in ("linear", "lm_head")}
    assert linear_weights and all(n.provider == "cpu" for n in fn.nodes if n.op in ("linear", "lm_head"))
    embed = next(n.params["weight"] for n in fn.nodes if n.op == "embed")
    assert embed in linear_weights  # tied: lm_head reads the embedding
    for name in linear_weights - {embed}:
        assert params[name].is_mkldnn
    assert not params[embed].is_mkldnn and params[embed].__dict__[lin.PACKED].is_mkldnn
    norms = [n.params["weight"] for n in fn.nodes if n.op in ("rms_norm", "add_rms_norm")]
    assert norms and not any(params[p].is_mkldnn for p in norms)
    small = _compiled(tiny_ckpt, monkeypatch, 1 << 30).engine.runner.params  # below PACK_MIN: MKL's dense path
    assert not any(t.is_mkldnn or lin.PACKED in t.__dict__ for t in small.values())


@pytest.mark.skipif(not lin.ONEDNN, reason="torch built without oneDNN")
def test_every_weight_packed_gives_hf_greedy_tokens(tiny_ckpt, hf_ref, monkeypatch):
    from hf_fixtures import hf_greedy, random_prompts
    from nanoforge import SamplingParams

    llm = _compiled(tiny_ckpt, monkeypatch, 0)
    prompts = random_prompts(llm.plan.model.vocab_size, [3, 17, 40], seed=21)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf_ref("llama"), p, 16)


def test_registered_for_the_cpu_target():
    ops = {"attention", "rms_norm", "add_rms_norm", "silu_mul", "rope", "qk_norm_rope", "linear", "lm_head"}
    assert BY_NAME["cpu"].ops == frozenset(ops)
    for op in ops:
        assert [n for n, why in candidates(op, Target(device="cpu")) if why is None][0] == "cpu"
        assert dict(candidates(op, Target(device="cuda")))["cpu"] == "runs on the CPU target only"


@pytest.mark.parametrize("attrs", [_rope_attrs(4, 2, 32), _rope_attrs(6, 2, 80, scaling=YARN)], ids=["gqa", "yarn"])
def test_prefill_sized_rope_rotates_halves_bit_equal(attrs):
    h, kvh, d = attrs["heads"], attrs["kv_heads"], attrs["q_head_dim"]
    t = ew.SPLIT_ROWS + 37
    q, k, _ = torch.split(rand(t, (h + 2 * kvh) * d, seed=31), [h * d, kvh * d, kvh * d], dim=-1)
    positions = torch.randint(0, 5000, (t,), generator=torch.Generator().manual_seed(32))
    for qs, ks in ((q, k), (q.contiguous(), k.contiguous())):
        fresh = positions.clone()
        out = ew.rope(qs, ks, fresh, **attrs)
        (cos, _), = fresh.__dict__[ew._CACHE].values()
        assert cos.dim() == 4  # half tables: the in-place rotation of the halves ran
        for a, b in zip(out, torch_ref.rope(qs, ks, positions, **attrs)):
            assert torch.equal(a, b)


@pytest.mark.skipif(not lin.ONEDNN, reason="torch built without oneDNN")
def test_small_weights_run_mkl_then_their_packed_twin(tiny_ckpt, monkeypatch):
    """Weights under PACK_MIN: MKL on a transposed view (torch_ref's bits) below PACK_ROWS rows, their
    packed twin from there; lm_head picks its rows alike."""
    llm = _compiled(tiny_ckpt, monkeypatch, 1 << 30)
    fn, params = llm.plan.module.functions["forward"], llm.engine.runner.params
    name = next(n.params["weight"] for n in fn.nodes if n.op == "linear")
    w = params[name]
    assert not w.is_mkldnn and w.__dict__[lin.SMALL][1].is_mkldnn
    for rows in (1, 33, lin.PACK_ROWS + 3):
        x = rand(rows, w.shape[1], seed=rows)
        out, ref = lin.linear(x, w), torch_ref.linear(x, w)
        assert torch.equal(out, ref) if rows < lin.PACK_ROWS else torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    head = next(n.params["weight"] for n in fn.nodes if n.op == "lm_head")
    x, rows_ = rand(9, params[head].shape[1], seed=40), torch.tensor([8, 2, 5])
    assert torch.equal(lin.lm_head(x, rows_, params[head]), torch_ref.lm_head(x, rows_, params[head]))

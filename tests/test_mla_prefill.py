"""kernels/mla_prefill.py: a mixed MLA step split per sequence, prefill chunks in the expanded form
(kv_b_proj expansion + torch SDPA, bottom-right causal after a cached prefix), the other rows on an
absorbed path as a batch of their own; against the torch reference MLA attention (kernels/torch_ref.py).
The expanded core is plain torch, so it runs here on the CPU as it does on CUDA. The Triton and FlashMLA
providers' use of it: tests/test_triton_attention.py, tests/test_lib_flash_mla.py."""
from __future__ import annotations

import random

import pytest
import torch

from nanoforge.kernels import fp8, mla_prefill, torch_ref
from nanoforge.kernels.context import BatchContext, make_context

# decode rows, a fresh 12-token prompt, chunks of 9 and 20 rows after cached prefixes, 3 verify-like rows
SPEC = [(1, 7), (12, 12), (9, 30), (1, 15), (3, 10), (20, 45)]
EXPANDED = [1, 2, 5]  # the sequences of more than 8 rows
DIMS = dict(heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)  # q/k 24, v 12: dv != dk
R, BS = 32, 4


@pytest.fixture
def on_cpu(monkeypatch):
    """Split steps on the CPU too (the providers split on CUDA only)."""
    monkeypatch.setattr(mla_prefill, "DEVICES", frozenset({"cpu", "cuda"}))


def _step(spec, *, dtype, seed, fp8_pool=False):
    """A random MLA pool (shuffled, non-contiguous blocks; block 0 unused), a step's contexts over two
    copies of it, and the step's inputs. Returns (ctx, ref_ctx, q, latent, k_rope, kv_b_proj)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    nb = 1 + sum(-(-c // BS) for _, c in spec) * 2
    free = list(range(1, nb))
    rng.shuffle(free)
    seqs = [(q, c, [free.pop() for _ in range(-(-c // BS))]) for q, c in spec]
    width = R + DIMS["qk_rope_head_dim"]
    entries = torch.randn(nb, BS, width, generator=g)
    if fp8_pool:
        e, s = fp8.quantize_kv(entries.view(nb * BS, 1, width))
        pools = [[(e.view(nb, BS, width).clone(), s.view(nb, BS, 1).clone())] for _ in range(2)]
    else:
        pools = [[(entries.to(dtype),)] for _ in range(2)]
    h, dk, dv = DIMS["heads"], DIMS["qk_nope_head_dim"] + DIMS["qk_rope_head_dim"], DIMS["v_head_dim"]
    T = sum(q for q, _ in spec)
    q = torch.randn(T, h * dk, generator=g).to(dtype)
    latent = torch.randn(T, R, generator=g).to(dtype)
    k_rope = torch.randn(T, DIMS["qk_rope_head_dim"], generator=g).to(dtype)
    w = (torch.randn(h * (DIMS["qk_nope_head_dim"] + dv), R, generator=g) * R ** -0.5).to(dtype)
    ctx, ref_ctx = (make_context(p, BS, seqs) for p in pools)
    return ctx, ref_ctx, q, latent, k_rope, w


def _run(ctx, q, latent, k_rope, w, scale):
    """What a provider does with a split step: store, split, absorbed rows (here the torch reference on
    their own batch), expanded sequences. Returns (out, split)."""
    cache, *scales = ctx.kv[0]
    torch_ref._store(cache, ctx.slot_mapping, torch.cat([latent, k_rope], dim=-1), scales[0] if scales else None)
    split = mla_prefill.split_step(ctx, q, DIMS, absorbed_max_q=8)
    assert split is not None

    def absorbed(q_rows, sub):
        rows = split.absorbed_rows
        return torch_ref.attention(q_rows, latent[rows], k_rope[rows], ctx=sub, kind="mla", layer=0, scale=scale,
                                   kv_b_proj=w, **DIMS)
    h, nope, vd = DIMS["heads"], DIMS["qk_nope_head_dim"], DIMS["v_head_dim"]
    out = mla_prefill.run_split(q, split, absorbed, w=w.view(h, nope + vd, R), cache=cache,
                                kv_scale=scales[0] if scales else None, scale=scale, nope=nope)
    return out, split


def _close(out, ref, tol):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err, bound = (out.float() - ref.float()).abs().max().item(), tol * ref.float().abs().max().item()
    assert err <= bound, (err, bound)


def test_split_step_rows_and_absorbed_batch(on_cpu):
    ctx, ref_ctx, q, latent, k_rope, w = _step(SPEC, dtype=torch.float32, seed=1)
    out, split = _run(ctx, q, latent, k_rope, w, scale=0.2)
    ref = torch_ref.attention(q, latent, k_rope, ctx=ref_ctx, kind="mla", layer=0, scale=0.2, kv_b_proj=w, **DIMS)
    _close(out, ref, 1e-5)
    assert torch.equal(ctx.kv[0][0], ref_ctx.kv[0][0])  # the pool as the reference stores it
    starts = [sum(q for q, _ in SPEC[:i]) for i in range(len(SPEC))]
    assert [(s, n) for s, n, _ in split.expanded] == [(starts[i], SPEC[i][0]) for i in EXPANDED]
    for (_, _, slots), i in zip(split.expanded, EXPANDED):
        assert torch.equal(slots, ref_ctx.context_slots(ref_ctx.seqs[i]))
    kept = [i for i in range(len(SPEC)) if i not in EXPANDED]
    sub = split.absorbed_ctx
    assert split.absorbed_rows.tolist() == [starts[i] + j for i in kept for j in range(SPEC[i][0])]
    assert sub.query_start.tolist() == [0, 1, 2, 5] and sub.context_lens.tolist() == [SPEC[i][1] for i in kept]
    assert torch.equal(sub.block_tables, ctx.block_tables[kept]) and (sub.max_query_len, sub.max_context_len) == (3, 15)
    assert sub.block_tables.dtype == sub.query_start.dtype == sub.context_lens.dtype == torch.int32
    assert mla_prefill.split_step(ctx, q, DIMS, absorbed_max_q=8) is split  # planned once per step
    masks = dict(split.masks)  # the bottom-right masks of the chunks after a prefix, built by this first layer
    assert set(masks) == {(n, L) for i, (n, L) in enumerate(SPEC) if i in EXPANDED and n != L}
    h, nope, vd = DIMS["heads"], DIMS["qk_nope_head_dim"], DIMS["v_head_dim"]
    again = mla_prefill.run_split(q, split, lambda q_rows, sub: out[split.absorbed_rows], w=w.view(h, nope + vd, R),
                                  cache=ctx.kv[0][0], kv_scale=None, scale=0.2, nope=nope)
    assert torch.equal(again, out) and all(split.masks[key] is m for key, m in masks.items())  # a later layer


@pytest.mark.parametrize("fp8_pool", [False, True], ids=["bf16", "fp8-pool"])
def test_bf16_within_rounding_of_f32_reference(on_cpu, fp8_pool):
    ctx, ref_ctx, q, latent, k_rope, w = _step(SPEC, dtype=torch.bfloat16, seed=2, fp8_pool=fp8_pool)
    out, _ = _run(ctx, q, latent, k_rope, w, scale=0.2)
    assert out.dtype == torch.bfloat16
    ref = torch_ref.attention(q.float(), latent.float(), k_rope.float(), ctx=ref_ctx, kind="mla", layer=0, scale=0.2,
                              kv_b_proj=w.float(), **DIMS)
    _close(out, ref, 2e-2)


@pytest.mark.parametrize("pad_v", [False, True], ids=["v-as-is", "v-padded"])
def test_expanded_form_equals_absorbed_one(pad_v, monkeypatch):
    """The core alone: one chunk after a prefix and one fresh prompt, against the absorbed form."""
    monkeypatch.setattr(mla_prefill, "PAD_V_TO_QK", pad_v)
    g = torch.Generator().manual_seed(3)
    h, nope, rope, vd = 3, 16, 8, 12
    w = torch.randn(h, nope + vd, R, generator=g) * R ** -0.5
    for n, L in [(5, 17), (11, 11)]:
        q, entry = torch.randn(n, h, nope + rope, generator=g), torch.randn(L, R + rope, generator=g)
        out = mla_prefill.expanded_attention(q, entry, w, scale=0.3, nope=nope)
        q_full = torch.cat([torch.einsum("nhd,hdr->nhr", q[..., :nope], w[:, :nope]), q[..., nope:]], dim=-1)
        o_lat = torch_ref._attend(q_full, entry[:, None], entry[:, None, :R], L, 0.3)
        _close(out, torch.einsum("nhr,hvr->nhv", o_lat, w[:, nope:]), 1e-5)


def test_steps_that_do_not_split(on_cpu, monkeypatch):
    decode = [(1, 7), (3, 9), (8, 20)]  # decode and verify rows only (at most 8 a sequence)
    ctx, _, q, *_ = _step(decode, dtype=torch.float32, seed=4)
    assert mla_prefill.split_step(ctx, q, DIMS, absorbed_max_q=8) is None and not ctx.scratch
    ctx, _, q, *_ = _step(SPEC, dtype=torch.float32, seed=5)
    graph_ctx = BatchContext(ctx.kv, BS, ctx.slot_mapping, ctx.query_start, ctx.context_lens, ctx.block_tables,
                             ctx.max_query_len, ctx.max_context_len)  # as cuda_graphs.py builds it: no host lists
    assert mla_prefill.split_step(graph_ctx, q, DIMS, absorbed_max_q=8) is None
    monkeypatch.setattr(mla_prefill, "DEVICES", frozenset({"cuda"}))
    assert mla_prefill.split_step(ctx, q, DIMS, absorbed_max_q=8) is None  # the CPU target keeps its kernels
    monkeypatch.setattr(mla_prefill, "DEVICES", frozenset({"cpu"}))
    # a context whose expanded K/V would pass the budget stays absorbed: 30 tokens fit, 45 do not
    per_token = mla_prefill.expanded_bytes_per_token(DIMS, q.element_size())
    monkeypatch.setattr(mla_prefill, "EXPAND_MAX_BYTES", 30 * per_token)
    split = mla_prefill.split_step(ctx, q, DIMS, absorbed_max_q=8)
    assert [n for _, n, _ in split.expanded] == [12, 9] and split.absorbed_ctx.max_query_len == 20
    monkeypatch.setattr(mla_prefill, "EXPAND_MAX_BYTES", 10 * per_token)
    ctx, _, q, *_ = _step(SPEC, dtype=torch.float32, seed=5)
    assert mla_prefill.split_step(ctx, q, DIMS, absorbed_max_q=8) is None


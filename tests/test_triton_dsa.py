"""The Triton DeepSeek-sparse-attention kernels (kernels/triton/dsa.py) against the torch reference
(kernels/dsa_ref.py), in the interpreter on CPU: fresh random inputs, a shuffled paged pool, one mixed
batch of a prefill chunk over a cached prefix, a decode row, verify-like rows and a context below
top-k (dense); model-dtype and FP8 pools, and model-dtype entries beside FP8 indexer keys
(--index-kv-dtype fp8)."""
from __future__ import annotations

import pytest
import torch

from nanoforge.kernels import dsa_ref
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kv_contract import KVContract, KVLayer

triton_dsa = pytest.importorskip("nanoforge.kernels.triton.dsa")

BS, NB, TOPK = 4, 40, 16
SEQS = [(7, 30), (1, 45), (3, 12), (1, 17)]  # (new rows, context after this step); 12 <= TOPK: dense
IDX = dict(heads=8, head_dim=32, rope_dim=8, style="neox", theta=10000.0, topk=TOPK, scale=32 ** -0.5, eps=1e-6)
MLA = dict(heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, kv_lora_rank=32, scale=0.2)


KV = ["f32", "fp8_e4m3", "fp8_index"]  # fp8_index: f32 entries, e4m3 indexer keys with their scales


def batch(kv: str, g: torch.Generator):
    """A pool holding each sequence's cached prefix (random, as earlier steps would have left it) and
    the context of this step; two copies, so each provider stores into its own."""
    if kv == "fp8_index":
        layer, dtype, scale_dtype = KVLayer(0, "dsa", ((40,), (32,)), "", ((1,),), ("f32", "fp8_e4m3")), "f32", "f32"
    else:
        fp8 = kv == "fp8_e4m3"
        layer, dtype, scale_dtype = KVLayer(0, "dsa", ((40,), (32,)), "", ((1,), (1,)) if fp8 else ()), kv, \
            "f32" if fp8 else None
    contract = KVContract(BS, dtype, (layer,), scale_dtype)
    pools = [allocate_pool(contract, NB), allocate_pool(contract, NB)]
    blocks = torch.randperm(NB, generator=g).tolist()
    seqs, at = [], 0
    for q_len, ctx_len in SEQS:
        n = -(-ctx_len // BS)
        seqs.append((q_len, ctx_len, blocks[at:at + n]))
        at += n
    ctxs = [make_context(p, BS, seqs) for p in pools]
    prefix = make_context(pools[0], BS, [(c - q, c - q, b) for q, c, b in seqs if c > q])
    fill = torch.randn(int(sum(c - q for q, c, _ in seqs)), 40, generator=g)
    entry, entry_scale, keys, key_scale = dsa_ref.dsa_pool(prefix, 0)
    assert (entry_scale is None) == (entry.dtype != torch.float8_e4m3fn) and (key_scale is None) == (kv == "f32")
    dsa_ref.store(entry, prefix.slot_mapping, fill, entry_scale)
    dsa_ref.store(keys, prefix.slot_mapping, fill[:, :32] * 2, key_scale)
    for a, b in zip(pools[0][0], pools[1][0]):
        b.copy_(a)
    return ctxs, pools


def positions(ctx) -> torch.Tensor:
    return torch.cat([torch.arange(s.ctx_len - s.q_len, s.ctx_len) for s in ctx.seqs])


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_indexer_scores_topk_and_store_match_reference(kv, dtype):
    g = torch.Generator().manual_seed(1)
    (c_ref, c_tri), (p_ref, p_tri) = batch(kv, g)
    T, hidden = sum(q for q, _ in SEQS), 48
    x = torch.randn(T, hidden, generator=g).to(dtype)
    q = torch.randn(T, 8 * 32, generator=g).to(dtype)
    k = torch.randn(T, 32, generator=g).to(dtype)
    params = (torch.randn(8, hidden, generator=g), (1 + 0.1 * torch.randn(32, generator=g)).to(dtype),
              (0.1 * torch.randn(32, generator=g)).to(dtype))
    pos = positions(c_ref)
    want = dsa_ref.indexer(x, q, k, pos, *params, ctx=c_ref, layer=0, **IDX)
    got = triton_dsa.indexer(x, q, k, pos, *params, ctx=c_tri, layer=0, **IDX)
    for a, b in zip(p_ref[0], p_tri[0]):  # the keys stored alike (FP8: bitwise, scales included)
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    # scores of the whole batch vs the reference's per sequence; the chosen sets score the same
    qr = dsa_ref.rope_front(q, pos, 8, head_dim=32, rope_dim=8, style="neox", theta=10000.0, scaling=None)
    w = torch.nn.functional.linear(x.float(), params[0]) * 8 ** -0.5
    rows = triton_dsa.row_positions(c_tri.query_start, c_tri.context_lens, T)
    assert torch.equal(rows[1], pos)
    _, _, cache, scale = dsa_ref.dsa_pool(c_tri, 0)
    scores = triton_dsa.index_scores(qr, w, cache, scale, rows, c_tri.block_tables, width=c_tri.max_context_len,
                                     scale=IDX["scale"])
    tol = 1e-5 if dtype == torch.float32 else 3e-3  # fp16: the reference rounds dequantized keys to fp16
    for s in c_ref.seqs:
        r = slice(s.q_start, s.q_start + s.q_len)
        keys = dsa_ref.read(cache, c_ref.context_slots(s), scale, dtype)
        ref = dsa_ref.index_scores(qr[r], keys, w[r], IDX["scale"])
        t = tol * max(1.0, ref.abs().max().item())
        for i in range(s.q_len):
            p = int(pos[s.q_start + i])
            torch.testing.assert_close(scores[s.q_start + i, :p + 1], ref[i, :p + 1], rtol=t, atol=t)
            assert (scores[s.q_start + i, p + 1:] == float("-inf")).all()
            a, b = got[s.q_start + i], want[s.q_start + i]
            assert (a >= 0).sum() == (b >= 0).sum() == min(TOPK, p + 1)
            pick = lambda ids: ref[i, ids[ids >= 0].long()].sort().values  # noqa: E731
            torch.testing.assert_close(pick(a), pick(b), rtol=t, atol=t)
    assert (want >= 0).sum(1).min() < TOPK and (want >= 0).sum(1).max() == TOPK  # dense rows and sparse ones


def random_ids(pos: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per row a random set of min(TOPK, pos + 1) of its causal positions, in random order, -1 padded."""
    out = torch.full((len(pos), TOPK), -1, dtype=torch.int32)
    for i, p in enumerate(pos.tolist()):
        pick = torch.randperm(p + 1, generator=g)[:TOPK]
        out[i, :len(pick)] = pick.to(torch.int32)
    return out


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_mla_matches_reference(kv, dtype):
    g = torch.Generator().manual_seed(2)
    (c_ref, c_tri), (p_ref, p_tri) = batch(kv, g)
    T, h = sum(q for q, _ in SEQS), MLA["heads"]
    q = torch.randn(T, h * 24, generator=g).to(dtype)
    latent, k_rope = torch.randn(T, 32, generator=g).to(dtype), torch.randn(T, 8, generator=g).to(dtype)
    kv_b = (0.3 * torch.randn(h * (16 + 24), 32, generator=g)).to(dtype)
    ids = random_ids(positions(c_ref), g)
    want = dsa_ref.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=c_ref, layer=0, topk=TOPK, **MLA)
    got = triton_dsa.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=c_tri, layer=0, topk=TOPK, **MLA)
    for a, b in zip(p_ref[0], p_tri[0]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    other = dsa_ref.sparse_mla(q, latent, k_rope, random_ids(positions(c_ref), g), kv_b, ctx=c_ref, layer=0,
                               topk=TOPK, **MLA)
    assert (other.float() - want.float()).abs().max() > 10 * tol  # another selection: another output


# ---- on the GPU (`pytest -m gpu`, bench/gpu_check.sh): DeepSeek-V3.2's real dims, bf16 ----------------------
REAL_BS, REAL_TOPK = 64, 2048
REAL_SEQS = [(64, 4096), (1, 9000), (1, 1500), (1, 5000), (3, 2500)]  # a prefill chunk, decode rows, verify-like
REAL_IDX = dict(heads=64, head_dim=128, rope_dim=64, style="interleaved", theta=10000.0, topk=REAL_TOPK,
                scale=128 ** -0.5, eps=1e-6)
REAL_MLA = dict(heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
                scale=192 ** -0.5)
DEVICE, DTYPE = "cuda", torch.bfloat16  # module constants: the GPU tests dry-run in the interpreter at small dims
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def real_batch(kv: str, g: torch.Generator):
    """Two identical CUDA pools (576-wide MLA entries, 128-wide indexer keys, 64-token blocks, shuffled)
    holding each sequence's cached prefix, and a context per pool."""
    fp8 = kv == "fp8_e4m3"
    entry, key = REAL_MLA["kv_lora_rank"] + REAL_MLA["qk_rope_head_dim"], REAL_IDX["head_dim"]
    contract = KVContract(REAL_BS, kv, (KVLayer(0, "dsa", ((entry,), (key,)), "", ((1,), (1,)) if fp8 else ()),),
                          "f32" if fp8 else None)
    blocks_needed = sum(-(-c // REAL_BS) for _, c in REAL_SEQS)
    pools = [allocate_pool(contract, blocks_needed + 8, DEVICE) for _ in range(2)]
    blocks = torch.randperm(blocks_needed + 8, generator=g).tolist()
    seqs, at = [], 0
    for q_len, ctx_len in REAL_SEQS:
        n = -(-ctx_len // REAL_BS)
        seqs.append((q_len, ctx_len, blocks[at:at + n]))
        at += n
    ctxs = [make_context(p, REAL_BS, seqs, DEVICE) for p in pools]
    prefix = make_context(pools[0], REAL_BS, [(c - q, c - q, b) for q, c, b in seqs], DEVICE)
    fill = torch.randn(int(sum(c - q for q, c, _ in seqs)), entry, generator=g).to(DEVICE)
    scales = pools[0][0][2:] if fp8 else (None, None)
    dsa_ref.store(pools[0][0][0], prefix.slot_mapping, fill, scales[0])
    dsa_ref.store(pools[0][0][1], prefix.slot_mapping, fill[:, :key] * 2, scales[1])
    for a, b in zip(pools[0][0], pools[1][0]):
        b.copy_(a)
    return ctxs, pools


def gpu_positions(ctx) -> torch.Tensor:
    return torch.cat([torch.arange(s.ctx_len - s.q_len, s.ctx_len) for s in ctx.seqs]).to(DEVICE)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_gpu_indexer_at_real_dims(kv):
    """Keys stored alike, every selected set as good as the reference's (its scores of our picks, sorted,
    equal its own top-k's), dense rows (context <= 2048) keep all their tokens."""
    g = torch.Generator().manual_seed(11)
    (c_ref, c_tri), (p_ref, p_tri) = real_batch(kv, g)
    T, hidden, dt = sum(q for q, _ in REAL_SEQS), 7168, DTYPE
    h, d = REAL_IDX["heads"], REAL_IDX["head_dim"]
    x = torch.randn(T, hidden, generator=g).to(DEVICE, dt)
    q = torch.randn(T, h * d, generator=g).to(DEVICE, dt)
    k = torch.randn(T, d, generator=g).to(DEVICE, dt)
    params = ((0.02 * torch.randn(h, hidden, generator=g)).to(DEVICE, dt),
              (1 + 0.1 * torch.randn(d, generator=g)).to(DEVICE, dt), (0.1 * torch.randn(d, generator=g)).to(DEVICE, dt))
    pos = gpu_positions(c_ref)
    want = dsa_ref.indexer(x, q, k, pos, *params, ctx=c_ref, layer=0, **REAL_IDX)
    got = triton_dsa.indexer(x, q, k, pos, *params, ctx=c_tri, layer=0, **REAL_IDX)
    for a, b in zip(p_ref[0], p_tri[0]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), "stored keys differ"
    qr = dsa_ref.rope_front(q, pos, h, head_dim=d, rope_dim=REAL_IDX["rope_dim"], style="interleaved", theta=10000.0,
                            scaling=None)
    w = torch.nn.functional.linear(x, params[0]).float() * h ** -0.5
    _, _, cache, scale = dsa_ref.dsa_pool(c_ref, 0)
    worst = 0.0
    for s in c_ref.seqs:
        r = slice(s.q_start, s.q_start + s.q_len)
        ref = dsa_ref.index_scores(qr[r], dsa_ref.read(cache, c_ref.context_slots(s), scale, dt), w[r], REAL_IDX["scale"])
        for i in range(s.q_len):
            p = int(pos[s.q_start + i])
            a, b = got[s.q_start + i], want[s.q_start + i]
            n_a, n_b = int((a >= 0).sum()), int((b >= 0).sum())
            assert n_a == n_b == min(REAL_TOPK, p + 1), f"row {s.q_start + i} (pos {p}): {n_a} vs {n_b} tokens"
            assert int(a.max()) <= p, f"row {s.q_start + i}: a token after its position"
            ours, theirs = (ref[i, ids[ids >= 0].long()].sort().values for ids in (a, b))
            err = (ours - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-6)
            worst = max(worst, err)
    tol = 2e-2 if kv == "bf16" else 5e-2  # FP8: the reference rounds dequantized keys to bf16, the kernel does not
    print(f"indexer {kv}: worst relative gap of the picked sets' reference scores {worst:.2e} (tol {tol})")
    assert worst < tol


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_gpu_sparse_mla_at_real_dims(kv):
    g = torch.Generator().manual_seed(12)
    (c_ref, c_tri), (p_ref, p_tri) = real_batch(kv, g)
    T, dt = sum(q for q, _ in REAL_SEQS), DTYPE
    h, nope, rope, vd, r = (REAL_MLA[k] for k in ("heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                                   "kv_lora_rank"))
    q = torch.randn(T, h * (nope + rope), generator=g).to(DEVICE, dt)
    latent, k_rope = torch.randn(T, r, generator=g).to(DEVICE, dt), torch.randn(T, rope, generator=g).to(DEVICE, dt)
    kv_b = (0.05 * torch.randn(h * (nope + vd), r, generator=g)).to(DEVICE, dt)
    pos = gpu_positions(c_ref).cpu()
    ids = torch.full((T, REAL_TOPK), -1, dtype=torch.int32)
    for i, p in enumerate(pos.tolist()):
        pick = torch.randperm(p + 1, generator=g)[:REAL_TOPK]
        ids[i, :len(pick)] = pick.to(torch.int32)
    ids = ids.to(DEVICE)
    want = dsa_ref.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=c_ref, layer=0, topk=REAL_TOPK, **REAL_MLA)
    got = triton_dsa.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=c_tri, layer=0, topk=REAL_TOPK, **REAL_MLA)
    for a, b in zip(p_ref[0], p_tri[0]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), "stored entries differ"
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    print(f"sparse_mla {kv}: max abs err {err:.3e}, max |ref| {scale:.3e}")
    assert torch.isfinite(got).all() and err <= 3e-2 * max(scale, 1e-3)

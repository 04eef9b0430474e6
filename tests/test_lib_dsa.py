"""DeepSeek sparse attention on the GPU libraries (kernels/libs/flash_mla_sparse.py, deep_gemm_indexer.py),
the parts that run without a GPU: the layouts they read (kernels/dsa_layouts.py) against our pool and the
torch reference on fresh random inputs, provider ranking, and each adapter's plumbing against a torch
stand-in of its library written from the wheel's documented contract (shapes, dtypes, the constraints
its host code checks). The kernels themselves: tests/test_gpu_dsa_libs.py."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

from lib_fixtures import CPU, SM90, _fake, _fresh_probe_cache  # noqa: F401 - fixture
from nanoforge.codegen import providers
from nanoforge.errors import NanoForgeError
from nanoforge.kernels import dsa_layouts as L
from nanoforge.kernels import dsa_ref, libs
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kernels.fp8 import FP8, quantize_kv
from nanoforge.kv_contract import KVContract, KVLayer
from nanoforge.runtime.kv_transfer import gather_blocks, scatter_blocks

ADAPTERS = ("nanoforge.kernels.libs.flash_mla_sparse", "nanoforge.kernels.libs.deep_gemm_indexer")



def _indexer_inputs(seqs: list, hidden: int, heads: int, d: int, topk: int, g: torch.Generator) -> tuple:
    """An indexer step's random inputs (one row per sequence, at its last position), its weights and attrs."""
    x, q, k = (torch.randn(len(seqs), n, generator=g) for n in (hidden, heads * d, d))
    params = (torch.randn(heads, hidden, generator=g), 1 + 0.1 * torch.randn(d, generator=g),
              0.1 * torch.randn(d, generator=g))
    attrs = dict(heads=heads, head_dim=d, rope_dim=64, style="interleaved", theta=10000.0, topk=topk,
                 scale=d ** -0.5, eps=1e-6)
    return x, q, k, params, attrs, torch.tensor([c - 1 for _, c, _ in seqs])

def random_ids(pos: list[int], k: int, g: torch.Generator) -> torch.Tensor:
    """Per row a random set of min(k, pos + 1) causal positions, -1 scattered among them."""
    out = torch.full((len(pos), k), -1, dtype=torch.int32)
    for i, p in enumerate(pos):
        pick = torch.randperm(p + 1, generator=g)[:k].to(torch.int32)
        out[i, torch.randperm(k, generator=g)[:len(pick)]] = pick
    return out


def shuffled_seqs(q_ctx: list[tuple[int, int]], bs: int, nb: int, g: torch.Generator):
    blocks, seqs, at = torch.randperm(nb, generator=g).tolist(), [], 0
    for q, c in q_ctx:
        n = -(-c // bs)
        seqs.append((q, c, blocks[at:at + n]))
        at += n
    return seqs


def row_seq_pos(seqs) -> tuple[torch.Tensor, list[int]]:
    seq = torch.cat([torch.full((q,), i) for i, (q, _, _) in enumerate(seqs)])
    return seq, [p for q, c, _ in seqs for p in range(c - q, c)]


def test_token_slots_are_the_pool_rows_of_the_selected_tokens():
    g = torch.Generator().manual_seed(5)
    bs, k = 4, 11
    seqs = shuffled_seqs([(3, 13), (1, 1), (2, 30), (1, 7)], bs, 40, g) + [(1, 1, [])]  # a graph's padding row
    ctx = make_context([(torch.zeros(40, bs, 8),)], bs, seqs)
    seq, pos = row_seq_pos(seqs)
    ids = random_ids(pos, k, g)
    got = L.token_slots(ids, seq, ctx.block_tables, bs, multiple=8)
    assert got.dtype == torch.int32 and got.shape == (len(pos), 16) and (got[:, k:] == -1).all()
    for t, s in enumerate(seq.tolist()):
        rows = ctx.context_slots(ctx.seqs[s]) if seqs[s][2] else torch.zeros(1, dtype=torch.long)  # padding: table 0s
        want = [int(rows[i]) if i >= 0 else -1 for i in ids[t].tolist()]
        assert got[t, :k].tolist() == want, t
    wide = torch.zeros(ctx.block_tables.shape[0], 20, dtype=torch.int32)  # a strided table: same rows
    wide[:, :ctx.block_tables.shape[1]] = ctx.block_tables
    assert torch.equal(L.token_slots(ids, seq, wide[:, :ctx.block_tables.shape[1]], bs, 8), got)
    assert torch.equal(L.token_slots(ids, seq, ctx.block_tables, bs), got[:, :k])  # no padding asked


def test_head_padding():
    x = torch.randn(3, 5, 7)
    p = L.pad_heads(x, 64)
    assert p.shape == (3, 64, 7) and torch.equal(p[:, :5], x) and not p[:, 5:].any() and p.is_contiguous()
    assert [L.kernel_heads(h, (64, 128)) for h in (1, 64, 65, 128, 129)] == [64, 64, 128, 128, None]


def fp8_dsa_pool(bs: int, nb: int, key_dim: int, entry: int = 40):
    contract = KVContract(bs, "fp8_e4m3", (KVLayer(0, "dsa", ((entry,), (key_dim,)), "", ((1,), (1,))),), "f32")
    return allocate_pool(contract, nb)


def test_fp8_dsa_pool_keeps_keys_and_scales_in_deep_gemms_fused_pages():
    """Per block: BS x D e4m3 keys, then BS f32 scales; the reference stores and reads through the views,
    and a PD move of the blocks (gather / scatter) carries them to another pool unchanged."""
    g = torch.Generator().manual_seed(6)
    bs, nb, d = 8, 6, 16
    (entry, keys, entry_scale, scales), = pool = fp8_dsa_pool(bs, nb, d)
    fused = L.fused_index_cache(keys, scales)
    assert fused is not None and fused.shape == (nb, bs, 1, d + 4) and fused.dtype == torch.uint8
    slots = torch.randperm(nb * bs, generator=g)[:20]
    values = torch.randn(20, d, generator=g) * 3
    dsa_ref.store(keys, slots, values, scales)
    raw = fused.as_strided((nb, bs * (d + 4)), (fused.stride(0), 1))
    q, s = quantize_kv(values[:, None, :])
    for i, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        assert torch.equal(raw[b, o * d:(o + 1) * d], q[i, 0].view(torch.uint8))
        assert torch.equal(raw[b, bs * d + 4 * o: bs * d + 4 * (o + 1)].view(torch.float32), s[i])
    back = dsa_ref.read(keys, slots, scales, torch.float32)
    torch.testing.assert_close(back, values, rtol=0.07, atol=0.07 * values.abs().max().item())
    other = fp8_dsa_pool(bs, nb, d)
    scatter_blocks(other, [5, 0, 2], gather_blocks(pool, [1, 3, 4]))
    for a, b in zip(pool[0], other[0]):
        assert torch.equal(a[[1, 3, 4]].view(torch.uint8) if a.dtype == FP8 else a[[1, 3, 4]],
                           b[[5, 0, 2]].view(torch.uint8) if b.dtype == FP8 else b[[5, 0, 2]])
    assert L.fused_index_cache(entry, entry_scale) is None  # MLA's entries: ordinary tensors
    bf16 = allocate_pool(KVContract(bs, "bf16", (KVLayer(0, "dsa", ((40,), (d,))),)), nb)
    assert len(bf16[0]) == 2 and bf16[0][1].is_contiguous()


def test_fp8_queries_with_folded_scales_give_the_reference_scores():
    """DeepGEMM's logits (sum_h w' * relu(q_fp8 . k), keys dequantized) equal the reference's scores of the
    same keys up to the e4m3 rounding of q."""
    g = torch.Generator().manual_seed(7)
    T, H, D, n = 5, 6, 32, 50
    q, keys = torch.randn(T, H, D, generator=g), torch.randn(n, D, generator=g)
    w, scale = torch.randn(T, H, generator=g) * H ** -0.5, D ** -0.5
    q8, w8 = L.fp8_index_queries(q, w, scale, 32)
    assert q8.dtype == FP8 and q8.shape == (T, 32, D) and w8.shape == (T, 32) and not w8[:, H:].any()
    got = (torch.relu(torch.einsum("thd,nd->thn", q8.float(), keys)) * w8[..., None]).sum(1)
    want = dsa_ref.index_scores(q, keys, w, scale)
    err = (got - want).abs().max() / want.abs().max()
    assert 1e-5 < err < 0.05, err  # e4m3 rounding of q: visible, ~3% of the largest score


# ---------------------------------------------------------------------------------------------
# the adapters against torch stand-ins of the libraries
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fakes(monkeypatch):
    """flash_mla and deep_gemm stand-ins importable; the adapters imported against them do not leak."""
    monkeypatch.setitem(sys.modules, "flash_mla", _fake_flash_mla())
    monkeypatch.setitem(sys.modules, "deep_gemm", _fake_deep_gemm())
    monkeypatch.setattr(libs, "import_error", lambda adapter: None)
    for name in ADAPTERS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in ADAPTERS:
        sys.modules.pop(name, None)
        libs.__dict__.pop(name.rsplit(".", 1)[1], None)


def _fake_flash_mla():
    """flash_mla_sparse_fwd's contract on SM90 (flash_mla_interface.py, the legacy sparse_prefill checks):
    q bf16 [s_q, h_q in (64, 128), 576] heads contiguous, kv bf16 [s_kv, 1, 576], indices i32
    [s_q, 1, topk % 64 == 0] (-1: none); out [s_q, h_q, 512] = softmax(q . kv * scale) @ kv[:, :512]."""
    def sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, use_legacy=False,
                   return_log2_lse=None):
        s_q, h_q, d_qk = q.shape
        assert use_legacy and q.dtype == kv.dtype == torch.bfloat16 and indices.dtype == torch.int32
        assert h_q in (64, 128) and d_qk == 576 and d_v == 512 and kv.shape[1:] == (1, 576)
        assert indices.shape[:2] == (s_q, 1) and indices.shape[2] % 64 == 0
        assert q.stride(-1) == 1 and q.stride(1) == d_qk and kv.stride(-1) == 1 and indices.stride(-1) == 1
        idx = indices[:, 0].long()
        ok = (idx >= 0) & (idx < kv.shape[0])
        rows = kv[:, 0].float()[idx.clamp(0, kv.shape[0] - 1)]  # [s_q, topk, 576]
        s = torch.einsum("qhd,qkd->qhk", q.float(), rows) * sm_scale
        p = torch.softmax(s.masked_fill(~ok[:, None, :], float("-inf")), dim=-1)
        return torch.einsum("qhk,qkd->qhd", p, rows[..., :d_v]).to(q.dtype), None, None

    return _fake("flash_mla", __version__=libs.FLASH_MLA.version, has_legacy=lambda: True,
                 flash_mla_sparse_fwd=sparse_fwd)


NUM_SMS = 132


def _fake_deep_gemm():
    """fp8_paged_mqa_logits' contract on SM90 (DeepGEMM's host checks, tests' reference): q e4m3
    [B, 1, H in (32, 64), 128]; the fused uint8 cache [NB, 64, 1, 132], per page 64 x 128 e4m3 then 64 f32
    scales, read here from the raw bytes; f32 logits [B, max_len], garbage past each row's length."""
    def metadata(lens, block_kv, num_sms):
        assert lens.dim() == 2 and lens.dtype == torch.int32 and lens.is_contiguous() and block_kv == 64
        return torch.zeros(num_sms + 1, 2, dtype=torch.int32)

    def logits(q, fused, weights, lens, table, meta, max_len, clean_logits=False, indices=None):
        B, next_n, H, D = q.shape
        nb, bs = fused.shape[:2]
        assert q.dtype == FP8 and q.is_contiguous() and next_n == 1 and H in (32, 64) and D == 128
        assert fused.dtype == torch.uint8 and fused.shape[1:] == (64, 1, D + 4)
        assert fused.stride()[1:] == (D + 4, D + 4, 1)
        assert weights.dtype == torch.float32 and weights.shape == (B, H) and weights.stride(1) == 1
        assert lens.shape == (B, 1) and lens.dtype == table.dtype == torch.int32 and table.stride(1) == 1
        assert meta.shape == (NUM_SMS + 1, 2) and not clean_logits and indices is None
        raw = fused.as_strided((nb, bs * (D + 4)), (fused.stride(0), 1))
        vals = raw[:, :bs * D].contiguous().view(FP8).view(nb, bs, D).float()
        scales = raw[:, bs * D:].contiguous().view(torch.float32)
        out = torch.full((B, max_len), float("nan"))
        for b in range(B):
            n = int(lens[b, 0])
            pages = table[b, :-(-n // bs)].long()
            k = (vals[pages] * scales[pages][..., None]).reshape(-1, D)[:n]
            out[b, :n] = (torch.relu(q[b, 0].float() @ k.T) * weights[b][:, None]).sum(0)
        return out

    return _fake("deep_gemm", __version__=libs.DEEP_GEMM.version, get_num_sms=lambda: NUM_SMS,
                 get_paged_mqa_logits_metadata=metadata, fp8_paged_mqa_logits=logits)


def test_ranking_with_the_libraries_importable(fakes):
    first = lambda op, attrs: [n for n, why in providers.candidates(op, SM90, attrs) if why is None][0]  # noqa: E731
    mla = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "out_dtype": "bf16", "heads": 16}
    assert first("sparse_mla", mla) == "flash_mla_sparse"
    for other in ({"kv_lora_rank": 256}, {"qk_rope_head_dim": 32}, {"out_dtype": "f32"}, {"kv_dtype": "fp8_e4m3"}):
        assert first("sparse_mla", {**mla, **other}) == "triton", other
        assert dict(providers.candidates("sparse_mla", SM90, {**mla, **other}))["flash_mla_sparse"]
    idx = {"heads": 64, "head_dim": 128, "kv_dtype": "fp8_e4m3", "out_dtype": "i32"}
    assert first("indexer", idx) == "deep_gemm_indexer"
    for other in ({"kv_dtype": None}, {"head_dim": 64}, {"heads": 128}):
        assert first("indexer", {**idx, **other}) == "triton", other
    assert [n for n, why in providers.candidates("sparse_mla", CPU, mla) if why is None] == ["torch"]


def test_flash_mla_sparse_attend_plumbing(fakes):
    """Flat pool rows, heads padded to 64 / 128 (and chunked past 128), top-k padded to 64: the result
    equals plain attention over each row's selected pool entries."""
    M = importlib.import_module(ADAPTERS[0])
    g = torch.Generator().manual_seed(8)
    bs, nb, k = 16, 24, 20
    seqs = shuffled_seqs([(4, 40), (1, 70), (1, 9), (2, 100)], bs, nb, g)
    cache = (torch.randn(nb, bs, 576, generator=g) * 0.5).to(torch.bfloat16)
    ctx = make_context([(cache,)], bs, seqs)
    seq, pos = row_seq_pos(seqs)
    ids = random_ids(pos, k, g)
    assert M.takes(ctx, 0, torch.bfloat16, 512, 64)
    assert not M.takes(ctx, 0, torch.float32, 512, 64) and not M.takes(ctx, 0, torch.bfloat16, 256, 64)
    for heads in (4, 130):
        q = (torch.randn(len(pos), heads, 576, generator=g) * 0.5).to(torch.bfloat16)
        out = M.sparse_attend(q, cache, ids, (seq, torch.tensor(pos)), ctx, scale=0.05)
        assert out.shape == (len(pos), heads, 512)
        for t in range(len(pos)):
            sel = ids[t][ids[t] >= 0].long()
            kv = dsa_ref.read(cache, ctx.context_slots(ctx.seqs[int(seq[t])])[sel], None, torch.float32)
            p = torch.softmax(q[t].float() @ kv.T * 0.05, dim=-1)
            torch.testing.assert_close(out[t].float(), p @ kv[:, :512], rtol=2e-2, atol=2e-2)


def test_deep_gemm_indexer_plumbing(fakes):
    """A decode step over an FP8 pool: keys stored as the reference stores them, FP8 queries with folded
    scales on the (stand-in) paged logits, padded heads, the top-k as good as the reference's."""
    M = importlib.import_module(ADAPTERS[1])
    g = torch.Generator().manual_seed(9)
    bs, nb, heads, d, topk, hidden = 64, 12, 8, 128, 16, 48
    seqs = shuffled_seqs([(1, 150), (1, 9), (1, 64), (1, 300)], bs, nb, g)
    pools = [fp8_dsa_pool(bs, nb, d), fp8_dsa_pool(bs, nb, d)]
    prefix = make_context(pools[0], bs, [(c - 1, c - 1, b) for _, c, b in seqs])
    dsa_ref.store(pools[0][0][1], prefix.slot_mapping, torch.randn(prefix.slot_mapping.shape[0], d, generator=g),
                  pools[0][0][3])
    for a, b in zip(*(p[0] for p in pools)):
        b.copy_(a)
    ctx, ref_ctx = (make_context(p, bs, seqs) for p in pools)
    assert M.takes(ctx, 0, heads, d, len(seqs))
    mixed = make_context(pools[1], bs, [(2, 150, seqs[0][2])])
    assert not M.takes(mixed, 0, heads, d, 2)  # a prefill row: the Triton kernel
    x, q, k, params, attrs, pos = _indexer_inputs(seqs, hidden, heads, d, topk, g)
    got = M.indexer(x, q, k, pos, *params, ctx=ctx, layer=0, **attrs)
    want = dsa_ref.indexer(x, q, k, pos, *params, ctx=ref_ctx, layer=0, **attrs)
    for a, b in zip(pools[0][0], pools[1][0]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)
    qr = dsa_ref.rope_front(q, pos, heads, head_dim=d, rope_dim=64, style="interleaved", theta=10000.0, scaling=None)
    w = torch.nn.functional.linear(x, params[0]) * heads ** -0.5
    for s in ref_ctx.seqs:
        t = s.q_start
        ref = dsa_ref.index_scores(qr[t:t + 1], dsa_ref.read(pools[1][0][1], ref_ctx.context_slots(s), pools[1][0][3],
                                                              torch.float32), w[t:t + 1], attrs["scale"])[0]
        a, b = got[t], want[t]
        assert (a >= 0).sum() == (b >= 0).sum() == min(topk, s.ctx_len) and int(a.max()) < s.ctx_len
        ours, theirs = (ref[ids[ids >= 0].long()].sort().values for ids in (a, b))
        assert ((ours - theirs).abs().max() / theirs.abs().max()) < 0.1  # e4m3 q: ~3% of the top score each


def _dsa_plan(monkeypatch, **opts):
    from nanoforge.compiler import CompileOptions, compile_checkpoint
    from nanoforge.models.random_checkpoint import RandomCheckpoint
    from test_deepseek_v32 import tiny_config

    monkeypatch.setattr("nanoforge.compiler.target_of", lambda device: SM90)
    config = {**tiny_config("deepseek_v32", kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128).to_dict(),
              "architectures": ["DeepseekV32ForCausalLM"]}
    plan = compile_checkpoint("v32", CompileOptions(device="cuda", dtype="bf16", **opts),
                              ckpt=RandomCheckpoint(config, "v32", "bf16"))
    used = {op: {n.provider for _, n in plan.module.nodes() if n.op == op} for op in ("indexer", "sparse_mla")}
    return plan, used


def test_dsa_plans_pick_the_libraries_and_say_why(fakes, monkeypatch):
    plan, used = _dsa_plan(monkeypatch)
    assert used == {"indexer": {"triton"}, "sparse_mla": {"flash_mla_sparse"}}, used
    notes = plan.provider_notes
    assert any(n.startswith("flash_mla_sparse: DSA's sparse MLA on FlashMLA") for n in notes["sparse_mla"])
    assert any(n.startswith("deep_gemm_indexer: its paged MQA logits read FP8 keys")
               for n in notes["indexer"])
    assert plan.kv_contract.block_size == 16  # FlashMLA's sparse kernel reads rows by flat index: any block size
    plan, used = _dsa_plan(monkeypatch, kv_dtype="fp8")
    assert used == {"indexer": {"deep_gemm_indexer"}, "sparse_mla": {"triton"}}, used
    assert plan.kv_contract.block_size == 64  # DeepGEMM's SM90 pages
    with pytest.raises(NanoForgeError, match=r"--provider sparse_mla=flash_mla_sparse: its sparse kernel reads bf16"):
        _dsa_plan(monkeypatch, kv_dtype="fp8", providers={"sparse_mla": "flash_mla_sparse"})
    # FP8 indexer keys beside bf16 latents (as DeepSeek-V3.2 stores them): both libraries in one plan
    plan, used = _dsa_plan(monkeypatch, index_kv_dtype="fp8")
    assert used == {"indexer": {"deep_gemm_indexer"}, "sparse_mla": {"flash_mla_sparse"}}, used
    kv = plan.kv_contract
    assert kv.block_size == 64 and kv.dtype == "bf16" and kv.scale_dtype == "f32"
    assert {(layer.dtypes, layer.scale_shapes) for layer in kv.layers} == {(("bf16", "fp8_e4m3"), ((1,),))}


def test_both_adapters_on_one_pool_of_bf16_latents_and_fp8_indexer_keys(fakes):
    """--index-kv-dtype fp8's pool (bf16 [latent | rope] entries, e4m3 keys fused with their f32 scales): a
    decode step runs the indexer on (stand-in) DeepGEMM and sparse MLA on (stand-in) FlashMLA over it, storing
    what the reference stores, the picks as good as the reference's, the attention output the reference's
    over those picks."""
    sparse, index = (importlib.import_module(name) for name in ADAPTERS)
    g = torch.Generator().manual_seed(10)
    bs, nb, heads, d, topk, hidden = 64, 12, 8, 128, 16, 48
    contract = KVContract(bs, "bf16", (KVLayer(0, "dsa", ((576,), (d,)), "", ((1,),), ("bf16", "fp8_e4m3")),), "f32")
    pools = [allocate_pool(contract, nb), allocate_pool(contract, nb)]
    assert [t.dtype for t in pools[0][0]] == [torch.bfloat16, FP8, torch.float32]
    assert L.fused_index_cache(pools[0][0][1], pools[0][0][2]) is not None
    seqs = shuffled_seqs([(1, 150), (1, 9), (1, 64), (1, 300)], bs, nb, g)
    prefix = make_context(pools[0], bs, [(c - 1, c - 1, b) for _, c, b in seqs])
    n = prefix.slot_mapping.shape[0]
    dsa_ref.store(pools[0][0][0], prefix.slot_mapping, 0.5 * torch.randn(n, 576, generator=g), None)
    dsa_ref.store(pools[0][0][1], prefix.slot_mapping, torch.randn(n, d, generator=g), pools[0][0][2])
    for a, b in zip(*(p[0] for p in pools)):
        b.copy_(a)
    ctx, ref_ctx = (make_context(p, bs, seqs) for p in pools)
    T = len(seqs)
    assert index.takes(ctx, 0, heads, d, T) and sparse.takes(ctx, 0, torch.bfloat16, 512, 64)
    x, q, k, params, attrs, pos = _indexer_inputs(seqs, hidden, heads, d, topk, g)
    ids = index.indexer(x, q, k, pos, *params, ctx=ctx, layer=0, **attrs)
    want_ids = dsa_ref.indexer(x, q, k, pos, *params, ctx=ref_ctx, layer=0, **attrs)
    assert [int((r >= 0).sum()) for r in ids] == [int((r >= 0).sum()) for r in want_ids] == [16, 9, 16, 16]
    qr = dsa_ref.rope_front(q, pos, heads, head_dim=d, rope_dim=64, style="interleaved", theta=10000.0, scaling=None)
    w = torch.nn.functional.linear(x, params[0]) * heads ** -0.5
    _, no_scale, keys, scales = dsa_ref.dsa_pool(ref_ctx, 0)
    assert no_scale is None and keys.dtype == FP8 and scales.dtype == torch.float32
    for s in ref_ctx.seqs:
        t = s.q_start
        ref = dsa_ref.index_scores(qr[t:t + 1], dsa_ref.read(keys, ref_ctx.context_slots(s), scales, torch.float32),
                                   w[t:t + 1], attrs["scale"])[0]
        ours, theirs = (ref[r[r >= 0].long()].sort().values for r in (ids[t], want_ids[t]))
        assert ((ours - theirs).abs().max() / theirs.abs().max()) < 0.1  # e4m3 q: ~3% of the top score each
    mla = dict(heads=heads, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, kv_lora_rank=512,
               scale=96 ** -0.5, topk=topk)
    bf = lambda *shape, std=1.0: (std * torch.randn(*shape, generator=g)).to(torch.bfloat16)  # noqa: E731
    q_mla, latent, k_rope, kv_b = bf(T, heads * 96), bf(T, 512), bf(T, 64), bf(heads * 64, 512, std=0.05)
    got = sparse.sparse_mla(q_mla, latent, k_rope, ids, kv_b, ctx=ctx, layer=0, **mla)
    want = dsa_ref.sparse_mla(q_mla, latent, k_rope, ids, kv_b, ctx=ref_ctx, layer=0, **mla)
    for a, b in zip(pools[0][0], pools[1][0]):  # the step's entry and key stored alike, scales included
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.float().abs().max().item())

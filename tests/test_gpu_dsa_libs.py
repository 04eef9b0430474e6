"""On the GPU (`pytest -m gpu`): DeepSeek sparse attention on the libraries' kernels, FlashMLA's SM90 sparse
kernel for sparse_mla (kernels/libs/flash_mla_sparse.py) and DeepGEMM's paged FP8 MQA logits for the
indexer (kernels/libs/deep_gemm_indexer.py). Each against the torch reference (kernels/dsa_ref.py) on fresh
random inputs at small dims (heads and top-k padded) and DeepSeek-V3.2's real ones, eagerly and replayed
in a CUDA graph on new inputs; both on one pool of bf16 latents and FP8 indexer keys (--index-kv-dtype fp8,
as DeepSeek-V3.2 stores them); then a tiny DeepSeek-V3.2 checkpoint with the dims they take (latent 512 +
rope 64, index head dim 128) through the engine on them, each alone and both in one plan, with and without
graphs, against the CPU path with the same plan options (the same FP8 rounding of whatever it stores in FP8).
Skipped without an SM90 GPU or where the pinned library does not import.

Why a logit distance and not token equality end to end: the kernels run bf16 (FlashMLA has no other) and
the DeepGEMM indexer scores e4m3 queries, and on this tiny random model the CPU path itself in bf16 already
gives other greedy tokens than in f32 for every prompt. So each GPU run's reported top-5 logprobs are
compared with the f32 CPU path's teacher-forced on the run's own tokens (every position counts) and must
stay within twice the bf16 CPU path's shift, a noise level measured in the test. The same measure on the
weights run dense (the selection ignored) must exceed that bound, or the test says it cannot see the
selection (measured on CPU: noise ~0.6, selection-blind ~2.7). For the same reason the GPU's tokens are not
compared with the CPU's token for token, nor graphs' with eager runs' (padded graph batches may round GEMMs
otherwise): each run is held to the same bound against the same CPU reference."""
from __future__ import annotations

import pytest
import torch

from lib_fixtures import _adapter, _capture
from nanoforge.kernels import dsa_ref
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.kv_contract import KVContract, KVLayer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]
DEV, BF16 = "cuda", torch.bfloat16
BS, LAT, ROPE, KEY = 64, 512, 64, 128


def batch(seqs: list[tuple[int, int]], kv: str, g: torch.Generator):
    """Two identical CUDA pools (DSA layer: [latent 512 | rope 64] entries and 128-wide indexer keys,
    64-token blocks, shuffled) holding each sequence's random cached prefix, and a context per pool.
    kv: bf16, fp8_e4m3 (both caches) or fp8_index (bf16 entries, FP8 keys)."""
    if kv == "fp8_index":
        contract = KVContract(BS, "bf16", (KVLayer(0, "dsa", ((LAT + ROPE,), (KEY,)), "", ((1,),),
                                                   ("bf16", "fp8_e4m3")),), "f32")
    else:
        fp8 = kv == "fp8_e4m3"
        contract = KVContract(BS, kv, (KVLayer(0, "dsa", ((LAT + ROPE,), (KEY,)), "", ((1,), (1,)) if fp8 else ()),),
                              "f32" if fp8 else None)
    nb = sum(-(-c // BS) for _, c in seqs) + 4
    pools = [allocate_pool(contract, nb, DEV) for _ in range(2)]
    blocks, full, at = torch.randperm(nb, generator=g).tolist(), [], 0
    for q, c in seqs:
        n = -(-c // BS)
        full.append((q, c, blocks[at:at + n]))
        at += n
    prefix = make_context(pools[0], BS, [(c - q, c - q, b) for q, c, b in full], DEV)
    n = prefix.slot_mapping.shape[0]
    entry, entry_scale, keys, key_scale = dsa_ref.dsa_pool(prefix, 0)
    dsa_ref.store(entry, prefix.slot_mapping, torch.randn(n, LAT + ROPE, generator=g).to(DEV), entry_scale)
    dsa_ref.store(keys, prefix.slot_mapping, torch.randn(n, KEY, generator=g).to(DEV), key_scale)
    for a, b in zip(pools[0][0], pools[1][0]):
        b.copy_(a)
    return [make_context(p, BS, full, DEV) for p in pools], pools


def same_pools(a, b) -> bool:
    raw = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    return all(torch.equal(raw(x), raw(y)) for x, y in zip(a[0], b[0]))


def positions(ctx) -> list[int]:
    return [p for s in ctx.seqs for p in range(s.ctx_len - s.q_len, s.ctx_len)]


def random_ids(pos: list[int], topk: int, g: torch.Generator) -> torch.Tensor:
    """Per row a random set of min(topk, pos + 1) causal positions in random order, -1 padded."""
    out = torch.full((len(pos), topk), -1, dtype=torch.int32)
    for i, p in enumerate(pos):
        pick = torch.randperm(p + 1, generator=g)[:topk]
        out[i, :len(pick)] = pick.to(torch.int32)
    return out.to(DEV)


def rnd(g, *shape, std=1.0):
    return (std * torch.randn(*shape, generator=g)).to(DEV, BF16)


SMALL = [(5, 300), (1, 70), (1, 20), (2, 129), (1, 64)]  # a prefill chunk, decode rows, verify-like rows
REAL = [(64, 4096), (1, 9000), (1, 1500), (1, 5000), (3, 2500)]


@pytest.mark.parametrize("heads,topk,seqs", [(4, 16, SMALL), (16, 64, SMALL), (130, 128, SMALL), (128, 2048, REAL)],
                         ids=["4h-top16", "16h-top64", "130h-top128", "real"])
def test_gpu_flash_mla_sparse_matches_reference(heads, topk, seqs):
    M = _adapter("flash_mla_sparse", (90,))
    g = torch.Generator().manual_seed(heads + topk)
    (c_ref, c_lib), (p_ref, p_lib) = batch(seqs, "bf16", g)
    mla = dict(heads=heads, qk_nope_head_dim=128, qk_rope_head_dim=ROPE, v_head_dim=128, kv_lora_rank=LAT,
               scale=192 ** -0.5, topk=topk)
    T = sum(q for q, _ in seqs)
    q, latent, k_rope = rnd(g, T, heads * 192), rnd(g, T, LAT), rnd(g, T, ROPE)
    kv_b = rnd(g, heads * 256, LAT, std=0.05)
    ids = random_ids(positions(c_ref), topk, g)
    assert M.takes(c_lib, 0, q.dtype, LAT, ROPE)
    want = dsa_ref.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=c_ref, layer=0, **mla)
    got = M.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=c_lib, layer=0, **mla)
    assert same_pools(p_ref, p_lib), "stored entries differ"
    err, top = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    print(f"flash_mla sparse {heads}h top-{topk}: max abs err {err:.3e}, max |ref| {top:.3e}")
    assert got.shape == want.shape and torch.isfinite(got).all() and err <= 3e-2 * max(top, 1e-3)
    other = dsa_ref.sparse_mla(q, latent, k_rope, random_ids(positions(c_ref), topk, g), kv_b, ctx=c_ref, layer=0,
                               **mla)
    assert (other.float() - want.float()).abs().max().item() > 10 * err  # the comparison sees the selection


def test_gpu_flash_mla_sparse_decode_graph_replays_new_inputs():
    M = _adapter("flash_mla_sparse", (90,))
    g = torch.Generator().manual_seed(3)
    seqs = [(1, 3000), (1, 700), (1, 40), (1, 2049)]
    (ctx, _), _ = batch(seqs, "bf16", g)
    mla = dict(heads=128, qk_nope_head_dim=128, qk_rope_head_dim=ROPE, v_head_dim=128, kv_lora_rank=LAT,
               scale=192 ** -0.5, topk=2048)
    q, latent, k_rope, kv_b = rnd(g, 4, 128 * 192), rnd(g, 4, LAT), rnd(g, 4, ROPE), rnd(g, 128 * 256, LAT, std=0.05)
    ids = random_ids(positions(ctx), 2048, g)
    run = lambda: M.sparse_mla(q, latent, k_rope, ids, kv_b, ctx=ctx, layer=0, **mla)  # noqa: E731
    graph, out = _capture(run)
    q.copy_(rnd(g, 4, 128 * 192))
    ids.copy_(random_ids(positions(ctx), 2048, g))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, run(), rtol=1e-3, atol=1e-3)


IDX_REAL = dict(heads=64, head_dim=KEY, rope_dim=64, style="interleaved", theta=10000.0, topk=2048,
                scale=KEY ** -0.5, eps=1e-6)


def indexer_inputs(T: int, heads: int, g: torch.Generator, hidden: int = 7168):
    x, q, k = rnd(g, T, hidden), rnd(g, T, heads * KEY), rnd(g, T, KEY)
    params = (rnd(g, heads, hidden, std=0.02).float(), 1 + rnd(g, KEY, std=0.1), rnd(g, KEY, std=0.1))
    return x, q, k, params


def worst_pick_gap(c_ref, got, want, x, q, pos, params, attrs) -> float:
    """The largest relative gap, over rows, between the reference's scores of our picks and of its own
    (each set sorted); checks each row keeps min(topk, context) distinct causal tokens as the reference."""
    heads, topk = attrs["heads"], attrs["topk"]
    qr = dsa_ref.rope_front(q, pos, heads, head_dim=KEY, rope_dim=64, style="interleaved", theta=10000.0, scaling=None)
    w = torch.nn.functional.linear(x.float(), params[0]) * heads ** -0.5
    _, _, keys, scales = dsa_ref.dsa_pool(c_ref, 0)
    worst = 0.0
    for s in c_ref.seqs:
        t = s.q_start
        ref = dsa_ref.index_scores(qr[t:t + 1], dsa_ref.read(keys, c_ref.context_slots(s), scales, BF16), w[t:t + 1],
                                   attrs["scale"])[0]
        a, b = got[t], want[t]
        assert int((a >= 0).sum()) == int((b >= 0).sum()) == min(topk, s.ctx_len), f"row {t}"
        assert int(a.max()) < s.ctx_len and len(set(a[a >= 0].tolist())) == int((a >= 0).sum())
        ours, theirs = (ref[ids[ids >= 0].long()].sort().values for ids in (a, b))
        worst = max(worst, ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-6)).item())
    return worst


@pytest.mark.parametrize("heads,topk,lens", [(8, 16, [1, 20, 64, 65, 300]), (64, 2048, [9000, 1500, 5000, 2500, 70, 1])],
                         ids=["8h-top16", "real"])
def test_gpu_deep_gemm_indexer_matches_reference(heads, topk, lens):
    """Decode rows over an FP8 pool: keys stored bitwise as the reference stores them; every picked set as
    good as the reference's (its scores of our picks, sorted, equal its own top-k's up to the e4m3 rounding
    of the queries, ~3% of the largest score); rows with at most top-k tokens keep them all."""
    M = _adapter("deep_gemm_indexer", (90,))
    g = torch.Generator().manual_seed(heads)
    (c_ref, c_lib), (p_ref, p_lib) = batch([(1, c) for c in lens], "fp8_e4m3", g)
    attrs = {**IDX_REAL, "heads": heads, "topk": topk}
    x, q, k, params = indexer_inputs(len(lens), heads, g)
    pos = torch.tensor(positions(c_ref), device=DEV)
    assert M.takes(c_lib, 0, heads, KEY, len(lens))
    want = dsa_ref.indexer(x, q, k, pos, *params, ctx=c_ref, layer=0, **attrs)
    got = M.indexer(x, q, k, pos, *params, ctx=c_lib, layer=0, **attrs)
    assert same_pools(p_ref, p_lib), "stored keys differ"
    worst = worst_pick_gap(c_ref, got, want, x, q, pos, params, attrs)
    print(f"deep_gemm indexer {heads}h: worst relative gap of the picked sets' reference scores {worst:.2e}")
    assert worst < 0.1  # two e4m3 roundings of q apart at most (each ~3% of the largest score, test_lib_dsa.py)


def test_gpu_deep_gemm_indexer_decode_graph_replays_new_inputs():
    M = _adapter("deep_gemm_indexer", (90,))
    g = torch.Generator().manual_seed(4)
    lens = [5000, 300, 2049, 64]
    (ctx, _), _ = batch([(1, c) for c in lens], "fp8_e4m3", g)
    x, q, k, params = indexer_inputs(len(lens), 64, g)
    pos = torch.tensor(positions(ctx), device=DEV)
    run = lambda: M.indexer(x, q, k, pos, *params, ctx=ctx, layer=0, **IDX_REAL)  # noqa: E731
    graph, out = _capture(run)
    for t in (x, q, k):
        t.copy_(torch.randn(t.shape, generator=g).to(DEV, t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run())


def test_gpu_both_libraries_on_bf16_latents_and_fp8_indexer_keys():
    """--index-kv-dtype fp8's pool (bf16 entries; e4m3 keys fused with their f32 scales): a decode step of
    DeepSeek-V3.2's real dims with DeepGEMM's indexer picking and FlashMLA's sparse kernel attending over the
    picks, as one plan runs them. Stores as the reference (bitwise), picks as good as the reference's, the
    output the reference's over the same picks; a CUDA graph of the step replays new inputs as eager calls
    compute them."""
    index, sparse = _adapter("deep_gemm_indexer", (90,)), _adapter("flash_mla_sparse", (90,))
    g = torch.Generator().manual_seed(6)
    lens = [5000, 300, 2049, 64, 9000]
    (c_ref, c_lib), (p_ref, p_lib) = batch([(1, c) for c in lens], "fp8_index", g)
    assert p_lib[0][0].dtype == BF16 and p_lib[0][1].dtype == torch.float8_e4m3fn and len(p_lib[0]) == 3
    T = len(lens)
    x, q, k, params = indexer_inputs(T, 64, g)
    pos = torch.tensor(positions(c_ref), device=DEV)
    mla = dict(heads=128, qk_nope_head_dim=128, qk_rope_head_dim=ROPE, v_head_dim=128, kv_lora_rank=LAT,
               scale=192 ** -0.5, topk=2048)
    q_mla, latent, k_rope = rnd(g, T, 128 * 192), rnd(g, T, LAT), rnd(g, T, ROPE)
    kv_b = rnd(g, 128 * 256, LAT, std=0.05)
    assert index.takes(c_lib, 0, 64, KEY, T) and sparse.takes(c_lib, 0, BF16, LAT, ROPE)

    def step(ctx):
        ids = index.indexer(x, q, k, pos, *params, ctx=ctx, layer=0, **IDX_REAL)
        return ids, sparse.sparse_mla(q_mla, latent, k_rope, ids, kv_b, ctx=ctx, layer=0, **mla)

    ids, got = step(c_lib)
    want_ids = dsa_ref.indexer(x, q, k, pos, *params, ctx=c_ref, layer=0, **IDX_REAL)
    want = dsa_ref.sparse_mla(q_mla, latent, k_rope, ids, kv_b, ctx=c_ref, layer=0, **mla)
    assert same_pools(p_ref, p_lib), "stored entries or keys differ"
    worst = worst_pick_gap(c_ref, ids, want_ids, x, q, pos, params, IDX_REAL)
    err, top = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    print(f"deep_gemm indexer + flash_mla sparse: pick gap {worst:.2e}, max abs err {err:.3e}, max |ref| {top:.3e}")
    assert worst < 0.1 and torch.isfinite(got).all() and err <= 3e-2 * max(top, 1e-3)
    graph, out = _capture(lambda: step(c_lib)[1])
    for t in (x, q, k, q_mla):
        t.copy_(torch.randn(t.shape, generator=g).to(DEV, t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, step(c_lib)[1], rtol=1e-3, atol=1e-3)


# ---- end to end: a tiny DeepSeek-V3.2 with the dims the libraries take --------------------------------------
LENGTHS = [3, 9, 13, 29, 40, 70, 130]  # index_topk 8: all but the first attend to a real subset


def teacher_forced_shift(outs, prompts, ref) -> float:
    """Mean |logprob difference| between each generated position's reported top-5 and the reference LLM's
    log-softmax of the same tokens after the same context (the run's own tokens fed back), so every
    position counts, past the first divergent token too."""
    prefixes = [list(p) + o.token_ids[:i] for p, o in zip(prompts, outs) for i in range(len(o.token_ids))]
    logp = torch.log_softmax(ref.last_logits(prefixes).float(), dim=-1)
    diffs, row = [], 0
    for o in outs:
        for i in range(len(o.token_ids)):
            diffs += [abs(logp[row, t].item() - v) for t, v in o.logprobs[i]["top"]]
            row += 1
    return sum(diffs) / len(diffs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_deepseek_v32 import make_checkpoint

    return make_checkpoint("deepseek_v32", tmp_path_factory.mktemp("dsa_libs") / "v32", kv_lora_rank=LAT,
                           qk_rope_head_dim=ROPE, index_head_dim=KEY)


@pytest.fixture(scope="module")
def cpu_runs(ckpt, tmp_path_factory):
    """Per KV dtype: the prompts, the f32 CPU path (the reference), its noise level (the bf16 CPU path's shift
    from it) and, to show the measure sees the selection, the shift of the same weights run dense."""
    from hf_fixtures import random_prompts
    from nanoforge import LLM
    from test_deepseek_v32 import with_config
    from test_gpu_fp8 import PARAMS

    cache = {}

    def get(kv: str, index_kv: str = "auto"):
        if (kv, index_kv) not in cache:
            prompts = random_prompts(1000, LENGTHS, seed=31)
            opts = dict(kv_dtype=kv, index_kv_dtype=index_kv, progress=False)
            ref = LLM(ckpt, dtype="f32", **opts)
            noise = teacher_forced_shift(LLM(ckpt, dtype="bf16", **opts).generate(prompts, PARAMS), prompts, ref)
            dense = with_config(ckpt, tmp_path_factory.mktemp("dense") / "v32", index_topk=4096)
            blind = teacher_forced_shift(LLM(dense, dtype="f32", **opts).generate(prompts, PARAMS), prompts, ref)
            print(f"kv {kv}, index keys {index_kv}: cpu bf16 shift {noise:.3f}, selection-blind (dense) shift "
                  f"{blind:.3f}")
            assert 0 < noise and blind > 2 * noise, (noise, blind)  # on CPU: ~0.6 and ~2.7
            cache[kv, index_kv] = (prompts, ref, noise)
        return cache[kv, index_kv]

    return get


def _counted(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of module.<name> (a capture calls it once per layer; replays call no Python)."""
    calls, fn = [0], getattr(module, name)

    def wrapper(*args, **kw):
        calls[0] += 1
        return fn(*args, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


SPARSE_LIB = ("sparse_mla", "flash_mla_sparse", "sparse_attend")  # (op, provider, the function whose calls count)
INDEX_LIB = ("indexer", "deep_gemm_indexer", "index_logits")


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("kv,index_kv,libs", [("auto", "auto", [SPARSE_LIB]), ("fp8", "auto", [INDEX_LIB]),
                                              ("auto", "fp8", [SPARSE_LIB, INDEX_LIB])],
                         ids=["flash_mla_sparse", "deep_gemm_indexer", "both-fp8-index-keys"])
def test_gpu_engine_on_the_library_tracks_the_cpu_path(kv, index_kv, libs, eager, ckpt, cpu_runs, monkeypatch):
    from nanoforge import LLM
    from test_gpu_fp8 import PARAMS

    calls = {lib: _counted(monkeypatch, _adapter(lib, (90,)), entry) for _, lib, entry in libs}
    prompts, ref, noise = cpu_runs(kv, index_kv)
    llm = LLM(ckpt, device="cuda", dtype="bf16", kv_dtype=kv, index_kv_dtype=index_kv, progress=False,
              enforce_eager=eager, max_num_seqs=16, kv_cache_memory=256 << 20)
    for op, lib, _ in libs:
        used = {n.provider for _, n in llm.plan.module.nodes() if n.op == op}
        assert used == {lib}, used
    out = llm.generate(prompts, PARAMS)
    shift = teacher_forced_shift(out, prompts, ref)
    print(f"{'+'.join(calls)} eager={eager}: shift {shift:.3f} (cpu bf16 {noise:.3f}); kernel calls "
          f"{ {lib: n[0] for lib, n in calls.items()} }; batches {dict(llm.metrics()['batches'])}")
    assert all(n[0] > 0 for n in calls.values()), f"a library's kernel never ran: {calls}"
    assert all(len(o.token_ids) == PARAMS.max_tokens for o in out)
    assert shift <= 2 * noise, (shift, noise)
    assert ("graph" in llm.metrics()["batches"]) != eager
    llm.engine.blocks.check_invariants([])

"""Runtime engine on tiny checkpoints: continuous batching, chunked prefill, preemption and prefix
caching leave greedy outputs unchanged (and equal to HF); no KV block ever leaks."""
from __future__ import annotations

import pytest

from hf_fixtures import ARCHS, random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from test_e2e_hf import hf_generate

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LENGTHS = [3, 17, 5, 40, 9, 1, 24, 12, 33, 7, 16, 2, 48, 11, 20, 31]  # 16 prompts


def assert_no_leak(llm: LLM) -> None:
    """Every test ends here: all blocks free, ref counts consistent, nothing left queued."""
    eng = llm.engine
    assert not eng.has_work()
    eng.blocks.check_invariants([])
    assert eng.blocks.num_free == eng.blocks.num_blocks


def make_llm(tiny_ckpt, arch: str, **opts) -> LLM:
    return LLM(tiny_ckpt(arch), progress=False, **opts)


@pytest.fixture(scope="module")
def alone_outputs(tiny_ckpt):
    """Greedy outputs of each prompt run alone (one sequence in the engine at a time)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            llm = make_llm(tiny_ckpt, arch, max_num_seqs=1)
            prompts = random_prompts(tiny_config(arch).vocab_size, LENGTHS, seed=5)
            cache[arch] = (prompts, [llm.generate([p], GREEDY)[0].token_ids for p in prompts])
            assert_no_leak(llm)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_alone_equals_hf(arch, tiny_ckpt, alone_outputs, hf_ref):
    prompts, alone = alone_outputs(arch)
    llm = make_llm(tiny_ckpt, arch)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_generate(hf_ref(arch), p, GREEDY.max_tokens)
    assert llm.metrics()["mean_tokens_per_step"] > 2  # really batched
    assert_no_leak(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_and_chunking_keep_outputs(arch, tiny_ckpt, alone_outputs):
    prompts, alone = alone_outputs(arch)
    # 12 blocks of 16 tokens: the longest request (48 + 12 tokens) fits alone, 16 together do not
    llm = make_llm(tiny_ckpt, arch, num_blocks=12, max_prefill_chunk=16, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    m = llm.metrics()
    assert m["preemptions"] > 0
    assert max(llm.engine.metrics.tokens_per_step) <= 64
    assert_no_leak(llm)


def test_every_prompt_chunked(tiny_ckpt, alone_outputs):
    prompts, alone = alone_outputs("qwen3")
    llm = make_llm(tiny_ckpt, "qwen3", max_prefill_chunk=16)
    chunks: dict[int, list[int]] = {}
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        for seq, n in batch.items:
            if seq.num_computed < len(seq.prompt_ids):
                chunks.setdefault(seq.seq_id, []).append(n)
        return batch

    llm.engine.scheduler.schedule = recording_schedule
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone
    for p, got in zip(prompts, chunks.values()):
        assert got == [16] * (len(p) // 16) + ([len(p) % 16] if len(p) % 16 else []), (len(p), got)
    assert_no_leak(llm)


def test_prefix_cache_computes_only_the_suffix(tiny_ckpt):
    vocab = tiny_config("llama").vocab_size
    (prefix, a, b) = random_prompts(vocab, [48, 5, 7], seed=6)  # 3 full blocks of 16
    on = make_llm(tiny_ckpt, "llama")
    first = on.generate([prefix + a], GREEDY)[0]
    hits_before = on.engine.blocks.hits
    second = on.generate([prefix + b], GREEDY)[0]
    assert on.engine.blocks.hits - hits_before == 48 and second.num_cached_tokens == 48
    assert on.metrics()["prefix_cache_hit_tokens"] == 48
    off = make_llm(tiny_ckpt, "llama", prefix_caching=False)
    assert off.generate([prefix + a, prefix + b], GREEDY)[0].token_ids == first.token_ids
    assert off.generate([prefix + b], GREEDY)[0].token_ids == second.token_ids
    assert off.metrics()["prefix_cache_hit_tokens"] == 0
    assert_no_leak(on)
    assert_no_leak(off)


def test_fully_cached_prompt_of_exact_block_multiple(tiny_ckpt):
    vocab = tiny_config("qwen3").vocab_size
    (prompt,) = random_prompts(vocab, [32], seed=7)
    llm = make_llm(tiny_ckpt, "qwen3")
    first = llm.generate([prompt], GREEDY)[0]
    again = llm.generate([prompt], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens == 16  # capped so at least one token (the last block) is computed
    assert_no_leak(llm)


def test_reset_prefix_cache_forgets_every_prefix(tiny_ckpt):
    """Benchmarks rerun their prompts: after a reset the same prompt is computed again, and the
    same tokens come out."""
    (prompt,) = random_prompts(tiny_config("qwen3").vocab_size, [40], seed=8)
    llm = make_llm(tiny_ckpt, "qwen3")
    first = llm.generate([prompt], GREEDY)[0]
    llm.engine.reset_prefix_cache()
    again = llm.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 32  # cached again from then on
    assert_no_leak(llm)


def test_decode_blocks_are_cached_too(tiny_ckpt):
    """A follow-up that extends prompt + answer reuses the blocks filled during decode."""
    vocab = tiny_config("qwen3").vocab_size
    (prompt,) = random_prompts(vocab, [20], seed=8)
    llm = make_llm(tiny_ckpt, "qwen3")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    follow = prompt + out.token_ids + [5, 6, 7]
    again = llm.generate([follow], GREEDY)[0]
    assert again.num_cached_tokens == 48  # 3 full blocks, 2 of them written by decode steps
    assert_no_leak(llm)


def test_prompt_longer_than_max_model_len_is_rejected(tiny_ckpt):
    llm = make_llm(tiny_ckpt, "llama", max_model_len=64)
    with pytest.raises(NanoForgeError, match="max_model_len is 64"):
        llm.generate([[1] * 64], GREEDY)
    out = llm.generate([[1] * 60], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert_no_leak(llm)


def test_max_tokens_beyond_max_model_len_is_rejected_not_capped(tiny_ckpt):
    """The OpenAI server's rule (a 400) for every caller: a request whose prompt + max_tokens cannot
    fit is refused at once, naming what fits, rather than silently stopped at max_model_len."""
    llm = make_llm(tiny_ckpt, "llama", max_model_len=64)
    with pytest.raises(NanoForgeError, match=r"prompt \(60 tokens\) \+ max_tokens \(50\) is more than max_model_len 64; "
                                             r"lower max_tokens to at most 4"):
        llm.generate([[1] * 60], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    assert_no_leak(llm)


def test_request_larger_than_pool_is_rejected(tiny_ckpt):
    """max_model_len defaults to what the KV pool holds (2 blocks of 16 tokens), and says so."""
    llm = make_llm(tiny_ckpt, "llama", num_blocks=2)
    assert llm.engine.max_model_len == 32
    with pytest.raises(NanoForgeError, match=r"max_model_len is 32 \(all the KV cache holds\)"):
        llm.generate([[1] * 40], GREEDY)
    with pytest.raises(NanoForgeError, match="max_model_len 64 is more than the KV cache holds"):
        make_llm(tiny_ckpt, "llama", num_blocks=2, max_model_len=64)
    assert_no_leak(llm)


def test_token_ids_out_of_vocab_are_rejected(tiny_ckpt):
    llm = make_llm(tiny_ckpt, "llama")
    with pytest.raises(NanoForgeError, match=r"token ids must be in \[0, 1024\)"):
        llm.generate([[1, 5000]], GREEDY)


def test_make_context_matches_per_sequence_bookkeeping():
    """The vectorized context builder: slots, query starts, padded block tables as a per-sequence
    loop would compute them, for mixed batches of decode rows and prefill chunks."""
    import random

    from nanoforge.kernels.context import make_context

    rnd = random.Random(3)
    bs = 4
    seqs = []
    for _ in range(9):
        ctx = rnd.randint(1, 40)
        q = rnd.choice([1, ctx, rnd.randint(1, ctx)])
        seqs.append((q, ctx, rnd.sample(range(100), -(-ctx // bs))))
    ctx = make_context([], bs, seqs)
    slots = [b[p // bs] * bs + p % bs for q, c, b in seqs for p in range(c - q, c)]
    assert ctx.slot_mapping.tolist() == slots
    assert ctx.query_start.tolist() == [sum(q for q, _, _ in seqs[:i]) for i in range(len(seqs) + 1)]
    width = max(len(b) for _, _, b in seqs)
    assert ctx.block_tables.tolist() == [b + [0] * (width - len(b)) for _, _, b in seqs]
    assert ctx.context_lens.tolist() == [c for _, c, _ in seqs]
    assert (ctx.max_query_len, ctx.max_context_len) == (max(q for q, _, _ in seqs), max(c for _, c, _ in seqs))


def test_generate_progress_counts_tokens(tiny_ckpt, capsys):
    """One long generation moves the bar: it counts generated tokens, not finished requests."""
    llm = make_llm(tiny_ckpt, "llama")
    llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (40, 8)],
                 use_tqdm=True)
    err = capsys.readouterr().err
    assert "48/48" in err and "tok" in err and "2/2 requests" in err


def test_cpu_pools_are_zeros_the_os_maps_on_first_touch():
    """A 1 GiB CPU pool (the default) of which a tiny model writes a few blocks costs neither the
    memset at start nor resident memory; it still reads as zeros in every KV dtype and takes writes."""
    import torch

    from nanoforge.kernels.context import zeros

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    before = resident()
    pool = zeros((1 << 28,), torch.float32)  # 1 GiB
    pool[:1024] = 1.0
    assert resident() - before < (64 << 20) and pool[1024:1 << 20].abs().sum() == 0 and pool[:1024].sum() == 1024
    for dt in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        t = zeros((3, 16, 2, 8), dt)
        assert t.shape == (3, 16, 2, 8) and t.dtype == dt and t.is_contiguous() and not t.float().any()
        t[1, 2] = 2.0
        assert t.float().sum() == 32

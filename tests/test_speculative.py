"""Speculative decoding with prompt-lookup drafts (`--speculative ngram`): greedy output is exactly
decoding's without speculation, for every architecture, under batching, chunked prefill, preemption,
prefix caching and aborts, with no block leaked; rejection sampling keeps the target distribution
(exactly, on a fixed distribution; statistically, through the engine on a tiny vocabulary); stop
rules, max_tokens, logprobs behave as without speculation; acceptance metrics are reported."""
from __future__ import annotations

import pytest
import torch

from hf_fixtures import ARCHS, random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from nanoforge.models.presets import PRESETS
from nanoforge.models.random_checkpoint import RandomCheckpoint
from nanoforge.serving.metrics import ServerMetrics
from nanoforge.runtime.speculative import SpecConfig, accept_greedy, accept_sampled, ngram_drafts


def test_ngram_drafts_follow_the_latest_longest_match():
    assert ngram_drafts([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3], 2) == [5, 7]  # latest of the two "2 3"
    assert ngram_drafts([1, 2, 3, 4, 9, 2, 3, 5, 7, 1, 2, 3], 3) == [4, 9, 2]  # "1 2 3" beats the later "2 3"
    assert ngram_drafts([5, 6, 7], 3) == [] and ngram_drafts([4], 3) == []
    assert ngram_drafts([1, 2, 1], 5) == [2, 1]  # cut at the end of the sequence


def test_greedy_acceptance_emits_targets_up_to_the_first_miss():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all drafts + the bonus token
    assert accept_greedy([4, 8, 6, 7], [4, 5, 6]) == [4, 8]  # the target's token replaces the miss
    assert accept_greedy([3, 5], [4]) == [3]


def test_rejection_sampling_keeps_the_target_distribution():
    """Two drafts, three rows over 5 tokens: the first emitted token is distributed as row 0 and,
    when the first draft was kept, the second as row 1."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5)
    p0, p1 = torch.softmax(logits[0], -1), torch.softmax(logits[1], -1)
    g = torch.Generator().manual_seed(1)
    d0 = int(p0.argmax())  # a likely first draft, so many samples get to the second row
    n, first, second = 40000, torch.zeros(5), torch.zeros(5)
    for _ in range(n):
        out = accept_sampled(lambda j, acc: logits[j], [d0, 4], g)
        first[out[0]] += 1
        if out[0] == d0:
            second[out[1]] += 1
    assert (first / n - p0).abs().max() < 0.01, (first / n, p0)
    assert (second / second.sum() - p1).abs().max() < 0.015, (second / second.sum(), p1)


def _repetitive_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Prompts that repeat themselves, so prompt lookup finds drafts."""
    base = random_prompts(vocab, [20, 7, 33, 12, 3], seed=seed)
    return [p * 3 + p[:4] for p in base]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_decoding_without_speculation(arch, tiny_ckpt):
    prompts = _repetitive_prompts(tiny_config(arch).vocab_size, 1)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in LLM(tiny_ckpt(arch), progress=False).generate(prompts, sp)]
    for k in (1, 2, 3):
        llm = LLM(tiny_ckpt(arch), progress=False, speculative="ngram", num_speculative_tokens=k)
        assert [o.token_ids for o in llm.generate(prompts, sp)] == want, k
        m = llm.metrics()["speculative"]
        assert m["drafts_proposed"] > 0 and len(m["acceptance_rate_per_position"]) == k
        assert 1 <= m["mean_accepted_length"] <= k + 1
        assert llm.metrics()["generated_tokens"] == 24 * len(prompts)
        text = ServerMetrics("tiny").render(llm.engine.stats())  # the same figures under /metrics
        assert f"nanoforge_spec_drafts_accepted_total{{model_name=\"tiny\"}} {m['drafts_accepted']}" in text
        assert 'nanoforge_spec_acceptance_rate{model_name="tiny",position="0"}' in text
        llm.engine.blocks.check_invariants([])
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    llm.engine.spec.uniform = True  # as with verify graphs: every decode row gets K drafts, fillers included
    assert [o.token_ids for o in llm.generate(prompts, sp)] == want
    llm.engine.blocks.check_invariants([])


def test_preemption_chunking_prefix_cache_and_aborts_keep_outputs_and_blocks(tiny_ckpt):
    vocab = tiny_config("qwen3").vocab_size
    prompts = _repetitive_prompts(vocab, 3) + _repetitive_prompts(vocab, 3)[:2]  # repeats: prefix-cache hits
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.token_ids for o in LLM(tiny_ckpt("qwen3"), progress=False, max_num_seqs=1).generate(prompts, sp)]
    llm = LLM(tiny_ckpt("qwen3"), progress=False, speculative="ngram", num_speculative_tokens=3, num_blocks=14,
              max_prefill_chunk=16, max_num_batched_tokens=48)
    assert [o.token_ids for o in llm.generate(prompts, sp)] == want
    m = llm.metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hit_tokens"] > 0 and m["speculative"]["drafts_accepted"] > 0
    abort_half_and_check(llm, prompts, sp, want)


def abort_half_and_check(llm: LLM, prompts: list[list[int]], sp: SamplingParams, want: list[list[int]]) -> None:
    """Abort every other request six steps in: the rest still get `want`, and every block comes back."""
    eng = llm.engine
    seqs = [eng.add_request(p, sp) for p in prompts]
    for _ in range(6):
        eng.step()
    for s in seqs[::2]:
        eng.abort(s.seq_id)
    eng.run_until_done()
    eng.blocks.check_invariants([])
    assert eng.blocks.num_free == eng.blocks.num_blocks
    for s, w in zip(seqs[1::2], want[1::2]):
        assert s.output_ids == w


def test_stop_rules_max_tokens_and_logprobs_behave_as_without(tiny_ckpt):
    ckpt = tiny_ckpt("qwen3")
    prompts = _repetitive_prompts(tiny_config("qwen3").vocab_size, 3)
    plain, spec = LLM(ckpt, progress=False), LLM(ckpt, progress=False, speculative="ngram")
    ref = plain.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop_id = ref[0].token_ids[9]  # a token the first prompt's greedy output reaches
    for sp in (SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3)):
        a, b = plain.generate(prompts, sp), spec.generate(prompts, sp)
        for x, y in zip(a, b):
            assert (x.token_ids, x.finish_reason) == (y.token_ids, y.finish_reason)
            if sp.logprobs:
                for lx, ly in zip(x.logprobs, y.logprobs):
                    assert lx["token"] == pytest.approx(ly["token"], abs=1e-4)
                    assert [t for t, _ in lx["top"]] == [t for t, _ in ly["top"]]
    assert spec.metrics()["speculative"]["drafts_accepted"] > 0
    # a stop string inside the output: the same text, cut at the same place, with the same reason
    text = plain.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    a, b = plain.generate(prompts[:1], sp)[0], spec.generate(prompts[:1], sp)[0]
    assert (a.text, a.finish_reason) == (b.text, b.finish_reason) and a.finish_reason == "stop" and stop not in a.text


def test_sampling_through_the_engine_keeps_the_distribution():
    """A random model with 8 tokens at temperature 0.5: the joint distribution of the second and third
    sampled tokens after a repetitive prompt, with and without speculation (independent seeds), passes a
    two-sample chi-square test (63 degrees of freedom, threshold at p ~ 1e-4)."""
    cfg = {**PRESETS["llama-tiny"], "vocab_size": 8, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "head_dim": 16}
    ckpt = RandomCheckpoint(cfg, "tiny-vocab", "f32", seed=4)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    n = 3000

    def joint(llm: LLM, seed0: int) -> torch.Tensor:
        # the first token comes from the prefill; the next two from one verify step with two drafts
        sps = [SamplingParams(temperature=0.5, max_tokens=4, ignore_eos=True, seed=seed0 + i) for i in range(n)]
        counts = torch.zeros(64)
        for o in llm.generate([prompt] * n, sps):
            counts[o.token_ids[1] * 8 + o.token_ids[2]] += 1
        return counts

    spec = LLM(ckpt, progress=False, speculative="ngram", num_speculative_tokens=2, max_num_seqs=256,
               prefix_caching=False)
    a = joint(spec, 0)
    b = joint(LLM(ckpt, progress=False, max_num_seqs=256), 10 ** 6)
    m = spec.metrics()["speculative"]
    assert m["drafts_accepted"] > 0.1 * m["drafts_proposed"] > 0  # drafts were really verified
    seen = (a + b) > 0
    chi2 = float(((a - b)[seen] ** 2 / (a + b)[seen]).sum())
    assert chi2 < 110, chi2


@pytest.mark.parametrize("cfg, msg", [
    (dict(method="eagle"), "--speculative 'eagle': choose ngram or mtp"),
    (dict(method="ngram", num_tokens=0), "--num-speculative-tokens 0: must be at least 1"),
])
def test_bad_flags_are_one_line_errors(cfg, msg):
    with pytest.raises(NanoForgeError, match=msg):
        SpecConfig(**cfg)


def test_drafts_without_a_method_are_refused(tiny_ckpt):
    with pytest.raises(NanoForgeError, match="--num-speculative-tokens needs --speculative"):
        LLM(tiny_ckpt("llama"), progress=False, num_speculative_tokens=2)


def prefill_then_migrate(a: LLM, b: LLM, prompt: list[int], sp: SamplingParams):
    """PD by hand: `a` prefills `prompt` (its first token sampled) and parks it; its KV blocks are copied
    into `b`, which resumes it. Returns (a's parked sequence, b's sequence)."""
    from nanoforge.runtime.kv_transfer import gather_blocks, scatter_blocks

    seq = a.engine.add_request(prompt, sp)
    while not seq.num_output:
        a.engine.step()
    a.engine.park(seq)
    moved, _ = b.engine.add_migrated(seq.token_ids, seq.num_prompt, sp, seq.num_computed)
    scatter_blocks(b.engine.runner.pool, moved.block_table, gather_blocks(a.engine.runner.pool, seq.block_table))
    b.engine.resume_migrated(moved, seq.num_computed)
    return seq, moved


def test_pd_decode_engine_speculates(tiny_ckpt):
    """PD: a plain prefill engine hands the KV over; the decode engine verifies drafts and gives one
    engine's greedy tokens (prompt lookup needs nothing from prefill but the tokens)."""
    ckpt = tiny_ckpt("qwen3")
    prompt = _repetitive_prompts(tiny_config("qwen3").vocab_size, 3)[2]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    a = LLM(ckpt, progress=False, num_blocks=64)
    b = LLM(ckpt, progress=False, num_blocks=64, speculative="ngram")
    want = a.generate([prompt], sp)[0].token_ids
    seq, moved = prefill_then_migrate(a, b, prompt, sp)
    b.engine.run_until_done()
    assert moved.output_ids == want and b.metrics()["speculative"]["drafts_accepted"] > 0
    a.engine.release_parked(seq)
    b.engine.blocks.check_invariants([])

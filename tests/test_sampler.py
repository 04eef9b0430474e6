"""Sampler against transformers' logits processors (the reference), plus engine-level stop rules,
seeds and logprobs on a tiny checkpoint."""
from __future__ import annotations

import os

import pytest
import torch

from hf_fixtures import random_prompts, tiny_config
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from nanoforge.runtime import sampler as S
from nanoforge.runtime.sampler import SampleRequest, _filter, _penalize, sample


def req(params: SamplingParams, history=(), output=(), seed=None) -> SampleRequest:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRequest(params, list(history), list(output), g, [])


@pytest.mark.parametrize("kind,value", [("top_k", 5), ("top_k", 1), ("top_p", 0.3), ("top_p", 0.9), ("min_p", 0.05),
                                        ("min_p", 0.5)])
def test_filters_match_hf_warpers(kind, value):
    from transformers.generation import logits_process as lp

    hf = {"top_k": lp.TopKLogitsWarper, "top_p": lp.TopPLogitsWarper, "min_p": lp.MinPLogitsWarper}[kind](value)
    for seed in range(20):
        logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(seed)) * 3
        ours = _filter(logits[0].clone(), SamplingParams(**{kind: value}))
        ref = hf(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0]
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (kind, value, seed)


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)) * 2
    history = [3, 17, 17, 42, 99, 0]
    ours = _penalize(logits[0].clone(), req(SamplingParams(repetition_penalty=1.7), history=history))
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([history]), logits.clone())[0]
    assert torch.allclose(ours, ref)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(10)
    out = _penalize(logits, req(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), output=[2, 2, 2, 7]))
    expect = torch.zeros(10)
    expect[2] = -(0.5 + 3 * 0.25)
    expect[7] = -(0.5 + 0.25)
    assert torch.equal(out, expect)


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    p = SamplingParams(temperature=0.8, seed=1)
    r = req(p, seed=1)
    draws = torch.tensor([sample(logits[None], [r])[0][0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (freq - torch.softmax(logits / 0.8, -1)).abs().max() < 0.03


def test_top_k_one_is_greedy_and_banned_ids_are_never_drawn():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3))
    top = int(logits.argmax())
    assert sample(logits, [req(SamplingParams(top_k=1, temperature=1.5), seed=0)])[0][0] == top
    r = req(SamplingParams(temperature=0))
    r.banned = [top]
    assert sample(logits, [r])[0][0] != top


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0),
                                 dict(min_p=2), dict(logprobs=99), dict(stop=[""]), dict(repetition_penalty=0)])
def test_bad_sampling_params_are_named(bad):
    with pytest.raises(NanoForgeError, match=next(iter(bad))):
        SamplingParams(**bad)


# ---- the Triton fast path (CUDA; here in Triton's interpreter) -------------------------------------------

FAST_DEV = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.fixture
def triton_path(monkeypatch):
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    monkeypatch.setattr(S, "_use_triton", lambda logits: True)
    calls = []
    fast = S._sample_triton
    monkeypatch.setattr(S, "_sample_triton", lambda logits, params, gens: calls.append(len(params)) or
                        fast(logits, params, gens))
    return calls


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
def test_triton_path_filters_and_seeds(triton_path):
    logits = (torch.randn(4, 300, generator=torch.Generator().manual_seed(7)) * 2).to(FAST_DEV)
    top = logits.argmax(-1).tolist()
    nucleus = SamplingParams(temperature=0.8, top_p=0.7, seed=3)
    params = [SamplingParams(top_k=1, temperature=1.5), SamplingParams(temperature=0), nucleus,
              SamplingParams(min_p=0.2)]
    reqs = [req(p, seed=p.seed) for p in params]
    out = [t for t, _ in sample(logits, reqs)]
    assert triton_path == [4] and out[:2] == top[:2]
    for i in (2, 3):
        allowed = ~torch.isinf(_filter(logits[i].cpu() / params[i].temperature, params[i]))
        assert allowed[out[i]] and allowed.sum() > 1
    other = torch.randn(2, 300, device=FAST_DEV) * 5  # same seed, same token, alone or with other neighbours
    alone = sample(logits[2:3], [req(nucleus, seed=3)])[0][0]
    mixed = sample(torch.cat([other[:1], logits[2:3], other[1:]]),
                   [req(SamplingParams()), req(nucleus, seed=3), req(SamplingParams(top_k=5), seed=9)])
    assert alone == mixed[1][0] == out[2]


def test_triton_path_leaves_penalties_logprobs_and_banned_to_torch(triton_path):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)).to(FAST_DEV)
    for extra in (dict(repetition_penalty=1.3), dict(logprobs=2)):
        sample(logits, [req(SamplingParams(temperature=1.0, **extra), history=[1, 2], seed=0), req(SamplingParams())])
    banned = req(SamplingParams(temperature=0))
    banned.banned = [int(logits[0].argmax())]
    assert sample(logits[:1], [banned])[0][0] != banned.banned[0]
    assert triton_path == []


# ---- engine-level behaviour on a tiny checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    from test_runtime import assert_no_leak

    llm = LLM(tiny_ckpt("llama"), progress=False)
    yield llm
    assert_no_leak(llm)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(tiny_config("llama").vocab_size, [7, 15, 4], seed=11)


def test_seed_reproducible_whatever_the_batch(llm, prompts):
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=15, ignore_eos=True)
    alone = llm.generate([prompts[0]], sp)[0].token_ids
    batched = llm.generate([prompts[0], prompts[1], prompts[0]], [sp, SamplingParams(temperature=1.0, max_tokens=15), sp])
    assert batched[0].token_ids == alone and batched[2].token_ids == alone
    other = llm.generate([prompts[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=15, ignore_eos=True))
    assert other[0].token_ids != alone


def test_stop_string_is_cut_from_the_text(llm, prompts):
    free = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop.strip(), text
    out = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)] and stop not in out.text
    assert out.token_ids == free.token_ids[:len(out.token_ids)]


def test_stop_token_ids_and_min_tokens(llm, prompts):
    free = llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].token_ids
    stop_id = free[4]
    first = free.index(stop_id)
    out = llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:first + 1]
    later = llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                                      min_tokens=first + 2))[0]
    assert stop_id not in later.token_ids[:first + 2]


def test_logprobs_of_chosen_and_top_tokens(llm, prompts, hf_ref):
    out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=4))[0]
    ref = torch.log_softmax(hf_ref("llama")(torch.tensor([prompts[0]])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert abs(first["token"] - ref[out.token_ids[0]].item()) < 1e-4
    top_ids = [i for i, _ in first["top"]]
    assert top_ids == torch.topk(ref, 4).indices.tolist() and top_ids[0] == out.token_ids[0]
    assert len(out.logprobs) == 3


@pytest.mark.parametrize("vocab", [1024, 4096, 49152, 4100])  # 1024, 4100: one argmax (too few, not whole chunks)
def test_greedy_tokens_are_argmax_ties_nan_and_inf_included(vocab):
    """The CPU's two-level argmax (chunk maxima, then inside the first chunk holding the row's maximum)
    picks what argmax picks: the first of equal maxima, the first NaN over any number, -inf rows' 0."""
    from nanoforge.runtime.sampler import greedy_tokens

    x = torch.randn(12, vocab, generator=torch.Generator().manual_seed(vocab))
    x[1, 70] = x[1, vocab - 300] = x[1, vocab - 3] = 50.0  # a tie across chunks
    x[2, 5], x[2, 200] = float("nan"), float("inf")
    x[3, 250], x[3, 10] = float("nan"), float("inf")
    x[4] = float("-inf")
    x[5, 131], x[5, 129] = 99.0, 99.0  # a tie inside a chunk
    x[6] = 0.0
    x[7, 199], x[7, 130] = float("nan"), float("nan")
    x[8, vocab - 1] = 1e4  # the last column
    assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))

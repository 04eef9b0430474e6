"""End to end against HF transformers: compile each tiny checkpoint, run it through the engine,
compare last-token logits (batch of prompts in one flat batch) and 20 greedy tokens with HF."""
from __future__ import annotations

import pytest
import torch

from hf_fixtures import ARCHS, random_prompts, tiny_config
from nanoforge import LLM, SamplingParams

LENGTHS = [1, 6, 13, 29]


def hf_generate(model, prompt: list[int], n: int) -> list[int]:
    """HF `generate`, greedy, exactly n new tokens: no eos in its generation config, so nothing
    stops it and nothing is suppressed (min_new_tokens would ban eos and change the argmax)."""
    import copy

    ids = torch.tensor([prompt])
    cfg = copy.deepcopy(model.generation_config)
    cfg.update(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    saved, model.generation_config = model.generation_config, cfg
    try:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids))
    finally:
        model.generation_config = saved
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    cache = {}

    def get(arch, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(tiny_ckpt(arch, **kw), progress=False)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_last_token_logits_match_hf(arch, engines, hf_ref):
    from hf_fixtures import hf_last_logits

    vocab = tiny_config(arch).vocab_size
    prompts = random_prompts(vocab, LENGTHS, seed=1)
    ours = engines(arch).last_logits(prompts)
    ref = hf_last_logits(hf_ref(arch), prompts)
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_20_tokens_match_hf_generate(arch, engines, hf_ref):
    vocab = tiny_config(arch).vocab_size
    prompts = random_prompts(vocab, LENGTHS, seed=2)
    llm = engines(arch)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_generate(hf_ref(arch), prompt, 20)
        assert out.finish_reason == "length"
    llm.engine.blocks.check_invariants([])


def test_legacy_rope_scaling_config_matches_hf(tiny_ckpt, hf_ref):
    """Hub-style `rope_theta` + `rope_scaling` (DeepSeek YaRN) reads the same as `rope_parameters`."""
    from hf_fixtures import hf_last_logits, hf_model

    path = tiny_ckpt("deepseek_v3", config_style="legacy")
    prompts = random_prompts(tiny_config("deepseek_v3").vocab_size, [9, 17], seed=3)
    ours = LLM(path, progress=False).last_logits(prompts)
    ref = hf_last_logits(hf_model(path), prompts)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4


def test_bf16_engine_tracks_hf_bf16(tiny_ckpt):
    """bf16 weights and activations: same argmax as HF running in bf16 for most rows, close logits."""
    from hf_fixtures import hf_last_logits, hf_model

    path = tiny_ckpt("qwen3")
    prompts = random_prompts(tiny_config("qwen3").vocab_size, LENGTHS, seed=4)
    ours = LLM(path, dtype="bf16", progress=False).last_logits(prompts)
    ref = hf_last_logits(hf_model(path, dtype=torch.bfloat16), prompts)
    assert (ours - ref).abs().max() / ref.abs().max() < 3e-2

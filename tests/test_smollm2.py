"""The real SmolLM2-135M-Instruct (GGUF, Q4_1): greedy chat output equals transformers' on the
same dequantized weights, and the answer names Paris."""
from __future__ import annotations

import pytest
import torch

from nanoforge import LLM, SamplingParams

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_llm(smollm2_gguf):
    return LLM(smollm2_gguf, progress=False)


def test_chat_greedy_equals_hf(smol_llm, smollm2_hf):
    tok = smol_llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True), add_special_tokens=False)
    out = smol_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32))[0]
    n = len(out.token_ids)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        ref = smollm2_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  pad_token_id=2)[0, len(prompt):].tolist()
    assert out.token_ids == ref
    assert out.finish_reason == "stop" and out.token_ids[-1] in tok.eos_token_ids
    assert "Paris" in out.text


def test_batch_of_prompts_matches_each_alone(smol_llm):
    prompts = ["The capital of Germany is", "1, 2, 3, 4,", "Once upon a time"]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = smol_llm.generate(prompts, sp)
    for p, out in zip(prompts, together):
        assert smol_llm.generate([p], sp)[0].token_ids == out.token_ids

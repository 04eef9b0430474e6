"""The building block of MTP speculation (issue 17): a DeepSeek-V3 checkpoint's MTP layer traced into
the IR as a `draft` function, whose logits equal transformers' own MtpModel on the same weights, with
the MTP layer's attention as one more KV layer of the plan's contract. (The runtime that drafts with
it is not built yet: `--speculative mtp` says so.)"""
from __future__ import annotations

import json

import pytest
import torch

from hf_fixtures import random_prompts, tiny_config
from mtp_fixtures import hf_mtp_logits, hf_mtp_model
from nanoforge.codegen.pysource import compile_function
from nanoforge.errors import NanoForgeError
from nanoforge.kernels.context import allocate_pool, make_context
from nanoforge.models import trace_model
from nanoforge.models.checkpoint import open_checkpoint
from nanoforge.models.weights import load_params
from nanoforge.passes.plan_memory import kv_contract


def test_draft_function_gives_hf_mtp_logits(tiny_ckpt, hf_ref):
    path = tiny_ckpt("deepseek_v3")
    config = json.loads((path / "config.json").read_text())
    module = trace_model(config, "f32", draft=True)
    L = config["num_hidden_layers"]
    contract = kv_contract(module, 4, "f32")
    assert [layer.layer for layer in contract.layers] == list(range(L + 1))  # the MTP layer keeps its own KV
    params = load_params(module, open_checkpoint(path), progress=False)
    hf = hf_ref("deepseek_v3")
    mtp = hf_mtp_model(hf)
    draft = compile_function(module, "draft")
    for prompt in random_prompts(tiny_config("deepseek_v3").vocab_size, [1, 9, 23], seed=8):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            hidden = hf.model(input_ids=ids, use_cache=False).last_hidden_state[0]
            nxt = int(hf(input_ids=ids).logits[0, -1].argmax())
        want = hf_mtp_logits(hf, mtp, prompt, nxt)
        n = len(prompt)
        pool = allocate_pool(contract, -(-n // 4) + 1)
        ctx = make_context(pool, 4, [(n, n, list(range(-(-n // 4))))])
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        with torch.inference_mode():
            logits, state = draft(params, ctx, as_long(prompt[1:] + [nxt]), as_long(range(1, n + 1)), hidden,
                                  as_long(range(n)))
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert state.shape == (n, config["hidden_size"]) and torch.isfinite(state).all()
        assert pool[L][0].abs().sum() > 0 and all(p[0].abs().sum() == 0 for p in pool[:L])  # only its own KV


def test_a_checkpoint_without_mtp_layers_is_a_one_line_error(tiny_ckpt):
    for arch, change in (("deepseek_v3", {"num_nextn_predict_layers": 0}), ("qwen3", {})):
        config = {**json.loads((tiny_ckpt(arch) / "config.json").read_text()), **change}
        with pytest.raises(NanoForgeError, match="--speculative mtp: this .* has no MTP layer"):
            trace_model(config, "f32", draft=True)

"""Qwen3-Next (Qwen3NextForCausalLM: the Qwen3.5-MoE layer types with fused GDN projections on disk, dense
MLPs on `mlp_only_layers`, configurable `norm_topk_prob`) against HF transformers on CPU: the reader's
views of in_proj_qkvz / in_proj_ba against transformers' own fix_query_key_value_ordering, and greedy
tokens of prompts batched together, longer than a 16-token prefill chunk, with preemption."""
from __future__ import annotations

import json

import pytest
import torch

from hf_fixtures import hf_greedy, hf_last_logits, random_prompts
from nanoforge import LLM, SamplingParams
from nanoforge.errors import NanoForgeError
from qwen3_5_fixtures import NEXT_DENSE, VOCAB, hf_qwen3_5, make_qwen3_next_checkpoint

LENGTHS = [4, 19, 45]
NEW = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_qwen3_next_checkpoint(tmp_path_factory.mktemp("qwen3_next") / "ckpt", seed=5)


@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_qwen3_5(ckpt)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(VOCAB, LENGTHS, seed=2)


def test_fused_projections_read_as_transformers_splits_them(ckpt, hf):
    """Each view of in_proj_qkvz / in_proj_ba, applied to fresh inputs, equals the part transformers'
    fix_query_key_value_ordering cuts from the fused projections (whole reads and sliced reads)."""
    from nanoforge.models.checkpoint import open_checkpoint

    c = open_checkpoint(ckpt)
    layer = "model.layers.3.linear_attn."
    assert layer + "in_proj_qkvz.weight" in c.sources and layer + "in_proj_qkvz.weight" not in c.tensors
    names = [layer + f"in_proj_{n}.weight" for n in ("qkv", "z", "b", "a")]
    w = dict(c.read(names))
    gdn = hf.model.layers[3].linear_attn
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        q, k, v, z, b, a = gdn.fix_query_key_value_ordering(gdn.in_proj_qkvz(x), gdn.in_proj_ba(x))
    qkv = torch.cat([t.reshape(2, 5, -1) for t in (q, k, v)], -1)
    for name, want in zip(names, (qkv, z.reshape(2, 5, -1), b, a)):
        torch.testing.assert_close(x @ w[name].t(), want, rtol=1e-5, atol=1e-6)
    rows = (slice(8, 40), slice(None))  # a rank's slice of the gathered view
    (_, part), = c.read_slices([(names[0], rows)], progress=False)
    torch.testing.assert_close(part, w[names[0]][rows])


def test_greedy_chunk16_preemption_matches_hf(ckpt, hf, prompts):
    """Dense and MoE layers, both mixer kinds, unrenormalised top-k: last logits and 8 greedy tokens of three
    prompts batched together, in chunks of 16 with a pool of 6 blocks that forces preemption."""
    llm = LLM(ckpt, progress=False, max_prefill_chunk=16, max_num_batched_tokens=24, num_blocks=6)
    mlps = {n.source for _, n in llm.plan.module.nodes() if n.op == "moe"}
    assert len(mlps) == 6 - len(NEXT_DENSE)  # the dense layers trace a SwiGLU MLP, not a moe node
    ours, ref = llm.last_logits(prompts), hf_last_logits(hf, prompts)
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, NEW) for p in prompts]
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.blocks.check_invariants([])


def test_config_and_layout_mistakes_are_one_line_errors(ckpt, tmp_path):
    from nanoforge.models import trace_model
    from nanoforge.models.fused_gdn import split_fused_gdn
    from nanoforge.models.tensor_info import TensorInfo

    config = json.loads((ckpt / "config.json").read_text())
    with pytest.raises(NanoForgeError, match="drafting with Qwen3NextForCausalLM's MTP layer is not built"):
        trace_model({**config, "mtp_num_hidden_layers": 1}, "f32", draft=True)
    with pytest.raises(NanoForgeError, match="decoder_sparse_step 0 must be a positive integer"):
        trace_model({**config, "decoder_sparse_step": 0}, "f32")
    bad = {"model.layers.0.linear_attn.in_proj_qkvz.weight":
           TensorInfo("model.layers.0.linear_attn.in_proj_qkvz.weight", (190, 64), "F32", "model.safetensors")}
    with pytest.raises(NanoForgeError, match=r"has shape \[190, 64\]; config.json implies \[192, hidden_size\]"):
        split_fused_gdn(bad, config)
    with pytest.raises(NanoForgeError, match="need positive integers linear_num_key_heads"):
        split_fused_gdn(bad, {k: v for k, v in config.items() if k != "linear_num_key_heads"})

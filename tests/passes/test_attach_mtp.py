"""attach_mtp (`compile --speculative mtp`): the forward also returns the hidden state its lm_head
reads (the draft function's input), and the `speculative` fact records K and the draft's KV layer;
a module without a draft function is a one-line error."""
from __future__ import annotations

import pytest
from irtext import MODEL, apply, run

from nanoforge.errors import NanoForgeError
from nanoforge.facts import SpeculativePlan, read
from nanoforge.passes.attach_mtp import Options

WITH_DRAFT = f"""
    module
    {MODEL}
    param $embed.weight: f32[32,8] <- model.embed_tokens.weight
    param $norm.weight: f32[8] <- model.norm.weight
    param $head.weight: f32[32,8] <- lm_head.weight
    param $kv.weight: f32[8,8] <- model.layers.1.self_attn.kv_proj.weight

    func forward(%tokens: i64[T], %positions: i64[T], %rows: i64[S]) {{
      %0: f32[T,8] = embed(%tokens, weight=$embed.weight)  @model.embed_tokens
      %1: f32[T,8] = rms_norm(%0, weight=$norm.weight) {{eps=1e-06}}  @model.norm
      %2: f32[S,32] = lm_head(%1, %rows, weight=$head.weight)  @lm_head
      return %2
    }}

    func draft(%tokens: i64[T], %positions: i64[T], %hidden: f32[T,8], %rows: i64[S]) {{
      %0: f32[T,8] = linear(%hidden, weight=$kv.weight)  @model.layers.1.self_attn.kv_proj
      %1: f32[T,8] = attention(%0, %0, %0) {{kind="gqa", layer=1, heads=2, kv_heads=2, head_dim=4, scale=0.5}}  @model.layers.1.self_attn
      %2: f32[S,32] = lm_head(%1, %rows, weight=$head.weight)  @lm_head
      return %2, %1
    }}
"""
ROUNDTRIP = [("attach_mtp", WITH_DRAFT, Options(2))]


def test_forward_returns_the_hidden_state_and_the_fact_records_k():
    out = run("attach_mtp", WITH_DRAFT, Options(2))
    assert "  return %2, %1\n}\n\nfunc draft" in out  # forward's outputs: logits, then the hidden state
    module, changes = apply("attach_mtp", WITH_DRAFT, Options(2))
    assert changes == 2 and read(module, SpeculativePlan) == SpeculativePlan("mtp", 2, (1,))
    assert 'meta speculative = {"draft_kv_layers": [1], "method": "mtp", "num_tokens": 2}' in out


def test_off_changes_nothing():
    module, changes = apply("attach_mtp", WITH_DRAFT, Options())
    assert changes == 0 and read(module, SpeculativePlan) is None
    assert len(module.functions["forward"].outputs) == 1


def test_a_module_without_a_draft_is_a_one_line_error():
    no_draft = WITH_DRAFT[:WITH_DRAFT.index("    func draft")].replace(
        "    param $kv.weight: f32[8,8] <- model.layers.1.self_attn.kv_proj.weight\n", "")
    with pytest.raises(NanoForgeError, match="--speculative mtp: the traced module has no draft function"):
        apply("attach_mtp", no_draft, Options(1))

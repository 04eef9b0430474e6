"""quantize_weights: how each weight is stored and run when the checkpoint ships block FP8 or the
user asks for it (`compile --quantize`).

    checkpoint fp8, mode auto|fp8  linear / moe weight -> fp8_e4m3 + f32 `_scale_inv` param, attr fp8_block;
                                   MLA's kv_b_proj (read inside attention) -> widened at load
    checkpoint fp8, mode none      every fp8 weight -> widened at load (quant=dequant)
    checkpoint plain, mode fp8     linear / moe weight -> fp8_e4m3 + scales, quantized at load
    checkpoint plain, mode auto    nothing
Embeddings, LM heads, norms and routers are never touched, nor modules listed in `keep`.
"""
from __future__ import annotations

import pytest
from irtext import apply, ir, run

from nanoforge.errors import NanoForgeError
from nanoforge.passes.quantize_weights import Options

DENSE = """
    module
    param $mlp.up_proj.weight: f32[200,160] <- mlp.up_proj.weight
    param $lm_head.weight: f32[32,200] <- lm_head.weight

    func forward(%x: f32[T,160], %rows: i64[S]) {
      %0: f32[T,200] = linear(%x, weight=$mlp.up_proj.weight)  @mlp.up_proj
      %1: f32[S,32] = lm_head(%0, %rows, weight=$lm_head.weight)  @lm_head
      return %1
    }
"""

FP8_DENSE = """
    module
    param $mlp.up_proj.weight: fp8_e4m3[200,160] <- mlp.up_proj.weight quant=fp8_e4m3:128x128
    param $lm_head.weight: f32[32,200] <- lm_head.weight
    param $mlp.up_proj.weight_scale_inv: f32[2,2] <- mlp.up_proj.weight_scale_inv quant=scale:128x128

    func forward(%x: f32[T,160], %rows: i64[S]) {
      %0: f32[T,200] = linear(%x, weight=$mlp.up_proj.weight, weight_scale_inv=$mlp.up_proj.weight_scale_inv) {fp8_block=[128, 128]}  @mlp.up_proj
      %1: f32[S,32] = lm_head(%0, %rows, weight=$lm_head.weight)  @lm_head
      return %1
    }
"""

MOE = """
    module
    param $mlp.gate.weight: f32[4,8] <- mlp.gate.weight
    param $mlp.experts.w_gate: f32[4,16,8] <- stack(mlp.experts.{0..3}.gate_proj.weight)
    param $mlp.experts.w_up: f32[4,16,8] <- stack(mlp.experts.{0..3}.up_proj.weight)
    param $mlp.experts.w_down: f32[4,8,16] <- stack(mlp.experts.{0..3}.down_proj.weight)

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = moe(%x, router=$mlp.gate.weight, w_gate=$mlp.experts.w_gate, w_up=$mlp.experts.w_up, w_down=$mlp.experts.w_down) {num_experts=4, top_k=2, scoring="softmax"}  @mlp
      return %0
    }
"""

ROUNDTRIP = [("quantize_weights", DENSE, Options("fp8", "auto")), ("quantize_weights", MOE, Options("none", "fp8"))]


@pytest.mark.parametrize("options", [Options("fp8", "auto"), Options("fp8", "fp8"), Options("none", "fp8")],
                         ids=["shipped-fp8", "shipped-fp8-kept", "quantized-at-load"])
def test_a_linear_becomes_an_fp8_linear_with_its_block_scales(options):
    """200 x 160 in 128x128 blocks: 2 x 2 scales (partial edge blocks count); the LM head stays f32."""
    assert run("quantize_weights", DENSE, options) == ir(FP8_DENSE)


def test_fp8_shipped_but_not_wanted_is_widened_at_load():
    assert run("quantize_weights", DENSE, Options("fp8", "none")) == ir(DENSE.replace(
        "<- mlp.up_proj.weight\n", "<- mlp.up_proj.weight quant=dequant:128x128\n"))


def test_plain_weights_as_shipped_are_left_alone():
    module, changes = apply("quantize_weights", DENSE, Options("none", "auto"))
    assert changes == 0 and run("quantize_weights", DENSE, Options("none", "auto")) == ir(DENSE)


def test_experts_quantize_per_expert_and_the_router_does_not():
    out = run("quantize_weights", MOE, Options("fp8", "auto"))
    assert "param $mlp.experts.w_gate: fp8_e4m3[4,16,8] <- stack(mlp.experts.{0..3}.gate_proj.weight) " \
           "quant=fp8_e4m3:128x128" in out
    assert "param $mlp.experts.w_down_scale_inv: f32[4,1,1] <- stack(mlp.experts.{0..3}.down_proj.weight_scale_inv) " \
           "quant=scale:128x128" in out
    assert "param $mlp.gate.weight: f32[4,8] <- mlp.gate.weight\n" in out
    assert ("w_gate_scale_inv=$mlp.experts.w_gate_scale_inv, w_up_scale_inv=$mlp.experts.w_up_scale_inv, "
            "w_down_scale_inv=$mlp.experts.w_down_scale_inv) {num_experts=4, top_k=2, scoring=\"softmax\", "
            "fp8_block=[128, 128]}") in out


def test_kv_b_proj_read_by_attention_is_widened_not_run_in_fp8():
    text = """
        module
        param $attn.kv_b_proj.weight: f32[16,4] <- attn.kv_b_proj.weight

        func forward(%q: f32[T,12], %latent: f32[T,4], %k_rope: f32[T,2]) {
          %0: f32[T,8] = attention(%q, %latent, %k_rope, kv_b_proj=$attn.kv_b_proj.weight) {kind="mla", layer=0, heads=2, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, kv_lora_rank=4, scale=0.4}  @attn
          return %0
        }
    """
    out = run("quantize_weights", text, Options("fp8", "auto"))
    assert "<- attn.kv_b_proj.weight quant=dequant:128x128" in out and "fp8" not in out.split("func")[1]
    assert run("quantize_weights", text, Options("none", "fp8")) == ir(text)  # plain: attention keeps it as it is


def test_modules_to_not_convert_stay_as_shipped():
    assert run("quantize_weights", DENSE, Options("fp8", "auto", keep=("mlp.up_proj",))) == ir(DENSE)


def test_bad_mode_is_named():
    with pytest.raises(NanoForgeError, match="--quantize 'int4': choose one of auto, none, fp8"):
        apply("quantize_weights", DENSE, Options("none", "int4"))


def test_act_quant_marks_fp8_linears_and_experts_w8a8():
    out = run("quantize_weights", DENSE, Options("fp8", "auto", act_quant=128))
    assert "{fp8_block=[128, 128], act_quant=128}  @mlp.up_proj" in out
    assert "act_quant=128" in run("quantize_weights", MOE, Options("fp8", "auto", act_quant=128))
    assert "act_quant" not in run("quantize_weights", MOE, Options("fp8", "auto"))
    assert "act_quant" not in run("quantize_weights", DENSE, Options("fp8", "none", act_quant=128))  # widened

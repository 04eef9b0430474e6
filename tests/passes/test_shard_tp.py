"""shard_tp: tensor parallelism over `tp` ranks (Megatron layout); the result is the per-rank module.

    column-parallel  q/k/v, q_b, gate/up: shard "d0:n@tp", outputs hold this rank's heads / channels
    row-parallel     o_proj, down_proj: shard "d1:tp@tp", output is a partial sum
    attention        local heads; kv heads fewer than tp are replicated (kv_heads becomes 1)
    moe              experts split along their intermediate dim: a partial sum
    embedding        vocab-parallel rows (vocab_parallel="tp"): a partial sum
    lm_head          vocab-parallel rows, then all_gather of the logits
    partial sums     one all_reduce right after the value, or after an add of two partial sums

Every collective takes over the name of the value it completes, so readers keep their operands;
the producer writes a fresh value numbered after the last one.
"""
from __future__ import annotations

import pytest
from irtext import apply, ir, run, run_fn

from nanoforge.errors import NanoForgeError
from nanoforge.facts import ParallelLayout, read
from nanoforge.ir.printer import format_module
from nanoforge.passes.shard_tp import Options

GQA = """
    module
    param $q.weight: f32[8,8] <- q.weight
    param $k.weight: f32[4,8] <- k.weight
    param $v.weight: f32[4,8] <- v.weight
    param $o.weight: f32[8,8] <- o.weight

    func forward(%x: f32[T,8], %positions: i64[T]) {
      %0: f32[T,8] = linear(%x, weight=$q.weight)  @attn.q_proj
      %1: f32[T,4] = linear(%x, weight=$k.weight)  @attn.k_proj
      %2: f32[T,4] = linear(%x, weight=$v.weight)  @attn.v_proj
      %3: f32[T,8], %4: f32[T,4] = rope(%0, %1, %positions) {heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
      %5: f32[T,8] = attention(%3, %4, %2) {kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}  @attn
      %6: f32[T,8] = linear(%5, weight=$o.weight)  @attn.o_proj
      return %6
    }
"""

MLP_EMBED_LM_HEAD = """
    module
    param $embed.weight: f32[32,8] <- embed.weight
    param $gate.weight: f32[16,8] <- gate.weight
    param $up.weight: f32[16,8] <- up.weight
    param $down.weight: f32[8,16] <- down.weight
    param $lm_head.weight: f32[32,8] <- lm_head.weight

    func forward(%tokens: i64[T], %rows: i64[S]) {
      %0: f32[T,8] = embed(%tokens, weight=$embed.weight)  @embed
      %1: f32[T,16] = linear(%0, weight=$gate.weight)  @mlp.gate_proj
      %2: f32[T,16] = silu(%1)  @mlp
      %3: f32[T,16] = linear(%0, weight=$up.weight)  @mlp.up_proj
      %4: f32[T,16] = mul(%2, %3)  @mlp
      %5: f32[T,8] = linear(%4, weight=$down.weight)  @mlp.down_proj
      %6: f32[T,8] = add(%0, %5)  @layer
      %7: f32[S,32] = lm_head(%6, %rows, weight=$lm_head.weight)  @lm_head
      return %7
    }
"""

MOE_AND_SHARED = """
    module
    param $router.weight: f32[4,8] <- router.weight
    param $experts.w_gate: f32[4,16,8] <- stack(experts.{0..3}.gate.weight)
    param $experts.w_up: f32[4,16,8] <- stack(experts.{0..3}.up.weight)
    param $experts.w_down: f32[4,8,16] <- stack(experts.{0..3}.down.weight)
    param $shared.gate.weight: f32[16,8] <- shared.gate.weight
    param $shared.up.weight: f32[16,8] <- shared.up.weight
    param $shared.down.weight: f32[8,16] <- shared.down.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = moe(%x, router=$router.weight, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, top_k=2, scoring="softmax"}  @mlp
      %1: f32[T,16] = linear(%x, weight=$shared.gate.weight)  @mlp.shared.gate
      %2: f32[T,16] = linear(%x, weight=$shared.up.weight)  @mlp.shared.up
      %3: f32[T,16] = silu_mul(%1, %2)  @mlp.shared
      %4: f32[T,8] = linear(%3, weight=$shared.down.weight)  @mlp.shared.down
      %5: f32[T,8] = add(%0, %4)  @mlp
      return %5
    }
"""

ROUNDTRIP = [("shard_tp", GQA, Options(tp=2)), ("shard_tp", MOE_AND_SHARED, Options(tp=2))]


def test_attention_heads_split_and_kv_heads_replicated():
    """2 q heads over 2 ranks: one each (d0:2). 1 kv head cannot split: every rank reads all of
    k/v (d0:1). o_proj is row-parallel (d1:2) and its partial sum gets an all_reduce."""
    assert run("shard_tp", GQA, Options(tp=2)) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 2}
        param $q.weight: f32[4,8] <- q.weight shard=d0:2@tp
        param $k.weight: f32[4,8] <- k.weight shard=d0:1@tp
        param $v.weight: f32[4,8] <- v.weight shard=d0:1@tp
        param $o.weight: f32[8,4] <- o.weight shard=d1:2@tp

        func forward(%x: f32[T,8], %positions: i64[T]) {
          %0: f32[T,4] = linear(%x, weight=$q.weight)  @attn.q_proj
          %1: f32[T,4] = linear(%x, weight=$k.weight)  @attn.k_proj
          %2: f32[T,4] = linear(%x, weight=$v.weight)  @attn.v_proj
          %3: f32[T,4], %4: f32[T,4] = rope(%0, %1, %positions) {heads=1, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
          %5: f32[T,4] = attention(%3, %4, %2) {kind="gqa", layer=0, heads=1, kv_heads=1, head_dim=4, scale=0.5}  @attn
          %7: f32[T,8] = linear(%5, weight=$o.weight)  @attn.o_proj
          %6: f32[T,8] = all_reduce(%7) {group="tp"}  @attn.o_proj
          return %6
        }
    """)


def test_mlp_embedding_and_lm_head():
    """gate/up column-parallel, down row-parallel; the embedding is vocab-parallel (a partial sum,
    all_reduced since several nodes read it) and the lm_head's logits are all_gathered."""
    assert run("shard_tp", MLP_EMBED_LM_HEAD, Options(tp=2)) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 2}
        param $embed.weight: f32[16,8] <- embed.weight shard=d0:2@tp
        param $gate.weight: f32[8,8] <- gate.weight shard=d0:2@tp
        param $up.weight: f32[8,8] <- up.weight shard=d0:2@tp
        param $down.weight: f32[8,8] <- down.weight shard=d1:2@tp
        param $lm_head.weight: f32[16,8] <- lm_head.weight shard=d0:2@tp

        func forward(%tokens: i64[T], %rows: i64[S]) {
          %8: f32[T,8] = embed(%tokens, weight=$embed.weight) {vocab_parallel="tp"}  @embed
          %0: f32[T,8] = all_reduce(%8) {group="tp"}  @embed
          %1: f32[T,8] = linear(%0, weight=$gate.weight)  @mlp.gate_proj
          %2: f32[T,8] = silu(%1)  @mlp
          %3: f32[T,8] = linear(%0, weight=$up.weight)  @mlp.up_proj
          %4: f32[T,8] = mul(%2, %3)  @mlp
          %9: f32[T,8] = linear(%4, weight=$down.weight)  @mlp.down_proj
          %5: f32[T,8] = all_reduce(%9) {group="tp"}  @mlp.down_proj
          %6: f32[T,8] = add(%0, %5)  @layer
          %10: f32[S,16] = lm_head(%6, %rows, weight=$lm_head.weight)  @lm_head
          %7: f32[S,32] = all_gather(%10) {group="tp", dim=-1, size=2}  @lm_head
          return %7
        }
    """)


def test_tied_embedding_and_lm_head_share_one_shard():
    assert run("shard_tp", """
        module
        param $embed.weight: f32[32,8] <- embed.weight

        func forward(%tokens: i64[T], %rows: i64[S]) {
          %0: f32[T,8] = embed(%tokens, weight=$embed.weight)  @embed
          %1: f32[S,32] = lm_head(%0, %rows, weight=$embed.weight)  @lm_head
          return %1
        }
    """, Options(tp=2)) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 2}
        param $embed.weight: f32[16,8] <- embed.weight shard=d0:2@tp

        func forward(%tokens: i64[T], %rows: i64[S]) {
          %2: f32[T,8] = embed(%tokens, weight=$embed.weight) {vocab_parallel="tp"}  @embed
          %0: f32[T,8] = all_reduce(%2) {group="tp"}  @embed
          %3: f32[S,16] = lm_head(%0, %rows, weight=$embed.weight)  @lm_head
          %1: f32[S,32] = all_gather(%3) {group="tp", dim=-1, size=2}  @lm_head
          return %1
        }
    """)


def test_routed_and_shared_experts_share_one_all_reduce():
    """moe splits every expert's intermediate dim (w_gate/w_up d1, w_down d2), router replicated;
    both partial sums meet in one add, so the sum is all_reduced once."""
    assert run("shard_tp", MOE_AND_SHARED, Options(tp=2)) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 2}
        param $router.weight: f32[4,8] <- router.weight
        param $experts.w_gate: f32[4,8,8] <- stack(experts.{0..3}.gate.weight) shard=d1:2@tp
        param $experts.w_up: f32[4,8,8] <- stack(experts.{0..3}.up.weight) shard=d1:2@tp
        param $experts.w_down: f32[4,8,8] <- stack(experts.{0..3}.down.weight) shard=d2:2@tp
        param $shared.gate.weight: f32[8,8] <- shared.gate.weight shard=d0:2@tp
        param $shared.up.weight: f32[8,8] <- shared.up.weight shard=d0:2@tp
        param $shared.down.weight: f32[8,8] <- shared.down.weight shard=d1:2@tp

        func forward(%x: f32[T,8]) {
          %0: f32[T,8] = moe(%x, router=$router.weight, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, top_k=2, scoring="softmax"}  @mlp
          %1: f32[T,8] = linear(%x, weight=$shared.gate.weight)  @mlp.shared.gate
          %2: f32[T,8] = linear(%x, weight=$shared.up.weight)  @mlp.shared.up
          %3: f32[T,8] = silu_mul(%1, %2)  @mlp.shared
          %4: f32[T,8] = linear(%3, weight=$shared.down.weight)  @mlp.shared.down
          %6: f32[T,8] = add(%0, %4)  @mlp
          %5: f32[T,8] = all_reduce(%6) {group="tp"}  @mlp
          return %5
        }
    """)


def test_mla_splits_q_and_kv_b_by_heads_and_keeps_the_latent_replicated():
    text = """
        module
        param $q.weight: f32[12,8] <- q.weight
        param $kv_a.weight: f32[10,8] <- kv_a.weight
        param $kv_norm.weight: f32[8] <- kv_norm.weight
        param $kv_b.weight: f32[16,8] <- kv_b.weight
        param $o.weight: f32[8,8] <- o.weight

        func forward(%x: f32[T,8], %positions: i64[T]) {
          %0: f32[T,12] = linear(%x, weight=$q.weight)  @attn.q_proj
          %1: f32[T,10] = linear(%x, weight=$kv_a.weight)  @attn.kv_a_proj
          %2: f32[T,8], %3: f32[T,2] = split(%1) {sizes=[8, 2]}  @attn
          %4: f32[T,12], %5: f32[T,2] = rope(%0, %3, %positions) {heads=2, kv_heads=1, q_head_dim=6, k_head_dim=2, rotary_dim=2, style="interleaved", theta=10000.0}  @attn
          %6: f32[T,8] = rms_norm(%2, weight=$kv_norm.weight) {eps=1e-06}  @attn.kv_norm
          %7: f32[T,8] = attention(%4, %6, %5, kv_b_proj=$kv_b.weight) {kind="mla", layer=0, heads=2, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, kv_lora_rank=8, scale=0.4}  @attn
          %8: f32[T,8] = linear(%7, weight=$o.weight)  @attn.o_proj
          return %8
        }
    """
    assert run("shard_tp", text, Options(tp=2)) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 2}
        param $q.weight: f32[6,8] <- q.weight shard=d0:2@tp
        param $kv_a.weight: f32[10,8] <- kv_a.weight
        param $kv_norm.weight: f32[8] <- kv_norm.weight
        param $kv_b.weight: f32[8,8] <- kv_b.weight shard=d0:2@tp
        param $o.weight: f32[8,4] <- o.weight shard=d1:2@tp

        func forward(%x: f32[T,8], %positions: i64[T]) {
          %0: f32[T,6] = linear(%x, weight=$q.weight)  @attn.q_proj
          %1: f32[T,10] = linear(%x, weight=$kv_a.weight)  @attn.kv_a_proj
          %2: f32[T,8], %3: f32[T,2] = split(%1) {sizes=[8, 2]}  @attn
          %4: f32[T,6], %5: f32[T,2] = rope(%0, %3, %positions) {heads=1, kv_heads=1, q_head_dim=6, k_head_dim=2, rotary_dim=2, style="interleaved", theta=10000.0}  @attn
          %6: f32[T,8] = rms_norm(%2, weight=$kv_norm.weight) {eps=1e-06}  @attn.kv_norm
          %7: f32[T,4] = attention(%4, %6, %5, kv_b_proj=$kv_b.weight) {kind="mla", layer=0, heads=1, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, kv_lora_rank=8, scale=0.4}  @attn
          %9: f32[T,8] = linear(%7, weight=$o.weight)  @attn.o_proj
          %8: f32[T,8] = all_reduce(%9) {group="tp"}  @attn.o_proj
          return %8
        }
    """)


def test_fused_qkv_cat_param_gets_a_count_per_key():
    """An already fused q/k/v: the split's demand gives one count per key (q split in 2, k and v
    replicated), and the split's sizes become the local ones."""
    text = """
        module
        param $qkv.weight: f32[16,8] <- cat(q.weight, k.weight, v.weight)
        param $o.weight: f32[8,8] <- o.weight

        func forward(%x: f32[T,8], %positions: i64[T]) {
          %0: f32[T,16] = linear(%x, weight=$qkv.weight)  @attn
          %1: f32[T,8], %2: f32[T,4], %3: f32[T,4] = split(%0) {sizes=[8, 4, 4]}  @attn
          %4: f32[T,8], %5: f32[T,4] = rope(%1, %2, %positions) {heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
          %6: f32[T,8] = attention(%4, %5, %3) {kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}  @attn
          %7: f32[T,8] = linear(%6, weight=$o.weight)  @attn.o_proj
          return %7
        }
    """
    assert run("shard_tp", text, Options(tp=2)) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 2}
        param $qkv.weight: f32[12,8] <- cat(q.weight, k.weight, v.weight) shard=d0:2,1,1@tp
        param $o.weight: f32[8,4] <- o.weight shard=d1:2@tp

        func forward(%x: f32[T,8], %positions: i64[T]) {
          %0: f32[T,12] = linear(%x, weight=$qkv.weight)  @attn
          %1: f32[T,4], %2: f32[T,4], %3: f32[T,4] = split(%0) {sizes=[4, 4, 4]}  @attn
          %4: f32[T,4], %5: f32[T,4] = rope(%1, %2, %positions) {heads=1, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
          %6: f32[T,4] = attention(%4, %5, %3) {kind="gqa", layer=0, heads=1, kv_heads=1, head_dim=4, scale=0.5}  @attn
          %8: f32[T,8] = linear(%6, weight=$o.weight)  @attn.o_proj
          %7: f32[T,8] = all_reduce(%8) {group="tp"}  @attn.o_proj
          return %7
        }
    """)


def test_fused_gate_up_spec_lists_the_count_of_each_key():
    """Where fuse_projections would write one count ("d0:2@tp", same meaning), shard_tp writes
    one per key of a cat param."""
    text = """
        module
        param $gate_up.weight: f32[32,8] <- cat(gate.weight, up.weight)
        param $down.weight: f32[8,16] <- down.weight

        func forward(%x: f32[T,8]) {
          %0: f32[T,32] = linear(%x, weight=$gate_up.weight)  @mlp
          %1: f32[T,16], %2: f32[T,16] = split(%0) {sizes=[16, 16]}  @mlp
          %3: f32[T,16] = silu_mul(%1, %2)  @mlp
          %4: f32[T,8] = linear(%3, weight=$down.weight)  @mlp.down_proj
          return %4
        }
    """
    out = run("shard_tp", text, Options(tp=2))
    assert "param $gate_up.weight: f32[16,8] <- cat(gate.weight, up.weight) shard=d0:2,2@tp\n" in out
    assert "%1: f32[T,8], %2: f32[T,8] = split(%0) {sizes=[8, 8]}  @mlp\n" in out


def test_four_ranks_share_two_kv_heads():
    """kv heads fewer than tp but dividing it: ranks 0,1 read kv head 0 and ranks 2,3 kv head 1
    (d0:2@tp over 4 ranks); every rank has 1 q head and 1 kv head."""
    module, _ = apply("shard_tp", _attention(heads=4, kv_heads=2), Options(tp=4))
    assert format_module(module) == ir("""
        module
        meta parallel = {"attention_dp": 1, "ffn_ep": 1, "tp": 4}
        param $q.weight: f32[2,8] <- q.weight shard=d0:4@tp
        param $k.weight: f32[2,8] <- k.weight shard=d0:2@tp
        param $v.weight: f32[2,8] <- v.weight shard=d0:2@tp

        func forward(%x: f32[T,8]) {
          %0: f32[T,2] = linear(%x, weight=$q.weight)  @model.layers.0.self_attn.q_proj
          %1: f32[T,2] = linear(%x, weight=$k.weight)  @model.layers.0.self_attn.k_proj
          %2: f32[T,2] = linear(%x, weight=$v.weight)  @model.layers.0.self_attn.v_proj
          %3: f32[T,2] = attention(%0, %1, %2) {kind="gqa", layer=0, heads=1, kv_heads=1, head_dim=2, scale=0.5}  @model.layers.0.self_attn
          return %3
        }
    """)
    assert read(module, ParallelLayout) == ParallelLayout(tp=4)


def test_tp_1_changes_nothing():
    module, changes = apply("shard_tp", GQA, Options(tp=1))
    assert changes == 0 and read(module, ParallelLayout) is None
    assert run("shard_tp", GQA, Options(tp=1)) == ir(GQA)


def _attention(heads: int, kv_heads: int, meta: str = "") -> str:
    q, kv = 2 * heads, 2 * kv_heads
    return f"""
        module{meta}
        param $q.weight: f32[{q},8] <- q.weight
        param $k.weight: f32[{kv},8] <- k.weight
        param $v.weight: f32[{kv},8] <- v.weight

        func forward(%x: f32[T,8]) {{
          %0: f32[T,{q}] = linear(%x, weight=$q.weight)  @model.layers.0.self_attn.q_proj
          %1: f32[T,{kv}] = linear(%x, weight=$k.weight)  @model.layers.0.self_attn.k_proj
          %2: f32[T,{kv}] = linear(%x, weight=$v.weight)  @model.layers.0.self_attn.v_proj
          %3: f32[T,{q}] = attention(%0, %1, %2) {{kind="gqa", layer=0, heads={heads}, kv_heads={kv_heads}, head_dim=2, scale=0.5}}  @model.layers.0.self_attn
          return %3
        }}
    """


MLP_6 = """
    module
    param $gate.weight: f32[6,8] <- gate.weight
    param $down.weight: f32[8,6] <- down.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,6] = linear(%x, weight=$gate.weight)  @model.layers.0.mlp.gate_proj
      %1: f32[T,6] = silu(%0)  @model.layers.0.mlp
      %2: f32[T,8] = linear(%1, weight=$down.weight)  @model.layers.0.mlp.down_proj
      return %2
    }
"""

MOE_6 = """
    module
    param $router.weight: f32[4,8] <- router.weight
    param $experts.w_gate: f32[4,6,8] <- stack(experts.{0..3}.gate.weight)
    param $experts.w_up: f32[4,6,8] <- stack(experts.{0..3}.up.weight)
    param $experts.w_down: f32[4,8,6] <- stack(experts.{0..3}.down.weight)

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = moe(%x, router=$router.weight, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, top_k=2, scoring="softmax"}  @model.layers.1.mlp
      return %0
    }
"""

EMBED_33 = """
    module
    param $embed.weight: f32[33,8] <- embed.weight

    func forward(%tokens: i64[T]) {
      %0: f32[T,8] = embed(%tokens, weight=$embed.weight)  @model.embed_tokens
      return %0
    }
"""

ROW_BIAS = """
    module
    param $gate.weight: f32[8,8] <- gate.weight
    param $down.weight: f32[8,8] <- down.weight
    param $down.bias: f32[8] <- down.bias

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = linear(%x, weight=$gate.weight)  @mlp.gate_proj
      %1: f32[T,8] = silu(%0)  @mlp
      %2: f32[T,8] = linear(%1, weight=$down.weight, bias=$down.bias)  @mlp.down_proj
      return %2
    }
"""

Q_THROUGH_ADD = """
    module
    param $q.weight: f32[8,8] <- q.weight
    param $k.weight: f32[4,8] <- k.weight

    func forward(%x: f32[T,8], %bias: f32[T,8]) {
      %0: f32[T,8] = linear(%x, weight=$q.weight)  @attn.q_proj
      %1: f32[T,4] = linear(%x, weight=$k.weight)  @attn.k_proj
      %2: f32[T,8] = add(%0, %bias)  @attn
      %3: f32[T,8] = attention(%2, %1, %1) {kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}  @attn
      return %3
    }
"""

Q_READ_WHOLE = """
    module
    param $q.weight: f32[8,8] <- q.weight
    param $k.weight: f32[4,8] <- k.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = linear(%x, weight=$q.weight)  @attn.q_proj
      %1: f32[T,4] = linear(%x, weight=$k.weight)  @attn.k_proj
      %2: f32[T,8] = attention(%0, %1, %1) {kind="gqa", layer=0, heads=2, kv_heads=1, head_dim=4, scale=0.5}  @attn
      %3: f32[T,8] = add(%0, %2)  @attn
      return %3
    }
"""


@pytest.mark.parametrize("text, tp, message", [
    pytest.param(_attention(3, 1), 2, "--tp 2 does not divide the 3 attention heads of model.layers.0.self_attn",
                 id="heads"),
    pytest.param(_attention(6, 3), 2, "--tp 2 does not divide the 3 kv heads (nor is it a multiple of them) of "
                 "model.layers.0.self_attn", id="kv-heads"),
    pytest.param(MLP_6, 4, "--tp 4 does not divide the intermediate size 6 of model.layers.0.mlp.down_proj",
                 id="intermediate"),
    pytest.param(MOE_6, 4, "--tp 4 does not divide the moe intermediate size 6 of model.layers.1.mlp", id="moe"),
    pytest.param(EMBED_33, 2, "--tp 2 does not divide the vocab size 33 of model.embed_tokens", id="vocab"),
    pytest.param(ROW_BIAS, 2, "shard_tp: row-parallel linear with a bias is not supported @mlp.down_proj",
                 id="row-bias"),
    pytest.param(Q_THROUGH_ADD, 2, "shard_tp: cannot split the heads of add @attn", id="heads-through-add"),
    pytest.param(Q_READ_WHOLE, 2, "shard_tp: add reads a head-split value @attn", id="head-split-read-whole"),
    pytest.param(GQA, 0, "--tp 0: expected a positive integer", id="tp-0"),
    pytest.param(_attention(4, 2, '\n        meta parallel = {"tp": 2}'), 2,
                 "--tp 2: the module is already sharded (tp=2)", id="twice"),
    pytest.param(_attention(4, 2, '\n        meta parallel = {"attention_dp": 2, "ffn_ep": 2}'), 2,
                 "--tp 2: the module is already sharded (attention_dp=2 x ffn_ep=2)", id="after-ep"),
])
def test_errors_name_the_layer(text, tp, message):
    with pytest.raises(NanoForgeError) as e:
        apply("shard_tp", text, Options(tp=tp))
    assert str(e.value) == message


def test_the_sizes_that_divide_shard_cleanly():
    """The same shapes as the error cases, at a tp that divides them."""
    assert "%1: f32[T,3] = silu(%0)" in run_fn("shard_tp", MLP_6, Options(tp=2))
    assert "shard=d1:2@tp" in run("shard_tp", MOE_6, Options(tp=2))
    assert "heads=2, kv_heads=1" in run_fn("shard_tp", _attention(6, 3), Options(tp=3))


def test_a_returned_partial_sum_is_all_reduced():
    text = MOE_AND_SHARED.replace("return %5", "return %5, %0")
    out = run_fn("shard_tp", text, Options(tp=2))
    assert "%0: f32[T,8] = all_reduce(" in out

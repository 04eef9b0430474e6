"""fuse_projections: linears that read the same input become one linear over a concatenated weight,
followed by a split that gives back the values under their old names.

    q_proj(x), k_proj(x), v_proj(x)  =>  split(q_k_v_proj(x))
    gate_proj(x), up_proj(x)         =>  split(gate_up_proj(x))

The fused param has layout "cat" over the original checkpoint keys and replaces the originals
(appended after the other params). Column-parallel shards fuse too, with a count per key.
Not fused: linears with a bias, row-parallel (d1) or quantized weights, a linear alone on its input.
"""
from __future__ import annotations

import pytest
from irtext import apply, ir, run

from nanoforge.passes.manager import NoOptions

QKV = """
    module
    param $attn.q_proj.weight: f32[8,8] <- attn.q_proj.weight
    param $attn.k_proj.weight: f32[4,8] <- attn.k_proj.weight
    param $attn.v_proj.weight: f32[4,8] <- attn.v_proj.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = linear(%x, weight=$attn.q_proj.weight)  @attn.q_proj
      %1: f32[T,4] = linear(%x, weight=$attn.k_proj.weight)  @attn.k_proj
      %2: f32[T,4] = linear(%x, weight=$attn.v_proj.weight)  @attn.v_proj
      return %0, %1, %2
    }
"""

ROUNDTRIP = [("fuse_projections", QKV, NoOptions())]


def test_q_k_v_become_one_linear_and_a_split():
    _, changes = apply("fuse_projections", QKV, NoOptions())
    assert changes == 1
    assert run("fuse_projections", QKV, NoOptions()) == ir("""
        module
        param $attn.q_k_v_proj.weight: f32[16,8] <- cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)

        func forward(%x: f32[T,8]) {
          %3: f32[T,16] = linear(%x, weight=$attn.q_k_v_proj.weight)  @attn
          %0: f32[T,8], %1: f32[T,4], %2: f32[T,4] = split(%3) {sizes=[8, 4, 4]}  @attn
          return %0, %1, %2
        }
    """)


def test_gate_up_fuse_and_names_without_proj_join_with_and():
    """Per input: gate/up read %x, q_a/kv_a read %y. Names ending in _proj fuse to x_y_proj,
    others to x_and_y."""
    assert run("fuse_projections", """
        module
        param $mlp.gate_proj.weight: f32[16,8] <- mlp.gate_proj.weight
        param $mlp.up_proj.weight: f32[16,8] <- mlp.up_proj.weight
        param $attn.q_a_proj.weight: f32[4,8] <- attn.q_a_proj.weight
        param $attn.kv_a_proj_with_mqa.weight: f32[6,8] <- attn.kv_a_proj_with_mqa.weight

        func forward(%x: f32[T,8], %y: f32[T,8]) {
          %0: f32[T,16] = linear(%x, weight=$mlp.gate_proj.weight)  @mlp.gate_proj
          %1: f32[T,16] = linear(%x, weight=$mlp.up_proj.weight)  @mlp.up_proj
          %2: f32[T,16] = silu_mul(%0, %1)  @mlp
          %3: f32[T,4] = linear(%y, weight=$attn.q_a_proj.weight)  @attn.q_a_proj
          %4: f32[T,6] = linear(%y, weight=$attn.kv_a_proj_with_mqa.weight)  @attn.kv_a_proj_with_mqa
          return %2, %3, %4
        }
    """, NoOptions()) == ir("""
        module
        param $mlp.gate_up_proj.weight: f32[32,8] <- cat(mlp.gate_proj.weight, mlp.up_proj.weight)
        param $attn.q_a_proj_and_kv_a_proj_with_mqa.weight: f32[10,8] <- cat(attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight)

        func forward(%x: f32[T,8], %y: f32[T,8]) {
          %5: f32[T,32] = linear(%x, weight=$mlp.gate_up_proj.weight)  @mlp
          %0: f32[T,16], %1: f32[T,16] = split(%5) {sizes=[16, 16]}  @mlp
          %2: f32[T,16] = silu_mul(%0, %1)  @mlp
          %6: f32[T,10] = linear(%y, weight=$attn.q_a_proj_and_kv_a_proj_with_mqa.weight)  @attn
          %3: f32[T,4], %4: f32[T,6] = split(%6) {sizes=[4, 6]}  @attn
          return %2, %3, %4
        }
    """)


def test_column_parallel_weights_fuse_with_a_count_per_key():
    """After shard_tp: q split in 2, k/v replicated -> d0:2,1,1; the row-parallel o_proj and x_proj
    read one input too but keep their own GEMMs."""
    assert run("fuse_projections", """
        module
        param $attn.q_proj.weight: f32[4,8] <- attn.q_proj.weight shard=d0:2@tp
        param $attn.k_proj.weight: f32[4,8] <- attn.k_proj.weight shard=d0:1@tp
        param $attn.v_proj.weight: f32[4,8] <- attn.v_proj.weight shard=d0:1@tp
        param $attn.o_proj.weight: f32[8,4] <- attn.o_proj.weight shard=d1:2@tp
        param $attn.x_proj.weight: f32[8,4] <- attn.x_proj.weight shard=d1:2@tp

        func forward(%x: f32[T,8]) {
          %0: f32[T,4] = linear(%x, weight=$attn.q_proj.weight)  @attn.q_proj
          %1: f32[T,4] = linear(%x, weight=$attn.k_proj.weight)  @attn.k_proj
          %2: f32[T,4] = linear(%x, weight=$attn.v_proj.weight)  @attn.v_proj
          %3: f32[T,8] = linear(%0, weight=$attn.o_proj.weight)  @attn.o_proj
          %4: f32[T,8] = linear(%0, weight=$attn.x_proj.weight)  @attn.x_proj
          return %3, %4, %1, %2
        }
    """, NoOptions()) == ir("""
        module
        param $attn.o_proj.weight: f32[8,4] <- attn.o_proj.weight shard=d1:2@tp
        param $attn.x_proj.weight: f32[8,4] <- attn.x_proj.weight shard=d1:2@tp
        param $attn.q_k_v_proj.weight: f32[12,8] <- cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight) shard=d0:2,1,1@tp

        func forward(%x: f32[T,8]) {
          %5: f32[T,12] = linear(%x, weight=$attn.q_k_v_proj.weight)  @attn
          %0: f32[T,4], %1: f32[T,4], %2: f32[T,4] = split(%5) {sizes=[4, 4, 4]}  @attn
          %3: f32[T,8] = linear(%0, weight=$attn.o_proj.weight)  @attn.o_proj
          %4: f32[T,8] = linear(%0, weight=$attn.x_proj.weight)  @attn.x_proj
          return %3, %4, %1, %2
        }
    """)


def test_equal_shard_counts_fuse_into_one_count():
    out = run("fuse_projections", """
        module
        param $mlp.gate_proj.weight: f32[8,8] <- mlp.gate_proj.weight shard=d0:2@tp
        param $mlp.up_proj.weight: f32[8,8] <- mlp.up_proj.weight shard=d0:2@tp

        func forward(%x: f32[T,8]) {
          %0: f32[T,8] = linear(%x, weight=$mlp.gate_proj.weight)  @mlp.gate_proj
          %1: f32[T,8] = linear(%x, weight=$mlp.up_proj.weight)  @mlp.up_proj
          return %0, %1
        }
    """, NoOptions())
    assert "param $mlp.gate_up_proj.weight: f32[16,8] <- cat(mlp.gate_proj.weight, mlp.up_proj.weight) " \
           "shard=d0:2@tp\n" in out


@pytest.mark.parametrize("text", [
    pytest.param("""
        module
        param $attn.q_proj.weight: f32[8,8] <- attn.q_proj.weight
        param $attn.q_proj.bias: f32[8] <- attn.q_proj.bias
        param $attn.k_proj.weight: f32[4,8] <- attn.k_proj.weight
        param $attn.k_proj.bias: f32[4] <- attn.k_proj.bias

        func forward(%x: f32[T,8]) {
          %0: f32[T,8] = linear(%x, weight=$attn.q_proj.weight, bias=$attn.q_proj.bias)  @attn.q_proj
          %1: f32[T,4] = linear(%x, weight=$attn.k_proj.weight, bias=$attn.k_proj.bias)  @attn.k_proj
          return %0, %1
        }
    """, id="bias"),
    pytest.param("""
        module
        param $mlp.gate_proj.weight: f32[16,8] <- mlp.gate_proj.weight quant=fp8
        param $mlp.up_proj.weight: f32[16,8] <- mlp.up_proj.weight quant=fp8

        func forward(%x: f32[T,8]) {
          %0: f32[T,16] = linear(%x, weight=$mlp.gate_proj.weight)  @mlp.gate_proj
          %1: f32[T,16] = linear(%x, weight=$mlp.up_proj.weight)  @mlp.up_proj
          return %0, %1
        }
    """, id="quantized"),
    pytest.param("""
        module
        param $mlp.gate_proj.weight: f32[16,8] <- mlp.gate_proj.weight
        param $mlp.up_proj.weight: f32[16,8] <- mlp.up_proj.weight

        func forward(%x: f32[T,8], %y: f32[T,8]) {
          %0: f32[T,16] = linear(%x, weight=$mlp.gate_proj.weight)  @mlp.gate_proj
          %1: f32[T,16] = linear(%y, weight=$mlp.up_proj.weight)  @mlp.up_proj
          return %0, %1
        }
    """, id="different-inputs"),
])
def test_left_alone(text):
    _, changes = apply("fuse_projections", text, NoOptions())
    assert changes == 0
    assert run("fuse_projections", text, NoOptions()) == ir(text)

"""fuse_elementwise: elementwise neighbours fold into the fused layer ops kernels provide.

    add -> rms_norm                   => add_rms_norm   (returns the norm and the residual sum)
    silu -> mul                       => silu_mul
    rms_norm(q), rms_norm(k) -> rope  => qk_norm_rope

A fused node keeps the names of the values it replaces.
"""
from __future__ import annotations

import pytest
from irtext import ir, run

from nanoforge.passes.fuse_elementwise import Options

ADD_NORM = """
    module
    param $norm.weight: f32[8] <- norm.weight

    func forward(%x: f32[T,8], %residual: f32[T,8]) {
      %0: f32[T,8] = add(%x, %residual)  @layers.0
      %1: f32[T,8] = rms_norm(%0, weight=$norm.weight) {eps=1e-06}  @layers.0.norm
      return %1, %0
    }
"""

SILU_MUL = """
    module

    func forward(%gate: f32[T,16], %up: f32[T,16]) {
      %0: f32[T,16] = silu(%gate)  @mlp
      %1: f32[T,16] = mul(%0, %up)  @mlp
      return %1
    }
"""

QK_NORM_ROPE = """
    module
    param $q_norm.weight: f32[4] <- q_norm.weight
    param $k_norm.weight: f32[4] <- k_norm.weight

    func forward(%q: f32[T,8], %k: f32[T,4], %positions: i64[T]) {
      %0: f32[T,8] = rms_norm(%q, weight=$q_norm.weight) {eps=1e-06, group=4}  @attn.q_norm
      %1: f32[T,4] = rms_norm(%k, weight=$k_norm.weight) {eps=1e-06, group=4}  @attn.k_norm
      %2: f32[T,8], %3: f32[T,4] = rope(%0, %1, %positions) {heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
      return %2, %3
    }
"""

ROUNDTRIP = [("fuse_elementwise", ADD_NORM, Options()), ("fuse_elementwise", QK_NORM_ROPE, Options())]


def test_add_then_rms_norm_becomes_add_rms_norm():
    """The fused node returns the norm and the sum, under the names %1 and %0 they had."""
    assert run("fuse_elementwise", ADD_NORM, Options()) == ir("""
        module
        param $norm.weight: f32[8] <- norm.weight

        func forward(%x: f32[T,8], %residual: f32[T,8]) {
          %1: f32[T,8], %0: f32[T,8] = add_rms_norm(%x, %residual, weight=$norm.weight) {eps=1e-06}  @layers.0.norm
          return %1, %0
        }
    """)


def test_add_feeding_two_norms_fuses_with_the_first_only():
    """The sum is an output of add_rms_norm, so the add fuses even though it has two users; the
    second norm keeps reading the sum %0, now made by the fused node."""
    assert run("fuse_elementwise", """
        module
        param $a.weight: f32[8] <- a.weight
        param $b.weight: f32[8] <- b.weight

        func forward(%x: f32[T,8], %residual: f32[T,8]) {
          %0: f32[T,8] = add(%x, %residual)  @layers.0
          %1: f32[T,8] = rms_norm(%0, weight=$a.weight) {eps=1e-06}  @layers.0.a
          %2: f32[T,8] = rms_norm(%0, weight=$b.weight) {eps=1e-06}  @layers.0.b
          return %1, %2
        }
    """, Options()) == ir("""
        module
        param $a.weight: f32[8] <- a.weight
        param $b.weight: f32[8] <- b.weight

        func forward(%x: f32[T,8], %residual: f32[T,8]) {
          %1: f32[T,8], %0: f32[T,8] = add_rms_norm(%x, %residual, weight=$a.weight) {eps=1e-06}  @layers.0.a
          %2: f32[T,8] = rms_norm(%0, weight=$b.weight) {eps=1e-06}  @layers.0.b
          return %1, %2
        }
    """)


def test_add_before_a_per_head_norm_is_left_alone():
    """A grouped (per-head) rms_norm has no add_rms_norm form."""
    text = """
        module
        param $norm.weight: f32[4] <- norm.weight

        func forward(%x: f32[T,8], %y: f32[T,8]) {
          %0: f32[T,8] = add(%x, %y)  @attn
          %1: f32[T,8] = rms_norm(%0, weight=$norm.weight) {eps=1e-06, group=4}  @attn.q_norm
          return %1
        }
    """
    assert run("fuse_elementwise", text, Options()) == ir(text)


def test_silu_then_mul_becomes_silu_mul():
    assert run("fuse_elementwise", SILU_MUL, Options()) == ir("""
        module

        func forward(%gate: f32[T,16], %up: f32[T,16]) {
          %1: f32[T,16] = silu_mul(%gate, %up)  @mlp
          return %1
        }
    """)


def test_silu_on_the_right_of_mul_is_still_the_gate():
    assert run("fuse_elementwise", """
        module

        func forward(%gate: f32[T,16], %up: f32[T,16]) {
          %0: f32[T,16] = silu(%gate)  @mlp
          %1: f32[T,16] = mul(%up, %0)  @mlp
          return %1
        }
    """, Options()) == ir("""
        module

        func forward(%gate: f32[T,16], %up: f32[T,16]) {
          %1: f32[T,16] = silu_mul(%gate, %up)  @mlp
          return %1
        }
    """)


def test_silu_with_a_second_user_is_left_alone():
    """silu_mul does not return silu(gate), so a silu read elsewhere must stay."""
    text = """
        module

        func forward(%gate: f32[T,16], %up: f32[T,16]) {
          %0: f32[T,16] = silu(%gate)  @mlp
          %1: f32[T,16] = mul(%0, %up)  @mlp
          %2: f32[T,16] = add(%0, %1)  @mlp
          return %2
        }
    """
    assert run("fuse_elementwise", text, Options()) == ir(text)


def test_per_head_norms_then_rope_become_qk_norm_rope():
    """The norm weights move to the q_norm / k_norm slots, eps joins the rope attrs."""
    assert run("fuse_elementwise", QK_NORM_ROPE, Options()) == ir("""
        module
        param $q_norm.weight: f32[4] <- q_norm.weight
        param $k_norm.weight: f32[4] <- k_norm.weight

        func forward(%q: f32[T,8], %k: f32[T,4], %positions: i64[T]) {
          %2: f32[T,8], %3: f32[T,4] = qk_norm_rope(%q, %k, %positions, q_norm=$q_norm.weight, k_norm=$k_norm.weight) {eps=1e-06, heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
          return %2, %3
        }
    """)


@pytest.mark.parametrize("change", [
    pytest.param(("{eps=1e-06, group=4}  @attn.k_norm", "{eps=1e-05, group=4}  @attn.k_norm"), id="eps-differ"),
    pytest.param(("  return %2, %3", "  %4: f32[T,8] = add(%0, %2)  @attn\n      return %4, %3"),
                 id="q-norm-read-elsewhere"),
])
def test_qk_norms_that_cannot_fuse_are_left_alone(change):
    text = QK_NORM_ROPE.replace(*change)
    assert text != QK_NORM_ROPE
    assert run("fuse_elementwise", text, Options()) == ir(text)


def test_norms_over_part_of_a_head_are_left_alone():
    """Norms over 2-wide slices of 4-wide heads: qk_norm_rope cannot express them."""
    text = """
        module
        param $q_norm.weight: f32[2] <- q_norm.weight
        param $k_norm.weight: f32[2] <- k_norm.weight

        func forward(%q: f32[T,8], %k: f32[T,4], %positions: i64[T]) {
          %0: f32[T,8] = rms_norm(%q, weight=$q_norm.weight) {eps=1e-06, group=2}  @attn.q_norm
          %1: f32[T,4] = rms_norm(%k, weight=$k_norm.weight) {eps=1e-06, group=2}  @attn.k_norm
          %2: f32[T,8], %3: f32[T,4] = rope(%0, %1, %positions) {heads=2, kv_heads=1, q_head_dim=4, k_head_dim=4, rotary_dim=4, style="neox", theta=10000.0}  @attn
          return %2, %3
        }
    """
    assert run("fuse_elementwise", text, Options()) == ir(text)


@pytest.mark.parametrize("text, old, new", [
    pytest.param(SILU_MUL, "return %1", "return %1, %0", id="silu"),
    pytest.param(QK_NORM_ROPE, "return %2, %3", "return %2, %3, %0", id="q_norm"),
])
def test_a_returned_value_is_never_fused_away(text, old, new):
    text = text.replace(old, new)
    assert run("fuse_elementwise", text, Options()) == ir(text)


def test_each_rewrite_can_be_turned_off():
    assert run("fuse_elementwise", ADD_NORM, Options(add_rms_norm=False)) == ir(ADD_NORM)
    assert run("fuse_elementwise", SILU_MUL, Options(silu_mul=False)) == ir(SILU_MUL)
    assert run("fuse_elementwise", QK_NORM_ROPE, Options(qk_norm_rope=False)) == ir(QK_NORM_ROPE)

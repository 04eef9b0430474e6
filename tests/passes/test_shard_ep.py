"""shard_ep: attention data-parallel x FFN expert-parallel over the same N ranks.

    moe(x)  =>  moe_dispatch(x) -> grouped_experts -> moe_combine   (the moe's result keeps its name)

Each rank keeps num_experts / N experts: the expert params get shard "d0:N@ep" and their local
type; router and score_bias stay replicated, and so does everything outside the moe nodes.
"""
from __future__ import annotations

import pytest
from irtext import apply, ir, run

from nanoforge.errors import NanoForgeError
from nanoforge.facts import ParallelLayout, read
from nanoforge.passes.shard_ep import Options

MOE = """
    module
    param $router.weight: f32[4,8] <- router.weight
    param $router.bias: f32[4] <- router.bias
    param $experts.w_gate: f32[4,16,8] <- stack(experts.{0..3}.gate.weight)
    param $experts.w_up: f32[4,16,8] <- stack(experts.{0..3}.up.weight)
    param $experts.w_down: f32[4,8,16] <- stack(experts.{0..3}.down.weight)

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = moe(%x, router=$router.weight, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down, score_bias=$router.bias) {num_experts=4, top_k=2, scoring="sigmoid"}  @model.layers.1.mlp
      %1: f32[T,8] = add(%x, %0)  @model.layers.1
      return %1
    }
"""

ROUNDTRIP = [("shard_ep", MOE, Options(attention_dp=2, ffn_ep=2))]


def test_moe_becomes_dispatch_experts_combine():
    """Tg: the tokens this rank's experts receive; P: the exchange plan moe_combine reverses."""
    assert run("shard_ep", MOE, Options(attention_dp=2, ffn_ep=2)) == ir("""
        module
        meta parallel = {"attention_dp": 2, "ffn_ep": 2, "tp": 1}
        param $router.weight: f32[4,8] <- router.weight
        param $router.bias: f32[4] <- router.bias
        param $experts.w_gate: f32[2,16,8] <- stack(experts.{0..3}.gate.weight) shard=d0:2@ep
        param $experts.w_up: f32[2,16,8] <- stack(experts.{0..3}.up.weight) shard=d0:2@ep
        param $experts.w_down: f32[2,8,16] <- stack(experts.{0..3}.down.weight) shard=d0:2@ep

        func forward(%x: f32[T,8]) {
          %2: f32[Tg,8], %3: f32[Tg,2], %4: i64[Tg,2], %5: i64[P] = moe_dispatch(%x, router=$router.weight, score_bias=$router.bias) {num_experts=4, top_k=2, scoring="sigmoid", group="ep"}  @model.layers.1.mlp
          %6: f32[Tg,8] = grouped_experts(%2, %3, %4, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, group="ep"}  @model.layers.1.mlp
          %0: f32[T,8] = moe_combine(%6, %5) {group="ep"}  @model.layers.1.mlp
          %1: f32[T,8] = add(%x, %0)  @model.layers.1
          return %1
        }
    """)


def test_one_rank_changes_nothing():
    module, changes = apply("shard_ep", MOE, Options())
    assert changes == 0 and read(module, ParallelLayout) is None
    assert run("shard_ep", MOE, Options()) == ir(MOE)


def test_layout_fact():
    module, changes = apply("shard_ep", MOE, Options(attention_dp=4, ffn_ep=4))
    assert changes == 1
    assert read(module, ParallelLayout) == ParallelLayout(tp=1, attention_dp=4, ffn_ep=4)
    assert module.params["experts.w_down"].shard == "d0:4@ep"
    assert str(module.params["experts.w_down"].type) == "f32[1,8,16]"


DENSE = """
    module
    param $down.weight: f32[8,8] <- down.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = linear(%x, weight=$down.weight)  @model.layers.0.mlp.down_proj
      return %0
    }
"""


@pytest.mark.parametrize("text, options, message", [
    pytest.param(MOE, Options(attention_dp=2, ffn_ep=4), "--attention-dp 2 and --ffn-ep 4 must be equal: attention "
                 "data parallelism and expert parallelism run on the same ranks", id="dp-ne-ep"),
    pytest.param(MOE, Options(attention_dp=8, ffn_ep=8), "--ffn-ep 8 does not divide the 4 experts of "
                 "model.layers.1.mlp", id="experts"),
    pytest.param(MOE, Options(attention_dp=0, ffn_ep=1), "--attention-dp and --ffn-ep must be >= 1; got 0 and 1",
                 id="zero"),
    pytest.param(MOE.replace("module", 'module\n    meta parallel = {"tp": 2}', 1), Options(attention_dp=2, ffn_ep=2),
                 "--tp cannot be combined with --attention-dp/--ffn-ep (yet)", id="after-tp"),
    pytest.param(DENSE, Options(attention_dp=2, ffn_ep=2), "--ffn-ep 2: the model has no MoE layers to spread over "
                 "ranks", id="dense"),
])
def test_errors(text, options, message):
    with pytest.raises(NanoForgeError) as e:
        apply("shard_ep", text, options)
    assert str(e.value) == message


def test_running_twice_reads_as_a_dense_model():
    """Surprising: a second run finds no moe nodes left (they are dispatch/experts/combine now) and
    says the model has none, rather than that the module is already sharded as shard_tp does."""
    once = run("shard_ep", MOE, Options(attention_dp=2, ffn_ep=2))
    with pytest.raises(NanoForgeError, match="the model has no MoE layers"):
        apply("shard_ep", once, Options(attention_dp=2, ffn_ep=2))

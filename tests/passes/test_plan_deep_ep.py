"""plan_deep_ep: which DeepEP mode serves which batch sizes, checked where the plan is made.

Every moe_dispatch on provider deep_ep gets attr `low_latency_max_tokens` (the cap, 0 = normal
mode only) and the module the DeepEPPlan fact (`meta deep_ep`); with the cap 0 also a
GraphBlockers reason (normal mode syncs with the host, so no CUDA graphs). Checked: bf16
activations, 2/4/8 EP ranks, and with a cap the hidden sizes and top-k of the low-latency kernels.
"""
from __future__ import annotations

import pytest
from irtext import apply, ir, run

from nanoforge.errors import NanoForgeError
from nanoforge.facts import DeepEPPlan, GraphBlockers, read
from nanoforge.passes.plan_deep_ep import Options

DEEP_EP = """
    module
    meta parallel = {"attention_dp": 2, "ffn_ep": 2, "tp": 1}
    param $router.weight: bf16[4,2048] <- router.weight
    param $experts.w_gate: bf16[2,8,2048] <- stack(experts.{0..3}.gate.weight) shard=d0:2@ep
    param $experts.w_up: bf16[2,8,2048] <- stack(experts.{0..3}.up.weight) shard=d0:2@ep
    param $experts.w_down: bf16[2,2048,8] <- stack(experts.{0..3}.down.weight) shard=d0:2@ep

    func forward(%x: bf16[T,2048]) {
      %1: bf16[Tg,2048], %2: f32[Tg,2], %3: i64[Tg,2], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {num_experts=4, top_k=2, scoring="softmax", group="ep"} provider=deep_ep  @model.layers.1.mlp
      %5: bf16[Tg,2048] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, group="ep"} provider=deep_ep  @model.layers.1.mlp
      %0: bf16[T,2048] = moe_combine(%5, %4) {group="ep"} provider=deep_ep  @model.layers.1.mlp
      return %0
    }
"""

ROUNDTRIP = [("plan_deep_ep", DEEP_EP, Options(max_num_seqs=64, max_tokens=128)),
             ("plan_deep_ep", DEEP_EP, Options(max_num_seqs=64, max_tokens=0))]


def test_low_latency_cap_goes_on_the_dispatch_and_into_the_plan():
    assert run("plan_deep_ep", DEEP_EP, Options(max_num_seqs=64, max_tokens=128)) == ir("""
        module
        meta deep_ep = {"low_latency_max_tokens": 128, "max_num_seqs": 64, "modes": "low_latency while no EP rank holds more than 128 tokens (every decode batch: max_num_seqs 64), normal above (prefill, mixed batches)"}
        meta parallel = {"attention_dp": 2, "ffn_ep": 2, "tp": 1}
        param $router.weight: bf16[4,2048] <- router.weight
        param $experts.w_gate: bf16[2,8,2048] <- stack(experts.{0..3}.gate.weight) shard=d0:2@ep
        param $experts.w_up: bf16[2,8,2048] <- stack(experts.{0..3}.up.weight) shard=d0:2@ep
        param $experts.w_down: bf16[2,2048,8] <- stack(experts.{0..3}.down.weight) shard=d0:2@ep

        func forward(%x: bf16[T,2048]) {
          %1: bf16[Tg,2048], %2: f32[Tg,2], %3: i64[Tg,2], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {num_experts=4, top_k=2, scoring="softmax", group="ep", low_latency_max_tokens=128} provider=deep_ep  @model.layers.1.mlp
          %5: bf16[Tg,2048] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, group="ep"} provider=deep_ep  @model.layers.1.mlp
          %0: bf16[T,2048] = moe_combine(%5, %4) {group="ep"} provider=deep_ep  @model.layers.1.mlp
          return %0
        }
    """)


def test_cap_0_is_normal_mode_and_blocks_cuda_graphs():
    module, changes = apply("plan_deep_ep", DEEP_EP, Options(max_num_seqs=64, max_tokens=0))
    assert changes == 1
    assert read(module, DeepEPPlan) == DeepEPPlan(0, 64, "normal for every batch (--deep-ep-max-tokens 0)")
    assert read(module, GraphBlockers) == GraphBlockers(
        ("deep_ep in normal mode only (--deep-ep-max-tokens 0) syncs with the host",))
    out = run("plan_deep_ep", DEEP_EP, Options(max_num_seqs=64, max_tokens=0))
    assert 'meta graph_blockers = {"reasons": ["deep_ep in normal mode only (--deep-ep-max-tokens 0) syncs with ' \
           'the host"]}\n' in out
    assert 'group="ep", low_latency_max_tokens=0} provider=deep_ep' in out


def test_without_deep_ep_dispatches_nothing_happens():
    text = DEEP_EP.replace(" provider=deep_ep", " provider=allgather", 1) \
        .replace(" provider=deep_ep", " provider=torch", 1).replace(" provider=deep_ep", " provider=allgather")
    module, changes = apply("plan_deep_ep", text, Options(max_num_seqs=64))
    assert changes == 0 and read(module, DeepEPPlan) is None
    assert run("plan_deep_ep", text, Options(max_num_seqs=64)) == ir(text)


def _deep_ep(dtype: str = "bf16", hidden: int = 2048, top_k: int = 2, ranks: int = 2) -> str:
    """DEEP_EP with 16 experts, 8 a rank (the shapes plan_deep_ep checks: dtype, hidden, top_k, ranks)."""
    return f"""
        module
        meta parallel = {{"attention_dp": {ranks}, "ffn_ep": {ranks}, "tp": 1}}
        param $router.weight: {dtype}[16,{hidden}] <- router.weight
        param $experts.w_gate: {dtype}[8,8,{hidden}] <- stack(experts.{{0..15}}.gate.weight) shard=d0:2@ep
        param $experts.w_up: {dtype}[8,8,{hidden}] <- stack(experts.{{0..15}}.up.weight) shard=d0:2@ep
        param $experts.w_down: {dtype}[8,{hidden},8] <- stack(experts.{{0..15}}.down.weight) shard=d0:2@ep

        func forward(%x: {dtype}[T,{hidden}]) {{
          %1: {dtype}[Tg,{hidden}], %2: f32[Tg,{top_k}], %3: i64[Tg,{top_k}], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {{num_experts=16, top_k={top_k}, scoring="softmax", group="ep"}} provider=deep_ep  @model.layers.1.mlp
          %5: {dtype}[Tg,{hidden}] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {{num_experts=16, group="ep"}} provider=deep_ep  @model.layers.1.mlp
          %0: {dtype}[T,{hidden}] = moe_combine(%5, %4) {{group="ep"}} provider=deep_ep  @model.layers.1.mlp
          return %0
        }}
    """


def test_normal_mode_takes_any_hidden_size_and_top_k():
    module, _ = apply("plan_deep_ep", _deep_ep(hidden=8, top_k=12), Options(max_num_seqs=64, max_tokens=0))
    assert read(module, DeepEPPlan).modes == "normal for every batch (--deep-ep-max-tokens 0)"


@pytest.mark.parametrize("text, options, message", [
    pytest.param(_deep_ep(), Options(max_num_seqs=256, max_tokens=128), "--max-num-seqs 256 exceeds DeepEP's "
                 "low-latency cap --deep-ep-max-tokens 128: lower --max-num-seqs to 128 or raise --deep-ep-max-tokens "
                 "to 256", id="seqs-over-cap"),
    pytest.param(_deep_ep(), Options(max_num_seqs=64, max_tokens=512), "--deep-ep-max-tokens 512: DeepEP's "
                 "low-latency mode holds 1 to 511 tokens per rank (0 turns it off)", id="cap-too-big"),
    pytest.param(_deep_ep(dtype="f32"), Options(max_num_seqs=64), "deep_ep @model.layers.1.mlp: DeepEP moves bf16 "
                 "activations, this plan's are f32 (compile with --dtype bf16)", id="f32"),
    pytest.param(_deep_ep(ranks=3), Options(max_num_seqs=64), "deep_ep @model.layers.1.mlp: DeepEP's NVLink mode "
                 "runs on 2, 4 or 8 EP ranks, not 3", id="3-ranks"),
    pytest.param(_deep_ep(hidden=8), Options(max_num_seqs=64), "deep_ep @model.layers.1.mlp: DeepEP's low-latency "
                 "kernels take hidden sizes 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192, not 8; "
                 "--deep-ep-max-tokens 0 uses normal mode", id="hidden"),
    pytest.param(_deep_ep(top_k=12), Options(max_num_seqs=64), "deep_ep @model.layers.1.mlp: DeepEP's low-latency "
                 "combine takes top-k <= 11, not 12; --deep-ep-max-tokens 0 uses normal mode", id="top-k"),
])
def test_errors(text, options, message):
    with pytest.raises(NanoForgeError) as e:
        apply("plan_deep_ep", text, options)
    assert str(e.value) == message


def test_the_default_options_reject_every_deep_ep_plan():
    """Surprising: the defaults (max_num_seqs 256 = defaults.MAX_NUM_SEQS, cap 128 =
    defaults.DEEP_EP_MAX_TOKENS) contradict each other, so forcing deep_ep without also passing
    --max-num-seqs or --deep-ep-max-tokens never compiles."""
    assert (Options().max_num_seqs, Options().max_tokens) == (256, 128)
    with pytest.raises(NanoForgeError, match="--max-num-seqs 256 exceeds DeepEP's low-latency cap"):
        apply("plan_deep_ep", DEEP_EP, Options())

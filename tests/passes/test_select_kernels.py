"""select_kernels: a provider for every node (`provider=` in the node's line), the first usable one
in rank order (triton, allgather, cpu, torch, then the library adapters), and two facts:

    meta target = {...}              the Target the plan is for (Options.target)
    meta provider_fallbacks = {...}  per op, why the providers that could not run it were passed over

`Options.force` ({op: provider}, from --provider) picks a provider outright; one that cannot run
the op there is an error. The EP trio must agree: moe_combine runs on its dispatch's provider.
"""
from __future__ import annotations

import sys
import types

import pytest
from irtext import apply, ir, run, run_fn

from nanoforge.errors import NanoForgeError
from nanoforge.facts import ProviderNotes, Target, read
from nanoforge.passes.select_kernels import Options

DENSE = """
    module
    param $norm.weight: f32[8] <- norm.weight
    param $w.weight: f32[8,8] <- w.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = rms_norm(%x, weight=$norm.weight) {eps=1e-06}  @norm
      %1: f32[T,8] = linear(%0, weight=$w.weight)  @proj
      return %1
    }
"""

EP = """
    module
    param $router.weight: f32[4,8] <- router.weight
    param $experts.w_gate: f32[2,16,8] <- stack(experts.{0..3}.gate.weight) shard=d0:2@ep
    param $experts.w_up: f32[2,16,8] <- stack(experts.{0..3}.up.weight) shard=d0:2@ep
    param $experts.w_down: f32[2,8,16] <- stack(experts.{0..3}.down.weight) shard=d0:2@ep

    func forward(%x: f32[T,8]) {
      %1: f32[Tg,8], %2: f32[Tg,2], %3: i64[Tg,2], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {num_experts=4, top_k=2, scoring="softmax", group="ep"}  @mlp
      %5: f32[Tg,8] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, group="ep"}  @mlp
      %0: f32[T,8] = moe_combine(%5, %4) {group="ep"}  @mlp
      return %0
    }
"""

ROUNDTRIP = [("select_kernels", DENSE, Options()), ("select_kernels", EP, Options())]


def test_cpu_target_runs_norms_and_linears_on_the_cpu_provider():
    """The cpu provider (ranked above torch) takes the CPU target's norms and linears. The fallbacks
    list every provider that cannot run the op, lower-ranked ones (deep_gemm, flashinfer) included,
    though the docstrings say 'better-ranked'."""
    assert run("select_kernels", DENSE, Options()) == ir("""
        module
        meta provider_fallbacks = {"notes": {"linear": ["triton: needs a CUDA target (compile with --device cuda)", "deep_gemm: deep_gemm needs a CUDA target (compile with --device cuda)"], "rms_norm": ["triton: needs a CUDA target (compile with --device cuda)", "flashinfer: flashinfer needs a CUDA target (compile with --device cuda)"]}}
        meta target = {"capability": "", "device": "cpu", "machine": "", "torch": ""}
        param $norm.weight: f32[8] <- norm.weight
        param $w.weight: f32[8,8] <- w.weight

        func forward(%x: f32[T,8]) {
          %0: f32[T,8] = rms_norm(%x, weight=$norm.weight) {eps=1e-06} provider=cpu  @norm
          %1: f32[T,8] = linear(%0, weight=$w.weight) provider=cpu  @proj
          return %1
        }
    """)


def test_ep_dispatch_and_combine_take_allgather_which_ranks_above_torch():
    assert run_fn("select_kernels", EP, Options()) == ir("""
        func forward(%x: f32[T,8]) {
          %1: f32[Tg,8], %2: f32[Tg,2], %3: i64[Tg,2], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {num_experts=4, top_k=2, scoring="softmax", group="ep"} provider=allgather  @mlp
          %5: f32[Tg,8] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, group="ep"} provider=torch  @mlp
          %0: f32[T,8] = moe_combine(%5, %4) {group="ep"} provider=allgather  @mlp
          return %0
        }
    """)


def test_facts():
    target = Target("cpu", "2.13.0", "x86_64")
    module, changes = apply("select_kernels", DENSE, Options(target=target))
    assert changes == 2  # two nodes got a provider
    assert read(module, Target) == target
    assert read(module, ProviderNotes).notes["linear"][0] == "triton: needs a CUDA target (compile with --device cuda)"


def test_a_second_run_changes_nothing():
    once = run("select_kernels", DENSE, Options())
    _, changes = apply("select_kernels", once, Options())
    assert changes == 0


@pytest.fixture
def fake_triton(monkeypatch):
    """Triton's probe imports triton: make it importable and empty, so the target alone decides."""
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))


def test_cuda_sm90_target_prefers_triton(fake_triton):
    out = run_fn("select_kernels", DENSE, Options(target=Target("cuda", capability="sm90")))
    assert out == ir("""
        func forward(%x: f32[T,8]) {
          %0: f32[T,8] = rms_norm(%x, weight=$norm.weight) {eps=1e-06} provider=triton  @norm
          %1: f32[T,8] = linear(%0, weight=$w.weight) provider=triton  @proj
          return %1
        }
    """)


def test_cuda_sm75_target_falls_back_to_torch_saying_why(fake_triton):
    module, _ = apply("select_kernels", DENSE, Options(target=Target("cuda", capability="sm75")))
    assert {n.provider for n in module.functions["forward"].nodes} == {"torch"}
    assert read(module, ProviderNotes).notes == {
        "linear": ["triton: needs sm80 or newer; the target is sm75", "cpu: runs on the CPU target only",
                   "deep_gemm: deep_gemm needs sm90/sm100; the target is sm75"],
        "rms_norm": ["triton: needs sm80 or newer; the target is sm75", "cpu: runs on the CPU target only",
                     "flashinfer: flashinfer needs sm80+; the target is sm75"]}


def test_forced_provider_wins_over_rank():
    assert run_fn("select_kernels", EP, Options(force={"moe_dispatch": "torch", "moe_combine": "torch"})) == ir("""
        func forward(%x: f32[T,8]) {
          %1: f32[Tg,8], %2: f32[Tg,2], %3: i64[Tg,2], %4: i64[P] = moe_dispatch(%x, router=$router.weight) {num_experts=4, top_k=2, scoring="softmax", group="ep"} provider=torch  @mlp
          %5: f32[Tg,8] = grouped_experts(%1, %2, %3, w_gate=$experts.w_gate, w_up=$experts.w_up, w_down=$experts.w_down) {num_experts=4, group="ep"} provider=torch  @mlp
          %0: f32[T,8] = moe_combine(%5, %4) {group="ep"} provider=torch  @mlp
          return %0
        }
    """)


@pytest.mark.parametrize("text, force, message", [
    pytest.param(DENSE, {"linear": "cuda"}, "--provider linear=cuda: unknown provider; known: triton, allgather, cpu, torch, "
                 "flashinfer, deep_gemm, flash_mla, flash_mla_sparse, deep_gemm_indexer, deep_ep", id="unknown"),
    pytest.param(DENSE, {"linear": "triton"}, "--provider linear=triton: needs a CUDA target (compile with --device "
                 "cuda)", id="cannot-run-here"),
    pytest.param(DENSE, {"linear": "allgather"}, "--provider linear=allgather: allgather does not implement linear",
                 id="does-not-implement"),
    pytest.param(EP, {"moe_dispatch": "torch"}, "moe_combine runs on allgather but its moe_dispatch on torch @mlp: "
                 "force the EP ops together (--provider moe_dispatch=allgather --provider moe_combine=allgather)",
                 id="ep-trio"),
])
def test_errors(text, force, message):
    with pytest.raises(NanoForgeError) as e:
        apply("select_kernels", text, Options(force=force))
    assert str(e.value) == message


def test_the_ep_trio_advice_compiles():
    """The advice names only ops the suggested provider implements (allgather has no grouped_experts)."""
    with pytest.raises(NanoForgeError) as e:
        apply("select_kernels", EP, Options(force={"moe_dispatch": "torch"}))
    advice = dict(flag.split("=") for flag in str(e.value).split("(", 1)[1].rstrip(")").split("--provider ")[1:])
    advice = {op: provider.strip() for op, provider in advice.items()}
    apply("select_kernels", EP, Options(force=advice))


def test_deep_gemm_ranks_first_for_w8a8_fp8_linears_where_it_runs(fake_triton, monkeypatch):
    """A linear over block-FP8 weights with quantized activations (act_quant=128) goes to deep_gemm
    when it can run there; every other linear keeps the usual order (triton first)."""
    import dataclasses

    from nanoforge.codegen import providers

    usable = [dataclasses.replace(p, probe=lambda t: None) if p.name == "deep_gemm" else p for p in providers.PROVIDERS]
    monkeypatch.setattr(providers, "PROVIDERS", usable)
    text = """
        module
        param $w.weight: fp8_e4m3[8,8] <- w.weight quant=fp8_e4m3:128x128
        param $w.weight_scale_inv: f32[1,1] <- w.weight_scale_inv quant=scale:128x128
        param $v.weight: f32[8,8] <- v.weight

        func forward(%x: f32[T,8]) {
          %0: f32[T,8] = linear(%x, weight=$w.weight, weight_scale_inv=$w.weight_scale_inv) {fp8_block=[128, 128], act_quant=128}  @w
          %1: f32[T,8] = linear(%0, weight=$v.weight)  @v
          return %1
        }
    """
    out = run_fn("select_kernels", text, Options(target=Target("cuda", capability="sm90")))
    assert "{fp8_block=[128, 128], act_quant=128} provider=deep_gemm  @w" in out
    assert "linear(%0, weight=$v.weight) provider=triton  @v" in out
    weight_only = text.replace(", act_quant=128", "")
    sm90 = Options(target=Target("cuda", capability="sm90"))
    assert "provider=triton  @w" in run_fn("select_kernels", weight_only, sm90)

"""plan_cuda_graphs: the decode batch sizes to capture as CUDA graphs, or why none (`meta cuda_graphs`).

Sizes 1, 2, 4, 8, then every 16 up to max_num_seqs (and max_num_seqs itself), cut where
size * (peak activation bytes per token + 4 * vocab_size of f32 logits) exceeds the budget.
No sizes, with a reason, when the target (`meta target`, written by select_kernels) is not
CUDA, graphs are disabled, an earlier pass left a GraphBlockers reason, or a node's provider
syncs with the host (a node without a provider counts as torch).
"""
from __future__ import annotations

import pytest
from irtext import MODEL, apply, ir, run

from nanoforge.errors import NanoForgeError
from nanoforge.facts import CudaGraphPlan, read
from nanoforge.passes.plan_cuda_graphs import Options, candidate_sizes

CUDA = 'meta target = {"capability": "sm90", "device": "cuda", "machine": "", "torch": ""}'

# peak activations: %0 and %1 alive at once, 2 x 8 f32 = 64 B a token; logits 4 * 32 = 128 B a sequence
DENSE = f"""
    module
    {MODEL}
    {CUDA}
    param $norm.weight: f32[8] <- norm.weight
    param $w.weight: f32[8,8] <- w.weight

    func forward(%x: f32[T,8]) {{
      %0: f32[T,8] = rms_norm(%x, weight=$norm.weight) {{eps=1e-06}} provider=triton  @norm
      %1: f32[T,8] = linear(%0, weight=$w.weight) provider=triton  @proj
      return %1
    }}
"""

ROUNDTRIP = [("plan_cuda_graphs", DENSE, Options(max_num_seqs=40, memory_budget=20 * 192))]


def test_sizes_up_to_the_budget():
    """A batch costs 64 + 128 = 192 B a sequence; a budget of 20 of them keeps 1..16 of 1,2,4,8,16,32,40."""
    assert candidate_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert run("plan_cuda_graphs", DENSE, Options(max_num_seqs=40, memory_budget=20 * 192)) == ir(f"""
        module
        meta cuda_graphs = {{"reason": null, "sizes": [1, 2, 4, 8, 16], "verify_sizes": []}}
        {MODEL}
        {CUDA}
        param $norm.weight: f32[8] <- norm.weight
        param $w.weight: f32[8,8] <- w.weight

        func forward(%x: f32[T,8]) {{
          %0: f32[T,8] = rms_norm(%x, weight=$norm.weight) {{eps=1e-06}} provider=triton  @norm
          %1: f32[T,8] = linear(%0, weight=$w.weight) provider=triton  @proj
          return %1
        }}
    """)


def test_default_budget_takes_every_candidate():
    module, changes = apply("plan_cuda_graphs", DENSE, Options())
    assert read(module, CudaGraphPlan) == CudaGraphPlan(tuple([1, 2, 4, 8] + list(range(16, 257, 16))), None)
    assert changes == 20


def _plan(text: str, options: Options) -> CudaGraphPlan:
    module, changes = apply("plan_cuda_graphs", text, options)
    plan = read(module, CudaGraphPlan)
    assert changes == len(plan.sizes)
    return plan


GRAPH_BLOCKER = 'meta graph_blockers = {"reasons": ["deep_ep in normal mode only (--deep-ep-max-tokens 0) syncs with the host"]}'


@pytest.mark.parametrize("text, options, reason", [
    pytest.param(DENSE.replace(CUDA, ""), Options(), "the target is not a CUDA device", id="no-target-fact"),
    pytest.param(DENSE.replace('"device": "cuda"', '"device": "cpu"'), Options(), "the target is not a CUDA device",
                 id="cpu"),
    pytest.param(DENSE, Options(enabled=False), "disabled at compile time", id="disabled"),
    pytest.param(DENSE.replace(CUDA, CUDA + "\n    " + GRAPH_BLOCKER), Options(),
                 "deep_ep in normal mode only (--deep-ep-max-tokens 0) syncs with the host", id="earlier-pass"),
    pytest.param(DENSE.replace(" provider=triton  @proj", "  @proj"), Options(max_num_seqs=4), None,
                 id="no-provider-is-torch-linear-is-fine"),
    pytest.param(DENSE, Options(memory_budget=191), "even a batch of 1 needs more than the 191 B budget",
                 id="budget"),
])
def test_no_graphs_and_why(text, options, reason):
    plan = _plan(text, options)
    assert plan.reason == reason
    assert plan.sizes == (() if reason else (1, 2, 4))


def test_a_host_syncing_kernel_is_named_with_its_layer():
    text = f"""
        module
        {MODEL}
        {CUDA}
        param $q.weight: f32[8,8] <- q.weight

        func forward(%x: f32[T,8]) {{
          %0: f32[T,8] = linear(%x, weight=$q.weight) provider=triton  @attn.q_proj
          %1: f32[T,8] = attention(%0, %x, %x) {{kind="gqa", layer=0, heads=2, kv_heads=2, head_dim=4, scale=0.5}} provider=torch  @model.layers.0.self_attn
          return %1
        }}
    """
    out = run("plan_cuda_graphs", text, Options())
    assert out.startswith(ir("""
        module
        meta cuda_graphs = {"reason": "attention runs on provider torch, whose kernel syncs with the host @model.layers.0.self_attn", "sizes": [], "verify_sizes": []}
    """))


def test_a_budget_needs_the_model_fact():
    with pytest.raises(NanoForgeError, match="the module has no model"):
        apply("plan_cuda_graphs", DENSE.replace(MODEL, ""), Options())


def test_max_num_seqs_0_plans_no_empty_graph():
    try:
        plan = _plan(DENSE, Options(max_num_seqs=0))
    except NanoForgeError:
        return  # rejecting it is fine too
    assert all(s >= 1 for s in plan.sizes), plan.sizes

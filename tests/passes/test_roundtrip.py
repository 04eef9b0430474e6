"""Every pass's output is IR text the parser reads back exactly: print(parse(text)) == text.

Plans store their IR as this text (facts included, as `meta` lines), so a pass that wrote
something the printer cannot express, or the parser cannot read, would lose it on the way to
the plan. One parametrized test over each pass file's ROUNDTRIP examples.
"""
from __future__ import annotations

import pytest
from irtext import run

from nanoforge.ir.parser import parse_module
from nanoforge.ir.printer import format_module
from nanoforge.passes import PASSES

from . import (
    test_attach_mtp,
    test_fuse_elementwise,
    test_fuse_kv_store,
    test_fuse_projections,
    test_plan_cuda_graphs,
    test_plan_deep_ep,
    test_plan_memory,
    test_quantize_kv,
    test_quantize_weights,
    test_select_kernels,
    test_shard_ep,
    test_shard_tp,
    test_verify,
)

PASS_TESTS = (test_verify, test_attach_mtp, test_quantize_weights, test_quantize_kv, test_shard_tp, test_shard_ep,
              test_fuse_elementwise, test_fuse_projections, test_select_kernels, test_fuse_kv_store, test_plan_deep_ep,
              test_plan_cuda_graphs, test_plan_memory)
EXAMPLES = [case for m in PASS_TESTS for case in m.ROUNDTRIP]


def test_every_pass_has_an_example():
    assert {name for name, _, _ in EXAMPLES} == set(PASSES)


@pytest.mark.parametrize("name, text, options", [
    pytest.param(name, text, options, id=f"{name}-{i}") for i, (name, text, options) in enumerate(EXAMPLES)])
def test_output_round_trips(name, text, options):
    out = run(name, text, options)
    assert format_module(parse_module(out)) == out

"""verify: structural checks of a module (SSA, operand types against ops.py, params); changes nothing.

Each failure is one line naming the function and the node's line with its HF module, so the
reader finds the layer without knowing our value numbers.
"""
from __future__ import annotations

import pytest
from irtext import ir, run

from nanoforge.ir.parser import IRParseError, parse_module
from nanoforge.ir.verifier import VerifyError
from nanoforge.passes import PASSES
from nanoforge.passes.manager import NoOptions

GOOD = """
    module
    param $norm.weight: f32[8] <- norm.weight
    param $w.weight: f32[4,8] <- w.weight

    func forward(%x: f32[T,8]) {
      %0: f32[T,8] = rms_norm(%x, weight=$norm.weight) {eps=1e-06}  @model.norm
      %1: f32[T,4] = linear(%0, weight=$w.weight)  @model.proj
      return %1
    }
"""

ROUNDTRIP = [("verify", GOOD, NoOptions())]


def test_a_valid_module_is_left_as_it_is():
    assert PASSES["verify"].run(parse_module(ir(GOOD)), NoOptions()) == 0
    assert run("verify", GOOD, NoOptions()) == ir(GOOD)


def _verify(text: str) -> str:
    with pytest.raises(VerifyError) as e:
        PASSES["verify"].run(parse_module(ir(text)), NoOptions())
    return str(e.value)


@pytest.mark.parametrize("old, new, message", [
    pytest.param("%1: f32[T,4] = linear", "%1: f32[T,8] = linear",
                 "output types f32[T,8] != inferred f32[T,4] in forward: %1: f32[T,8] = linear(%0, "
                 "weight=$w.weight) @model.proj", id="wrong-output-type"),
    pytest.param("$w.weight: f32[4,8]", "$w.weight: f32[4,6]",
                 "linear: input f32[T,8] vs weight f32[4,6] in forward: %1: f32[T,4] = linear(%0, "
                 "weight=$w.weight) @model.proj", id="operand-mismatch"),
    pytest.param(" {eps=1e-06}", "",
                 "rms_norm: missing attrs ['eps'] in forward: %0: f32[T,8] = rms_norm(%x, "
                 "weight=$norm.weight) @model.norm", id="missing-attr"),
    pytest.param("weight=$w.weight", "weight=$v.weight",
                 "unknown param $v.weight in forward: %1: f32[T,4] = linear(%0, weight=$v.weight) @model.proj",
                 id="unknown-param"),
    pytest.param("= rms_norm(%x, weight=$norm.weight) {eps=1e-06}", "= swizzle(%x)",
                 "unknown op 'swizzle' in forward: %0: f32[T,8] = swizzle(%x) @model.norm", id="unknown-op"),
])
def test_errors_name_the_node_and_its_layer(old, new, message):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    assert _verify(text) == message


def test_a_param_no_node_reads_is_an_error():
    text = GOOD.replace("module\n", "module\n    param $unused.weight: f32[8] <- unused.weight\n", 1)
    assert _verify(text) == "param $unused.weight is bound to the checkpoint but used by no node"


def test_ssa_is_already_enforced_by_the_parser():
    with pytest.raises(IRParseError, match="IR line 7: %0 defined twice"):
        parse_module(ir(GOOD.replace("%1: f32[T,4] = linear(%0", "%0: f32[T,4] = linear(%0")))


def test_returning_an_undefined_value_is_an_error():
    """What the parser cannot see: a node list edited by a pass (here: the producer removed)."""
    module = parse_module(ir(GOOD))
    module.functions["forward"].nodes.pop()
    with pytest.raises(VerifyError) as e:
        PASSES["verify"].run(module, NoOptions())
    assert str(e.value) == "forward returns %1, which is never defined"

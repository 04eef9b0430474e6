"""Structural checks of a module: SSA, operand types, params, outputs.

Every check failure names the function, the node's line and its HF module path, since the
person reading it knows the model, not our value numbers.
"""
from __future__ import annotations

from ..errors import NanoForgeError
from .graph import Module, Node
from .ops import OpTypeError, infer_types
from .printer import format_node


class VerifyError(NanoForgeError):
    pass


def _where(fn_name: str, node: Node) -> str:
    return f"{fn_name}: {format_node(node)}"


def verify_module(module: Module) -> None:
    """Raise VerifyError on the first broken invariant."""
    for fn in module.functions.values():
        defined = {id(v) for v in fn.inputs}
        names = {v.name for v in fn.inputs}
        for node in fn.nodes:
            where = _where(fn.name, node)
            for v in node.inputs:
                if id(v) not in defined:
                    raise VerifyError(f"%{v.name} used before it is defined in {where}")
            missing = [p for p in node.params.values() if p not in module.params]
            if missing:
                raise VerifyError(f"unknown param ${missing[0]} in {where}")
            ptypes = {slot: module.params[p].type for slot, p in node.params.items()}
            try:
                expect = infer_types(node.op, [v.type for v in node.inputs], ptypes, node.attrs)
            except (OpTypeError, KeyError, TypeError) as e:
                raise VerifyError(f"{e} in {where}") from None
            got = [v.type for v in node.outputs]
            if got != expect:
                raise VerifyError(f"output types {', '.join(map(str, got))} != inferred "
                                  f"{', '.join(map(str, expect))} in {where}")
            for v in node.outputs:
                if v.name in names:
                    raise VerifyError(f"%{v.name} defined twice in {where}")
                names.add(v.name)
                defined.add(id(v))
        for v in fn.outputs:
            if id(v) not in defined:
                raise VerifyError(f"{fn.name} returns %{v.name}, which is never defined")
    used = {p for _, n in module.nodes() for p in n.params.values()}
    unused = [p for p in module.params if p not in used]
    if unused:
        raise VerifyError(f"param ${unused[0]} is bound to the checkpoint but used by no node")

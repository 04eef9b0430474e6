"""fuse_elementwise: fold elementwise neighbours into the fused layer ops kernels provide.

  add -> rms_norm                 => add_rms_norm   (returns the norm and the residual sum)
  silu -> mul                     => silu_mul
  rms_norm(q), rms_norm(k) -> rope => qk_norm_rope

A fused node keeps the names of the values it replaces, so dumps diff cleanly and the numeric
check can compare every surviving value with its twin before the pass.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Function, Module, Node
from .manager import Pass


def _replace(fn: Function, fused: Node, at: Node, remove: list[Node], prod: dict[int, Node]) -> None:
    fn.nodes[fn.nodes.index(at)] = fused
    for n in remove:
        fn.nodes.remove(n)
    prod.update({id(v): fused for v in fused.outputs})


def _fuse_add_norm(fn: Function) -> int:
    count, prod = 0, fn.producers()
    for norm in [n for n in fn.nodes if n.op == "rms_norm" and "group" not in n.attrs]:
        add = prod.get(id(norm.inputs[0]))
        if add is None or add.op != "add":
            continue
        fused = Node("add_rms_norm", list(add.inputs), dict(norm.params), dict(norm.attrs),
                     [norm.out, add.out], norm.source)
        _replace(fn, fused, add, [norm], prod)
        count += 1
    return count


def _fuse_silu_mul(fn: Function) -> int:
    count, prod, users = 0, fn.producers(), fn.users()
    for mul in [n for n in fn.nodes if n.op == "mul"]:
        for gate_side, other in ((0, 1), (1, 0)):
            silu = prod.get(id(mul.inputs[gate_side]))
            if silu is not None and silu.op == "silu" and len(users[id(silu.out)]) == 1 and not fn.returns(silu.out):
                fused = Node("silu_mul", [silu.inputs[0], mul.inputs[other]], {}, {}, [mul.out], mul.source)
                _replace(fn, fused, mul, [silu], prod)
                count += 1
                break
    return count


def _fuse_qk_norm_rope(fn: Function) -> int:
    count, prod, users = 0, fn.producers(), fn.users()
    for rope in [n for n in fn.nodes if n.op == "rope"]:
        norms = [prod.get(id(v)) for v in rope.inputs[:2]]
        if not all(n is not None and n.op == "rms_norm" and n.attrs.get("group") == rope.attrs[dim]
                   and len(users[id(n.out)]) == 1 and not fn.returns(n.out)
                   for n, dim in zip(norms, ("q_head_dim", "k_head_dim"))):
            continue  # qk_norm_rope normalises whole heads, of values nothing else reads
        qn, kn = norms
        if qn.attrs["eps"] != kn.attrs["eps"]:
            continue
        fused = Node("qk_norm_rope", [qn.inputs[0], kn.inputs[0], rope.inputs[2]],
                     {"q_norm": qn.params["weight"], "k_norm": kn.params["weight"]},
                     {"eps": qn.attrs["eps"], **rope.attrs}, list(rope.outputs), rope.source)
        _replace(fn, fused, rope, [qn, kn], prod)
        count += 1
    return count


@dataclass(frozen=True)
class Options:
    add_rms_norm: bool = True
    silu_mul: bool = True
    qk_norm_rope: bool = True


def fuse_elementwise(module: Module, opts: Options) -> int:
    count = 0
    for fn in module.functions.values():
        if opts.add_rms_norm:
            count += _fuse_add_norm(fn)
        if opts.silu_mul:
            count += _fuse_silu_mul(fn)
        if opts.qk_norm_rope:
            count += _fuse_qk_norm_rope(fn)
    return count


PASS = Pass("fuse_elementwise", fuse_elementwise, "add+rms_norm, silu*mul, qk_norm+rope", Options)

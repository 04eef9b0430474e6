"""shard_tp: tensor parallelism over `tp` ranks (the Megatron layout), after which the module is the
per-rank module (every type and attr local, the same on all ranks; `Param.shard` says which slice
of each checkpoint tensor a rank reads, see parallel/shard_spec.py).

  column-parallel  linears feeding attention heads or a SwiGLU (q/k/v, q_b, gate/up; fused cat
                   params per key): "d0:n@tp", outputs hold this rank's heads / channels
  row-parallel     the linear after attention or SwiGLU (o_proj, down_proj): "d1:tp@tp", a partial sum
  attention        local heads; kv heads fewer than tp are replicated in groups (kv_heads becomes 1);
                   MLA splits q_b / kv_b by heads and keeps q_a, kv_a and the latent KV replicated
  moe              experts split along their intermediate dim, router replicated: a partial sum
  embedding        vocab-parallel rows (other ids give zeros): a partial sum
  lm_head          vocab-parallel rows, then all_gather of the logits
Partial sums flow through adds of partial sums (routed + shared experts) and get one all_reduce
right where something needs the whole value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NanoForgeError
from ..facts import ParallelLayout, layout_of, write
from ..ir.graph import Function, Module, Node, TensorType, Value
from ..ir.ops import infer_types
from ..parallel.shard_spec import format_spec
from .manager import Pass

HEAD_LOCAL = {"rope", "qk_norm_rope", "silu", "mul", "silu_mul", "split", "rms_norm"}
Pieces = list[tuple[int, int]]  # (global width, parts) per piece of a head-split value's last dim


def _fail(tp: int, what: str, node: Node) -> None:
    raise NanoForgeError(f"--tp {tp} does not divide {what} of {node.source or node.op}")


def _demands(fn: Function, tp: int) -> tuple[dict[int, Pieces], set[Node]]:
    """Which values must be head-split (and in how many parts), walking back from attention
    inputs and from the inputs of row-parallel linears; and which linears are row-parallel."""
    demand: dict[int, Pieces] = {}
    prod, rows = fn.producers(), set()

    def want(v: Value, pieces: Pieces, node: Node) -> None:
        if demand.setdefault(id(v), pieces) != pieces:
            raise NanoForgeError(f"shard_tp: %{v.name} is split two ways @{node.source}")

    def width(v: Value) -> int:
        return int(v.type.shape[-1])

    for node in fn.nodes:
        if node.op == "attention":
            a = node.attrs
            if a["heads"] % tp:
                _fail(tp, f"the {a['heads']} attention heads", node)
            want(node.inputs[0], [(width(node.inputs[0]), tp)], node)
            if a["kind"] == "gqa":
                kv = a["kv_heads"]
                if kv % tp and (kv > tp or tp % kv):
                    _fail(tp, f"the {kv} kv heads (nor is it a multiple of them)", node)
                for v in node.inputs[1:]:
                    want(v, [(width(v), min(kv, tp))], node)
        elif node.op == "linear" and (p := prod.get(id(node.inputs[0]))) is not None \
                and p.op in ("attention", "silu_mul", "mul", "silu"):
            rows.add(node)
            if width(node.inputs[0]) % tp:
                _fail(tp, f"the intermediate size {width(node.inputs[0])}", node)
            if p.op != "attention":
                want(node.inputs[0], [(width(node.inputs[0]), tp)], node)
    for node in reversed(fn.nodes):
        d = [demand.get(id(v)) for v in node.outputs]
        if not any(d) or node.op in ("linear", "attention"):
            continue
        if node.op in ("rope", "qk_norm_rope"):
            for v, pieces in zip(node.inputs[:2], d):
                if pieces:
                    want(v, pieces, node)
        elif node.op == "split" and all(d):
            want(node.inputs[0], [pc for pieces in d for pc in pieces], node)
        elif node.op in HEAD_LOCAL - {"split"} and (node.op != "rms_norm" or "group" in node.attrs):
            for v in node.inputs:
                want(v, d[0], node)
        else:
            raise NanoForgeError(f"shard_tp: cannot split the heads of {node.op} @{node.source}")
    return demand, rows


def _shard_function(module: Module, fn: Function, tp: int, specs: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    demand, rows = _demands(fn, tp)

    def spec(pname: str, dim: int, counts: list[int], node: Node, pieces: Pieces | None = None) -> None:
        s, p = format_spec(dim, counts, "tp"), module.params[pname]
        shape = [int(d) for d in p.type.shape]
        if shape[dim] % counts[0] and not pieces:
            raise NanoForgeError(f"shard_tp: dim {dim} of ${pname} {p.type} does not split into {counts[0]}")
        shape[dim] = sum(w // n for w, n in pieces) if pieces else shape[dim] // counts[0]
        if specs.setdefault(pname, (s, tuple(shape))) != (s, tuple(shape)):
            raise NanoForgeError(f"shard_tp: ${pname} is split two ways ({specs[pname][0]}, {s}) @{node.source}")

    partial: set[int] = set()  # values that are this rank's share of a sum
    users = fn.users()
    gather: list[Node] = []
    for node in fn.nodes:
        split_in = [v for v in node.inputs if id(v) in demand]
        if node.op == "linear" and id(node.out) in demand:
            pieces, p = demand[id(node.out)], module.params[node.params["weight"]]
            if len(pieces) != len(p.keys) or any(w % n for w, n in pieces):
                raise NanoForgeError(f"shard_tp: cannot split ${p.name} into the pieces {pieces} @{node.source}")
            spec(p.name, 0, [n for _, n in pieces], node, pieces)
            if "bias" in node.params:
                spec(node.params["bias"], 0, [n for _, n in pieces], node, pieces)
        elif node in rows:
            if "bias" in node.params:
                raise NanoForgeError(f"shard_tp: row-parallel linear with a bias is not supported @{node.source}")
            spec(node.params["weight"], 1, [tp], node)
            partial.add(id(node.out))
        elif node.op == "moe":
            inter = int(module.params[node.params["w_gate"]].type.shape[1])
            if inter % tp:
                _fail(tp, f"the moe intermediate size {inter}", node)
            for slot, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):
                spec(node.params[slot], dim, [tp], node)
            partial.add(id(node.out))
        elif node.op in ("embed", "lm_head"):
            vocab = int(module.params[node.params["weight"]].type.shape[0])
            if vocab % tp:
                _fail(tp, f"the vocab size {vocab}", node)
            spec(node.params["weight"], 0, [tp], node)
            if node.op == "embed":
                node.attrs["vocab_parallel"] = "tp"
                partial.add(id(node.out))
            else:
                gather.append(node)
        elif node.op == "add" and all(id(v) in partial and len(users[id(v)]) == 1 and not fn.returns(v)
                                      for v in node.inputs):
            partial.add(id(node.out))  # routed + shared experts: one all_reduce of the sum
        elif node.op == "attention":
            q, k = (demand[id(v)][0][1] for v in node.inputs[:2]) if node.attrs["kind"] == "gqa" else (tp, 1)
            node.attrs["heads"] //= q
            if node.attrs["kind"] == "gqa":
                node.attrs["kv_heads"] //= k
            else:
                spec(node.params["kv_b_proj"], 0, [tp], node)
        elif split_in and node.op in ("rope", "qk_norm_rope"):  # heads of q, kv heads of k: local
            for attr, v in [(a, v) for a, v in zip(("heads", "kv_heads"), node.inputs) if id(v) in demand]:
                node.attrs[attr] //= demand[id(v)][0][1]
        elif split_in and node.op == "split":
            node.attrs["sizes"] = [w // n for w, n in demand[id(node.inputs[0])]]
        if split_in and not (node in rows or node.op == "attention" or any(id(o) in demand for o in node.outputs)):
            raise NanoForgeError(f"shard_tp: {node.op} reads a head-split value @{node.source}")
    folded = {id(v) for n in fn.nodes if n.op == "add" and id(n.out) in partial for v in n.inputs}
    _insert_after(fn, partial - folded, "all_reduce", {"group": "tp"})
    _insert_after(fn, {id(n.out) for n in gather}, "all_gather", {"group": "tp", "dim": -1, "size": tp})
    return len(partial - folded) + len(gather)


def _insert_after(fn: Function, ids: set[int], op: str, attrs: dict[str, Any]) -> None:
    """Each value in `ids` becomes the output of a new collective right after its producer, which
    now writes a fresh value: every reader keeps the name it had."""
    for node in list(fn.nodes):
        for i, v in enumerate(node.outputs):
            if id(v) in ids:
                raw = node.outputs[i] = Value(fn.next_value_name(), v.type)
                fn.nodes.insert(fn.nodes.index(node) + 1, Node(op, [raw], {}, dict(attrs), [v], node.source))


@dataclass(frozen=True)
class Options:
    tp: int = 1  # tensor-parallel ranks (--tp)


def shard_tp(module: Module, opts: Options) -> int:
    tp = opts.tp
    if not isinstance(tp, int) or tp < 1:
        raise NanoForgeError(f"--tp {tp!r}: expected a positive integer")
    if tp == 1:
        return 0
    if quantized := [p.name for p in module.params.values() if p.quant]:
        raise NanoForgeError(f"--tp {tp} with block-FP8 weights (${quantized[0]}, ...) is not built yet: use "
                             "--attention-dp/--ffn-ep, or one rank")
    if dsa := next((n for _, n in module.nodes() if n.op in ("indexer", "sparse_mla")), None):
        raise NanoForgeError(f"--tp {tp}: sparse attention (@{dsa.source}) is not split over ranks yet: use "
                             "--attention-dp/--ffn-ep, or one rank")
    if (layout := layout_of(module)).sharded:
        raise NanoForgeError(f"--tp {tp}: the module is already sharded ({layout.describe()})")
    specs: dict[str, tuple[str, tuple[int, ...]]] = {}
    changes = sum(_shard_function(module, fn, tp, specs) for fn in module.functions.values())
    for name, (s, shape) in specs.items():
        p = module.params[name]
        p.shard, p.type = s, TensorType(p.type.dtype, shape)
    for fn in module.functions.values():  # every value takes its local type, inferred in order
        for node in fn.nodes:
            ptypes = {slot: module.params[n].type for slot, n in node.params.items()}
            for v, t in zip(node.outputs, infer_types(node.op, [v.type for v in node.inputs], ptypes, node.attrs)):
                v.type = t
    write(module, ParallelLayout(tp=tp))
    return changes + len(specs)


PASS = Pass("shard_tp", shard_tp, "tensor parallelism: column/row-parallel linears, local heads, "
            "vocab-parallel embedding and lm_head, all_reduce / all_gather", Options)

"""fuse_projections: linears that read the same input become one linear over a concatenated
weight, followed by a split.

  q_proj(x), k_proj(x), v_proj(x)   => split(qkv_proj(x))      (one GEMM instead of three)
  gate_proj(x), up_proj(x)          => split(gate_up_proj(x))

At batch 1 a decode step is a chain of GEMVs; one wide GEMV streams the same bytes with one
launch instead of several narrow ones. The fused param has layout "cat" over the original
checkpoint keys, so weights still load straight from the checkpoint; the split outputs keep the
names of the values they replace, so the numeric check compares them. Column-parallel weights of a
sharded module fuse too: the fused param keeps a shard count per key (q heads split, kv replicated).
"""
from __future__ import annotations

from ..ir.graph import Function, Module, Node, Param, TensorType, Value
from ..parallel.shard_spec import format_spec, parse_spec
from .manager import NoOptions, Pass


def _fusable(module: Module, node: Node) -> bool:
    if node.op != "linear" or "bias" in node.params:
        return False
    p = module.params[node.params["weight"]]
    column = p.shard is None or parse_spec(p.shard).dim == 0  # row-split weights keep their own GEMM
    return p.layout in ("single", "cat") and column and p.quant is None


def _fused_shard(weights: list[Param]) -> str | None:
    """Column-parallel weights fuse into one with a count per key: "d0:4@tp" + "d0:2@tp" -> "d0:4,2@tp"."""
    if weights[0].shard is None:
        return None
    specs = [parse_spec(w.shard) for w in weights]
    counts = [s.count(i) for s, w in zip(specs, weights) for i in range(len(w.keys))]
    return format_spec(0, counts[:1] if len(set(counts)) == 1 else counts, specs[0].group)


def _fused_name(names: list[str]) -> str:
    """...self_attn.{q,k,v}_proj.weight -> ...self_attn.q_k_v_proj.weight; mlp.{gate,up}_proj -> mlp.gate_up_proj."""
    stems = [n.removesuffix(".weight") for n in names]
    prefix = stems[0].rsplit(".", 1)[0] + "." if "." in stems[0] else ""
    if not all(s.startswith(prefix) for s in stems):
        prefix = ""
    tails = [s[len(prefix):] for s in stems]
    if all(t.endswith("_proj") for t in tails):
        return prefix + "_".join(t.removesuffix("_proj") for t in tails) + "_proj.weight"
    return prefix + "_and_".join(tails) + ".weight"


def _fuse_group(module: Module, fn: Function, group: list[Node]) -> list[str]:
    weights = [module.params[n.params["weight"]] for n in group]
    rows = [int(w.type.shape[0]) for w in weights]
    dtype = weights[0].type.dtype
    name = _fused_name([w.name for w in weights])
    module.params[name] = Param(name, TensorType(dtype, (sum(rows), weights[0].type.shape[1])),
                                [k for w in weights for k in w.keys], "cat", _fused_shard(weights))
    first = group[0]
    out_type = TensorType(first.out.type.dtype, (first.out.type.shape[0], sum(rows)))
    fused = Value(fn.next_value_name(), out_type)
    linear = Node("linear", list(first.inputs), {"weight": name}, dict(first.attrs), [fused],
                  first.source.rsplit(".", 1)[0] if "." in first.source else first.source)
    split = Node("split", [fused], {}, {"sizes": rows}, [n.out for n in group], linear.source)
    at = fn.nodes.index(first)
    fn.nodes[at:at + 1] = [linear, split]
    for n in group[1:]:
        fn.nodes.remove(n)
    return [w.name for w in weights]


def fuse_projections(module: Module, opts: NoOptions) -> int:
    count, replaced = 0, set()
    for fn in module.functions.values():
        groups: dict[tuple[int, str], list[Node]] = {}
        for node in fn.nodes:
            if _fusable(module, node):
                w = module.params[node.params["weight"]]
                group = w.shard and parse_spec(w.shard).group
                groups.setdefault((id(node.inputs[0]), w.type.dtype, group), []).append(node)
        for group in groups.values():
            if len(group) > 1:
                replaced.update(_fuse_group(module, fn, group))
                count += 1
    used = {p for _, n in module.nodes() for p in n.params.values()}
    for name in replaced - used:
        del module.params[name]
    return count


PASS = Pass("fuse_projections", fuse_projections, "linears on one input -> one linear over a cat weight + split")

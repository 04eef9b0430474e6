"""shard_ep: wide expert parallelism, attention data-parallel x FFN expert-parallel over the same N
ranks (the NanoDeploy layout). Attention, dense MLPs, shared experts, embedding and LM head stay
replicated and run on each rank's own requests, so the KV cache of a rank holds only its requests;
every moe node becomes moe_dispatch -> grouped_experts -> moe_combine and each rank keeps
num_experts / N experts (their params sharded "d0:N@ep": a rank reads only its experts' tensors).
After the pass the module is the per-rank module, one graph for every rank: which experts a rank
owns comes from its position in the EP group at run time, not from the graph."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import NanoForgeError
from ..facts import ParallelLayout, layout_of, write
from ..ir.graph import Function, Module, Node, TensorType, Value
from ..ir.ops import EXPERT_SLOTS as OP_EXPERT_SLOTS, SCALE_SLOTS
from .manager import Pass

EXPERT_SLOTS = OP_EXPERT_SLOTS + SCALE_SLOTS  # an fp8 expert's block scales split with it


def _check(module: Module, dp: int, ep: int, moes: list[tuple[Function, Node]]) -> None:
    if dp != ep:
        raise NanoForgeError(f"--attention-dp {dp} and --ffn-ep {ep} must be equal: attention data parallelism "
                             "and expert parallelism run on the same ranks")
    if layout_of(module).tp > 1:
        raise NanoForgeError("--tp cannot be combined with --attention-dp/--ffn-ep (yet)")
    if not moes:
        raise NanoForgeError(f"--ffn-ep {ep}: the model has no MoE layers to spread over ranks")
    for _, node in moes:
        if node.attrs["num_experts"] % ep:
            raise NanoForgeError(f"--ffn-ep {ep} does not divide the {node.attrs['num_experts']} experts of "
                                 f"{node.source or 'a moe layer'}")


def _rewrite(fn: Function, node: Node, ep: int) -> list[Node]:
    x, h = node.inputs[0], node.out.type.shape[-1]
    k = node.attrs["top_k"]
    names = iter(range(int(fn.next_value_name()), 1 << 30))
    new = lambda dtype, shape: Value(str(next(names)), TensorType(dtype, shape))  # noqa: E731
    xg, wg, ids, plan = new(x.type.dtype, ("Tg", h)), new("f32", ("Tg", k)), new("i64", ("Tg", k)), new("i64", ("P",))
    yg = new(x.type.dtype, ("Tg", h))
    routing = {"router": node.params["router"], **({"score_bias": node.params["score_bias"]}
                                                   if "score_bias" in node.params else {})}
    experts = {s: node.params[s] for s in EXPERT_SLOTS if s in node.params}
    fp8 = {k: node.attrs[k] for k in ("fp8_block", "act_quant") if k in node.attrs}
    return [Node("moe_dispatch", [x], routing, {**node.attrs, "group": "ep"}, [xg, wg, ids, plan], node.source),
            Node("grouped_experts", [xg, wg, ids], experts,
                 {"num_experts": node.attrs["num_experts"], "group": "ep", **fp8}, [yg], node.source),
            Node("moe_combine", [yg, plan], {}, {"group": "ep"}, [node.out], node.source)]


@dataclass(frozen=True)
class Options:
    attention_dp: int = 1  # --attention-dp
    ffn_ep: int = 1  # --ffn-ep


def run(module: Module, opts: Options) -> int:
    dp, ep = opts.attention_dp, opts.ffn_ep
    if dp < 1 or ep < 1:
        raise NanoForgeError(f"--attention-dp and --ffn-ep must be >= 1; got {dp} and {ep}")
    if dp == ep == 1:
        return 0
    moes = [(fn, n) for fn, n in module.nodes() if n.op == "moe"]
    _check(module, dp, ep, moes)
    sharded: set[str] = set()
    for fn, node in moes:
        i = fn.nodes.index(node)
        fn.nodes[i:i + 1] = _rewrite(fn, node, ep)
        for slot in [s for s in EXPERT_SLOTS if s in node.params]:
            p = module.params[node.params[slot]]
            if p.name not in sharded:
                sharded.add(p.name)
                shape = tuple(p.type.shape)
                p.type = TensorType(p.type.dtype, (int(shape[0]) // ep, *shape[1:]))
                p.shard = f"d0:{ep}@ep"
    write(module, ParallelLayout(tp=layout_of(module).tp, attention_dp=dp, ffn_ep=ep))
    return len(moes)


PASS = Pass("shard_ep", run, __doc__.split("\n")[0], Options)

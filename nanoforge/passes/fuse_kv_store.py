"""fuse_kv_store: write a GQA layer's new K and V to the paged pool from the rope kernel.

  rope | qk_norm_rope (q, k) -> attention (q, k, v)   =>   qk_rope_store (q, k, v) -> attention(kv_stored)

Attention stores this step's K/V before it reads the pool: one more launch a layer (store_kv), whose
work is a few KB a token. The rope kernel already holds each new key in registers, so it can write
it (and copy v's row beside it) to the pool slot the attention would. Runs after select_kernels,
only where both nodes run on a provider whose kernels do this in one launch (`FUSING`) and the pool
holds the model's dtype (FP8 KV quantizes in attention's store). The rewritten node keeps the rope
node's outputs, so the value k is unchanged for any check that compares it.

Off by default (ENABLED): one H100 pair of the reference workload showed no gain (0.98x; decode steps
at 129-256 rows unchanged, one-row steps 1.19 -> 1.15 ms; bench/results/gpu-logs/h100-20261207-g/).
`bench/knob_ab.py fuse_kv_store --decode-step qwen3-8b` is the next timing: its batch-1 decode step,
where one launch less a layer is ~1%.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.graph import Function, Module, Node
from .manager import Pass

ENABLED = False  # the default of Options.enabled (read when the options are made)
FUSING = ("triton",)  # providers whose qk_rope_store is one launch (torch_ref's is the reference: nothing saved)


def _fusable(fn: Function, attn: Node, rope: Node | None, users: dict, order: dict) -> bool:
    a = attn.attrs
    if rope is None or rope.op not in ("rope", "qk_norm_rope") or attn.provider not in FUSING:
        return False
    if a.get("kind") != "gqa" or a.get("kv_dtype") or a.get("kv_stored") or rope.provider != attn.provider:
        return False
    k, v = attn.inputs[1], attn.inputs[2]
    if rope.outputs[1] is not k or len(users[id(k)]) != 1 or fn.returns(k):
        return False  # the pool gets the roped k that only this attention reads
    if rope.attrs["k_head_dim"] != a["head_dim"] or v.type.shape != k.type.shape:
        return False  # v's rows are copied as whole heads of k's width
    made_at = order.get(id(v))  # v must exist where the rope node runs (a function input always does)
    return made_at is None or made_at < order[id(rope.outputs[0])]


def fuse_kv_store(module: Module, opts: "Options") -> int:
    if not opts.enabled:
        return 0
    count = 0
    for fn in module.functions.values():
        prod, users = fn.producers(), fn.users()
        order = {id(v): i for i, n in enumerate(fn.nodes) for v in n.outputs}
        for attn in [n for n in fn.nodes if n.op == "attention"]:
            rope = prod.get(id(attn.inputs[1]))
            if not _fusable(fn, attn, rope, users, order):
                continue
            fused = Node("qk_rope_store", [*rope.inputs[:2], attn.inputs[2], rope.inputs[2]], dict(rope.params),
                         {**rope.attrs, "layer": attn.attrs["layer"]}, list(rope.outputs), rope.source)
            fused.provider = rope.provider
            fn.nodes[fn.nodes.index(rope)] = fused
            attn.attrs["kv_stored"] = True
            count += 1
    return count


@dataclass(frozen=True)
class Options:
    enabled: bool = field(default_factory=lambda: ENABLED)


PASS = Pass("fuse_kv_store", fuse_kv_store, "rope/qk_norm_rope + attention's K/V store => qk_rope_store", Options)

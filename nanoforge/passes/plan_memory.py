"""plan_memory: derive the KV contract (what the paged pool holds per token and layer) and the
memory the plan needs: weights, KV bytes per token, and peak activation bytes per token from
value liveness. The runtime sizes its pool from these numbers; it never inspects the model."""
from __future__ import annotations

from typing import Any

from ..ir.graph import DTYPE_BYTES, Function, Module
from .manager import Pass


def kv_contract(module: Module, block_size: int, kv_dtype: str | None = None) -> dict[str, Any]:
    """Per attention layer, the shape of one token's entry in each pool tensor."""
    layers = []
    dtype = kv_dtype or module.meta.get("dtype", "bf16")
    for _, n in module.nodes():
        if n.op != "attention":
            continue
        a = n.attrs
        if a["kind"] == "gqa":
            shapes = [[a["kv_heads"], a["head_dim"]], [a["kv_heads"], a["head_dim"]]]
        else:
            shapes = [[a["kv_lora_rank"] + a["qk_rope_head_dim"]]]
        layers.append({"layer": a["layer"], "kind": a["kind"], "shapes": shapes, "source": n.source})
    layers.sort(key=lambda layer: layer["layer"])
    return {"block_size": block_size, "dtype": dtype, "layers": layers}


def kv_contract_mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Why KV blocks written under contract `a` cannot be read under `b` (empty: they can), one
    line per difference, first differing layer only: what PD migration checks before it connects."""
    out = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in ("block_size", "dtype") if a.get(k) != b.get(k)]
    la, lb = a.get("layers", []), b.get("layers", [])
    if len(la) != len(lb):
        out.append(f"attention layers: {len(la)} vs {len(lb)}")
    for x, y in zip(la, lb):
        if (x["kind"], x["shapes"]) != (y["kind"], y["shapes"]):
            out.append(f"layer {x['layer']}: {x['kind']} {x['shapes']} vs {y['kind']} {y['shapes']}")
            break
    return out


def kv_bytes_per_token(contract: dict[str, Any]) -> int:
    per = DTYPE_BYTES[contract["dtype"]]
    total = 0
    for layer in contract["layers"]:
        for shape in layer["shapes"]:
            n = per
            for d in shape:
                n *= d
            total += n
    return total


def peak_activation_bytes(fn: Function) -> int:
    """Peak bytes per token of values alive at once (a value dies after its last use)."""
    last_use = {}
    for i, node in enumerate(fn.nodes):
        for v in node.inputs:
            last_use[id(v)] = i
    live, peak = {}, 0
    for i, node in enumerate(fn.nodes):
        for v in node.outputs:
            if v.type.shape and v.type.shape[0] == "T":
                live[id(v)] = v.type.numel_per_token() * DTYPE_BYTES[v.type.dtype]
        peak = max(peak, sum(live.values()))
        for v in node.inputs:
            if last_use.get(id(v)) == i:
                live.pop(id(v), None)
    return peak


def plan_memory(module: Module, opts: dict[str, Any]) -> int:
    contract = kv_contract(module, opts["block_size"])
    module.meta["kv_contract"] = contract
    module.meta["memory"] = {
        "param_bytes": module.param_bytes(),
        "kv_bytes_per_token": kv_bytes_per_token(contract),
        "activation_bytes_per_token": max(peak_activation_bytes(f) for f in module.functions.values()),
        "max_num_batched_tokens": opts["max_num_batched_tokens"],
    }
    return len(contract["layers"])


PASS = Pass("plan_memory", plan_memory, "KV contract, weight / KV / activation bytes",
            {"block_size": 16, "max_num_batched_tokens": 2048})

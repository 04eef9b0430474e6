"""plan_memory: derive the KV contract (kv_contract.py: what the paged pool holds per token and
layer) and the memory the plan needs: weights, KV bytes per token, and peak activation bytes per
token from value liveness. The runtime sizes its pool from these facts; it never inspects the model."""
from __future__ import annotations

from dataclasses import dataclass

from .. import defaults
from ..codegen.providers import BY_NAME
from ..errors import NanoForgeError
from ..facts import MemoryPlan, ModelInfo, require, write
from ..ir.graph import DTYPE_BYTES, Function, Module
from ..ir.ops import FP8
from ..kv_contract import KVContract, KVLayer, SequenceState
from .manager import Pass
from .quantize_kv import index_kv_dtype_of_module, kv_dtype_of_module


def kv_contract(module: Module, block_size: int, kv_dtype: str | None = None,
                index_dtype: str | None = None) -> KVContract:
    """Per attention layer, the shape of one token's entry in each pool tensor, in `kv_dtype`, else
    the dtype quantize_kv gave the attention nodes, else the model's. FP8 values get an f32 scale per
    token and KV head (GQA: K and V each) or per token (MLA's one entry) beside them. A DSA layer
    (sparse_mla) holds MLA's entry and its indexer's key per token; the key in `index_dtype`, else the
    dtype quantize_kv gave the indexer nodes (--index-kv-dtype), else the entry's; each FP8 one scaled."""
    dtype = kv_dtype or kv_dtype_of_module(module) or require(module, ModelInfo).dtype
    index = index_dtype or index_kv_dtype_of_module(module) or dtype
    scaled = dtype == FP8
    layers = []
    index_dims = {n.attrs["layer"]: n.attrs["head_dim"] for _, n in module.nodes() if n.op == "indexer"}
    for _, n in module.nodes():
        if n.op == "sparse_mla":  # DSA: MLA's entry, plus the indexer's keys where the layer has an indexer
            d, a = index_dims.get(n.attrs["layer"]), n.attrs
            shapes = ((a["kv_lora_rank"] + a["qk_rope_head_dim"],),) + (((d,),) if d else ())
            dtypes = (dtype, index)[:len(shapes)]
            layers.append(KVLayer(a["layer"], "dsa" if d else "mla", shapes, n.source,
                                  ((1,),) * dtypes.count(FP8), dtypes if len(set(dtypes)) > 1 else ()))
        if n.op != "attention":
            continue
        a = n.attrs
        if a["kind"] == "gqa":
            shapes = ((a["kv_heads"], a["head_dim"]), (a["kv_heads"], a["head_dim"]))
            scales = ((a["kv_heads"],), (a["kv_heads"],))
        else:
            shapes = ((a["kv_lora_rank"] + a["qk_rope_head_dim"],),)
            scales = ((1,),)
        layers.append(KVLayer(a["layer"], a["kind"], shapes, n.source, scales if scaled else ()))
    layers.sort(key=lambda layer: layer.layer)
    scaled = scaled or any(layer.scale_shapes for layer in layers)
    return KVContract(block_size, dtype, tuple(layers), "f32" if scaled else None, sequence_state(module))


def sequence_state(module: Module) -> tuple[SequenceState, ...]:
    """Per Gated DeltaNet layer, the state one sequence keeps: its conv window (the last conv_kernel - 1
    inputs of [q|k|v]) and its delta-rule matrix per value head; f32, as the kernels update them."""
    state = {}
    for _, n in module.nodes():
        if n.op == "gdn":
            a = n.attrs
            conv = 2 * a["k_heads"] * a["k_head_dim"] + a["v_heads"] * a["v_head_dim"]
            shapes = ((conv, a["conv_kernel"] - 1), (a["v_heads"], a["k_head_dim"], a["v_head_dim"]))
            state[a["layer"]] = SequenceState(a["layer"], "gdn", shapes, "f32", n.source)
    return tuple(state[i] for i in sorted(state))


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


@dataclass(frozen=True)
class Options:
    block_size: int | None = None  # tokens per KV block; None = what the chosen kernels take, else 16
    max_num_batched_tokens: int = defaults.MAX_NUM_BATCHED_TOKENS  # the largest step, for the activation peak


def block_size_for(module: Module, asked: int | None) -> int:
    """`asked`, else the one block size every node's provider takes (FlashMLA's dense decode reads
    64-token pages), else defaults.BLOCK_SIZE. select_kernels already passed over providers that
    cannot take an explicit size."""
    if asked is not None:
        if asked < 1:
            raise NanoForgeError(f"--block-size {asked}: must be at least 1")
        return asked
    allowed: set[int] | None = None
    for _, n in module.nodes():
        sizes = (BY_NAME[n.provider].block_sizes or {}).get(n.op) if n.provider in BY_NAME else None
        if sizes:
            allowed = set(sizes) if allowed is None else allowed & set(sizes)
    if allowed is None:
        return defaults.BLOCK_SIZE
    if not allowed:
        raise NanoForgeError("the plan's kernels need different KV block sizes; force one provider per op")
    return min(allowed)


def plan_memory(module: Module, opts: Options) -> int:
    contract = kv_contract(module, block_size_for(module, opts.block_size))
    write(module, contract)
    write(module, MemoryPlan(module.param_bytes(), contract.bytes_per_token(),
                             max(peak_activation_bytes(f) for f in module.functions.values()),
                             opts.max_num_batched_tokens))
    return len(contract.layers) + len(contract.state)


PASS = Pass("plan_memory", plan_memory, "KV contract, weight / KV / activation bytes", Options)

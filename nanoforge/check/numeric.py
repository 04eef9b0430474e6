"""--verify-each-pass: run the function before and after a pass on tiny random inputs through
the reference kernels and compare every value that survives the pass (fusions keep the names
of what they replace). The first value that diverges is reported by its HF module path."""
from __future__ import annotations

import torch

from ..errors import NanoForgeError
from ..facts import layout_of
from ..ir.graph import Function, Module
from ..ir.printer import format_node
from ..kernels import fp8
from ..models.weights import quant_of
from ..passes.quantize_kv import index_kv_dtype_of_module, kv_dtype_of_module
from .recorded import random_params, run_recorded
from .simulate import key_tensors, run_ranks

RTOL = 1e-4


def quantize_like(params: dict[str, torch.Tensor], before: Module, after: Module) -> dict[str, torch.Tensor]:
    """Weights a pass turned into block FP8 (quantize_weights), quantized as the loader would, with
    their scales; `params` (the before side) gets their dequantized values, so both graphs compute
    with the same numbers and the check sees only what the pass did besides rounding."""
    out = {}
    for name, p in after.params.items():
        if p.type.dtype == "fp8_e4m3" and name in params and before.params[name].type.dtype != "fp8_e4m3":
            block = quant_of(p)[1]
            out[name], out[f"{name}_scale_inv"] = fp8.quantize(params[name], block)
            params[name] = fp8.dequantize(out[name], out[f"{name}_scale_inv"], block, params[name].dtype)
    return out


def carry_params(params: dict[str, torch.Tensor], before: Module, after: Module) -> dict[str, torch.Tensor]:
    """The before-pass weights as the after-pass module names them: a param a pass created
    with layout "cat" is the concatenation of the single-key params that held its keys."""
    by_key = {p.keys[0]: params[n] for n, p in before.params.items() if p.layout == "single"}
    out = quantize_like(params, before, after)
    for name, p in after.params.items():
        if name in out:
            continue
        if name in params:
            out[name] = params[name]
        elif p.layout == "cat" and all(k in by_key for k in p.keys):
            out[name] = torch.cat([by_key[k] for k in p.keys])
        else:
            raise NanoForgeError(f"numeric check: param {name} of the rewritten graph has no counterpart before it")
    return out


def _divergence(pass_name: str, fn_name: str, node, v, err: float, where: str = "") -> NanoForgeError:
    return NanoForgeError(
        f"pass {pass_name} changed the numerics of {fn_name}: first divergence at {node.source or '?'} "
        f"(%{v.name} = {node.op}{where}, relative error {err:.2e} > {RTOL:.0e}): {format_node(node)}")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / (b.abs().max().item() + 1e-6) if a.shape == b.shape else float("inf")


def _with_reference(before: Module, after: Module, params: dict[str, torch.Tensor]):
    """(name, rewritten function, the original's recorded values) for every function both have. The
    original runs with the rewritten one's KV dtype (quantize_kv), so only the rewrite is compared."""
    kv, index = kv_dtype_of_module(after), index_kv_dtype_of_module(after)
    for fn_name, fn in after.functions.items():
        if fn_name in before.functions:
            yield fn_name, fn, run_recorded(before, fn_name, params, kv_dtype=kv, index_dtype=index)


LAYOUT_OPS = ("moe_dispatch", "grouped_experts")  # rows in the dispatching provider's order: compared after combine


def _values(fn: Function):
    return ((node, v) for node in fn.nodes if node.op not in LAYOUT_OPS for v in node.outputs)


def check_sharding_preserves(pass_name: str, before: Module, after: Module) -> None:
    """A sharding pass: run every rank of `after` as simulated ranks on slices of the same random
    weights and compare with `before`, value by value in order, so a divergence is reported at its
    HF module. A value of the unsharded shape is either whole on every rank or a partial sum (the
    ranks' pieces sum to it); values of other shapes are per-rank pieces, skipped. Then every rank's
    function outputs must match."""
    params = random_params(before)
    tensors = key_tensors(before, params)
    world = layout_of(after).world
    for fn_name, fn, ref in _with_reference(before, after, params):
        ranks = run_ranks(after, tensors, fn_name)
        for node, v in _values(fn):
            b, got = ref.get(v.name), [r[v.name] for r in ranks]
            if b is None or got[0].shape != b.shape:
                continue  # a value each rank holds its own piece of
            err = max(_rel_err(g, b) for g in got)  # whole on every rank (attention-DP ranks: their own)
            if not err <= RTOL and not _rel_err(torch.stack(got).sum(0), b) <= RTOL:  # nor a partial sum
                raise _divergence(pass_name, fn_name, node, v, err, f" on {world} simulated ranks")
        prod = fn.producers()
        for v, w in zip(fn.outputs, before.functions[fn_name].outputs):
            for rank, values in enumerate(ranks):
                if not (err := _rel_err(values[v.name], ref[w.name])) <= RTOL:
                    raise _divergence(pass_name, fn_name, prod[id(v)], v, err, f", output on rank {rank} of {world}")


def check_pass_preserves(pass_name: str, before: Module, after: Module) -> None:
    if layout_of(before) != layout_of(after):
        return check_sharding_preserves(pass_name, before, after)
    params = random_params(before)
    params_after = carry_params(params, before, after)
    for fn_name, fn, ref in _with_reference(before, after, params):
        got = run_recorded(after, fn_name, params_after)
        for node, v in _values(fn):
            if v.name not in ref:
                continue
            if not (err := _rel_err(got[v.name], ref[v.name])) <= RTOL:
                raise _divergence(pass_name, fn_name, node, v, err)


def after_pass(pass_name: str, before: Module, after: Module) -> str:
    """The pass manager's after_pass hook for --verify-each-pass (the compiler installs it)."""
    check_pass_preserves(pass_name, before, after)
    return "numerics ok"

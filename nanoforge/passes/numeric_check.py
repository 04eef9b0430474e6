"""--verify-each-pass: run the function before and after a pass on tiny random inputs through
the reference kernels and compare every value that survives the pass (fusions keep the names
of what they replace). The first value that diverges is reported by its HF module path."""
from __future__ import annotations

import torch

from ..codegen.kernels.context import TORCH_DTYPES, allocate_pool, make_context
from ..codegen.pysource import compile_function
from ..errors import NanoForgeError
from ..ir.graph import Function, Module
from ..ir.printer import format_node
from .plan_memory import kv_contract

SEQ_LENS = (5, 3)  # two prompts: enough for causal masks and per-sequence bookkeeping
RTOL = 1e-4


def random_params(module: Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Well-scaled random weights: 1-D params near 1 (norm gains), matrices ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.params.items():
        shape = tuple(int(d) for d in p.type.shape)
        t = torch.randn(shape, generator=g)
        t = 1 + 0.1 * t if len(shape) == 1 else t / shape[-1] ** 0.5
        out[name] = t.to(TORCH_DTYPES.get(p.type.dtype, torch.float32))
    return out


def run_recorded(module: Module, fn_name: str, params: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Value name -> tensor for every node output of one forward over a fresh 2-prompt batch."""
    fn: Function = module.functions[fn_name]
    contract = kv_contract(module, block_size=4, kv_dtype="f32")
    blocks_per_seq = [(n + 3) // 4 for n in SEQ_LENS]
    pool = allocate_pool(contract, sum(blocks_per_seq))
    seqs, first = [], 0
    for n, nb in zip(SEQ_LENS, blocks_per_seq):
        seqs.append((n, n, list(range(first, first + nb))))
        first += nb
    ctx = make_context(pool, 4, seqs)
    g = torch.Generator().manual_seed(seed)
    vocab = module.meta.get("vocab_size", 2)
    tokens = torch.randint(0, vocab, (sum(SEQ_LENS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in SEQ_LENS])
    rows = torch.tensor([sum(SEQ_LENS[: i + 1]) - 1 for i in range(len(SEQ_LENS))])
    values: dict[str, torch.Tensor] = {}

    def record(i: int, outs: tuple) -> None:
        for v, t in zip(fn.nodes[i].outputs, outs):
            values[v.name] = t.detach().float()

    run = compile_function(module, fn_name, record=True)
    with torch.no_grad():
        run(params, ctx, tokens, positions, rows, record)
    return values


def carry_params(params: dict[str, torch.Tensor], before: Module, after: Module) -> dict[str, torch.Tensor]:
    """The before-pass weights as the after-pass module names them: a param a pass created
    with layout "cat" is the concatenation of the single-key params that held its keys."""
    by_key = {p.keys[0]: params[n] for n, p in before.params.items() if p.layout == "single"}
    out = {}
    for name, p in after.params.items():
        if name in params:
            out[name] = params[name]
        elif p.layout == "cat" and all(k in by_key for k in p.keys):
            out[name] = torch.cat([by_key[k] for k in p.keys])
        else:
            raise NanoForgeError(f"numeric check: param {name} of the rewritten graph has no counterpart before it")
    return out


def check_pass_preserves(pass_name: str, before: Module, after: Module) -> None:
    params = random_params(before)
    params_after = carry_params(params, before, after)
    for fn_name, fn in after.functions.items():
        if fn_name not in before.functions:
            continue
        ref = run_recorded(before, fn_name, params)
        got = run_recorded(after, fn_name, params_after)
        for node in fn.nodes:
            for v in node.outputs:
                if v.name not in ref:
                    continue
                a, b = got[v.name], ref[v.name]
                err = (a - b).abs().max().item() / (b.abs().max().item() + 1e-6) if a.shape == b.shape else float("inf")
                if not err <= RTOL:
                    raise NanoForgeError(
                        f"pass {pass_name} changed the numerics of {fn_name}: first divergence at "
                        f"{node.source or '?'} (%{v.name} = {node.op}, relative error {err:.2e} > {RTOL:.0e}): "
                        f"{format_node(node)}")

"""One forward of a module's function over a fixed, tiny 2-prompt batch through the reference
kernels, recording every node's outputs by value name: what the per-pass numeric check compares
before and after a pass, and what each simulated rank returns."""
from __future__ import annotations

from typing import Any

import torch

from ..codegen.pysource import compile_function
from ..facts import ModelInfo, read
from ..ir.graph import Function, Module
from ..kernels.context import TORCH_DTYPES, allocate_pool, make_context
from ..passes.plan_memory import kv_contract
from ..passes.quantize_kv import kv_dtype_of_module

SEQ_LENS = (5, 3)  # two prompts: enough for causal masks and per-sequence bookkeeping


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


def run_recorded(module: Module, fn_name: str, params: dict[str, torch.Tensor], seed: int = 0,
                 comm: Any = None, kv_dtype: str | None = None,
                 index_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Value name -> tensor for every node output of one forward over a fresh 2-prompt batch
    (`comm`: this rank's collectives, when the module is one rank of a sharded plan). The KV pool
    is f32 unless `kv_dtype` or the module's attention (quantize_kv) asks for FP8; DSA indexer keys as
    `index_dtype` or the module's indexers ask, else as the pool."""
    fn: Function = module.functions[fn_name]
    contract = kv_contract(module, block_size=4, kv_dtype=kv_dtype or kv_dtype_of_module(module) or "f32",
                           index_dtype=index_dtype)
    blocks_per_seq = [(n + 3) // 4 for n in SEQ_LENS]
    pool = allocate_pool(contract, sum(blocks_per_seq))
    seqs, first = [], 0
    for n, nb in zip(SEQ_LENS, blocks_per_seq):
        seqs.append((n, n, list(range(first, first + nb))))
        first += nb
    ctx = make_context(pool, 4, seqs, comm=comm)
    g = torch.Generator().manual_seed(seed)
    info = read(module, ModelInfo)
    vocab = info.vocab_size if info else 2
    tokens = torch.randint(0, vocab, (sum(SEQ_LENS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in SEQ_LENS])
    rows = torch.tensor([sum(SEQ_LENS[: i + 1]) - 1 for i in range(len(SEQ_LENS))])
    values: dict[str, torch.Tensor] = {}

    def record(i: int, outs: tuple) -> None:
        for v, t in zip(fn.nodes[i].outputs, outs):
            values[v.name] = t.detach().float()

    args: tuple = (tokens, positions, rows)
    if [v.name for v in fn.inputs] == ["pixels", "grid"]:  # a vision tower (`encode`): two small images
        grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
        args = (torch.randn(int(grid.prod(-1).sum()), int(fn.inputs[0].type.shape[1]), generator=g), grid)
    run = compile_function(module, fn_name, record=True)
    with torch.no_grad():
        run(params, ctx, *args, record)
    return values

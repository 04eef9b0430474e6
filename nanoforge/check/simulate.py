"""Simulated ranks: every rank of a sharded module runs as a thread of this process, with its own
params (cut from whole tensors by the loader a real rank uses), its own KV pool (from its local
KV contract) and SimulatedComm collectives. The numeric check of sharding passes and the tests
compare what the ranks return with the unsharded module; any world size runs on one CPU."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from ..ir.graph import Module
from ..models.tensor_info import TensorInfo
from ..parallel.comm import SimulatedComm, SimulatedHub
from ..facts import layout_of
from ..parallel.shard_spec import cat_rows


ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class DictCheckpoint:
    """The checkpoint interface over tensors held in memory, {key: tensor}."""

    kind = "memory"

    def __init__(self, data: dict[str, torch.Tensor]):
        self.path, self.data = Path("<memory>"), data
        self.tensors = {k: TensorInfo(k, tuple(t.shape), ST_DTYPES.get(t.dtype, "F32"), "memory")
                        for k, t in data.items()}

    def read(self, keys: list[str], dtype: torch.dtype | None = None,
             progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        for k in keys:
            yield k, self.data[k]

    def read_slices(self, requests: list[tuple[str, tuple[slice, ...] | None]],
                    progress: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        for i, (k, sl) in enumerate(requests):
            yield i, self.data[k] if sl is None else self.data[k][sl]


def key_tensors(module: Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint an unsharded module's params would come from, key by key."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.params.items():
        t = params[name]
        if p.layout == "single":
            out[p.keys[0]] = t
        elif p.layout == "stack":
            out.update(zip(p.keys, t.unbind(0)))
        else:
            out.update(zip(p.keys, t.split(cat_rows(module, p))))
    return out


def run_ranks(module: Module, weights: dict[str, torch.Tensor] | Any, fn_name: str = "forward",
              seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Every rank's {value name: tensor} for one forward over numeric_check's 2-prompt batch;
    `weights`: whole tensors by checkpoint key, or a checkpoint (each rank reads its slices)."""
    from ..models.weights import load_params
    from .recorded import run_recorded

    layout = layout_of(module)
    world = layout.world
    ckpt = DictCheckpoint(weights) if isinstance(weights, dict) else weights
    hub = SimulatedHub(world)
    results: list[dict[str, torch.Tensor] | None] = [None] * world

    def work(rank: int) -> None:
        params = load_params(module, ckpt, progress=False, rank=rank)
        results[rank] = run_recorded(module, fn_name, params, seed, comm=SimulatedComm(hub, rank, layout))

    _on_threads(world, hub, work)
    return results  # type: ignore[return-value]


def run_ranks_dp(module: Module, weights: dict[str, torch.Tensor] | Any, prompts: list[list[int]]) -> torch.Tensor:
    """Logits (f32[len(prompts), vocab], prompt order) of one prefill of `prompts` on attention-DP
    ranks: prompt i runs on DP rank i % dp, each rank with its own batch and KV pool (ranks left
    without a prompt run an empty batch, as idle ranks must for the MoE collectives)."""
    from ..kernels.context import allocate_pool, make_context
    from ..codegen.pysource import compile_function
    from ..passes.plan_memory import kv_contract
    from ..passes.quantize_kv import kv_dtype_of_module
    from ..models.weights import load_params

    layout = layout_of(module)
    world, dp = layout.world, layout.attention_dp
    ckpt = DictCheckpoint(weights) if isinstance(weights, dict) else weights
    hub, forward = SimulatedHub(world), compile_function(module, "forward")
    outs: list[torch.Tensor | None] = [None] * world
    mine = lambda r: [i for i in range(len(prompts)) if i % dp == layout.rank_in_group("dp", r)[0]]  # noqa

    def work(rank: int) -> None:
        params = load_params(module, ckpt, progress=False, rank=rank)
        batch = [prompts[i] for i in mine(rank)]
        blocks = [-(-len(p) // 4) for p in batch]
        pool = allocate_pool(kv_contract(module, 4, kv_dtype_of_module(module) or "f32"), max(sum(blocks), 1))
        starts = [sum(blocks[:i]) for i in range(len(batch))]
        seqs = [(len(p), len(p), list(range(s, s + b))) for p, s, b in zip(batch, starts, blocks)]
        ctx = make_context(pool, 4, seqs, comm=SimulatedComm(hub, rank, layout))
        long = dict(dtype=torch.long)
        tokens = torch.tensor([t for p in batch for t in p], **long)
        positions = torch.tensor([i for p in batch for i in range(len(p))], **long)
        rows = torch.tensor([sum(len(p) for p in batch[:i + 1]) - 1 for i in range(len(batch))], **long)
        with torch.no_grad():
            outs[rank] = forward(params, ctx, tokens, positions, rows).float()

    _on_threads(world, hub, work)
    logits = torch.empty(len(prompts), outs[0].shape[-1])
    for rank in range(world):
        if layout.rank_in_group("tp", rank)[0] == 0:  # one rank of each DP replica reports
            for row, i in enumerate(mine(rank)):
                logits[i] = outs[rank][row]
    return logits


def _on_threads(world: int, hub: SimulatedHub, work: Any) -> None:
    """work(rank) on one thread per rank; the first real error (not a barrier broken by it) is
    raised once every thread has stopped."""
    errors: list[BaseException | None] = [None] * world

    def guarded(rank: int) -> None:
        try:
            work(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[rank] = e
            hub.abort()

    threads = [threading.Thread(target=guarded, args=(r,), name=f"rank{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise first

"""What one rank of a sharded plan holds, for `nanoforge inspect --rank R`: the checkpoint slice of
every param and its bytes, and the collectives a step runs. Reads the plan only (no checkpoint)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..facts import layout_of
from ..ir.graph import DTYPE_BYTES, Module, Param
from .shard_spec import cat_rows, key_slices, parse_spec

COLLECTIVES = ("all_reduce", "all_gather", "moe_dispatch", "moe_combine")


@dataclass
class KeySlice:
    param: str
    key: str
    global_shape: tuple[int, ...]
    slices: tuple[slice, ...] | None  # None: the whole tensor
    nbytes: int  # what this rank reads of it


def key_shapes(module: Module, p: Param) -> list[tuple[int, ...]]:
    """The global (checkpoint) shape of each key of a param, from its local type and shard spec."""
    spec = parse_spec(p.shard) if p.shard else None
    shape = [int(d) for d in p.type.shape]
    if spec is not None and not (p.layout == "cat" and spec.dim == 0):
        shape[spec.dim] *= spec.counts[0]
    if p.layout == "single":
        return [tuple(shape)]
    if p.layout == "stack":
        return [tuple(shape[1:])] * len(p.keys)
    per_key = spec is not None and spec.dim == 0
    return [(r * (spec.count(i) if per_key else 1), *shape[1:]) for i, r in enumerate(cat_rows(module, p))]


def _text(sl: tuple[slice, ...] | None) -> str:
    if sl is None:
        return "(whole)"
    return "[" + ", ".join(":" if s == slice(None) else f"{s.start}:{s.stop}" for s in sl) + "]"


def rank_slices(module: Module, rank: int) -> list[KeySlice]:
    """Every checkpoint tensor rank `rank` reads (experts it does not hold are left out)."""
    out = []
    for p in module.params.values():
        spec = parse_spec(p.shard) if p.shard else None
        index, size = layout_of(module).rank_in_group(spec.group, rank) if spec else (0, 1)
        for i, (key, shape) in enumerate(zip(p.keys, key_shapes(module, p))):
            sl = key_slices(p, spec, i, shape, index, size) if spec else None
            if spec is not None and sl is None:
                continue
            n = DTYPE_BYTES[p.type.dtype]
            for d, s in zip(shape, sl or [slice(None)] * len(shape)):
                n *= len(range(*s.indices(d)))
            out.append(KeySlice(p.name, key, shape, sl, n))
    return out


def model_bytes(module: Module) -> int:
    """Bytes of every param's global (unsharded) tensors: the whole model one rank holds a share of."""
    total = 0
    for p in module.params.values():
        for shape in key_shapes(module, p):
            n = DTYPE_BYTES[p.type.dtype]
            for d in shape:
                n *= d
            total += n
    return total


def collectives_per_step(module: Module, fn_name: str = "forward") -> Counter:
    return Counter(n.op for n in module.functions[fn_name].nodes if n.op in COLLECTIVES)


def describe_rank(module: Module, rank: int) -> list[str]:
    """Lines for `inspect --rank`: this rank's place in each group, then its params and slices."""
    layout = layout_of(module)
    world = layout.world
    groups = ", ".join(f"{g} {i} of {n}" for g in ("tp", "dp", "ep") for i, n in [layout.rank_in_group(g, rank)]
                       if n > 1)
    lines = [f"rank {rank} of {world}: {groups or 'the only rank'}"]
    for ks in rank_slices(module, rank):
        p = module.params[ks.param]
        lines.append(f"  ${ks.param}: {p.type}{' shard=' + p.shard if p.shard else ''}  <- {ks.key} "
                     f"{list(ks.global_shape)} {_text(ks.slices)}  {ks.nbytes:,} B")
    return lines

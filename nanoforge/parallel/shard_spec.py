"""Shard specs: which slice of each checkpoint tensor a rank reads.

A sharded module is the per-rank module: every type in it is the local one, the same on all
ranks; only the slice a rank loads differs. `Param.shard` says how, as plain text:

    d{dim}:{n}@{group}          the param's global tensor is split along `dim` into n equal
                                contiguous parts; rank r of the group reads part r * n // size
                                (n == size: part r; n < size: ranks share a part, e.g. kv heads)
    d0:{n_q},{n_k},{n_v}@tp     layout "cat" along dim 0: each key split on its own, the rank's
                                parts concatenated (one count for a cat param applies to each key)

Layout "stack" (dim 0 = expert): "d0:n" splits the experts (a rank reads only its experts'
keys), "d1:n" / "d2:n" split inside each expert's tensor. `group` names the ranks the param is
split over ("tp", "ep", "dp"); the module's ParallelLayout fact (facts.py) says which ranks form
each group.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import NanoForgeError
from ..ir.graph import Module, Param
from ..ir.ops import GROUPS as OP_GROUPS

GROUPS = OP_GROUPS  # "tp", "ep", "dp"
_SPEC = re.compile(r"d(\d+):(\d+(?:,\d+)*)@(\w+)")


@dataclass
class ShardSpec:
    dim: int
    counts: list[int]  # one count, or one per key (layout "cat" along dim 0)
    group: str

    def count(self, key_index: int) -> int:
        return self.counts[key_index] if len(self.counts) > 1 else self.counts[0]

    def __str__(self) -> str:
        return format_spec(self.dim, self.counts, self.group)


def format_spec(dim: int, counts: int | Sequence[int], group: str) -> str:
    counts = [counts] if isinstance(counts, int) else list(counts)
    return f"d{dim}:{','.join(str(int(c)) for c in counts)}@{group}"


def parse_spec(s: str) -> ShardSpec:
    m = _SPEC.fullmatch(s.strip())
    if not m or m[3] not in GROUPS:
        raise ValueError(f"bad shard spec {s!r}: expected d<dim>:<n>[,<n>...]@<{'|'.join(GROUPS)}>")
    counts = [int(c) for c in m[2].split(",")]
    if min(counts) < 1:
        raise ValueError(f"bad shard spec {s!r}: counts must be >= 1")
    return ShardSpec(int(m[1]), counts, m[3])


def key_slices(param: Param, spec: ShardSpec, key_index: int, key_shape: Sequence[int], rank: int,
               world: int) -> tuple[slice, ...] | None:
    """The slice of checkpoint tensor `param.keys[key_index]` (shape `key_shape`) that rank
    `rank` of a group of `world` reads; None when it reads nothing of it (an expert it lacks)."""
    n = spec.count(key_index)
    if n > world or world % n:
        raise ValueError(f"shard {spec} of ${param.name}: {n} parts do not spread over {world} ranks")
    part = rank * n // world
    full = [slice(None)] * len(key_shape)
    kdim = spec.dim
    if param.layout == "stack":
        if spec.dim == 0:
            experts = len(param.keys)
            if experts % n:
                raise ValueError(f"shard {spec} of ${param.name}: {experts} experts do not split into {n}")
            per = experts // n
            return tuple(full) if part * per <= key_index < (part + 1) * per else None
        kdim = spec.dim - 1
    if kdim >= len(key_shape) or key_shape[kdim] % n:
        raise ValueError(f"shard {spec} of ${param.name}: dim {kdim} of {param.keys[key_index]} "
                         f"{list(key_shape)} does not split into {n}")
    step = key_shape[kdim] // n
    full[kdim] = slice(part * step, (part + 1) * step)
    return tuple(full)


def local_key_shape(param: Param, spec: ShardSpec | None, key_index: int, key_shape: Sequence[int],
                    world: int) -> tuple[int, ...] | None:
    """Shape of what a rank reads of one key (rank 0's view: every rank reads the same shapes)."""
    if spec is None:
        return tuple(key_shape)
    sl = key_slices(param, spec, key_index, key_shape, 0, world)
    if sl is None:
        return None
    return tuple(len(range(*s.indices(d))) for s, d in zip(sl, key_shape))


def global_shape(param: Param) -> tuple[int, ...]:
    """The shape of the param's unsharded (checkpoint) tensor. A "cat" param with different
    counts per key has no single answer (it depends on each key's rows): ValueError."""
    shape = [int(d) for d in param.type.shape]
    if not param.shard:
        return tuple(shape)
    spec = parse_spec(param.shard)
    if len(set(spec.counts)) > 1:
        raise ValueError(f"${param.name}: shard {spec} has a count per key; its global rows are each key's rows")
    shape[spec.dim] *= spec.counts[0]
    return tuple(shape)


def cat_rows(module: Module, p: Param) -> list[int]:
    """Rows of each key of a "cat" param (this rank's rows, if sharded): the split after its linear."""
    for fn in module.functions.values():
        users = fn.users()
        for n in fn.nodes:
            if n.op == "linear" and n.params.get("weight") == p.name:
                for u in users.get(id(n.out), []):
                    if u.op == "split" and len(u.attrs["sizes"]) == len(p.keys):
                        return list(u.attrs["sizes"])
    rows = int(p.type.shape[0])
    if rows % len(p.keys):
        raise NanoForgeError(f"${p.name}: cannot tell the rows of each of its {len(p.keys)} keys")
    return [rows // len(p.keys)] * len(p.keys)

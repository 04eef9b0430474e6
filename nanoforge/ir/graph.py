"""The IR data structures: typed values, checkpoint-bound params, layer-level nodes, functions, modules.

Granularity is the layer (linear, rms_norm, attention, moe ...), not the aten op, so a whole
model is a few hundred lines of IR a person can read. Everything here is plain data: no torch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "fp8_e4m3": 1, "i32": 4, "i64": 8}
DTYPES = tuple(DTYPE_BYTES)
Dim = int | str  # str dims are symbolic: "T" tokens in the flat batch, "S" sequences


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def numel_per_token(self) -> int:
        """Elements per unit of the symbolic leading dim (all dims but the first)."""
        n = 1
        for d in self.shape[1:]:
            n *= int(d)
        return n


@dataclass(eq=False)
class Value:
    name: str  # printed as %name: digits for node results, identifiers for function inputs
    type: TensorType

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass
class Param:
    """A weight of the model, bound to the checkpoint tensor(s) it is read from.

    `layout` says how several keys combine: "stack" makes a new leading dim (MoE experts),
    "cat" concatenates along dim 0 (fused projections). `shard` and `quant` are filled by passes.
    """

    name: str
    type: TensorType
    keys: list[str]
    layout: str = "single"  # single | stack | cat
    shard: str | None = None
    quant: str | None = None


@dataclass(eq=False)
class Node:
    op: str
    inputs: list[Value]
    params: dict[str, str]  # slot -> param name
    attrs: dict[str, Any]
    outputs: list[Value]
    source: str = ""  # the HF module path this node came from
    provider: str | None = None

    @property
    def out(self) -> Value:
        assert len(self.outputs) == 1, f"{self.op} has {len(self.outputs)} outputs"
        return self.outputs[0]


@dataclass
class Function:
    name: str
    inputs: list[Value]
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)

    def users(self) -> dict[int, list[Node]]:
        """id(value) -> nodes reading it (a value the function returns has a reader `users` does
        not list: rewrites that remove or fold a value ask `returns` too)."""
        use: dict[int, list[Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                use.setdefault(id(v), []).append(node)
        return use

    def returns(self, v: Value) -> bool:
        return any(o is v for o in self.outputs)

    def producers(self) -> dict[int, Node]:
        return {id(v): n for n in self.nodes for v in n.outputs}

    def next_value_name(self) -> str:
        names = [int(v.name) for n in self.nodes for v in n.outputs if v.name.isdigit()]
        return str(max(names, default=-1) + 1)


@dataclass
class Module:
    """Several functions sharing one set of params, plus model-level metadata (data only)."""

    meta: dict[str, Any]
    params: dict[str, Param] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)

    def clone(self) -> "Module":
        return copy.deepcopy(self)

    def nodes(self) -> Iterator[tuple[Function, Node]]:
        for fn in self.functions.values():
            for node in fn.nodes:
                yield fn, node

    def param_bytes(self) -> int:
        total = 0
        for p in self.params.values():
            n = DTYPE_BYTES[p.type.dtype]
            for d in p.type.shape:
                n *= int(d)
            total += n
        return total


"""Tracing frontend: nn-like modules whose calls on symbolic tensors record IR nodes.

A model file reads like its HF counterpart: attribute names mirror HF module paths, so every
node's `source` and every param's checkpoint key fall out of the attribute tree. There is no
global tracer: a `Sym` carries the `Tracer` that made it, and modules find it through their inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ir.graph import Function, Module, Node, Param, TensorType, Value
from ..ir.ops import OpTypeError, infer_types


@dataclass
class ParamSpec:
    """A weight declared by a module; named and registered when the module first uses it."""

    shape: tuple[int, ...]
    keys: list[str] | None = None  # default: [its own name]; set for tied or stacked weights
    layout: str = "single"
    name: str = ""
    dtype: str | None = None  # default: the compile dtype; routers' score biases stay f32


class Tracer:
    def __init__(self, dtype: str):
        self.module = Module(meta={})
        self.dtype = dtype
        self.fn: Function | None = None
        self.scope: list[str] = []
        self._next = 0

    def begin(self, name: str, inputs: dict[str, TensorType]) -> list["Sym"]:
        self.fn = Function(name, [Value(n, t) for n, t in inputs.items()])
        self.module.functions[name] = self.fn
        return [Sym(v, self) for v in self.fn.inputs]

    def end(self, *outputs: "Sym") -> None:
        assert self.fn is not None
        self.fn.outputs = [o.value for o in outputs]
        self.fn = None

    def param(self, spec: ParamSpec) -> str:
        if spec.name not in self.module.params:
            keys = spec.keys or [spec.name]
            dtype = spec.dtype or self.dtype
            self.module.params[spec.name] = Param(spec.name, TensorType(dtype, spec.shape), keys, spec.layout)
        return spec.name

    def emit(self, op: str, inputs: list["Sym"], params: dict[str, ParamSpec | None] | None = None,
             **attrs: Any) -> Any:
        """Record one node; return its output Sym (or a tuple for several outputs)."""
        assert self.fn is not None, "emit outside of a traced function"
        pnames = {slot: self.param(s) for slot, s in (params or {}).items() if s is not None}
        ptypes = {slot: self.module.params[n].type for slot, n in pnames.items()}
        source = self.scope[-1] if self.scope else ""
        try:
            types = infer_types(op, [s.value.type for s in inputs], ptypes, attrs)
        except OpTypeError as e:
            raise OpTypeError(f"{e} (tracing {source})") from None
        outs = []
        for t in types:
            outs.append(Value(str(self._next), t))
            self._next += 1
        self.fn.nodes.append(Node(op, [s.value for s in inputs], pnames, attrs, outs, source))
        syms = tuple(Sym(v, self) for v in outs)
        return syms[0] if len(syms) == 1 else syms


@dataclass(eq=False)
class Sym:
    """A symbolic tensor: an IR value plus the tracer recording ops on it."""

    value: Value
    tracer: Tracer = field(repr=False)

    @property
    def width(self) -> int:
        return int(self.value.type.shape[-1])

    def __add__(self, other: "Sym") -> "Sym":
        return self.tracer.emit("add", [self, other])

    def __mul__(self, other: "Sym") -> "Sym":
        return self.tracer.emit("mul", [self, other])


class TraceModule:
    """Base class: registers child modules and param specs under their attribute names."""

    def __init__(self) -> None:
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_specs", {})
        object.__setattr__(self, "path", "")

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, TraceModule):
            self._children[name] = value
        elif isinstance(value, ParamSpec):
            self._specs[name] = value
        object.__setattr__(self, name, value)

    def bind(self, prefix: str = "") -> "TraceModule":
        """Give every module its HF path and every param its checkpoint name."""
        object.__setattr__(self, "path", prefix)
        for name, spec in self._specs.items():
            if not spec.name:
                spec.name = f"{prefix}.{name}" if prefix else name
        for name, child in self._children.items():
            child.bind(f"{prefix}.{name}" if prefix else name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracer = next(a.tracer for a in args if isinstance(a, Sym))
        tracer.scope.append(self.path)
        try:
            return self.forward(*args, **kwargs)
        finally:
            tracer.scope.pop()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{type(self).__name__} defines no forward")


class ModuleList(TraceModule):
    def __init__(self, modules: list[TraceModule]):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)
        object.__setattr__(self, "items", modules)

    def __iter__(self):
        return iter(self.items)


# ---- leaf modules, named like torch.nn / HF so model files read the same ----

class Linear(TraceModule):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = ParamSpec((out_features, in_features))
        self.bias = ParamSpec((out_features,)) if bias else None

    def forward(self, x: Sym) -> Sym:
        return x.tracer.emit("linear", [x], {"weight": self.weight, "bias": self.bias})


class Embedding(TraceModule):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = ParamSpec((num, dim))

    def forward(self, tokens: Sym) -> Sym:
        return tokens.tracer.emit("embed", [tokens], {"weight": self.weight})


class RMSNorm(TraceModule):
    """RMSNorm over the last dim, or per `group`-wide slice (per-head q/k norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = ParamSpec((dim,))
        self.eps = float(eps)

    def forward(self, x: Sym) -> Sym:
        attrs = {"eps": self.eps}
        if x.width != self.weight.shape[0]:
            attrs["group"] = self.weight.shape[0]
        return x.tracer.emit("rms_norm", [x], {"weight": self.weight}, **attrs)


class LMHead(TraceModule):
    """Projects the hidden state of the rows that need logits (last token of each sequence)."""

    def __init__(self, weight: ParamSpec):
        super().__init__()
        self.weight = weight

    def forward(self, x: Sym, rows: Sym) -> Sym:
        return x.tracer.emit("lm_head", [x, rows], {"weight": self.weight})


def silu(x: Sym) -> Sym:
    return x.tracer.emit("silu", [x])


def split(x: Sym, sizes: list[int]) -> tuple[Sym, ...]:
    out = x.tracer.emit("split", [x], sizes=list(sizes))
    return out if isinstance(out, tuple) else (out,)


def concat(a: Sym, b: Sym) -> Sym:
    return a.tracer.emit("concat", [a, b])


def trace_forward(model: TraceModule, dtype: str, draft: TraceModule | None = None, hidden: int = 0) -> Module:
    """Trace `model.forward(tokens, positions, rows)` into the module's `forward` function and, given a
    `draft` module (a checkpoint's MTP layer), `draft.forward(tokens, positions, hidden, rows)` into a
    `draft` function: hidden is the target's final hidden state [T, hidden] of the previous positions."""
    tracer = Tracer(dtype)
    model.bind()
    ids = {"tokens": TensorType("i64", ("T",)), "positions": TensorType("i64", ("T",))}
    tokens, positions, rows = tracer.begin("forward", {**ids, "rows": TensorType("i64", ("S",))})
    tracer.end(model(tokens, positions, rows))
    if draft is not None:
        draft.bind(draft.prefix)
        tokens, positions, h, rows = tracer.begin("draft", {**ids, "hidden": TensorType(dtype, ("T", hidden)),
                                                             "rows": TensorType("i64", ("S",))})
        tracer.end(*draft(tokens, positions, h, rows))
    return tracer.module

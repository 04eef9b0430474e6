"""Parse the IR text form (see printer.py) back into a Module; print(parse(text)) == text.

Plans store their IR as this text, so the parser is also the plan loader's only way in: it
builds plain data and never evaluates anything it reads.
"""
from __future__ import annotations

import json
import re

from ..errors import NanoForgeError
from .graph import DTYPES, Function, Module, Node, Param, TensorType, Value
from .printer import expand_keys

_NAME = r"[A-Za-z0-9_.\-]+"
_TYPE = re.compile(r"(\w+)\[([^\]]*)\]")
_PARAM = re.compile(rf"param \$({_NAME}): (\S+) <- (?:(stack|cat)\((.*)\)|([^ ]+(?:, [^ ]+)*))(?: shard=(\S+))?(?: quant=(\S+))?$")
_FUNC = re.compile(r"func (\w+)\((.*)\) \{$")
_VALUE_DECL = re.compile(r"%(\w+): (\w+\[[^\]]*\])")
_CALL = re.compile(r"(\w+)\(([^()]*)\)")


class IRParseError(NanoForgeError):
    pass


def parse_type(text: str) -> TensorType:
    m = _TYPE.fullmatch(text.strip())
    if not m or m[1] not in DTYPES:
        raise ValueError(f"bad tensor type {text!r}")
    dims = tuple(int(d) if d.lstrip("-").isdigit() else d for d in m[2].split(",")) if m[2] else ()
    return TensorType(m[1], dims)


class _FunctionParser:
    def __init__(self, name: str, inputs: str):
        self.values: dict[str, Value] = {}
        self.fn = Function(name, [self._declare(n, t) for n, t in _VALUE_DECL.findall(inputs)])

    def _declare(self, name: str, type_text: str) -> Value:
        if name in self.values:
            raise ValueError(f"%{name} defined twice")
        v = self.values[name] = Value(name, parse_type(type_text))
        return v

    def _use(self, name: str) -> Value:
        if name not in self.values:
            raise ValueError(f"%{name} used before it is defined")
        return self.values[name]

    def node(self, line: str) -> None:
        outs_text, rest = line.split(" = ", 1)
        m = _CALL.match(rest)
        if not m:
            raise ValueError("expected op(args)")
        inputs, params = [], {}
        for arg in filter(None, (a.strip() for a in m[2].split(","))):
            if arg.startswith("%"):
                inputs.append(self._use(arg[1:]))
            elif "=$" in arg:
                slot, pname = arg.split("=$", 1)
                params[slot] = pname
            else:
                raise ValueError(f"bad argument {arg!r}")
        rest = rest[m.end():]
        attrs = {}
        if rest.startswith(" {"):
            attrs, rest = _parse_attrs(rest[1:])
        provider, source = None, ""
        pm = re.match(r" provider=(\w+)", rest)
        if pm:
            provider, rest = pm[1], rest[pm.end():]
        if rest.startswith("  @"):
            source, rest = rest[3:], ""
        if rest:
            raise ValueError(f"trailing text {rest!r}")
        outputs = [self._declare(n, t) for n, t in _VALUE_DECL.findall(outs_text)]
        self.fn.nodes.append(Node(m[1], inputs, params, attrs, outputs, source, provider))


def _parse_attrs(text: str) -> tuple[dict, str]:
    """Parse `{k=<json>, k2=<json>}` at the start of text; return (attrs, rest)."""
    decoder, attrs, i = json.JSONDecoder(), {}, 1
    while text[i] != "}":
        m = re.compile(r"\s*(\w+)=").match(text, i)
        if not m:
            raise ValueError(f"bad attribute near {text[i:i + 20]!r}")
        attrs[m[1]], i = decoder.raw_decode(text, m.end())
        if text.startswith(", ", i):
            i += 2
    return attrs, text[i + 1:]


def parse_module(text: str) -> Module:
    module: Module | None = None
    fp: _FunctionParser | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        try:
            if not line:
                continue
            if module is None:
                if line != "module":
                    raise ValueError("expected 'module' first")
                module = Module(meta={})
            elif fp is None and line.startswith("meta "):
                key, value = line[5:].split(" = ", 1)
                module.meta[key] = json.loads(value)
            elif fp is None and line.startswith("param "):
                m = _PARAM.match(line)
                if not m:
                    raise ValueError("bad param line")
                keys = expand_keys(m[4] if m[3] else m[5])
                module.params[m[1]] = Param(m[1], parse_type(m[2]), keys, m[3] or "single", m[6], m[7])
            elif fp is None and line.startswith("func "):
                m = _FUNC.match(line)
                if not m:
                    raise ValueError("bad func header")
                fp = _FunctionParser(m[1], m[2])
            elif fp is not None and line.startswith("return"):
                fp.fn.outputs = [fp._use(n) for n in re.findall(r"%(\w+)", line)]
            elif fp is not None and line == "}":
                module.functions[fp.fn.name] = fp.fn
                fp = None
            elif fp is not None:
                fp.node(line)
            else:
                raise ValueError("unexpected line")
        except (ValueError, KeyError, IndexError, json.JSONDecodeError) as e:
            raise IRParseError(f"IR line {lineno}: {e}: {raw.strip()[:120]}") from None
    if module is None or fp is not None:
        raise IRParseError("IR text ends early (no 'module' header, or a func without its closing brace)")
    return module

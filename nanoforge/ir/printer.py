"""The IR text form: one node a line, stable and diffable, parsed back exactly by `parser.py`.

    module
    meta architecture = "Qwen3ForCausalLM"
    param $model.norm.weight: f32[64] <- model.norm.weight
    param $model.layers.1.mlp.experts.w_up: f32[6,32,64] <- stack(model.layers.1.mlp.experts.{0..5}.up_proj.weight)

    func forward(%tokens: i64[T], %positions: i64[T], %rows: i64[S]) {
      %0: f32[T,64] = embed(%tokens, weight=$model.embed_tokens.weight)  @model.embed_tokens
      %1: f32[T,64] = rms_norm(%0, weight=$model.layers.0.input_layernorm.weight) {eps=1e-06} provider=torch  @model.layers.0.input_layernorm
      ...
      return %40
    }

Attr values are JSON, so floats and strings round-trip bit-exactly.
"""
from __future__ import annotations

import json
import re

from .graph import Function, Module, Node, Param


def format_attrs(attrs: dict) -> str:
    return "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in attrs.items()) + "}"


def compress_keys(keys: list[str]) -> str:
    """`a.0.b, a.1.b, ... a.{n-1}.b` -> `a.{0..n-1}.b`; anything else is listed in full."""
    if len(keys) > 2:
        parts = [k.split(".") for k in keys]
        if len({len(p) for p in parts}) == 1:
            differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
            if len(differ) == 1 and [p[differ[0]] for p in parts] == [str(i) for i in range(len(keys))]:
                head = parts[0][: differ[0]]
                tail = parts[0][differ[0] + 1 :]
                return ".".join(head + [f"{{0..{len(keys) - 1}}}"] + tail)
    return ", ".join(keys)


def expand_keys(text: str) -> list[str]:
    out: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*)", item)
        if m:
            out += [f"{m[1]}{i}{m[4]}" for i in range(int(m[2]), int(m[3]) + 1)]
        elif item:
            out.append(item)
    return out


def format_param(p: Param) -> str:
    src = compress_keys(p.keys)
    if p.layout != "single":
        src = f"{p.layout}({src})"
    line = f"param ${p.name}: {p.type} <- {src}"
    if p.shard:
        line += f" shard={p.shard}"
    if p.quant:
        line += f" quant={p.quant}"
    return line


def format_node(n: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in n.outputs)
    args = [f"%{v.name}" for v in n.inputs] + [f"{slot}=${name}" for slot, name in n.params.items()]
    line = f"{outs} = {n.op}({', '.join(args)})"
    if n.attrs:
        line += " " + format_attrs(n.attrs)
    if n.provider:
        line += f" provider={n.provider}"
    if n.source:
        line += f"  @{n.source}"
    return line


def format_function(fn: Function) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in fn.inputs)
    lines = [f"func {fn.name}({ins}) {{"]
    lines += ["  " + format_node(n) for n in fn.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in fn.outputs))
    lines.append("}")
    return "\n".join(lines)


def format_module(m: Module) -> str:
    parts = ["module"] + [f"meta {k} = {json.dumps(m.meta[k], sort_keys=True)}" for k in sorted(m.meta)]
    parts += [format_param(p) for p in m.params.values()]
    text = "\n".join(parts) + "\n"
    for fn in m.functions.values():
        text += "\n" + format_function(fn) + "\n"
    return text

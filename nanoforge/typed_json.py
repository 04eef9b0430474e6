"""Dataclasses to and from JSON, every field checked against its type hint on the way in.

A plan.json someone edited by hand, or one from another version, must fail with one line that
names the field (`checkpoint.path: expected a string, got a number`), never with a traceback from
deep inside whatever first touched the value. The supported hints are the ones plan data uses:
bool, int, float, str, Any, `X | None`, list[X], tuple[X, ...], dict[str, X] and dataclasses."""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, TypeVar, Union

from .errors import NanoForgeError

T = TypeVar("T")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_json(cls: type[T], data: Any, where: str) -> T:
    """An instance of dataclass `cls` from `data`; keys it does not know are ignored (a newer
    writer's additions), missing keys take the field's default or fail naming the field."""
    if not isinstance(data, dict):
        raise NanoForgeError(f"{where}: expected an object, got {_kind(data)}")
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise NanoForgeError(f"{where}: missing field '{f.name}'")
    return cls(**kwargs)


def _value(tp: Any, v: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _value(options[0], v, where)
        for a in options:
            try:
                return _value(a, v, where)
            except NanoForgeError:
                continue
        raise NanoForgeError(f"{where}: {_kind(v)} is none of the accepted types")
    if dataclasses.is_dataclass(tp):
        return from_json(tp, v, where)
    if tp is bool:
        if not isinstance(v, bool):
            raise NanoForgeError(f"{where}: expected true or false, got {_kind(v)}")
        return v
    if tp in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (tp is int and not float(v).is_integer()):
            raise NanoForgeError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {_kind(v)}")
        return tp(v)
    if tp is str:
        if not isinstance(v, str):
            raise NanoForgeError(f"{where}: expected a string, got {_kind(v)}")
        return v
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise NanoForgeError(f"{where}: expected a list, got {_kind(v)}")
        item = args[0] if args else Any
        out = [_value(item, x, f"{where}[{i}]") for i, x in enumerate(v)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(v, dict):
            raise NanoForgeError(f"{where}: expected an object, got {_kind(v)}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): _value(item, x, f"{where}.{k}") for k, x in v.items()}
    raise TypeError(f"typed_json: unsupported type hint {tp!r} at {where}")


def to_json(obj: Any) -> Any:
    """Plain JSON data of a dataclass (tuples become lists, nested dataclasses objects)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj

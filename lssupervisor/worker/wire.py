"""A small, strict codec between frozen dataclasses and JSON values, for the worker protocol.

``to_wire`` turns a dataclass (and the enums, tuples, dicts and scalars inside it) into plain JSON
values; ``from_wire(Type, data)`` builds the typed value back, checking every field against the type
hints: a missing field, an unknown one, or a value of the wrong kind is a :class:`WireError` naming the
dotted path (``result.lmdbs[0].version: expected int, got 'x'``). Nothing of the protocol travels as a
bare dict, and nothing is guessed: ``bool`` is not an ``int``, an ``int`` is accepted where a ``float``
is declared (JSON has one number type).

Supported annotations: ``int``, ``float``, ``str``, ``bool``, ``None``, ``X | None`` (and unions of
dataclasses told apart by nothing else are refused at definition time: use one type per message),
``tuple[X, ...]``, ``dict[str, X]``, ``Enum`` subclasses (by value), and dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar, get_args, get_origin

from lssupervisor.errors import WorkerError

T = TypeVar("T")


class WireError(WorkerError):
    """A message that does not match its declared type: a bug in one of the two sides."""


def to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise WireError(f"cannot send a {type(value).__name__} over the worker protocol")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_wire(tp: type[T], data: Any, where: str = "message") -> T:
    """``data`` (parsed JSON) as a value of type ``tp``; WireError naming the path on any mismatch."""
    return typing.cast(T, _decode(tp, data, where))


def _decode(tp: Any, data: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if data is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) != 1:
            raise WireError(f"{where}: ambiguous union {tp!r} in the protocol")
        return _decode(rest[0], data, where)
    if tp is Any:
        return data
    if origin is tuple:
        args = get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise WireError(f"{where}: only tuple[X, ...] is supported, not {tp!r}")
        if not isinstance(data, list):
            raise WireError(f"{where}: expected a list, got {_shown(data)}")
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is dict:
        _, value_type = get_args(tp)
        if not isinstance(data, dict):
            raise WireError(f"{where}: expected an object, got {_shown(data)}")
        return {str(k): _decode(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            known = ", ".join(repr(m.value) for m in tp)
            raise WireError(f"{where}: expected one of {known}, got {_shown(data)}") from None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, data, where)
    return _decode_scalar(tp, data, where)


def _decode_dataclass(tp: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected an object, got {_shown(data)}")
    hints = _hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise WireError(f"{where}: unknown field(s) {', '.join(unknown)} for {tp.__name__}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{where}.{name}: missing")
            continue
        kwargs[name] = _decode(hints[name], data[name], f"{where}.{name}")
    return tp(**kwargs)


def _decode_scalar(tp: Any, data: Any, where: str) -> Any:
    if tp is type(None):
        if data is not None:
            raise WireError(f"{where}: expected null, got {_shown(data)}")
        return None
    if tp is bool:
        if not isinstance(data, bool):
            raise WireError(f"{where}: expected true or false, got {_shown(data)}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise WireError(f"{where}: expected an integer, got {_shown(data)}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float):
            raise WireError(f"{where}: expected a number, got {_shown(data)}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise WireError(f"{where}: expected a string, got {_shown(data)}")
        return data
    raise WireError(f"{where}: unsupported type {tp!r} in the protocol")


def _shown(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 60 else text[:57] + "..."

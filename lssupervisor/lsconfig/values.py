"""Go value syntaxes LS uses in its config: byte sizes, instance names (durations: lssupervisor.durations)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass



# ---------------------------------------------------------------------------------------------------
# Go value syntaxes LS uses in its config

_GO_UNITS_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
                "m": 60 * 10**9, "h": 3600 * 10**9}
_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)([a-zµμ]+)")


def parse_go_duration(text: str) -> int:
    """Go ``time.ParseDuration`` into nanoseconds. Raises ValueError."""
    s = text
    sign = 1
    if s[:1] in ("+", "-"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _GO_DURATION.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r} (expected a number and a unit like 5s)")
        unit = _GO_UNITS_NS.get(m.group(2))
        if unit is None:
            raise ValueError(f"unknown unit {m.group(2)!r} in duration {text!r}")
        whole, _, frac = m.group(1).partition(".")
        total += int(whole or "0") * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        pos = m.end()
    return sign * total


_BYTE_UNITS: dict[str, int] = {"": 1, "b": 1, "byte": 1}
for _power, _names in enumerate(
    (
        ("k", "kb", "kilo", "kilobyte", "kilobytes"),
        ("m", "mb", "mega", "megabyte", "megabytes"),
        ("g", "gb", "giga", "gigabyte", "gigabytes"),
        ("t", "tb", "tera", "terabyte", "terabytes"),
        ("p", "pb", "peta", "petabyte", "petabytes"),
        ("e", "eb"),
    ),
    start=1,
):
    for _name in _names:
        _BYTE_UNITS[_name] = 1 << (10 * _power)


def parse_bytesize(text: str) -> int:
    """``datasize.ByteSize`` text as LS's ``map_size`` takes it: ``1GB`` = 2**30, a plain number is
    bytes, units are powers of 1024 and case-insensitive, ``Gb`` (bits) is refused. Raises ValueError."""
    m = re.match(r"[0-9]+", text)
    if m is None:
        raise ValueError(f"invalid size {text!r} (expected a number with an optional unit like 1GB)")
    unit = text[m.end() :].strip()
    if unit in ("Kb", "Mb", "Gb", "Tb", "Pb", "Eb"):
        raise ValueError(f"invalid size {text!r}: lower-case b means bits; write {unit[0]}B")
    mult = _BYTE_UNITS.get(unit.lower())
    if mult is None:
        raise ValueError(f"invalid size {text!r} (unknown unit {unit!r})")
    value = int(m.group(0)) * mult
    if value >= 1 << 64:
        raise ValueError(f"size {text!r} out of range")
    return value


_INSTANCE_UNSAFE = re.compile(r"[^a-zA-Z0-9-]")


def sanitize_instance(name: str) -> str:
    """What LS makes of an instance name (``syncer.instanceID``): other characters become ``-``."""
    return _INSTANCE_UNSAFE.sub("-", name)

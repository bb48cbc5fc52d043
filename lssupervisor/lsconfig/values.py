"""Go value syntaxes LS uses in its config: byte sizes, instance names (durations: lssupervisor.durations)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass



# ---------------------------------------------------------------------------------------------------
# Go value syntaxes LS uses in its config

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

"""Go durations, the one module that reads and writes them.

LS (a Go program) reads durations with Go's ``time.ParseDuration``: ``1m30s``, ``250ms``, ``1.5h``; a bare
number other than ``0`` is an error there, and in LS's YAML a bare integer means nanoseconds. Our own
config uses the same syntax, so an operator writes durations one way in both files.

- :func:`parse_ns`: Go's grammar exactly (sign, fractions, ``us``/``µs``), into nanoseconds;
- :func:`parse_seconds`: the same, as float seconds (our config's values);
- :func:`for_go`: seconds as a string LS's flags accept (``--timeout 60s``);
- :func:`human`: seconds for people, in log lines, reasons and docs (``5s``, ``250ms``, ``5m``, ``1h``).

The LS stand-in (``lssupervisor.testing.standin``) keeps its own reading of Go's grammar on purpose: it
plays LS in the tests, and a test compares the two readings.
"""

from __future__ import annotations

import re

_UNITS_NS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,  # U+00B5 micro sign
    "μs": 10**3,  # U+03BC Greek mu
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([a-zµμ]+)")


def parse_ns(text: str) -> int:
    """Go ``time.ParseDuration`` into nanoseconds. ValueError with a one-line reason."""
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
        m = _PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r} (expected a number and a unit like 5s)")
        unit = _UNITS_NS.get(m.group(2))
        if unit is None:
            raise ValueError(f"unknown unit {m.group(2)!r} in duration {text!r}")
        whole, _, frac = m.group(1).partition(".")
        total += int(whole or "0") * unit + (int(frac) * unit // 10 ** len(frac) if frac else 0)
        pos = m.end()
    return sign * total


def parse_seconds(text: str) -> float:
    """A Go duration (``1m30s``) as seconds, never negative (our config's time limits). ValueError."""
    ns = parse_ns(text.strip())
    if ns < 0:
        raise ValueError(f"negative duration {text!r}")
    return ns / 1e9


def for_go(seconds: float) -> str:
    """Seconds as a Go duration string for LS's flags (LS reads a bare number as nanoseconds)."""
    return f"{seconds:g}s"


def human(seconds: float) -> str:
    """Seconds for people: ``0s``, ``250ms``, ``5s``, ``2.5s``, ``5m``, ``1h``; always a valid Go duration."""
    seconds = float(seconds)
    if seconds == 0:
        return "0s"
    if abs(seconds) < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 or ms == round(ms) else f"{seconds:g}s"
    if seconds.is_integer():
        s = int(seconds)
        if s % 3600 == 0:
            return f"{s // 3600}h"
        if s % 60 == 0:
            return f"{s // 60}m"
        return f"{s}s"
    return f"{round(seconds, 3):g}s"

"""Go's ``os.Expand``/``os.ExpandEnv`` as LS applies it to its whole config text (src/os/env.go)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass



# ---------------------------------------------------------------------------------------------------
# Go os.Expand, reimplemented from its documented behaviour (src/os/env.go)

# Shell parameter-expansion operators people expect to work inside ${...}; Go has none of them.
SHELL_OPERATORS = (":-", "-", ":=", "=", ":?", "?", ":+", "+")
_GO_SPECIAL = frozenset("*#$@!?-0123456789")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def go_alnum(c: str) -> bool:
    return c == "_" or "0" <= c <= "9" or "a" <= c <= "z" or "A" <= c <= "Z"


def _go_shell_name(s: str, start: int) -> tuple[str, int]:
    """Go's ``getShellName`` on ``s[start:]`` (the text after a ``$``): (name, characters consumed).
    ``("", w > 0)`` is invalid syntax whose characters are eaten; ``("", 0)`` means "no name"."""
    n = len(s)
    if s[start] == "{":
        if start + 2 < n and s[start + 1] in _GO_SPECIAL and s[start + 2] == "}":
            return s[start + 1], 3
        close = s.find("}", start + 1)
        if close == -1:
            return "", 1  # "${" with no closing brace: Go eats the two characters
        if close == start + 1:
            return "", 2  # "${}": eaten
        return s[start + 1 : close], close - start + 1
    if s[start] in _GO_SPECIAL:
        return s[start], 1
    i = start
    while i < n and go_alnum(s[i]):
        i += 1
    return s[start:i], i - start


@dataclass(frozen=True, slots=True)
class DollarRef:
    """One ``$`` as Go's os.Expand sees it. ``text[start:end]`` is what Go consumes."""

    start: int
    end: int
    name: str  # "" when the syntax is invalid (eaten) or when the $ has no name (kept)
    eaten: bool  # Go deletes text[start:end]
    braced: bool

    @property
    def kept(self) -> bool:
        """A ``$`` followed by something that is not a name: Go leaves it alone."""
        return not self.name and not self.eaten


def scan_dollars(text: str) -> list[DollarRef]:
    """Every ``$`` construct of ``text`` in Go's os.Expand tokenisation, in order."""
    refs: list[DollarRef] = []
    n = len(text)
    j = text.find("$")
    while j != -1 and j + 1 < n:
        name, w = _go_shell_name(text, j + 1)
        eaten = not name and w > 0
        refs.append(DollarRef(start=j, end=j + 1 + w, name=name, eaten=eaten, braced=text[j + 1] == "{"))
        j = text.find("$", j + 1 + w)
    return refs


def go_expand(text: str, mapping: Callable[[str], str]) -> str:
    """Go ``os.Expand``: ``${VAR:-x}`` looks up the variable named ``VAR:-x``, ``$$``/``$1`` are the
    special variables ``$``/``1``, ``${}`` and an unclosed ``${`` are deleted, a ``$`` before a
    non-name character stays."""
    out: list[str] = []
    pos = 0
    for ref in scan_dollars(text):
        out.append(text[pos : ref.start])
        if ref.kept:
            out.append("$")
        elif ref.name:
            out.append(mapping(ref.name))
        pos = ref.end
    out.append(text[pos:])
    return "".join(out)


def go_expand_env(text: str, env: Mapping[str, str]) -> str:
    """Go ``os.ExpandEnv`` against ``env``: an unset variable becomes ``""``, silently."""
    return go_expand(text, lambda name: env.get(name, ""))

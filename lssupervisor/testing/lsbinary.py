"""Which Lightning Stream binary the demo and the real-LS tests use: one rule, one place.

``$LIGHTNINGSTREAM_BIN`` when set (a path, or a name looked up on PATH), else ``lightningstream`` on
PATH, else none: the demo then runs the stand-in, and the tests that need the real binary skip with
:attr:`RealLs.how` as the reason. The pytest header (tests/conftest.py) prints the same answer.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "LIGHTNINGSTREAM_BIN"
PROGRAM = "lightningstream"
STANDIN_SCRIPT = "lightningstream-standin"


@dataclass(frozen=True, slots=True)
class RealLs:
    """The real LS binary, or None and why not."""

    path: str | None  # absolute path of an executable file, or None
    how: str  # how it was found ("$LIGHTNINGSTREAM_BIN", "lightningstream on PATH") or why there is none


def find_real_ls(environ: Mapping[str, str] | None = None) -> RealLs:
    """The real LS: ``$LIGHTNINGSTREAM_BIN``, else ``lightningstream`` on PATH, else none.

    A ``$LIGHTNINGSTREAM_BIN`` that names no executable is reported as such (no fallback to PATH:
    the variable says which binary is meant)."""
    env = os.environ if environ is None else environ
    search = env.get("PATH", os.defpath)
    given = env.get(ENV_VAR, "")
    if given:
        found = shutil.which(given, path=search)
        if found is None:
            return RealLs(None, f"${ENV_VAR}={given} is not an executable file")
        return RealLs(os.path.abspath(found), f"${ENV_VAR}")
    on_path = shutil.which(PROGRAM, path=search)
    if on_path is not None:
        return RealLs(os.path.abspath(on_path), f"{PROGRAM} on PATH")
    return RealLs(None, f"${ENV_VAR} is not set and there is no {PROGRAM} on PATH")


def standin_binary(workdir: Path) -> str:
    """An executable that runs the stand-in: its console script next to this Python, or a small
    wrapper written into ``workdir``."""
    script = Path(sys.executable).parent / STANDIN_SCRIPT
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    wrapper = workdir / STANDIN_SCRIPT
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m lssupervisor.testing.standin "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


__all__ = ["ENV_VAR", "PROGRAM", "RealLs", "find_real_ls", "standin_binary"]

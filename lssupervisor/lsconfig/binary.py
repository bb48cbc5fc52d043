"""The LS binary: find it, and ask it whether it accepts a config (``BIN -c CANDIDATE``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lssupervisor.errors import TemplateError

if TYPE_CHECKING:
    pass



def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def resolve_binary(binary: str) -> str | None:
    """The LS binary's path, or None when it does not exist (or is not executable)."""
    if os.sep in binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    return shutil.which(binary)


def validate_with_binary(binary: str, candidate: Path, env: Mapping[str, str], timeout: float = 10.0) -> None:
    """Ask LS itself: ``BIN -c CANDIDATE`` with no subcommand loads and checks the config, prints help
    and exits 0 (1 on a bad config). TemplateError with LS's last stderr line when it refuses.
    Returns silently when the binary is not found (our own checks still ran)."""
    path = resolve_binary(binary)
    if path is None:
        return
    try:
        proc = subprocess.run(
            [path, "-c", str(candidate)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TemplateError(f"{candidate}: `{path} -c` did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise TemplateError(f"{candidate}: cannot run {path}: {exc.strerror}") from None
    if proc.returncode != 0:
        detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit status {proc.returncode}"
        raise TemplateError(f"{candidate}: Lightning Stream refuses this config: {detail}")

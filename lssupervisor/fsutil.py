"""Durable file writes shared by every plane: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) so that the directory itself is 0700 whatever the umask.
    An existing directory is left as it is (an operator's or systemd's ``StateDirectoryMode=``)."""
    p = Path(path)
    if not p.is_dir():
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(p, 0o700)  # mkdir's mode is filtered by the umask; this one is not
    return p


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory: a crash at any
    point leaves either the old or the new content under ``path``, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, text: str, *, mode: int = 0o600, keep_previous: bool = True) -> bool:
    """Write ``text`` to ``path`` atomically with ``mode``; the previous content is kept as
    ``<path>.prev``. Returns False (and writes nothing) when the content is already ``text``.
    OSError propagates (the caller decides what a failed write means)."""
    p = Path(path)
    data = text.encode("utf-8")
    try:
        old: bytes | None = p.read_bytes()
    except FileNotFoundError:
        old = None
    if old == data:
        if (p.stat().st_mode & 0o7777) != mode:
            os.chmod(p, mode)
        return False
    if old is not None and keep_previous:
        _replace_file(p.with_name(p.name + ".prev"), old, mode)
    _replace_file(p, data, mode)
    return True

"""Files shared by every plane: durable writes (temp file, fsync, rename, fsync the directory), private
directories, and which filesystem is full when a memory-mapped write dies."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------------
# Which filesystem is full (a worker killed by SIGBUS)

# Below this many free bytes a filesystem counts as full: a write through a memory map (LMDB with
# writemap) that finds no block for a page gets SIGBUS, not ENOSPC, and dies on the spot.
NEARLY_FULL_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo: where, with which per-mount options, of what."""

    point: str
    options: tuple[str, ...]  # per-mount: "ro"/"rw", "nosuid"...
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    """This process's mounts, in mountinfo order (a later mount on the same point hides earlier ones)."""
    out: list[Mount] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) < 6 or len(tail) < 2:
                    continue
                options = tuple(fields[5].split(","))
                out.append(Mount(_unescape(fields[4]), options, tail[0], _unescape(tail[1])))
    except OSError:
        pass
    return out


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(mount point, filesystem type, source) of the filesystem holding ``path`` (the longest mount
    point containing its real path); ("?", "?", "?") when unknown."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts():
        inside = real == m.point or real.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    return (best.point, best.fstype, best.source) if best is not None else ("?", "?", "?")


def is_read_only_mount_point(path: str) -> bool:
    """Is ``path`` (a real path) itself the mount point of a read-only mount?"""
    found = [m for m in mounts() if m.point == path]
    return bool(found) and "ro" in found[-1].options


def explain_sigbus(paths: Sequence[str]) -> str | None:
    """Why a process writing ``paths`` through a memory map got SIGBUS, when a full filesystem explains
    it: "no space left on <mount point> (<type> <source>, <free> free) holding <path>". None when every
    filesystem there has room (then it was something else)."""
    for path in paths:
        existing = Path(path)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            st = os.statvfs(existing)
        except OSError:
            continue
        free = st.f_bavail * st.f_frsize
        if free < NEARLY_FULL_BYTES:
            point, fstype, source = mount_of(existing)
            return (
                f"no space left on {point} ({fstype} {source}, {free // 1024} KiB free) holding {path}: a "
                "write through LMDB's memory map found no free block (SIGBUS); the step was rolled back, "
                "free space or grow that filesystem, then retry"
            )
    return None

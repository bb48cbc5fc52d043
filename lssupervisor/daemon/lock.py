"""The OS locks that make lssupervisor the only actor on a state dir and on its LMDBs (invariant I4).

Two kinds of lock, both ``flock(LOCK_EX | LOCK_NB)``, which the kernel drops when the holder dies
(``kill -9`` included), so there is never a stale lock to clean up:

- ``<state_dir>/lock``: one daemon (or one offline command) per state dir.
- one per LMDB: ``<lmdb dir>/.lssupervisor.lock`` for a directory LMDB, ``<lmdb file>.lssupervisor.lock``
  beside a ``no_subdir`` LMDB (like LMDB's own ``<file>-lock``). So two supervisors configured with
  different state dirs over the same LMDB still collide. We do not lock LMDB's ``lock.mdb``: LMDB uses
  POSIX record locks on it, and a second descriptor we closed could drop the application's own locks.

Each lock file holds one line, ``<pid> <purpose> <state_dir>``, written after the lock is taken, so a
refused process can name the holder. The files are never deleted (deleting a lock file races with a
process that just opened it). Lock files are opened ``O_CLOEXEC``: LS and workers do not inherit them
unless passed explicitly (a worker gets the state-dir lock fd so the lock outlives a dead daemon until
the worker is gone too).

Is a lock held (for ``status`` and ``reload``)? ``/proc/locks`` lists flock locks by device and inode;
when it does not show ours (no /proc, overlay filesystems report another device) we fall back to a
``LOCK_SH | LOCK_NB`` probe, released at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lssupervisor.config import Config
from lssupervisor.errors import ConfigError, LockHeld
from lssupervisor.fsutil import ensure_private_dir
from lssupervisor.lsmodel import LmdbSpec

LMDB_LOCK_NAME = ".lssupervisor.lock"
PROC_LOCKS = Path("/proc/locks")


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int | None
    purpose: str
    state_dir: str


def lmdb_lock_path(lmdb: LmdbSpec | str | os.PathLike[str]) -> Path:
    """Where the lock of one LMDB lives. A plain path means a directory LMDB (LS's default)."""
    if isinstance(lmdb, LmdbSpec):
        p, no_subdir = Path(lmdb.path), lmdb.no_subdir
    else:
        p = Path(lmdb)
        no_subdir = p.is_file()
    p = Path(os.path.abspath(p))
    return p.with_name(p.name + LMDB_LOCK_NAME) if no_subdir else p / LMDB_LOCK_NAME


def read_holder(path: Path) -> Holder | None:
    """What the lock file says about its last holder (None: empty or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if not text:
        return None
    pid_text, _, rest = text.partition(" ")
    purpose, _, state_dir = rest.partition(" ")
    try:
        pid: int | None = int(pid_text)
    except ValueError:
        pid = None
    return Holder(pid=pid, purpose=purpose or "?", state_dir=state_dir)


def _proc_locks_holders(path: Path) -> set[int] | None:
    """PIDs holding an flock on ``path`` per /proc/locks; None when /proc/locks is unreadable."""
    try:
        st = path.stat()
        text = PROC_LOCKS.read_text()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 27429 fe:00:2148704 0 EOF"; waiters have "->" after the id.
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5] == dev:
            with contextlib.suppress(ValueError):
                pids.add(int(parts[4]))
    return pids


def is_held(path: Path) -> bool:
    """True when some process holds an flock on ``path`` (False when the file does not exist)."""
    if not path.exists():
        return False
    holders = _proc_locks_holders(path)
    if holders:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock, if we got it
    return False


def holder_pid(cfg: Config) -> int | None:
    """The pid of the process holding ``<state_dir>/lock`` now, or None when nobody holds it."""
    path = cfg.lock_path
    if not is_held(path):
        return None
    holder = read_holder(path)
    if holder is not None and holder.pid is not None:
        return holder.pid
    # Locked but not yet written (the holder is between flock and write): ask the kernel.
    pids = _proc_locks_holders(path) or set()
    return min(pids) if pids else None


def holder(cfg: Config) -> Holder | None:
    """Who holds the state-dir lock now (None: nobody)."""
    pid = holder_pid(cfg)
    if pid is None:
        return None
    h = read_holder(cfg.lock_path)
    return Holder(pid=pid, purpose=h.purpose if h else "?", state_dir=str(cfg.state_dir))


@dataclass
class Lock:
    """Held locks; release() (or leaving the ``with`` block, or dying) drops them."""

    purpose: str
    state_dir: str
    fds: dict[Path, int] = field(default_factory=dict)

    def fileno(self) -> int:
        """The state-dir lock's descriptor (pass it to a worker so the lock outlives us until the
        worker is gone)."""
        return next(iter(self.fds.values()))

    @property
    def paths(self) -> list[Path]:
        return list(self.fds)

    def add_lmdbs(self, lmdbs: Iterable[LmdbSpec | str | os.PathLike[str]]) -> None:
        """Also lock these LMDBs (a reload that adds one). Raises LockHeld; keeps what it had."""
        for path in sorted({lmdb_lock_path(x) for x in lmdbs}):
            if path not in self.fds:
                self.fds[path] = _take(path, self.purpose, self.state_dir, what=f"LMDB {path.parent}")

    def release(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _take(path: Path, purpose: str, state_dir: str, *, what: str) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        # A path that cannot hold a lock file (a parent that is a file, no permission, read-only fs)
        # is a configuration problem; as a bare OSError it would crash a daemon reloading it.
        raise ConfigError(
            f"{what}: cannot create the lock file {path}: {exc.strerror or exc}; check that path "
            "(the LMDB's path in the LS template, or state_dir) and its permissions"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        h = read_holder(path)
        pids = _proc_locks_holders(path) or set()
        pid = h.pid if h is not None and h.pid is not None else (min(pids) if pids else None)
        who = f"lssupervisor pid {pid}" if pid is not None else "another process"
        detail = f" ({h.purpose}, state dir {h.state_dir})" if h is not None and h.state_dir else ""
        raise LockHeld(
            f"{what} is locked by {who}{detail} ({path}); only one lssupervisor may act on it: "
            "stop that one first, or wait for it to finish",
            holder_pid=pid,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {purpose} {state_dir}\n".encode(), 0)
    return fd


def acquire(cfg: Config, lmdb_paths: Iterable[LmdbSpec | str | os.PathLike[str]], purpose: str) -> Lock:
    """Take the state-dir lock, then one lock per LMDB (sorted, so two processes never deadlock-wait:
    they are non-blocking anyway). Raises LockHeld naming the holder's pid; nothing stays locked then.
    ``purpose``: ``daemon``, ``migrate``, ``rollback``... (shown to whoever is refused)."""
    state_dir = str(Path(cfg.state_dir).resolve())
    lock = Lock(purpose=purpose, state_dir=state_dir)
    try:
        # Whoever takes the lock first creates the state dir: 0700 whatever the umask (backups,
        # history and the rendered LS config live there).
        ensure_private_dir(cfg.state_dir)
        lock.fds[cfg.lock_path] = _take(cfg.lock_path, purpose, state_dir, what=f"state dir {state_dir}")
        lock.add_lmdbs(lmdb_paths)
    except BaseException:
        lock.release()
        raise
    return lock

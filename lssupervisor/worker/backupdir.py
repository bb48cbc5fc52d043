"""Backups on disk: manifests, listing, finding, retention, free space and ``.partial`` ownership.

No LMDB is opened here (and ``lmdb`` is not imported): the daemon lists backups for its status and the
CLI prints them. Creating, verifying and restoring a backup opens LMDBs and lives in
:mod:`lssupervisor.worker.backup`, inside the worker process. The directory layout and the guarantees
are described there.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3
import psutil

from lssupervisor.errors import BackupError
from lssupervisor.fsutil import ensure_private_dir
from lssupervisor.lsmodel import LmdbSpec

PARTIAL_SUFFIX = ".partial"
MANIFEST = "manifest.json"
OWNER = "owner.json"
DATA_FILE = "data.mdb"
# Free space needed: the LMDBs' used size x FREE_SPACE_FACTOR + FREE_SPACE_MARGIN. A compact copy is
# never bigger than the used pages; the factor and margin cover the manifest, filesystem overhead and
# whatever else writes to the same disk meanwhile.
FREE_SPACE_FACTOR = 1.1
FREE_SPACE_MARGIN = 16 * 1024 * 1024
_CHUNK = 1024 * 1024

Progress = Callable[[dict[str, Any]], None]


class Hasher(Protocol):
    """What hashlib's and blake3's hash objects have in common (and all the backups use)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class LmdbBackup:
    """One LMDB inside a backup."""

    name: str
    source_path: str
    no_subdir: bool
    schema_version: int | None
    size: int  # bytes of data.mdb in the backup
    digest: str  # hex digest of data.mdb with ``algorithm``
    last_txnid: int  # of the source at copy time
    file: str  # relative to the backup directory
    # Identity of the source's state when copied (txn id, pages, file): equal => nothing was written
    # since, so a retry reuses this backup instead of taking another (backup.state_digest).
    state_digest: str = ""
    # BLAKE3 since the one-pass backup (4x sha256's speed, so hashing keeps up with the copy);
    # manifests written before it say sha256, and still verify with it.
    algorithm: str = "blake3"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_path": self.source_path,
            "no_subdir": self.no_subdir,
            "schema_version": self.schema_version,
            "size": self.size,
            self.algorithm: self.digest,
            "last_txnid": self.last_txnid,
            "file": self.file,
            "state_digest": self.state_digest,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LmdbBackup:
        version = data.get("schema_version")
        return cls(
            name=str(data["name"]),
            source_path=str(data["source_path"]),
            no_subdir=bool(data.get("no_subdir", False)),
            schema_version=None if version is None else int(version),
            size=int(data["size"]),
            algorithm=(algorithm := next((a for a in HASHES if a in data), "sha256")),
            digest=str(data[algorithm]),
            last_txnid=int(data.get("last_txnid", 0)),
            file=str(data["file"]),
            state_digest=str(data.get("state_digest", "")),
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    time: str  # UTC ISO 8601
    instance: str
    tool_version: str
    lmdbs: tuple[LmdbBackup, ...]
    reason: str = ""  # why it was taken: "migrate", "manual", "before rollback to <id>"

    @property
    def schema_version(self) -> int | None:
        """The version of the backup as a whole: the highest marker among its LMDBs."""
        versions = [b.schema_version for b in self.lmdbs if b.schema_version is not None]
        return max(versions) if versions else None

    @property
    def size(self) -> int:
        return sum(b.size for b in self.lmdbs)

    def lmdb(self, name: str) -> LmdbBackup | None:
        for b in self.lmdbs:
            if b.name == name:
                return b
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "instance": self.instance,
            "tool_version": self.tool_version,
            "reason": self.reason,
            "schema_version": self.schema_version,
            "lmdbs": [b.to_json() for b in self.lmdbs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(
            id=str(data["id"]),
            time=str(data["time"]),
            instance=str(data.get("instance", "")),
            tool_version=str(data.get("tool_version", "")),
            reason=str(data.get("reason", "")),
            lmdbs=tuple(LmdbBackup.from_json(b) for b in data["lmdbs"]),
        )


@dataclass(frozen=True, slots=True)
class RestoredLmdb:
    name: str
    path: str  # the data file that was replaced
    restored: bool  # False: it already held exactly the backup (idempotent no-op)
    schema_version: int | None


# ---------------------------------------------------------------------------------------------------
# small file helpers


def data_file(spec: LmdbSpec) -> Path:
    """The LMDB's data file (``<path>/data.mdb``, or ``<path>`` itself with ``no_subdir``)."""
    return Path(spec.path) if spec.no_subdir else Path(spec.path) / DATA_FILE


def lock_file(spec: LmdbSpec) -> Path:
    """The LMDB's lock file (``<path>/lock.mdb``, or ``<path>-lock`` with ``no_subdir``)."""
    return Path(spec.path + "-lock") if spec.no_subdir else Path(spec.path) / "lock.mdb"


# The file hashes a manifest may name, by its JSON key. New backups use BACKUP_HASH.
HASHES: dict[str, Callable[[], Hasher]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
BACKUP_HASH = "blake3"


def file_digest(path: Path, algorithm: str = BACKUP_HASH) -> str:
    """Hex digest of the file at ``path`` (read in 1 MiB chunks)."""
    h = HASHES[algorithm]()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def holds_copy(path: Path, entry: LmdbBackup) -> bool:
    """True when ``path`` is byte-identical to the backed-up file ``entry``. The size is compared first:
    a live LMDB opened with writemap is as long as its map (sparse, often GBs), hashing it would be slow."""
    try:
        if path.stat().st_size != entry.size:
            return False
    except FileNotFoundError:
        return False
    return file_digest(path, entry.algorithm) == entry.digest


def fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    """mkdir ``path`` as 0700 whatever the umask (a backup is a full copy of the data: I9)."""
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)


def _write_json_durably(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def free_bytes(directory: Path) -> int:
    """Bytes available to us on the filesystem of ``directory`` (a module function so that unit tests
    can stand in for a full disk; the real full-disk test uses a tiny tmpfs)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_free_space(
    directory: Path, needed: int, what: str, advice: str = "free space, move backup.dir, or lower backup.keep"
) -> None:
    """Fail closed before writing ``needed`` bytes into ``directory``. ``what`` says what needs the room
    (each caller computes ``needed`` its own way: the message does not claim one formula)."""
    ensure_private_dir(directory)
    free = free_bytes(directory)
    if free < needed:
        raise BackupError(
            f"{directory}: not enough free space for {what}: need {_mib(needed)} ({needed} bytes), "
            f"have {_mib(free)} ({free} bytes); {advice}"
        )


def space_needed(used_bytes: int) -> int:
    return int(used_bytes * FREE_SPACE_FACTOR) + FREE_SPACE_MARGIN


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def new_backup_id(version: int | None, now: _dt.datetime | None = None) -> str:
    """A sortable, unique-enough id: UTC time with microseconds, and the schema version."""
    t = (now or _dt.datetime.now(_dt.UTC)).astimezone(_dt.UTC)
    return f"{t:%Y%m%dT%H%M%S}.{t.microsecond:06d}Z-v{version if version is not None else 0}"


# ---------------------------------------------------------------------------------------------------
# ownership of .partial directories


def claim(partial: Path) -> None:
    """Record this process as the writer of ``partial`` (so only a dead writer's leftovers are cleaned)."""
    me = psutil.Process(os.getpid())
    _write_json_durably(partial / OWNER, {"pid": me.pid, "create_time": me.create_time()})


def _owner_alive(partial: Path) -> bool:
    try:
        data = json.loads((partial / OWNER).read_text(encoding="utf-8"))
        pid, created = int(data["pid"]), float(data["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no owner record: a crash before it was written
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def clean_stale_partials(directory: Path, prefix: str = "") -> list[str]:
    """Remove ``*.partial`` directories whose writer is gone. Returns the removed names."""
    removed: list[str] = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        if not entry.name.endswith(PARTIAL_SUFFIX) or not entry.name.startswith(prefix):
            continue
        if entry.is_dir() and not _owner_alive(entry):
            shutil.rmtree(entry)
            removed.append(entry.name)
    if removed:
        fsync_path(directory)
    return removed


# ---------------------------------------------------------------------------------------------------
# listing


@dataclass(frozen=True, slots=True)
class BackupInfo:
    manifest: Manifest
    path: Path

    @property
    def id(self) -> str:
        return self.manifest.id


def list_backups(directory: Path) -> list[BackupInfo]:
    """Complete backups, oldest first. A directory whose manifest does not parse is skipped (it is
    not something we wrote completely; ``.partial`` ones are never listed)."""
    found: list[BackupInfo] = []
    if not directory.is_dir():
        return found
    for entry in directory.iterdir():
        if entry.name.endswith(PARTIAL_SUFFIX) or entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            manifest = Manifest.from_json(json.loads((entry / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if manifest.id != entry.name:
            continue
        found.append(BackupInfo(manifest=manifest, path=entry))
    found.sort(key=lambda b: (b.manifest.time, b.id))
    return found


PRE_ROLLBACK_REASON = "before rollback to "


def find_backup(directory: Path, backup_id: str | None) -> BackupInfo:
    """The backup named ``backup_id`` (a unique prefix is enough), or by default the newest one that
    is not a pre-rollback safety copy (so that ``rollback`` run twice restores the same backup, a no-op
    the second time, instead of undoing itself)."""
    backups = list_backups(directory)
    if not backups:
        raise BackupError(f"{directory}: no backups found")
    if backup_id is None:
        regular = [b for b in backups if not b.manifest.reason.startswith(PRE_ROLLBACK_REASON)]
        return (regular or backups)[-1]
    exact = [b for b in backups if b.id == backup_id]
    if exact:
        return exact[0]
    matches = [b for b in backups if b.id.startswith(backup_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise BackupError(f"{directory}: no backup {backup_id!r}; list them with `lssupervisor backups`")
    raise BackupError(
        f"{directory}: backup id {backup_id!r} is ambiguous ({', '.join(b.id for b in matches)})"
    )


def version_key(manifest: Manifest) -> int | None:
    """The version a backup restores (None: the LMDB had no marker)."""
    return manifest.schema_version


def restore_points(backups: Sequence[BackupInfo]) -> dict[str, int | None]:
    """backup id -> the version it is the restore point of: the newest backup of each version (I9).
    ``backups`` oldest first, as :func:`list_backups` returns them."""
    newest: dict[int | None, str] = {}
    for b in backups:
        newest[version_key(b.manifest)] = b.id
    return {backup_id: version for version, backup_id in newest.items()}


def apply_retention(directory: Path, keep: int, protect: Sequence[str] = ()) -> list[str]:
    """Delete the oldest complete backups so that ``keep`` remain, but never a restore point: the
    newest backup of each version the LMDB has been at (I9: a failed migration retried many times
    must not rotate out the only backup from before it), nor a ``protect`` id (the backup just taken,
    the one being restored). So more than ``keep`` may remain. Returns the deleted ids."""
    backups = list_backups(directory)
    points = restore_points(backups)
    deletable = [b for b in backups if b.id not in protect and b.id not in points]
    excess = len(backups) - keep
    deleted: list[str] = []
    for b in deletable[: max(0, excess)]:
        # Rename first so that a crash mid-delete leaves a .partial (cleaned later), never a
        # half-deleted directory that still looks like a complete backup.
        doomed = directory / f".deleting-{b.id}{PARTIAL_SUFFIX}"
        os.rename(b.path, doomed)
        shutil.rmtree(doomed)
        deleted.append(b.id)
    if deleted:
        fsync_path(directory)
    return deleted


# ---------------------------------------------------------------------------------------------------
# creating

"""The append-only migration history: ``<state_dir>/history.jsonl``.

One JSON object per line, one line per event that changed (or tried to change) an LMDB's schema:
a migration step, a stamp, a backup, a rollback. The file is the operator's audit trail and the
source of the *applied checksums* that :func:`lssupervisor.worker.migrations.check_checksums` compares with
the migration files (Flyway's ``validate``).

Durability: every append is one ``write(2)`` of a whole line on an ``O_APPEND`` descriptor followed by
``fsync``, so a crash loses at most the line being written, and can only leave that last line torn.
The reader therefore tolerates torn lines (reported in :attr:`History.torn_lines` and skipped: the
last line when it is unterminated, or an earlier line that is an unclosed JSON object or only NUL
bytes, what some filesystems, e.g. ext4 with delayed allocation, leave of a write lost in a crash
after the size was updated) but is strict about every other line: a bad line in the middle means
someone edited the file, and silently skipping it would hide an applied migration from checksum
validation.
The next append after a torn tail starts on a fresh line (we write a newline first when the file does
not end with one), so one crash never corrupts the following entry.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lssupervisor.errors import ConfigError
from lssupervisor.fsutil import ensure_private_dir


class Kind(enum.Enum):
    MIGRATE = "migrate"  # one migration step (one write transaction on one LMDB)
    STAMP = "stamp"  # marker set without running migrations
    BACKUP = "backup"  # a verified backup was taken
    ROLLBACK = "rollback"  # a backup was restored


class Result(enum.Enum):
    OK = "ok"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NOOP = "noop"  # e.g. restoring a backup that is already in place


def now_iso() -> str:
    """UTC wall-clock time for humans and for the audit trail (never used for deadlines)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Entry:
    """One history line. Fields that do not apply to a kind stay None."""

    kind: Kind
    result: Result
    start: str
    end: str
    lmdb: str | None = None
    instance: str | None = None
    from_version: int | None = None
    to_version: int | None = None
    migration: str | None = None  # file stem, e.g. 0003_split_names
    migration_version: int | None = None  # the VERSION of that file
    checksum: str | None = None  # sha256 of the migration file as it ran
    keys: int | None = None  # entries written by the step
    bytes: int | None = None  # value bytes written by the step
    backup_id: str | None = None
    message: str | None = None  # error message, or a note
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "result": self.result.value}
        for name in (
            "start",
            "end",
            "lmdb",
            "instance",
            "from_version",
            "to_version",
            "migration",
            "migration_version",
            "checksum",
            "keys",
            "bytes",
            "backup_id",
            "message",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        def opt_int(name: str) -> int | None:
            value = data.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            return value

        def opt_str(name: str) -> str | None:
            value = data.get(name)
            if value is None:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
            return value

        extra = data.get("extra") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be an object, got {extra!r}")
        return cls(
            kind=Kind(data["kind"]),
            result=Result(data["result"]),
            start=str(data.get("start", "")),
            end=str(data.get("end", "")),
            lmdb=opt_str("lmdb"),
            instance=opt_str("instance"),
            from_version=opt_int("from_version"),
            to_version=opt_int("to_version"),
            migration=opt_str("migration"),
            migration_version=opt_int("migration_version"),
            checksum=opt_str("checksum"),
            keys=opt_int("keys"),
            bytes=opt_int("bytes"),
            backup_id=opt_str("backup_id"),
            message=opt_str("message"),
            extra=extra,
        )


@dataclass(frozen=True, slots=True)
class History:
    entries: tuple[Entry, ...]
    torn_lines: tuple[int, ...] = ()  # line numbers left torn by a crash mid-append (skipped)


def append(path: str | os.PathLike[str], entry: Entry) -> None:
    """Append one entry durably (write + fsync; the directory is fsynced when the file is new)."""
    append_many(path, [entry])


def append_many(path: str | os.PathLike[str], entries: Iterable[Entry]) -> None:
    p = Path(path)
    lines = "".join(json.dumps(e.to_json(), sort_keys=True, separators=(",", ":")) + "\n" for e in entries)
    if not lines:
        return
    ensure_private_dir(p.parent)  # the state dir: 0700 whatever the umask
    created = not p.exists()
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(p) != b"\n":
            # A crash tore the previous last line; start ours on a fresh line so it stays readable.
            lines = "\n" + lines
        data = lines.encode("utf-8")
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(p.parent)


def _last_byte(p: Path) -> bytes:
    with p.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_NUL_AND_WHITESPACE = b"\x00 \t\r\x0b\x0c"


def read(path: str | os.PathLike[str]) -> History:
    """Read the whole history. A missing file is an empty history.

    Raises ConfigError naming the file and line for a bad line that is not the last one.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return History(entries=())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the migration history: {exc.strerror}") from exc
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")
    if complete:
        lines = lines[:-1]  # the empty string after the final newline
    entries: list[Entry] = []
    torn: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not line.strip(_NUL_AND_WHITESPACE):
            # A crash-lost append that the filesystem kept as zeros (ext4 delayed allocation): torn,
            # wherever it is, since later appends start on a fresh line after it.
            torn.append(number)
            continue
        try:
            data = json.loads(line.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            entries.append(Entry.from_json(data))
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            last_unterminated = number == len(lines) and not complete
            if last_unterminated or _is_json_prefix(line):
                # What a crash mid-append leaves: the start of an object that never closes (when
                # later appends followed, it sits on its own line thanks to the fresh-line rule).
                torn.append(number)
                continue
            raise ConfigError(
                f"{p}:{number}: bad history line ({exc}); the file is append-only: restore it from a "
                "backup or fix the line by hand"
            ) from None
    return History(entries=tuple(entries), torn_lines=tuple(torn))


def _is_json_prefix(line: bytes) -> bool:
    """True when ``line`` is an unterminated JSON object: a proper prefix of one, never closed."""
    text = line.strip()
    if not text.startswith(b"{"):
        return False
    depth = 0
    in_string = False
    escaped = False
    for byte in text:
        ch = chr(byte)
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return False  # a complete value: corrupt, not torn
    return depth > 0


def applied_checksums(entries: Iterable[Entry]) -> dict[int, str]:
    """migration version -> sha256 of the file that ran, for migrations still applied.

    A rollback to version V un-applies every migration above V (the backup restored the data from
    before them), so a fixed migration file may run again after a rollback without a checksum error.
    """
    applied: dict[int, str] = {}
    for entry in entries:
        if entry.result is not Result.OK:
            continue
        if entry.kind is Kind.MIGRATE and entry.migration_version is not None and entry.checksum:
            applied[entry.migration_version] = entry.checksum
        elif entry.kind is Kind.ROLLBACK and entry.to_version is not None:
            for version in [v for v in applied if v > entry.to_version]:
                del applied[version]
    return applied

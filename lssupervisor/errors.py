"""Errors a person reads, and the exit codes they map to.

Every error that reaches a user is one line: what was wrong, where (file, dotted key, migration,
LMDB) and what to do next. A traceback is printed only for bugs (anything not in this tree).

Exception tree::

    SupervisorError                 base of every expected failure; carries an exit code
    ├── UsageError                  bad command line                              (EX_USAGE)
    ├── ConfigError                 our YAML, the LS template, the environment    (EX_CONFIG)
    │   ├── TemplateError           the LS template renders to something LS would misread
    │   └── UntrustedInput          a file that decides what runs could be written by others (I8)
    ├── LockHeld                    another lssupervisor owns the state dir / LMDBs (EX_LOCKED)
    ├── MigrationError              a migration could not be loaded, planned or run (EX_MIGRATION)
    │   ├── MigrationLoadError      bad file name, gap, duplicate, import error, unsafe ownership
    │   ├── ChecksumMismatch        an applied migration file changed since it ran
    │   ├── UnmarkedDatabase        non-empty LMDB without a marker and no baseline configured
    │   ├── VerificationFailed      the verifier rejected what a step wrote (step rolled back)
    │   ├── MapFull                 the LMDB map is too small for the step (step rolled back)
    │   └── MigrationCancelled      cancelled by the operator (step rolled back)
    ├── SchemaTooNew                the LMDB is newer than the newest migration we know (EX_TOO_NEW)
    ├── BackupError                 backup or restore failed; nothing was written (EX_MIGRATION)
    ├── LightningStreamRunning      LS still runs where it must not (EX_LS_RUNNING)
    ├── StorageError                the shared storage (s3 bucket, fs root) cannot be read or written
    │                                                                              (STORAGE)
    ├── Refused                     `prune` refuses: the fleet is not done with what it would delete
    │                                                                              (REFUSED)
    ├── NotRunning                  a control command found no daemon to talk to  (NOT_RUNNING)
    ├── NotConfirmed                the daemon got the request but did not confirm it in time
    │                                                                              (UNCONFIRMED)
    └── WorkerError                 a worker process died or spoke nonsense (EX_SOFTWARE)

Across the worker protocol an error travels as its :class:`ErrorCode` (never a class name) and, when a
person has something to do about it, a :class:`Remedy`: a structured piece of advice that each side
words for its own context. The offline CLI says "run `lssupervisor stamp N`"; the daemon, whose lock
makes that command refuse, says "stop lssupervisor, run `lssupervisor stamp N`, then start it"
(:mod:`lssupervisor.core.reasons`). Rewording one never changes the other.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes. Documented in docs/operations.md; the systemd unit lists the fail-closed
    ones in RestartPreventExitStatus= so systemd does not restart into the same failure."""

    OK = 0
    SOFTWARE = 1  # a bug or an unexpected internal error (restartable)
    NOT_RUNNING = 3  # `status`/`reload`/...: no daemon runs (LSB's "program is not running")
    USAGE = 64  # EX_USAGE: bad command line
    CONFIG = 78  # EX_CONFIG: configuration or template invalid (fail closed)
    LOCKED = 75  # EX_TEMPFAIL: another supervisor holds the lock (restartable later)
    MIGRATION = 65  # EX_DATAERR: a migration failed and we were told to exit (fail closed)
    PARKED = 66  # LS parked waiting for an operator and the daemon was asked to exit (fail closed)
    TOO_NEW = 67  # the LMDB schema is newer than this application knows (fail closed)
    LS_RUNNING = 68  # an LS process is running where it must not (fail closed)
    # EX_UNAVAILABLE: `pause` delivered its request (flag written, SIGUSR1 sent) but the daemon did not
    # report PAUSED in time; the outcome is unknown, not a bug. Never from `run`, so the units'
    # RestartPreventExitStatus= does not list it.
    UNCONFIRMED = 69
    # EX_IOERR: the shared storage (bucket, fs root) could not be listed, read or written: `check`'s
    # probe, `fleet --storage`, `prune`. Never from `run` (the daemon's fleet view only logs it).
    STORAGE = 74
    # EX_NOPERM: `prune` refused because an instance still needs what it would delete (a straggler, a
    # young object, a marker below N). Never from `run`.
    REFUSED = 77


class ErrorCode(enum.Enum):
    """What kind of failure, as the worker protocol and the core see it (one per exception class)."""

    FAILED = "failed"  # SupervisorError itself
    USAGE = "usage"
    CONFIG = "config"
    TEMPLATE = "template"
    UNTRUSTED = "untrusted"
    LOCKED = "locked"
    MIGRATION = "migration"
    MIGRATION_LOAD = "migration-load"
    CHECKSUM_MISMATCH = "checksum-mismatch"
    UNMARKED = "unmarked"
    VERIFICATION = "verification"
    MAP_FULL = "map-full"
    CANCELLED = "cancelled"
    TOO_NEW = "too-new"
    BACKUP = "backup"
    LS_RUNNING = "ls-running"
    NOT_RUNNING = "not-running"
    STORAGE = "storage"
    REFUSED = "refused"
    NOT_CONFIRMED = "not-confirmed"
    WORKER = "worker"  # a worker died or spoke nonsense
    INTERNAL = "internal"  # an unexpected exception in the worker: a bug


class Remedy(enum.Enum):
    """What a person can do about an error, worded by the side that shows it."""

    STAMP = "stamp"  # the marker is unreadable or names another instance: stamp the right version
    BASELINE_OR_STAMP = "baseline-or-stamp"  # data without a marker: say which version it is


def offline_advice(remedy: Remedy) -> str:
    """The remedy for a person at a shell with the daemon stopped (the offline commands)."""
    match remedy:
        case Remedy.STAMP:
            return "fix it with `lssupervisor stamp N`"
        case Remedy.BASELINE_OR_STAMP:
            return (
                "if its data is at schema version N, run `lssupervisor stamp N` (or set schema.baseline: N)"
            )


class SupervisorError(Exception):
    """An expected failure with a one-line message for a person. ``remedy``: structured advice,
    appended (worded for the offline commands) by ``str()``; ``message`` is the bare fact."""

    exit_code: ExitCode = ExitCode.SOFTWARE
    code: ErrorCode = ErrorCode.FAILED

    def __init__(self, message: str, *, remedy: Remedy | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        if self.remedy is None:
            return self.message
        return f"{self.message}; {offline_advice(self.remedy)}"


class UsageError(SupervisorError):
    code = ErrorCode.USAGE
    exit_code = ExitCode.USAGE


class ConfigError(SupervisorError):
    code = ErrorCode.CONFIG
    exit_code = ExitCode.CONFIG


class TemplateError(ConfigError):
    code = ErrorCode.TEMPLATE


class UntrustedInput(ConfigError):
    """Our config, the template, the target file, a migration or a hook could be written by a user
    other than root or ours (see :mod:`lssupervisor.trust`)."""

    code = ErrorCode.UNTRUSTED


class LockHeld(SupervisorError):
    code = ErrorCode.LOCKED
    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, holder_pid: int | None = None, *, remedy: Remedy | None = None) -> None:
        super().__init__(message, remedy=remedy)
        self.holder_pid = holder_pid


class MigrationError(SupervisorError):
    code = ErrorCode.MIGRATION
    exit_code = ExitCode.MIGRATION


class MigrationLoadError(MigrationError):
    code = ErrorCode.MIGRATION_LOAD


class ChecksumMismatch(MigrationError):
    code = ErrorCode.CHECKSUM_MISMATCH


class UnmarkedDatabase(MigrationError):
    code = ErrorCode.UNMARKED


class VerificationFailed(MigrationError):
    code = ErrorCode.VERIFICATION


class MapFull(MigrationError):
    code = ErrorCode.MAP_FULL

    def __init__(
        self, message: str, needed_bytes: int | None = None, *, remedy: Remedy | None = None
    ) -> None:
        super().__init__(message, remedy=remedy)
        self.needed_bytes = needed_bytes


class MigrationCancelled(MigrationError):
    code = ErrorCode.CANCELLED


class SchemaTooNew(SupervisorError):
    code = ErrorCode.TOO_NEW
    exit_code = ExitCode.TOO_NEW


class BackupError(SupervisorError):
    code = ErrorCode.BACKUP
    exit_code = ExitCode.MIGRATION


class LightningStreamRunning(SupervisorError):
    code = ErrorCode.LS_RUNNING
    exit_code = ExitCode.LS_RUNNING


class StorageError(SupervisorError):
    code = ErrorCode.STORAGE
    exit_code = ExitCode.STORAGE


class Refused(SupervisorError):
    code = ErrorCode.REFUSED
    exit_code = ExitCode.REFUSED


class NotRunning(SupervisorError):
    code = ErrorCode.NOT_RUNNING
    exit_code = ExitCode.NOT_RUNNING


class NotConfirmed(SupervisorError):
    code = ErrorCode.NOT_CONFIRMED
    exit_code = ExitCode.UNCONFIRMED


class WorkerError(SupervisorError):
    code = ErrorCode.WORKER
    exit_code = ExitCode.SOFTWARE


def _all_subclasses(cls: type[SupervisorError]) -> list[type[SupervisorError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_for(
    code: ErrorCode, message: str, *, remedy: Remedy | None = None, exit_code: int | None = None
) -> SupervisorError:
    """The exception for an error that crossed the worker protocol (``code`` picks the class)."""
    classes = {c.code: c for c in _all_subclasses(SupervisorError) if c.__module__ == __name__}
    cls = classes.get(code, WorkerError)
    exc = cls(message, remedy=remedy)
    if exit_code is not None and exit_code != int(exc.exit_code):
        try:
            exc.exit_code = ExitCode(exit_code)
        except ValueError:
            pass
    return exc

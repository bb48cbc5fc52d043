"""Errors a person reads, and the exit codes they map to.

Every error that reaches a user is one line: what was wrong, where (file, dotted key, migration,
LMDB) and what to do next. A traceback is printed only for bugs (anything not in this tree).

Exception tree::

    SupervisorError                 base of every expected failure; carries an exit code
    ├── UsageError                  bad command line                              (EX_USAGE)
    ├── ConfigError                 our YAML, the LS template, the environment    (EX_CONFIG)
    │   └── TemplateError           the LS template renders to something LS would misread
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
    ├── NotRunning                  a control command found no daemon to talk to  (NOT_RUNNING)
    ├── NotConfirmed                the daemon got the request but did not confirm it in time
    │                                                                              (UNCONFIRMED)
    └── WorkerError                 a worker process died or spoke nonsense (EX_SOFTWARE)
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


class SupervisorError(Exception):
    """An expected failure with a one-line message for a person."""

    exit_code: ExitCode = ExitCode.SOFTWARE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(SupervisorError):
    exit_code = ExitCode.USAGE


class ConfigError(SupervisorError):
    exit_code = ExitCode.CONFIG


class TemplateError(ConfigError):
    pass


class LockHeld(SupervisorError):
    exit_code = ExitCode.LOCKED

    def __init__(self, message: str, holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class MigrationError(SupervisorError):
    exit_code = ExitCode.MIGRATION


class MigrationLoadError(MigrationError):
    pass


class ChecksumMismatch(MigrationError):
    pass


class UnmarkedDatabase(MigrationError):
    pass


class VerificationFailed(MigrationError):
    pass


class MapFull(MigrationError):
    def __init__(self, message: str, needed_bytes: int | None = None) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes


class MigrationCancelled(MigrationError):
    pass


class SchemaTooNew(SupervisorError):
    exit_code = ExitCode.TOO_NEW


class BackupError(SupervisorError):
    exit_code = ExitCode.MIGRATION


class LightningStreamRunning(SupervisorError):
    exit_code = ExitCode.LS_RUNNING


class NotRunning(SupervisorError):
    exit_code = ExitCode.NOT_RUNNING


class NotConfirmed(SupervisorError):
    exit_code = ExitCode.UNCONFIRMED


class WorkerError(SupervisorError):
    exit_code = ExitCode.SOFTWARE

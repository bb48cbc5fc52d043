"""Events: frozen, past-tense facts the main loop feeds to the pure core.

Producers: signal handlers (through :class:`SignalReceived`, translated by the shell), the shell itself
(results of the actions it executed: ``ConfigPrepared``, ``ChildSpawned``...), the health poller thread
(``ChildReady``) and the loop's own wake-ups (``Tick``). Threads and handlers only ``put_nowait`` these
on the loop's queue; only the loop thread calls the core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lssupervisor.core.states import Task
from lssupervisor.errors import ErrorCode, ExitCode, Remedy


@dataclass(frozen=True, slots=True)
class Booted:
    """The daemon holds its locks and is ready to act. ``paused``: the persisted pause flag."""

    paused: bool = False
    target_version: int | None = None


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    """SIGTERM/SIGINT (or the equivalent from a test). A second one while stopping kills LS now."""

    signal: str = "SIGTERM"


@dataclass(frozen=True, slots=True)
class ReloadRequested:
    """SIGHUP: reload our config and the LS template, then reconcile. ``paused``: the flag, re-read."""

    paused: bool = False


@dataclass(frozen=True, slots=True)
class ReconcileRequested:
    """SIGUSR1 (``reconcile``, ``pause``, ``resume``), later the file watcher: reconcile with the
    config we have. ``paused``: the persisted flag as read when the request arrived."""

    paused: bool = False
    source: str = "SIGUSR1"


@dataclass(frozen=True, slots=True)
class StatusRequested:
    """SIGUSR2: log one status line."""


@dataclass(frozen=True, slots=True)
class ConfigPrepared:
    """The LS config was rendered (in memory) for ``version``. ``digest`` identifies rendered text +
    argv + env: equal digests mean LS would run exactly the same way."""

    digest: str
    version: int
    wait_for_health: bool
    target_version: int | None = None


@dataclass(frozen=True, slots=True)
class ConfigFailed:
    """Loading our config, the template or the migrations, or rendering failed. ``message`` is the
    one-line error; ``what`` names the stage for the log line ("cannot load the migrations");
    ``exit_code``: the daemon's exit code when this happens at boot (nothing to keep running)."""

    message: str
    what: str = "cannot render the LS config"
    exit_code: ExitCode = ExitCode.CONFIG


@dataclass(frozen=True, slots=True)
class ChildSpawned:
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    """LS could not be started at all (binary missing, not executable, config file not writable)."""

    message: str


@dataclass(frozen=True, slots=True)
class ChildReady:
    """LS reported ``startup_<db>`` true for every db on /healthz."""

    pid: int


@dataclass(frozen=True, slots=True)
class ChildExited:
    """Our LS process ended (and its group is gone). ``description``: "exit 1", "killed by SIGTERM".
    ``last_line``: LS's last output line, when the shell reads LS's output (``output: prefix``)."""

    pid: int
    returncode: int
    description: str
    last_line: str | None = None


# -- results of the reconcile cycle's jobs (the shell translates worker messages into these) ----------


@dataclass(frozen=True, slots=True)
class Planned:
    """The plan worker read the markers and planned current -> target.

    ``render_version``: the one version every LMDB is marked with (what the LS config gets, I2); None
    when an LMDB is unmarked (empty: stamped by the cycle) or they differ. ``writes``: the cycle must
    write the LMDB (migration steps, or a stamp). ``steps``: one line per step for logs and status."""

    render_version: int | None
    target: int
    writes: bool
    steps: tuple[str, ...] = ()
    markers: tuple[tuple[str, int | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Imported:
    """IMPORTING finished: the worker compiled and ran the migrations' module code (LS still runs)."""

    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """The job named by ``task`` failed (a worker error, a hook or drain that could not start...).
    ``code`` says what kind of failure; ``remedy`` what a person can do (worded by the core for the
    daemon's context, :mod:`lssupervisor.core.reasons`)."""

    task: Task
    code: ErrorCode
    message: str
    backup_id: str | None = None  # migrate: the backup taken before the first write, if any
    remedy: Remedy | None = None


@dataclass(frozen=True, slots=True)
class GoneProven:
    """PROVING finished: ``remaining`` are LS pids that still live (empty: proven gone)."""

    remaining: tuple[int, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DrainFinished:
    returncode: int
    description: str


@dataclass(frozen=True, slots=True)
class HookFinished:
    phase: str  # "pre" | "post"
    index: int
    ok: bool
    message: str = ""


class Stage(enum.Enum):
    """Where a migration is (the core moves the sub-step and arms the step's time limit on changes)."""

    BACKUP = "backup"
    MIGRATE = "migrate"  # inside step ``step`` (its transaction is open)
    COMMITTED = "committed"  # step ``step`` committed


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """A progress report of the migration: ``text`` is for people ("migrating main 2→3: 45%")."""

    stage: Stage
    text: str
    step: int = 0  # index of the step in the plan (MIGRATE, COMMITTED)


@dataclass(frozen=True, slots=True)
class Migrated:
    """The migrate worker succeeded (steps committed, markers moved, backup taken if enabled)."""

    backup_id: str | None = None
    steps: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MarkersRead:
    """VERIFYING: the markers read back after the migrate worker ended (success or not)."""

    markers: tuple[tuple[str, int | None], ...]


@dataclass(frozen=True, slots=True)
class FileChanged:
    """The watcher saw a watched file change (observer thread). ``ours``: our own config file (a
    reload, not just a reconcile). Debounced by the core."""

    path: str
    ours: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """The loop woke up (a deadline passed, or the 1 s backstop). Deadlines are checked against now."""


Event = (
    Booted
    | ShutdownRequested
    | ReloadRequested
    | ReconcileRequested
    | StatusRequested
    | ConfigPrepared
    | ConfigFailed
    | ChildSpawned
    | SpawnFailed
    | ChildReady
    | ChildExited
    | Planned
    | TaskFailed
    | Imported
    | GoneProven
    | DrainFinished
    | HookFinished
    | MigrationProgress
    | Migrated
    | MarkersRead
    | FileChanged
    | Tick
)


@dataclass(frozen=True, slots=True)
class SignalReceived:
    """Put on the queue by a signal handler; the shell translates it into one of the events above
    (reading the pause flag for HUP/USR1 outside the handler). SIGCHLD only wakes the loop."""

    signum: int

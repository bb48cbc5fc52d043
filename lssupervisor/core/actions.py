"""Actions: frozen commands the pure core returns and the shell executes, in order.

The shell feeds results back as events (``PrepareConfig`` -> ``ConfigPrepared``/``ConfigFailed``,
``SpawnChild`` -> ``ChildSpawned``/``SpawnFailed``). Timers are not actions: the core derives its next
deadline from its state (:meth:`lssupervisor.core.lifecycle.Lifecycle.next_deadline`), so no timer can be
left armed by mistake, and the loop sends a ``Tick`` when it wakes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lssupervisor.core.states import State, Substep
from lssupervisor.errors import ExitCode


@dataclass(frozen=True, slots=True)
class SweepOrphans:
    """Before the first LS starts: kill an LS left by an earlier run (recorded pid + create_time, or an
    LS whose command line names our rendered config)."""


@dataclass(frozen=True, slots=True)
class PrepareConfig:
    """Load (``reload``: re-read our config file too) the template, the migrations and the target, then
    start the plan worker (markers + plan). Result: ``Planned`` or ``TaskFailed(plan)``, or
    ``ConfigFailed`` when loading failed (the old config, template and migrations are kept). A shell
    without migrations may answer ``ConfigPrepared`` at once."""

    reload: bool


@dataclass(frozen=True, slots=True)
class RenderConfig:
    """Render the LS config for ``version`` (the marker, I2) in memory, check it (our checks, and
    ``LS -c candidate`` when it differs from the running one): ``ConfigPrepared`` or ``ConfigFailed``."""

    version: int


@dataclass(frozen=True, slots=True)
class ImportMigrations:
    """Have the cycle's worker load the migrations' code while LS still runs: ``Imported`` or
    ``TaskFailed(import)``."""

    target: int


@dataclass(frozen=True, slots=True)
class ProveGone:
    """LS is stopped: prove it (group empty, no process naming our config, no LS pid among the LMDB
    readers, via a ``readers`` request to the cycle's worker): ``GoneProven``."""


@dataclass(frozen=True, slots=True)
class StartDrain:
    """Render the config for ``version`` (the OLD one) and run ``LS --config it sync --only-once
    --timeout T``: ``DrainFinished``."""

    version: int


@dataclass(frozen=True, slots=True)
class RunHook:
    """Run hook ``index`` of ``phase`` (``hooks.pre_migrate`` / ``hooks.post_migrate``): ``HookFinished``."""

    phase: str
    index: int
    from_version: int | None
    to_version: int


@dataclass(frozen=True, slots=True)
class StartMigration:
    """Start the ``migrate`` worker (backup, steps, history) toward ``target``: ``MigrationProgress``*,
    then ``Migrated`` or ``TaskFailed(migrate)``."""

    target: int


@dataclass(frozen=True, slots=True)
class ReadMarkers:
    """Start a ``markers`` worker: ``MarkersRead`` or ``TaskFailed(verify)``."""


@dataclass(frozen=True, slots=True)
class CancelTask:
    """Cancel the job in flight (SIGKILL a worker: its open write transaction aborts; SIGKILL the drain
    LS's group or the hook). Its result, if any, arrives later and is ignored as stale."""

    reason: str


@dataclass(frozen=True, slots=True)
class ShowProgress:
    """Migration progress for people: status (state.json, HTTP), sdnotify ``STATUS=``, and
    ``EXTEND_TIMEOUT_USEC`` while a start-up migration runs (``startup``)."""

    text: str
    startup: bool


@dataclass(frozen=True, slots=True)
class SpawnChild:
    """Write the prepared config (atomically), raise the PID floor, start LS, start readiness polling."""

    digest: str
    reason: str


@dataclass(frozen=True, slots=True)
class SignalGroup:
    """SIGTERM to LS's process group (LS has no handler: it dies at once, which is fine)."""

    pid: int


@dataclass(frozen=True, slots=True)
class KillGroup:
    """SIGKILL to LS's process group."""

    pid: int


@dataclass(frozen=True, slots=True)
class AnnounceState:
    """A transition: log one stable line, rewrite state.json, tell systemd and the HTTP server."""

    old: State
    new: State
    reason: str | None
    pid: int | None
    substep: Substep | None = None


@dataclass(frozen=True, slots=True)
class WriteState:
    """Something visible in status changed without a transition: rewrite state.json."""


class NotifyKind(enum.Enum):
    READY = "ready"
    STOPPING = "stopping"
    RELOADING = "reloading"


@dataclass(frozen=True, slots=True)
class Notify:
    kind: NotifyKind


class Level(enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log line the core wants written (a failed reload, a SIGKILL...)."""

    level: Level
    msg: str


@dataclass(frozen=True, slots=True)
class LogStatus:
    """SIGUSR2: one status line in the log."""


@dataclass(frozen=True, slots=True)
class Exit:
    code: ExitCode


Action = (
    SweepOrphans
    | PrepareConfig
    | RenderConfig
    | ImportMigrations
    | ProveGone
    | StartDrain
    | RunHook
    | StartMigration
    | ReadMarkers
    | CancelTask
    | ShowProgress
    | SpawnChild
    | SignalGroup
    | KillGroup
    | AnnounceState
    | WriteState
    | Notify
    | LogLine
    | LogStatus
    | Exit
)

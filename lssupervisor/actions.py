"""Actions: frozen commands the pure core returns and the shell executes, in order.

The shell feeds results back as events (``PrepareConfig`` -> ``ConfigPrepared``/``ConfigFailed``,
``SpawnChild`` -> ``ChildSpawned``/``SpawnFailed``). Timers are not actions: the core derives its next
deadline from its state (:meth:`lssupervisor.lifecycle.Lifecycle.next_deadline`), so no timer can be
left armed by mistake, and the loop sends a ``Tick`` when it wakes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lssupervisor.errors import ExitCode
from lssupervisor.states import State, Substep


@dataclass(frozen=True, slots=True)
class SweepOrphans:
    """Before the first LS starts: kill an LS left by an earlier run (recorded pid + create_time, or an
    LS whose command line names our rendered config)."""


@dataclass(frozen=True, slots=True)
class PrepareConfig:
    """Load (``reload``: re-read our config file too) the template, find the version to render (the
    LMDB's marker, I2), render in memory and report ``ConfigPrepared`` or ``ConfigFailed``."""

    reload: bool


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

"""Events: frozen, past-tense facts the main loop feeds to the pure core.

Producers: signal handlers (through :class:`SignalReceived`, translated by the shell), the shell itself
(results of the actions it executed: ``ConfigPrepared``, ``ChildSpawned``...), the health poller thread
(``ChildReady``) and the loop's own wake-ups (``Tick``). Threads and handlers only ``put_nowait`` these
on the loop's queue; only the loop thread calls the core.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """Loading our config, the template, or rendering failed. ``message`` is the one-line error."""

    message: str


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
    """Our LS process ended (and its group is gone). ``description``: "exit 1", "killed by SIGTERM"."""

    pid: int
    returncode: int
    description: str


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
    | Tick
)


@dataclass(frozen=True, slots=True)
class SignalReceived:
    """Put on the queue by a signal handler; the shell translates it into one of the events above
    (reading the pause flag for HUP/USR1 outside the handler). SIGCHLD only wakes the loop."""

    signum: int

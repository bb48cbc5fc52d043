"""Which event is legal where, and what each job's result leads to: the core's rules as data.

After h11's ``_state.py``: :meth:`lssupervisor.core.lifecycle.Lifecycle.handle` checks every event
against these tables ONCE, before any handler runs, and the states x events tests read the same tables.

- :data:`ACCEPTS`: the events each state accepts. Anything else is a bug in the shell (a spawn result
  nobody asked for, a config result outside RECONCILING) and raises ``LifecycleError``. Handlers may
  still refuse on data (a ``ChildExited`` for a pid that is not ours).
- :data:`RESULT_OF`: the jobs (``Task``) whose result an event is. Such an event is applied only while
  the state is RECONCILING and ``state.task`` is one of them; otherwise it is the late result of a job
  that was cancelled, and is ignored (stale) in every state.
- :data:`CYCLE` and :data:`TASK_OF`: the reconcile cycle's sub-steps in order, and the job each one
  waits for. The cycle never goes back in this order except DRAINING -> PROVING (the drain LS had the
  LMDB open too) and BACKING_UP <-> MIGRATING within one migrate job.
"""

from __future__ import annotations

from collections.abc import Mapping

from lssupervisor.core.events import (
    Booted,
    ChildExited,
    ChildReady,
    ChildSpawned,
    ConfigFailed,
    ConfigPrepared,
    DrainFinished,
    Event,
    FileChanged,
    GoneProven,
    HookFinished,
    Imported,
    MarkersRead,
    Migrated,
    MigrationProgress,
    Planned,
    ReconcileRequested,
    ReloadRequested,
    ShutdownRequested,
    SpawnFailed,
    StatusRequested,
    TaskFailed,
    Tick,
)
from lssupervisor.core.states import State, Substep, Task

EventType = type[Event]

# Operators, the watcher, the clock and the readiness poller act in every state (a readiness report
# may be stale: that LS already exited).
ALWAYS: frozenset[EventType] = frozenset(
    {ShutdownRequested, ReloadRequested, ReconcileRequested, StatusRequested, FileChanged, Tick, ChildReady}
)

RESULT_OF: Mapping[EventType, frozenset[Task]] = {
    Planned: frozenset({Task.PLAN}),
    Imported: frozenset({Task.IMPORT}),
    GoneProven: frozenset({Task.PROVE}),
    DrainFinished: frozenset({Task.DRAIN}),
    HookFinished: frozenset({Task.HOOK}),
    MigrationProgress: frozenset({Task.MIGRATE}),
    Migrated: frozenset({Task.MIGRATE}),
    MarkersRead: frozenset({Task.VERIFY}),
    TaskFailed: frozenset(Task) - {Task.RENDER},  # rendering answers ConfigFailed
}
RESULTS: frozenset[EventType] = frozenset(RESULT_OF)

# The shell answers these at once, inside the action that asked: they are never stale.
CONFIG_RESULTS: frozenset[EventType] = frozenset({ConfigPrepared, ConfigFailed})
CONFIG_TASKS: frozenset[Task | None] = frozenset({Task.PLAN, Task.RENDER, None})
SPAWN_RESULTS: frozenset[EventType] = frozenset({ChildSpawned, SpawnFailed})

_COMMON = ALWAYS | RESULTS
ACCEPTS: Mapping[State, frozenset[EventType]] = {
    State.STOPPED: _COMMON | {Booted},
    # A spawn is asked for from RECONCILING (settle), BACKOFF (retry) and STOPPING (a restart after
    # the stop); its result arrives in the same state.
    State.RECONCILING: _COMMON | CONFIG_RESULTS | SPAWN_RESULTS | {ChildExited},
    State.BACKOFF: _COMMON | SPAWN_RESULTS,
    State.STOPPING: _COMMON | SPAWN_RESULTS | {ChildExited},
    State.STARTING: _COMMON | {ChildExited},
    State.RUNNING: _COMMON | {ChildExited},
    # An LS that survived SIGKILL may finally exit while we are parked (or paused while parked).
    State.PAUSED: _COMMON | {ChildExited},
    State.PARKED: _COMMON | {ChildExited},
}

CYCLE: tuple[Substep, ...] = (
    Substep.PLANNING,
    Substep.IMPORTING,
    Substep.PROVING,
    Substep.DRAINING,
    Substep.PRE_HOOKS,
    Substep.BACKING_UP,
    Substep.MIGRATING,
    Substep.VERIFYING,
    Substep.POST_HOOKS,
    Substep.RENDERING,
)

TASK_OF: Mapping[Substep, Task] = {
    Substep.PLANNING: Task.PLAN,
    Substep.IMPORTING: Task.IMPORT,
    Substep.PROVING: Task.PROVE,
    Substep.DRAINING: Task.DRAIN,
    Substep.PRE_HOOKS: Task.HOOK,
    Substep.BACKING_UP: Task.MIGRATE,
    Substep.MIGRATING: Task.MIGRATE,
    Substep.VERIFYING: Task.VERIFY,
    Substep.POST_HOOKS: Task.HOOK,
    Substep.RENDERING: Task.RENDER,
}

# Sub-steps that run while LS may still run (everything else needs LS stopped and proven gone, I1).
LS_MAY_RUN: frozenset[Substep] = frozenset({Substep.PLANNING, Substep.IMPORTING, Substep.RENDERING})


def accepts(state: State, event: Event) -> bool:
    return type(event) in ACCEPTS[state]


def is_stale(task: Task | None, state: State, event: Event) -> bool:
    """A job's result that nobody waits for any more (its job was cancelled or superseded)."""
    tasks = RESULT_OF.get(type(event))
    if tasks is None:
        return False
    return state is not State.RECONCILING or task not in tasks

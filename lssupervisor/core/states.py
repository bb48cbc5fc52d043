"""The supervisor's states and the value the pure core (:mod:`lssupervisor.core.lifecycle`) works on.

Actual state (``State``, the child, the stop in progress, the backoff) is kept apart from desired state
(``Desired``: run, pause or shut down, and the target version), like supervisor's process state and
"mood". The core compares the two after every event and acts to close the gap.

Everything here is a frozen value: the core returns a new ``SupervisorState`` for every event, so the
shell can keep the old one to diff, and tests can build any situation from literals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lssupervisor.core.backoff import BackoffState
from lssupervisor.errors import ExitCode


class State(enum.Enum):
    """What the supervisor is doing. The names are what logs, state.json and metrics show."""

    STARTING = "STARTING"  # LS spawned, not ready yet (readiness or ready_timeout pending)
    RUNNING = "RUNNING"  # LS ready
    STOPPING = "STOPPING"  # SIGTERM sent to LS's group; SIGKILL at the deadline
    BACKOFF = "BACKOFF"  # LS failed; waiting before the next start
    RECONCILING = "RECONCILING"  # the reconcile cycle; the substep says where (see Substep)
    PAUSED = "PAUSED"  # LS held down by the operator (persisted flag)
    PARKED = "PARKED"  # LS down, waiting for an operator; the reason says why
    STOPPED = "STOPPED"  # not booted yet, or shut down (terminal)


class Substep(enum.Enum):
    """Sub-steps of RECONCILING, in cycle order (docs/reconcile.md; :data:`lssupervisor.core.tables.CYCLE`).
    Only PLANNING and RENDERING happen when there is nothing to migrate; PLANNING and IMPORTING run
    while LS still runs; PROVING to POST_HOOKS run with LS stopped (STOPPING purpose migration first)."""

    PLANNING = "PLANNING"  # load config, template, migrations; worker reads markers and plans
    IMPORTING = "IMPORTING"  # the worker loads the migrations' code (LS still runs; time-limited)
    PROVING = "PROVING"  # LS stopped: prove it gone (group empty, no LS pid among the LMDB readers)
    DRAINING = "DRAINING"  # optional `sync --only-once` on the OLD config
    PRE_HOOKS = "PRE_HOOKS"
    BACKING_UP = "BACKING_UP"  # the migrate worker's backup phase
    MIGRATING = "MIGRATING"  # the migrate worker's steps
    VERIFYING = "VERIFYING"  # a worker re-reads the markers: the version LS will get (I2)
    POST_HOOKS = "POST_HOOKS"
    RENDERING = "RENDERING"  # render for the marker version, validate, then start LS


class Task(enum.Enum):
    """The one asynchronous job the shell runs for the cycle (a request to the cycle's worker, the drain
    LS, a hook). Its result event is accepted only while ``SupervisorState.task`` names it: a cancelled
    job's late result is stale and ignored."""

    PLAN = "plan"
    IMPORT = "import"
    PROVE = "prove"
    DRAIN = "drain"
    HOOK = "hook"
    MIGRATE = "migrate"
    VERIFY = "verify"
    RENDER = "render"


class OnFailure(enum.Enum):
    """``schema.on_failure``: what a failed reconcile does with LS."""

    PARK = "park"  # LS stays down; an operator decides (status says what to run)
    RESUME = "resume"  # LS restarts on the version the LMDB has (safe by I2)


class Goal(enum.Enum):
    """Desired state, set by operators (signals, pause flag); the core moves actual state toward it."""

    RUN = "run"
    PAUSE = "pause"
    SHUTDOWN = "shutdown"


class StopPurpose(enum.Enum):
    """Why we are stopping LS. Every purpose is an intended stop: none triggers the restart policy (I5),
    except FAILED_START, where the start itself failed (not ready in time) and the stop merely cleans up."""

    SHUTDOWN = "shutdown"
    RESTART = "restart"  # the rendered config, argv or env changed
    PAUSE = "pause"
    FAILED_START = "failed-start"
    MIGRATION = "migration"  # the reconcile cycle needs the LMDB: continue with PROVING after the stop
    PARK = "park"  # a reconcile decided LS must stay down (schema too new...): PARKED after the stop


@dataclass(frozen=True, slots=True)
class Desired:
    goal: Goal = Goal.RUN
    target_version: int | None = None
    # How many TERM/INT we got: the second one while stopping means "SIGKILL now".
    shutdown_requests: int = 0


@dataclass(frozen=True, slots=True)
class Child:
    """The LS process we started (as far as the core knows it)."""

    pid: int
    digest: str  # identity of the rendered config + argv + env it was started with
    started_at: float  # monotonic
    wait_for_health: bool  # readiness from LS /healthz (else settle_time)
    ready: bool = False
    ready_at: float | None = None


@dataclass(frozen=True, slots=True)
class Stopping:
    purpose: StopPurpose
    reason: str
    term_at: float
    kill_at: float
    killed: bool = False
    give_up_at: float | None = None  # after SIGKILL: how long we wait before declaring LS unkillable


@dataclass(frozen=True, slots=True)
class Pending:
    """A reconcile requested while we could not start one (stopping LS, spawning)."""

    reload: bool  # HUP (reload our config) rather than USR1 (reconcile with the current one)


@dataclass(frozen=True, slots=True)
class Cycle:
    """A reconcile that writes the LMDB (migration steps, or a stamp of an unmarked LMDB)."""

    from_version: int | None  # the marker before (None: unmarked, to be stamped)
    target: int
    steps: tuple[str, ...]  # "main 1→2 (0002_users_json)", for logs and status
    startup: bool = False  # runs before LS was ever ready (systemd start: extend the timeout)
    drained: bool = False
    hook: int = 0  # index of the hook running (PRE_HOOKS / POST_HOOKS)
    migrated: bool = False  # the migrate worker reported success
    backup_id: str | None = None
    failure: str | None = None  # the migrate worker's error message (the LMDB is at some step k)
    version: int | None = None  # the marker read back in VERIFYING

    def describe(self) -> str:
        what = ", ".join(self.steps) if self.steps else "stamp"
        if self.from_version is not None:
            start = str(self.from_version)
        elif self.steps:
            start = "mixed"  # the LMDBs are at different versions; each step names its own from→to
        else:
            start = "unmarked"
        return f"{start}→{self.target} ({what})"


@dataclass(frozen=True, slots=True)
class SupervisorState:
    """Everything the pure core knows. Times are monotonic seconds from the injected clock."""

    state: State = State.STOPPED
    since: float = 0.0
    reason: str | None = None
    substep: Substep | None = None
    desired: Desired = field(default_factory=Desired)
    booted: bool = False
    # RECONCILING remembers where it came from, for a failed reload that keeps the old config, and what
    # started it ("reconcile (SIGUSR1)"): why LS starts afterwards, when it was not running.
    prior: State | None = None
    trigger: str | None = None
    # The config prepared by the last successful reconcile (the shell holds the text; we hold its id).
    digest: str | None = None
    version: int | None = None
    wait_for_health: bool = False
    spawn_pending: bool = False
    spawn_reason: str | None = None
    child: Child | None = None
    stopping: Stopping | None = None
    pending: Pending | None = None
    backoff: BackoffState = field(default_factory=BackoffState)
    retry_at: float | None = None
    park_reason: str | None = None
    # An LS that survived SIGKILL: while it exists no other LS may start and nothing migrates (I1),
    # whatever operators do.
    unkillable_pid: int | None = None
    starts: int = 0
    # Unintended LS exits (crash, failed start, not ready in time) since we started: what to alert on.
    failures_total: int = 0
    last_exit: str | None = None
    exit_code: ExitCode | None = None
    # The reconcile cycle (RECONCILING): the job in flight and, when the LMDB is written, the cycle.
    task: Task | None = None
    cycle: Cycle | None = None
    progress: str | None = None  # "migrating main 2→3: 45%"
    # The running job's time limit (import, each step of a migration, the backup), and its text for
    # the reason when it expires ("migrations.step_timeout (1h)"). None: no limit runs.
    task_deadline: float | None = None
    task_limit: str | None = None
    task_overdue: bool = False  # the limit expired and the job was cancelled
    progress_mark: tuple[str, int] | None = None  # (stage, step index) the deadline was armed for
    park_exit: ExitCode = ExitCode.PARKED  # exit code of a shutdown while PARKED (TOO_NEW...)
    # Debounced file-watch trigger: reconcile at this time (reload: our config file changed).
    watch_due_at: float | None = None
    watch_first_at: float | None = None  # first change of the current burst (bounds the debounce)
    watch_reload: bool = False

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def ready(self) -> bool:
        return self.child is not None and self.child.ready

    @property
    def restarts(self) -> int:
        """LS starts after the first one (crash restarts and config-change restarts alike)."""
        return max(0, self.starts - 1)

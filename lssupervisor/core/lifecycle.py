"""The pure lifecycle core: ``handle(state, event, now) -> (new_state, actions)``.

Theory of operation
-------------------
The daemon is a functional core inside an imperative shell. This module is the core: no I/O, no clock,
no processes. The shell (:mod:`lssupervisor.daemon.supervisor`) owns one :class:`SupervisorState`, feeds every
event through :meth:`Lifecycle.handle` with the monotonic time, executes the returned actions in order,
and feeds their results back as events. Randomness (backoff jitter) comes from an injected function,
so a test with a fixed RNG replays a whole history exactly.

Desired state (``state.desired``: run / pause / shutdown) is set by operator events; actual state is
everything else. After each event the core moves actual toward desired.

Transitions (each one emits exactly one ``AnnounceState``)::

    STOPPED      --Booted-->                 RECONCILING (SweepOrphans, PrepareConfig)
    RECONCILING  --ConfigPrepared/Failed-->  STARTING (via ChildSpawned) | RUNNING/STARTING (unchanged,
                                             LS keeps its pid) | STOPPING (changed, pause) | PAUSED |
                                             BACKOFF (a restart delay still runs) | PARKED | STOPPED
                                             (no config could ever be rendered: exit CONFIG)
    STARTING     --ChildReady / settle-->    RUNNING
    STARTING     --ready_timeout-->          STOPPING (purpose failed-start)
    STARTING, RUNNING --ChildExited-->       BACKOFF | PARKED (burst limit)   [restart policy armed]
    STARTING, RUNNING, BACKOFF, PAUSED, PARKED --HUP/USR1--> RECONCILING
    any with LS  --TERM/INT-->               STOPPING (purpose shutdown); without LS: STOPPED + Exit
    STOPPING     --stop_timeout-->           (SIGKILL, still STOPPING)
    STOPPING     --ChildExited-->            STOPPED+Exit | RECONCILING (a reconcile was requested
                                             meanwhile) | STARTING (restart) | PAUSED | BACKOFF/PARKED
                                             (failed start; when the restart policy gives up, a
                                             reconcile requested meanwhile then runs from PARKED)
    BACKOFF      --retry deadline-->         STARTING (via ChildSpawned)

An exit of LS is a failure only in STARTING/RUNNING (and RECONCILING); in STOPPING it is the stop we
asked for, whatever the return code (I5). Events that cannot happen in a state (a spawn result nobody
asked for, a config result outside RECONCILING, an exit without a child) raise :class:`LifecycleError`:
they are bugs in the shell. Stale facts that races can produce (readiness of an LS that already exited,
a signal after shutdown, the late result of a cancelled job) are ignored.

The reconcile cycle (RECONCILING's sub-steps) lives in :mod:`lssupervisor.core.cycle`, a mixin of
:class:`Lifecycle`. Which event is legal in which state, and which job an event answers, are tables in
:mod:`lssupervisor.core.tables`, checked once in :meth:`Lifecycle.handle`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import assert_never

from lssupervisor.core import reasons, tables
from lssupervisor.core.actions import (
    Action,
    AnnounceState,
    CancelTask,
    Exit,
    KillGroup,
    Level,
    LogLine,
    LogStatus,
    Notify,
    NotifyKind,
    PrepareConfig,
    SignalGroup,
    SpawnChild,
    SweepOrphans,
    WriteState,
)
from lssupervisor.core.backoff import (
    BackoffPolicy,
    BackoffState,
    GiveUp,
    Retry,
    record_failure,
    reset_deadline,
)
from lssupervisor.core.cycle import Cycle, CyclePolicy, LifecycleError
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
from lssupervisor.core.states import (
    Child,
    Desired,
    Goal,
    State,
    Stopping,
    StopPurpose,
    Substep,
    SupervisorState,
    Task,
)
from lssupervisor.errors import ExitCode

__all__ = ["CyclePolicy", "Lifecycle", "LifecycleError", "Timeouts"]

# After SIGKILL, how long LS may take to disappear before we say it is unkillable (D state, a
# kernel problem). Not configurable: SIGKILL cannot be caught, so this only covers stuck kernels.
KILL_GRACE_S = 5.0
# A burst of file changes is debounced, but reconciles at the latest this many debounce periods
# after its first change (a file rewritten every second must not hold a migration back forever).
DEBOUNCE_MAX_FACTOR = 10


@dataclass(frozen=True, slots=True)
class Timeouts:
    stop_timeout: float = 10.0
    ready_timeout: float = 300.0
    settle_time: float = 3.0
    kill_grace: float = KILL_GRACE_S


class Lifecycle(Cycle):
    """The core's parameters (timeouts, restart policy, RNG, the cycle's policy). Holds no state: the
    shell swaps in a new one when a reload changes the config."""

    def __init__(
        self,
        timeouts: Timeouts | None = None,
        policy: BackoffPolicy | None = None,
        rand: Callable[[], float] = random.random,
        cycle: CyclePolicy | None = None,
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.policy = policy or BackoffPolicy()
        self.rand = rand
        self.cycle = cycle or CyclePolicy()

    # -- entry points ------------------------------------------------------------------------------

    # Kept whole: a flat match, one case per event type (legality is in tables.py)
    def handle(self, st: SupervisorState, event: Event, now: float) -> tuple[SupervisorState, list[Action]]:  # noqa: PLR0912
        acts: list[Action] = []
        if not tables.accepts(st.state, event):
            raise LifecycleError(f"{type(event).__name__} in {st.state.value}: {event!r}")
        if tables.is_stale(st.task, st.state, event):
            return st, acts  # the late result of a job that was cancelled or superseded
        if type(event) in tables.CONFIG_RESULTS and (st.spawn_pending or st.task not in tables.CONFIG_TASKS):
            raise LifecycleError(f"{type(event).__name__} in {st.state.value} (task {st.task})")
        match event:
            case Booted():
                new = self._booted(st, event, now, acts)
            case ShutdownRequested():
                new = self._shutdown(st, event, now, acts)
            case ReloadRequested():
                new = self._reconcile_requested(
                    st, now, acts, paused=event.paused, reload=True, reason="reload (SIGHUP)"
                )
            case ReconcileRequested():
                new = self._reconcile_requested(
                    st, now, acts, paused=event.paused, reload=False, reason=f"reconcile ({event.source})"
                )
            case StatusRequested():
                new = st
                acts.append(LogStatus())
            case ConfigPrepared():
                new = self._config_prepared(st, event, now, acts)
            case ConfigFailed():
                new = self._config_failed(st, event, now, acts)
            case ChildSpawned():
                new = self._child_spawned(st, event, now, acts)
            case SpawnFailed():
                new = self._spawn_failed(st, event, now, acts)
            case ChildReady():
                new = self._child_ready(st, event, now, acts)
            case ChildExited():
                new = self._child_exited(st, event, now, acts)
            case Planned():
                new = self._planned(st, event, now, acts)
            case Imported():
                new = self._imported(st, event, now, acts)
            case TaskFailed():
                new = self._task_failed(st, event, now, acts)
            case GoneProven():
                new = self._gone_proven(st, event, now, acts)
            case DrainFinished():
                new = self._drain_finished(st, event, now, acts)
            case HookFinished():
                new = self._hook_finished(st, event, now, acts)
            case MigrationProgress():
                new = self._progress(st, event, now, acts)
            case Migrated():
                new = self._migrated(st, event, now, acts)
            case MarkersRead():
                new = self._markers_read(st, event, now, acts)
            case FileChanged():
                new = self._file_changed(st, event, now, acts)
            case Tick():
                new = self._tick(st, now, acts)
            case _:
                assert_never(event)
        return new, acts

    def next_deadline(self, st: SupervisorState) -> float | None:
        """The earliest monotonic time at which a ``Tick`` would change something; None: no deadline."""
        t = self.timeouts
        candidates: list[float | None] = []
        match st.state:
            case State.STARTING:
                if st.child is not None:
                    candidates.append(st.child.started_at + t.ready_timeout)
                    if not st.child.wait_for_health:
                        candidates.append(st.child.started_at + t.settle_time)
            case State.RUNNING:
                if st.child is not None:
                    candidates.append(reset_deadline(self.policy, st.backoff, st.child.ready_at))
            case State.STOPPING:
                if st.stopping is not None:
                    candidates.append(st.stopping.give_up_at if st.stopping.killed else st.stopping.kill_at)
            case State.BACKOFF:
                if not st.spawn_pending:
                    candidates.append(st.retry_at)
            case State.RECONCILING:
                candidates.append(st.task_deadline)
            case State.PAUSED | State.PARKED | State.STOPPED:
                pass
            case _:
                assert_never(st.state)
        if st.state is not State.STOPPED:
            candidates.append(st.watch_due_at)
        present = [c for c in candidates if c is not None]
        return min(present) if present else None

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _enter(
        st: SupervisorState,
        new_state: State,
        reason: str | None,
        now: float,
        acts: list[Action],
        *,
        substep: Substep | None = None,
    ) -> SupervisorState:
        new = replace(st, state=new_state, since=now, reason=reason, substep=substep)
        pid = new.child.pid if new.child is not None else None
        if new_state is State.PARKED and st.state is not State.PARKED:
            # One grep-able line for every entry into PARKED, whatever parked it (the cycle, the restart
            # policy, an LS that survived SIGKILL), logged when LS is down.
            acts.append(LogLine(Level.ERROR, f"parked: {reason}"))
        acts.append(AnnounceState(old=st.state, new=new_state, reason=reason, pid=pid, substep=substep))
        if new_state in (State.RUNNING, State.PAUSED, State.PARKED):
            # READY=1 once settled (also after a reload, which sent RELOADING=1). PAUSED and PARKED are
            # settled too: systemd start must not hang until its timeout on a parked daemon.
            acts.append(Notify(NotifyKind.READY))
        return new

    def _exit(
        self, st: SupervisorState, code: ExitCode, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        """LS is down (or beyond our reach): STOPPED, and the shell leaves with ``code``."""
        st = self._enter(replace(st, exit_code=code), State.STOPPED, reason, now, acts)
        acts.append(Exit(code))
        return st

    def _begin_stop(
        self, st: SupervisorState, purpose: StopPurpose, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        assert st.child is not None
        stopping = Stopping(
            purpose=purpose, reason=reason, term_at=now, kill_at=now + self.timeouts.stop_timeout
        )
        # SIGTERM before the announcement: kill_at counts from now, and the shell's announcing (the log
        # line, state.json written and fsynced) must not eat into the stop_timeout LS gets.
        acts.append(SignalGroup(st.child.pid))
        return self._enter(replace(st, stopping=stopping), State.STOPPING, reason, now, acts)

    def _spawn(self, st: SupervisorState, reason: str, acts: list[Action]) -> SupervisorState:
        assert st.digest is not None and st.child is None
        acts.append(SpawnChild(digest=st.digest, reason=reason))
        return replace(st, spawn_pending=True, spawn_reason=reason)

    def _back_to_child_state(
        self, st: SupervisorState, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        assert st.child is not None
        target = State.RUNNING if st.child.ready else State.STARTING
        return self._enter(st, target, reason, now, acts)

    def _settle(
        self, st: SupervisorState, now: float, acts: list[Action], reason: str, *, start: str | None = None
    ) -> SupervisorState:
        """Move actual state toward desired after a reconcile (or after a stop with nothing pending).
        ``reason``: for the state LS ends up in; ``start``: why LS starts now, when it is not running
        (default ``reason``)."""
        goal = st.desired.goal
        if goal is Goal.SHUTDOWN:
            # Shutdown leaves RECONCILING at once (STOPPING or STOPPED), so a settle never sees it.
            raise LifecycleError(f"settle with goal shutdown in {st.state.value}")
        if goal is Goal.PAUSE:
            if st.child is not None:
                return self._begin_stop(st, StopPurpose.PAUSE, "paused by operator", now, acts)
            return self._enter(st, State.PAUSED, "paused by operator", now, acts)
        if st.child is not None:
            if st.child.digest == st.digest:
                return self._back_to_child_state(st, reason, now, acts)
            return self._begin_stop(st, StopPurpose.RESTART, "LS config changed", now, acts)
        if st.unkillable_pid is not None:
            reason = st.park_reason or f"LS pid {st.unkillable_pid} survived SIGKILL"
            st = replace(st, park_exit=ExitCode.LS_RUNNING)
            return self._enter(st, State.PARKED, reason, now, acts)
        if st.park_reason is not None:
            return self._enter(st, State.PARKED, st.park_reason, now, acts)
        if st.retry_at is not None and st.retry_at > now:
            return self._enter(st, State.BACKOFF, f"restart at +{reasons.secs(st.retry_at - now)}", now, acts)
        return self._spawn(st, start or reason, acts)

    def _start_reason(self, st: SupervisorState) -> str:
        """Why LS starts after a reconcile that wrote nothing: what the operator (or a failure) did, not
        what the reconcile found (the config is "unchanged" only for an LS that still runs)."""
        if st.prior is None:
            return "boot"
        version = f"schema v{st.version}"
        if st.retry_at is not None:
            return f"restart after failure, {version}"
        match st.prior:
            case State.PAUSED:
                return f"resumed (pause flag removed), {version}"
            case State.PARKED:
                return f"leaving PARKED on {st.trigger or 'reconcile'}, {version}"
            case _:
                return f"{st.trigger or 'reconcile'}, {version}"

    def _failure(
        self,
        st: SupervisorState,
        what: str,
        now: float,
        acts: list[Action],
        *,
        started_at: float | None,
        exit_one: bool,
        defer: bool = False,
        last_line: str | None = None,
    ) -> SupervisorState:
        """LS failed (crashed, did not start, not ready in time): the restart policy decides.
        ``defer``: a reconcile is under way; its result settles into BACKOFF/PARKED (no transition now)."""
        pol = self.policy
        if exit_one and started_at is not None and now - started_at <= pol.config_error_window:
            # LS exits 1 for ANY fatal start-up error (logrus Fatal), not only a config it rejects.
            what = (
                f"LS exited 1 within {reasons.secs(pol.config_error_window)} of starting: a fatal start-up "
                "error (config, LMDB open, storage init or its HTTP port in use); LS's log says which"
            )
            if last_line:
                what += f"; LS's last line: {last_line}"
        backoff, decision = record_failure(pol, st.backoff, now, self.rand())
        st = replace(
            st,
            backoff=backoff,
            last_exit=what,
            child=None,
            stopping=None,
            spawn_pending=False,
            failures_total=st.failures_total + 1,
        )
        match decision:
            case Retry(delay=delay):
                st = replace(st, retry_at=now + delay)
                reason = f"{what}; restart {decision.failures} in {reasons.secs(delay)}"
                if defer:
                    return st
                return self._enter(st, State.BACKOFF, reason, now, acts)
            case GiveUp(failures=n, window=window):
                park = (
                    f"{what}; {n} failures within {reasons.secs(window)}, restart policy gave up; "
                    "fix the cause, then run `lssupervisor resume`"
                )
                st = replace(st, retry_at=None, park_reason=park)
                if defer:
                    return st
                st = self._enter(st, State.PARKED, park, now, acts)
                if st.pending is not None:
                    # An operator or a file change asked for a reconcile while LS was stopping or being
                    # spawned: it may be the fix that was shipped. Run it as if it came now, from
                    # PARKED (a good config leaves PARKED with a fresh restart budget, as resume does).
                    acts.append(LogLine(Level.INFO, "a reconcile was requested meanwhile: running it now"))
                    return self._start_reconcile(
                        st, st.pending.reload, "reconcile (requested meanwhile)", now, acts
                    )
                return st
            case _:
                assert_never(decision)

    # -- event handlers ----------------------------------------------------------------------------

    def _booted(self, st: SupervisorState, ev: Booted, now: float, acts: list[Action]) -> SupervisorState:
        if st.booted:
            raise LifecycleError("Booted twice")
        desired = Desired(goal=Goal.PAUSE if ev.paused else Goal.RUN, target_version=ev.target_version)
        st = replace(st, booted=True, desired=desired, prior=None)
        acts.append(SweepOrphans())
        st = replace(st, task=Task.PLAN)
        st = self._enter(st, State.RECONCILING, "boot", now, acts, substep=Substep.PLANNING)
        acts.append(PrepareConfig(reload=False))
        return st

    def _shutdown(
        self, st: SupervisorState, ev: ShutdownRequested, now: float, acts: list[Action]
    ) -> SupervisorState:
        if st.state is State.STOPPED:
            return st  # before boot or after exit: the shell is leaving anyway
        desired = replace(st.desired, goal=Goal.SHUTDOWN, shutdown_requests=st.desired.shutdown_requests + 1)
        first = st.desired.goal is not Goal.SHUTDOWN
        st = replace(st, desired=desired, pending=None, watch_due_at=None, watch_first_at=None)
        reason = f"shutdown ({ev.signal})"
        if st.state is State.RECONCILING and st.task is Task.MIGRATE:
            # A migration step in flight: let it commit (cancelling throws its work away); a second
            # TERM cancels it. Either way LS is not started again.
            if first:
                acts.append(
                    LogLine(
                        Level.WARNING,
                        f"{ev.signal} during the migration: it completes, then lssupervisor exits without "
                        f"starting LS; send {ev.signal} again to cancel it (the open step rolls back)",
                    )
                )
                acts.append(Notify(NotifyKind.STOPPING))
                acts.append(WriteState())
            elif desired.shutdown_requests == 2:
                acts.append(LogLine(Level.WARNING, f"second {ev.signal}: cancelling the migration"))
                acts.append(CancelTask(f"cancelled by a second {ev.signal}"))
            return st
        if st.task is not None:
            # Any other job only reads (or is the drain LS, or a hook): end it now.
            acts.append(CancelTask(reason))
            st = replace(st, task=None)
        st = replace(st, cycle=None, progress=None)
        if st.state is State.STOPPING:
            stopping = st.stopping
            assert stopping is not None
            if stopping.purpose is not StopPurpose.SHUTDOWN:
                # Already stopping for another reason: keep the deadlines, just do not start LS again.
                acts.append(Notify(NotifyKind.STOPPING))
                acts.append(WriteState())
                return replace(st, stopping=replace(stopping, purpose=StopPurpose.SHUTDOWN), reason=reason)
            if not first and not stopping.killed:
                assert st.child is not None
                acts.append(LogLine(Level.WARNING, f"second {ev.signal}: SIGKILL to LS now"))
                acts.append(KillGroup(st.child.pid))
                return replace(
                    st, stopping=replace(stopping, killed=True, give_up_at=now + self.timeouts.kill_grace)
                )
            return st
        if st.child is not None:
            acts.append(Notify(NotifyKind.STOPPING))
            return self._begin_stop(st, StopPurpose.SHUTDOWN, reason, now, acts)
        if st.spawn_pending:
            return st  # ChildSpawned stops the new LS at once
        acts.append(Notify(NotifyKind.STOPPING))
        code = st.park_exit if st.state is State.PARKED else ExitCode.OK
        return self._exit(replace(st, retry_at=None), code, reason, now, acts)

    def _child_spawned(
        self, st: SupervisorState, ev: ChildSpawned, now: float, acts: list[Action]
    ) -> SupervisorState:
        if not st.spawn_pending or st.digest is None:
            raise LifecycleError(f"ChildSpawned pid={ev.pid} without SpawnChild in {st.state.value}")
        child = Child(pid=ev.pid, digest=st.digest, started_at=now, wait_for_health=st.wait_for_health)
        reason = st.spawn_reason or "start"
        st = replace(st, child=child, spawn_pending=False, starts=st.starts + 1, retry_at=None)
        if st.desired.goal is Goal.SHUTDOWN:
            return self._begin_stop(st, StopPurpose.SHUTDOWN, "shutdown", now, acts)
        st = self._enter(st, State.STARTING, reason, now, acts)
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        return st

    def _spawn_failed(
        self, st: SupervisorState, ev: SpawnFailed, now: float, acts: list[Action]
    ) -> SupervisorState:
        if not st.spawn_pending:
            raise LifecycleError(f"SpawnFailed without SpawnChild in {st.state.value}")
        st = replace(st, spawn_pending=False)
        if st.desired.goal is Goal.SHUTDOWN:
            return self._exit(st, ExitCode.OK, "shutdown", now, acts)
        return self._failure(st, f"cannot start LS: {ev.message}", now, acts, started_at=None, exit_one=False)

    def _child_ready(
        self, st: SupervisorState, ev: ChildReady, now: float, acts: list[Action]
    ) -> SupervisorState:
        child = st.child
        if child is None or child.pid != ev.pid or child.ready:
            return st  # stale: that LS already exited, or readiness reported twice
        child = replace(child, ready=True, ready_at=now)
        st = replace(st, child=child)
        if st.state is State.STARTING:
            return self._enter(st, State.RUNNING, "LS ready", now, acts)
        acts.append(WriteState())  # RECONCILING/STOPPING: remember, no transition
        return st

    def _child_exited(
        self, st: SupervisorState, ev: ChildExited, now: float, acts: list[Action]
    ) -> SupervisorState:
        child = st.child
        if st.unkillable_pid is not None and ev.pid == st.unkillable_pid:
            # The LS that survived SIGKILL is finally gone; an operator may start LS again.
            st = replace(st, unkillable_pid=None)
            if st.state is State.PARKED and (st.park_reason or "").startswith(f"LS pid {ev.pid} survived"):
                # No LS runs any more: a shutdown now is a plain park, not "an LS still runs" (68).
                st = replace(st, park_exit=ExitCode.PARKED)
                next_step = "; run `lssupervisor resume` to start LS again"
            else:
                next_step = ""
            acts.append(
                LogLine(Level.WARNING, f"LS pid {ev.pid} finally exited ({ev.description}){next_step}")
            )
            acts.append(WriteState())
            return st
        if child is None or child.pid != ev.pid:
            raise LifecycleError(f"ChildExited pid={ev.pid} but our LS is {st.pid} in {st.state.value}")
        if st.state is State.STOPPING:
            return self._stopped(st, ev, now, acts)
        if st.state in (State.STARTING, State.RUNNING, State.RECONCILING):
            return self._failure(
                st,
                f"LS {ev.description}",
                now,
                acts,
                started_at=child.started_at,
                exit_one=ev.returncode == 1,
                defer=st.state is State.RECONCILING,
                last_line=ev.last_line,
            )
        raise LifecycleError(f"ChildExited in {st.state.value}")

    def _stopped(
        self, st: SupervisorState, ev: ChildExited, now: float, acts: list[Action]
    ) -> SupervisorState:
        """The stop we asked for completed: whatever the return code, it is clean (I5)."""
        stopping = st.stopping
        assert stopping is not None and st.child is not None
        started_at = st.child.started_at
        st = replace(st, child=None, stopping=None, last_exit=f"stopped ({ev.description})")
        if st.desired.goal is Goal.SHUTDOWN:
            return self._exit(st, ExitCode.OK, stopping.reason, now, acts)
        if stopping.purpose is StopPurpose.FAILED_START:
            return self._failure(st, stopping.reason, now, acts, started_at=started_at, exit_one=False)
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        match stopping.purpose:
            case StopPurpose.PAUSE | StopPurpose.RESTART | StopPurpose.SHUTDOWN:
                # SHUTDOWN purpose with another goal cannot happen: shutdown sets the goal for good.
                return self._settle(st, now, acts, stopping.reason)
            case StopPurpose.MIGRATION:
                if st.cycle is None:
                    return self._settle(st, now, acts, stopping.reason)
                return self._prove(st, now, acts)
            case StopPurpose.PARK:
                return self._enter(st, State.PARKED, st.park_reason or stopping.reason, now, acts)
            case _:
                raise LifecycleError(f"stop purpose {stopping.purpose.value} after the stop")

    # Kept whole: one case per state whose deadlines can expire.
    def _tick(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:  # noqa: PLR0911, PLR0912
        t = self.timeouts
        if st.watch_due_at is not None and now >= st.watch_due_at:
            reload = st.watch_reload
            st = replace(st, watch_due_at=None, watch_first_at=None, watch_reload=False)
            if st.booted and st.state is not State.STOPPED and st.desired.goal is not Goal.SHUTDOWN:
                paused = st.desired.goal is Goal.PAUSE
                reason = "reload (config file changed)" if reload else "reconcile (watched file changed)"
                st = self._reconcile_requested(st, now, acts, paused=paused, reload=reload, reason=reason)
        match st.state:
            case State.STARTING:
                child = st.child
                if child is None:
                    return st
                if not child.wait_for_health and now >= child.started_at + t.settle_time:
                    st = replace(st, child=replace(child, ready=True, ready_at=now))
                    return self._enter(
                        st, State.RUNNING, f"LS settled ({reasons.secs(t.settle_time)})", now, acts
                    )
                if now >= child.started_at + t.ready_timeout:
                    return self._begin_stop(
                        st,
                        StopPurpose.FAILED_START,
                        f"LS not ready within {reasons.secs(t.ready_timeout)}",
                        now,
                        acts,
                    )
                return st
            case State.RUNNING:
                child = st.child
                assert child is not None
                deadline = reset_deadline(self.policy, st.backoff, child.ready_at)
                if deadline is not None and now >= deadline:
                    healthy = reasons.secs(self.policy.reset_after)
                    acts.append(LogLine(Level.INFO, f"LS healthy for {healthy}: restart backoff reset"))
                    acts.append(WriteState())
                    return replace(st, backoff=BackoffState())
                return st
            case State.STOPPING:
                stopping = st.stopping
                assert stopping is not None and st.child is not None
                if not stopping.killed and now >= stopping.kill_at:
                    late = f"LS pid {st.child.pid} still running {reasons.secs(t.stop_timeout)} after SIGTERM"
                    acts.append(LogLine(Level.WARNING, f"{late}: SIGKILL"))
                    acts.append(KillGroup(st.child.pid))
                    return replace(st, stopping=replace(stopping, killed=True, give_up_at=now + t.kill_grace))
                if stopping.killed and stopping.give_up_at is not None and now >= stopping.give_up_at:
                    return self._unkillable(st, now, acts)
                return st
            case State.BACKOFF:
                if not st.spawn_pending and st.retry_at is not None and now >= st.retry_at:
                    return self._spawn(st, "restart after failure", acts)
                return st
            case State.RECONCILING:
                if st.task_deadline is not None and now >= st.task_deadline:
                    return self._overdue(st, acts)
                return st
            case State.PAUSED | State.PARKED | State.STOPPED:
                return st
            case _:
                assert_never(st.state)

    def _unkillable(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        """LS survived SIGKILL for kill_grace: something is badly wrong; never start a second LS beside it
        (two would sync one LMDB), and no migration while it may still hold the LMDB (I1)."""
        assert st.child is not None
        reason = (
            f"LS pid {st.child.pid} survived SIGKILL for {reasons.secs(self.timeouts.kill_grace)}; "
            f"check it (`ps -o stat,wchan -p {st.child.pid}`: D state?) and restart lssupervisor once it "
            "is gone"
        )
        # The same exit code as every other "an LS runs where it must not" park (68), whichever path
        # found it: here, or a migration planned while it lives.
        st = replace(
            st,
            child=None,
            stopping=None,
            park_reason=reason,
            park_exit=ExitCode.LS_RUNNING,
            retry_at=None,
            unkillable_pid=st.child.pid,
        )
        if st.desired.goal is Goal.SHUTDOWN:
            acts.append(LogLine(Level.ERROR, reason))  # (entering PARKED logs it otherwise)
            return self._exit(st, ExitCode.LS_RUNNING, reason, now, acts)
        return self._enter(st, State.PARKED, reason, now, acts)

    def _file_changed(
        self, st: SupervisorState, ev: FileChanged, now: float, acts: list[Action]
    ) -> SupervisorState:
        if not st.booted or st.state is State.STOPPED or st.desired.goal is Goal.SHUTDOWN:
            return st
        # Debounce: a burst of changes (an editor, a package install) becomes one reconcile. A file
        # that never stops changing must not postpone it forever: at most DEBOUNCE_MAX_FACTOR
        # debounce periods after the first change of the burst.
        first = st.watch_first_at if st.watch_due_at is not None and st.watch_first_at is not None else now
        due = min(now + self.cycle.debounce, first + DEBOUNCE_MAX_FACTOR * self.cycle.debounce)
        return replace(st, watch_due_at=due, watch_first_at=first, watch_reload=st.watch_reload or ev.ours)

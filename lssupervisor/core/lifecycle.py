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
a signal after shutdown) are ignored.

The reconcile cycle (docs/reconcile.md) is a sequence of RECONCILING sub-steps, each waiting for one
asynchronous job of the shell (``state.task``)::

    PLANNING (PrepareConfig -> Planned)
      nothing to write -> RENDERING (RenderConfig -> ConfigPrepared) -> settle as above (LS keeps its
                          pid when the rendered config is unchanged)
      else             -> [STOPPING purpose migration: SIGTERM LS, intended (I5)]
                          -> PROVING (ProveGone -> GoneProven)
                          -> [DRAINING (StartDrain -> DrainFinished) -> PROVING]   lightningstream.drain
                          -> PRE_HOOKS (RunHook -> HookFinished)*
                          -> BACKING_UP/MIGRATING (StartMigration -> MigrationProgress* -> Migrated)
                          -> VERIFYING (ReadMarkers -> MarkersRead)
                          -> POST_HOOKS* -> RENDERING for the version the markers HAVE (I2)
                          -> settle: STARTING -> RUNNING
    failures -> PARKED (reason names the next command) or, with ``on_failure: resume``, RENDERING for
    the version the LMDB has (after a failed step k of n: version k).

A job's result is accepted only while ``state.task`` names that job: results of a cancelled job are
stale and ignored. Shutdown during a migration lets it finish (the second TERM cancels it: the worker
is SIGKILLed and its open transaction aborts); any other job is cancelled at once. Either way LS is
not started again and the exit code is 0.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import assert_never

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
    ProveGone,
    ReadMarkers,
    RenderConfig,
    RunHook,
    ShowProgress,
    SignalGroup,
    SpawnChild,
    StartDrain,
    StartMigration,
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
    Cycle,
    Desired,
    Goal,
    OnFailure,
    Pending,
    State,
    Stopping,
    StopPurpose,
    Substep,
    SupervisorState,
    Task,
)
from lssupervisor.errors import ExitCode

# After SIGKILL, how long LS may take to disappear before we say it is unkillable (D state, a
# kernel problem). Not configurable: SIGKILL cannot be caught, so this only covers stuck kernels.
KILL_GRACE_S = 5.0
# A burst of file changes is debounced, but reconciles at the latest this many debounce periods
# after its first change (a file rewritten every second must not hold a migration back forever).
DEBOUNCE_MAX_FACTOR = 10


# The offline advice in the worker's UnmarkedDatabase message ("; if its data is at schema version N,
# run: lssupervisor stamp N ..."): right for the offline commands, wrong for the daemon, whose lock makes
# `stamp` refuse (75). The core replaces it with what works while the daemon runs.
_OFFLINE_STAMP_ADVICE = re.compile(r";[^;]*\blssupervisor stamp\b.*$", re.DOTALL)
# A damaged marker ("...; fix it with lssupervisor stamp N"): the same command, with the daemon stopped.
_FIX_WITH_STAMP = re.compile(r"fix it with lssupervisor stamp N$")
FIX_WITH_STAMP_ADVICE = "fix it: stop lssupervisor, run `lssupervisor stamp N`, then start it"
UNMARKED_ADVICE = (
    "if its data is at schema version N: set schema.baseline: N and run `lssupervisor reload`, "
    "or stop lssupervisor, run `lssupervisor stamp N`, then start it"
)

# Jobs whose result may be a ConfigPrepared/ConfigFailed (None: a shell answering PrepareConfig at once).
_CONFIG_TASKS = (None, Task.PLAN, Task.RENDER)


class LifecycleError(Exception):
    """An event that cannot happen in this state: a bug in the shell, never an operator error."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    stop_timeout: float = 10.0
    ready_timeout: float = 300.0
    settle_time: float = 3.0
    kill_grace: float = KILL_GRACE_S


@dataclass(frozen=True, slots=True)
class CyclePolicy:
    """The reconcile cycle's parameters (from our config; swapped with the core on reload)."""

    drain: bool = False
    pre_hooks: int = 0
    post_hooks: int = 0
    on_failure: OnFailure = OnFailure.PARK
    debounce: float = 1.0


def _secs(value: float) -> str:
    """Seconds for people: 5s, 2.5s, 0.1s."""
    return f"{value:g}s" if value >= 0.1 or value == 0 else f"{value:.3f}s"


class Lifecycle:
    """The core's parameters (timeouts, restart policy, RNG). Holds no state: the shell swaps in a new
    one when a reload changes the config."""

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

    def handle(
        self, st: SupervisorState, event: Event, now: float
    ) -> tuple[SupervisorState, list[Action]]:
        acts: list[Action] = []
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
            case State.RECONCILING | State.PAUSED | State.PARKED | State.STOPPED:
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
        new = self._enter(replace(st, stopping=stopping), State.STOPPING, reason, now, acts)
        acts.append(SignalGroup(st.child.pid))
        return new

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
            return self._enter(st, State.BACKOFF, f"restart at +{_secs(st.retry_at - now)}", now, acts)
        return self._spawn(st, start or reason, acts)

    @staticmethod
    def _start_reason(st: SupervisorState) -> str:
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
                f"LS exited 1 within {_secs(pol.config_error_window)} of starting: a fatal start-up error "
                "(config, LMDB open, storage init or its HTTP port in use); LS's log says which"
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
                reason = f"{what}; restart {decision.failures} in {_secs(delay)}"
                if defer:
                    return st
                return self._enter(st, State.BACKOFF, reason, now, acts)
            case GiveUp(failures=n, window=window):
                park = (
                    f"{what}; {n} failures within {_secs(window)}, restart policy gave up; "
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
                    acts.append(
                        LogLine(Level.INFO, "a reconcile was requested meanwhile: running it now")
                    )
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
        desired = replace(
            st.desired, goal=Goal.SHUTDOWN, shutdown_requests=st.desired.shutdown_requests + 1
        )
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

    def _reconcile_requested(
        self,
        st: SupervisorState,
        now: float,
        acts: list[Action],
        *,
        paused: bool,
        reload: bool,
        reason: str,
    ) -> SupervisorState:
        if st.state is State.STOPPED or st.desired.goal is Goal.SHUTDOWN:
            return st  # shutting down: nothing to reconcile
        st = replace(st, desired=replace(st.desired, goal=Goal.PAUSE if paused else Goal.RUN))
        if st.state in (State.STOPPING, State.RECONCILING) or st.spawn_pending:
            # Busy: run it as soon as the current step ends (a reload request dominates).
            pending = Pending(reload=reload or (st.pending is not None and st.pending.reload))
            acts.append(WriteState())
            return replace(st, pending=pending)
        if reload:
            acts.append(Notify(NotifyKind.RELOADING))
        return self._start_reconcile(st, reload, reason, now, acts)

    def _start_reconcile(
        self, st: SupervisorState, reload: bool, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        st = replace(
            st, prior=st.state, trigger=reason, pending=None, task=Task.PLAN, cycle=None, progress=None
        )
        st = self._enter(st, State.RECONCILING, reason, now, acts, substep=Substep.PLANNING)
        acts.append(PrepareConfig(reload=reload))
        return st

    def _config_prepared(
        self, st: SupervisorState, ev: ConfigPrepared, now: float, acts: list[Action]
    ) -> SupervisorState:
        if st.state is not State.RECONCILING or st.spawn_pending or st.task not in _CONFIG_TASKS:
            raise LifecycleError(f"ConfigPrepared in {st.state.value} (task {st.task})")
        cycle = st.cycle
        if cycle is not None and cycle.version is not None and ev.version != cycle.version:
            # I2: after a migration the config follows the marker read back, nothing else.
            raise LifecycleError(f"ConfigPrepared for version {ev.version}, the LMDB has {cycle.version}")
        target = ev.target_version if ev.target_version is not None else st.desired.target_version
        st = replace(
            st,
            digest=ev.digest,
            version=ev.version,
            wait_for_health=ev.wait_for_health,
            desired=replace(st.desired, target_version=target),
            task=None,
            cycle=None,
            progress=None,
        )
        st = self._leave_park(st)
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        if cycle is not None:
            reason = st.reason or f"schema v{ev.version}"  # the RENDERING step's: why LS starts now
            return self._settle(st, now, acts, reason)
        # Nothing was written: a running LS with the same config keeps running; otherwise say why LS
        # starts now (resumed, leaving PARKED...), never "unchanged".
        reason = "boot" if st.prior is None else "LS config unchanged"
        return self._settle(st, now, acts, reason, start=self._start_reason(st))

    def _leave_park(self, st: SupervisorState) -> SupervisorState:
        if st.prior is State.PARKED and st.child is None and st.unkillable_pid is None:
            # An operator acted (HUP/USR1/resume) and the config is good: a fresh restart budget.
            return replace(
                st, park_reason=None, park_exit=ExitCode.PARKED, backoff=BackoffState(), retry_at=None
            )
        return st

    def _config_failed(
        self, st: SupervisorState, ev: ConfigFailed, now: float, acts: list[Action]
    ) -> SupervisorState:
        if st.state is not State.RECONCILING or st.spawn_pending or st.task not in _CONFIG_TASKS:
            raise LifecycleError(f"ConfigFailed in {st.state.value} (task {st.task})")
        cycle = st.cycle
        st = replace(st, task=None)
        if cycle is not None:
            # The LMDB was (or was to be) written: the previous config may name another version's
            # prefix, so it must not be started (I2).
            version = cycle.version if cycle.version is not None else cycle.from_version
            return self._park(
                st,
                f"cannot render the LS config for schema version {version}: {ev.message}; LS stays down; "
                "fix it, then run `lssupervisor reload`",
                now,
                acts,
                code=ExitCode.CONFIG,
            )
        failed = f"{ev.what}: {ev.message}"
        if st.digest is None:
            # Nothing was ever rendered: there is no old config to keep. Fail closed with the stage's
            # code (EX_CONFIG; EX_DATAERR for a migration file that does not load, as offline).
            acts.append(LogLine(Level.ERROR, failed))
            return self._exit(st, ev.exit_code, failed, now, acts)
        acts.append(LogLine(Level.ERROR, f"reload failed, keeping the previous config: {failed}"))
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        kept = "reload failed, previous config kept"
        return self._settle(st, now, acts, kept, start=f"{self._start_reason(st)}; {kept}")

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
        return self._failure(
            st, f"cannot start LS: {ev.message}", now, acts, started_at=None, exit_one=False
        )

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
                st, f"LS {ev.description}", now, acts,
                started_at=child.started_at, exit_one=ev.returncode == 1,
                defer=st.state is State.RECONCILING, last_line=ev.last_line,
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

    def _tick(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
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
                    return self._enter(st, State.RUNNING, f"LS settled ({_secs(t.settle_time)})", now, acts)
                if now >= child.started_at + t.ready_timeout:
                    return self._begin_stop(
                        st, StopPurpose.FAILED_START,
                        f"LS not ready within {_secs(t.ready_timeout)}", now, acts,
                    )
                return st
            case State.RUNNING:
                child = st.child
                assert child is not None
                deadline = reset_deadline(self.policy, st.backoff, child.ready_at)
                if deadline is not None and now >= deadline:
                    healthy = _secs(self.policy.reset_after)
                    acts.append(LogLine(Level.INFO, f"LS healthy for {healthy}: restart backoff reset"))
                    acts.append(WriteState())
                    return replace(st, backoff=BackoffState())
                return st
            case State.STOPPING:
                stopping = st.stopping
                assert stopping is not None and st.child is not None
                if not stopping.killed and now >= stopping.kill_at:
                    late = f"LS pid {st.child.pid} still running {_secs(t.stop_timeout)} after SIGTERM"
                    acts.append(LogLine(Level.WARNING, f"{late}: SIGKILL"))
                    acts.append(KillGroup(st.child.pid))
                    return replace(
                        st, stopping=replace(stopping, killed=True, give_up_at=now + t.kill_grace)
                    )
                if stopping.killed and stopping.give_up_at is not None and now >= stopping.give_up_at:
                    return self._unkillable(st, now, acts)
                return st
            case State.BACKOFF:
                if not st.spawn_pending and st.retry_at is not None and now >= st.retry_at:
                    return self._spawn(st, "restart after failure", acts)
                return st
            case State.RECONCILING | State.PAUSED | State.PARKED | State.STOPPED:
                return st
            case _:
                assert_never(st.state)

    def _unkillable(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        """LS survived SIGKILL for kill_grace: something is badly wrong; never start a second LS (I4)."""
        assert st.child is not None
        reason = (
            f"LS pid {st.child.pid} survived SIGKILL for {_secs(self.timeouts.kill_grace)}; "
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

    # -- the reconcile cycle -------------------------------------------------------------------------

    @staticmethod
    def _expects(st: SupervisorState, task: Task) -> bool:
        """Is ``task`` the job we wait for? False: the result of a cancelled job (stale, ignored)."""
        return st.state is State.RECONCILING and st.task is task

    def _step(  # noqa: PLR0917 (internal helper; every argument is needed and positional reads best)
        self,
        st: SupervisorState,
        substep: Substep,
        reason: str,
        task: Task,
        action: Action,
        now: float,
        acts: list[Action],
    ) -> SupervisorState:
        st = self._enter(replace(st, task=task), State.RECONCILING, reason, now, acts, substep=substep)
        acts.append(action)
        return st

    def _park(
        self,
        st: SupervisorState,
        reason: str,
        now: float,
        acts: list[Action],
        *,
        code: ExitCode = ExitCode.PARKED,
    ) -> SupervisorState:
        """LS stays down until an operator acts; ``reason`` names what to run next. The ``parked:`` line
        is logged on entering PARKED (after LS stopped, when it still ran)."""
        st = replace(
            st,
            park_reason=reason,
            park_exit=code,
            cycle=None,
            task=None,
            progress=None,
            retry_at=None,
            pending=None,  # a request made during the failed cycle would only repeat it
        )
        if st.child is not None:
            return self._begin_stop(st, StopPurpose.PARK, reason, now, acts)
        return self._enter(st, State.PARKED, reason, now, acts)

    def _exit_after_cycle(
        self, st: SupervisorState, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        """Shutdown was requested while a job ran: it ended; exit without starting LS."""
        st = replace(st, task=None, cycle=None, progress=None)
        if (
            st.child is not None
        ):  # cannot happen (jobs with LS running are cancelled), but never exit with LS up
            return self._begin_stop(st, StopPurpose.SHUTDOWN, reason, now, acts)
        return self._exit(st, ExitCode.OK, reason, now, acts)

    def _render(
        self, st: SupervisorState, version: int, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        return self._step(st, Substep.RENDERING, reason, Task.RENDER, RenderConfig(version), now, acts)

    def _prove(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        reason = "LS stopped; proving it gone (process group, LMDB readers)"
        return self._step(st, Substep.PROVING, reason, Task.PROVE, ProveGone(), now, acts)

    def _planned(self, st: SupervisorState, ev: Planned, now: float, acts: list[Action]) -> SupervisorState:
        if not self._expects(st, Task.PLAN):
            return st
        st = replace(st, task=None, desired=replace(st.desired, target_version=ev.target))
        if not ev.writes:
            if ev.render_version is None:
                shown = ", ".join(f"{name}={v}" for name, v in ev.markers)
                return self._plan_problem(
                    st,
                    f"the LMDBs have no common schema version ({shown}); stop lssupervisor, bring them to "
                    "one version with `lssupervisor plan` and `lssupervisor migrate` (or `lssupervisor "
                    "stamp N`), then start it",
                    now,
                    acts,
                )
            return self._render(
                st, ev.render_version, f"schema v{ev.render_version}, nothing to migrate", now, acts
            )
        cycle = Cycle(
            from_version=ev.render_version, target=ev.target, steps=ev.steps, startup=st.prior is None
        )
        acts.append(LogLine(Level.INFO, f"migration planned: {cycle.describe()}"))
        if st.unkillable_pid is not None:
            return self._park(
                st,
                f"LS pid {st.unkillable_pid} survived SIGKILL; no migration while it lives; "
                "restart lssupervisor once it is gone",
                now,
                acts,
                code=ExitCode.LS_RUNNING,
            )
        if st.desired.goal is Goal.PAUSE:
            acts.append(
                LogLine(Level.INFO, f"paused: migration {cycle.describe()} waits for `lssupervisor resume`")
            )
            return self._settle(st, now, acts, "paused by operator")
        st = self._leave_park(replace(st, cycle=cycle))
        if st.child is not None:
            return self._begin_stop(st, StopPurpose.MIGRATION, f"migration {cycle.describe()}", now, acts)
        return self._prove(st, now, acts)

    def _plan_problem(
        self, st: SupervisorState, message: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        """Planning failed before anything was touched. A running LS keeps running (its config matches
        the unchanged markers, I2); without LS we cannot know what to start: park."""
        if st.child is not None:
            acts.append(LogLine(Level.ERROR, f"reconcile failed, LS keeps running: {message}"))
            return self._settle(st, now, acts, "reconcile failed, LS keeps running")
        return self._park(st, message, now, acts)

    def _task_failed(
        self, st: SupervisorState, ev: TaskFailed, now: float, acts: list[Action]
    ) -> SupervisorState:
        if st.state is not State.RECONCILING or st.task is None or st.task.value != ev.task:
            return st  # a cancelled job's late result
        task = st.task
        st = replace(st, task=None, progress=None)
        if st.desired.goal is Goal.SHUTDOWN:
            acts.append(LogLine(Level.WARNING, f"{task.value} ended: {ev.message}"))
            return self._exit_after_cycle(st, "shutdown", now, acts)
        cycle = st.cycle
        match task:
            case Task.PLAN:
                if ev.error == "SchemaTooNew":
                    return self._park(st, ev.message, now, acts, code=ExitCode.TOO_NEW)
                if ev.error == "UnmarkedDatabase":
                    what = _OFFLINE_STAMP_ADVICE.sub("", ev.message)
                    return self._plan_problem(st, f"{what}; {UNMARKED_ADVICE}", now, acts)
                message = _FIX_WITH_STAMP.sub(FIX_WITH_STAMP_ADVICE, ev.message)
                return self._plan_problem(st, message, now, acts)
            case Task.PROVE:
                return self._park(
                    st,
                    f"cannot prove LS gone: {ev.message}; check that no LS has the LMDB open "
                    "(`ps -ef | grep lightningstream`), then run `lssupervisor resume`",
                    now,
                    acts,
                    code=ExitCode.LS_RUNNING,
                )
            case Task.DRAIN | Task.HOOK:
                return self._failed_before_write(st, f"{task.value} could not run: {ev.message}", now, acts)
            case Task.MIGRATE:
                assert cycle is not None
                acts.append(LogLine(Level.ERROR, f"migration {cycle.describe()} failed: {ev.message}"))
                st = replace(st, cycle=replace(cycle, failure=ev.message, backup_id=ev.backup_id))
                return self._verify(st, now, acts)
            case Task.VERIFY:
                return self._park(
                    st,
                    f"cannot read the schema markers back: {ev.message}; see what the LMDB has "
                    "(`lssupervisor fleet`, `lssupervisor history`), then run `lssupervisor resume`",
                    now,
                    acts,
                    code=ExitCode.MIGRATION,
                )
            case Task.RENDER:
                raise LifecycleError("TaskFailed(render): rendering answers ConfigFailed")
            case _:
                assert_never(task)

    def _failed_before_write(
        self, st: SupervisorState, what: str, now: float, acts: list[Action]
    ) -> SupervisorState:
        """Drain or a pre hook failed: nothing was written. ``on_failure`` decides."""
        cycle = st.cycle
        assert cycle is not None
        version = cycle.from_version
        if self.cycle.on_failure is OnFailure.RESUME and version is not None:
            acts.append(
                LogLine(
                    Level.ERROR,
                    f"{what}; nothing was written; on_failure resume: LS restarts on version {version}",
                )
            )
            st = replace(st, cycle=replace(cycle, failure=what, version=version))
            return self._render(st, version, f"{what}; resuming on version {version}", now, acts)
        at = f"at version {version}" if version is not None else "unmarked"
        return self._park(
            st,
            f"{what}; nothing was written (the LMDB is {at}); fix it, then run `lssupervisor resume`",
            now,
            acts,
        )

    def _gone_proven(
        self, st: SupervisorState, ev: GoneProven, now: float, acts: list[Action]
    ) -> SupervisorState:
        if not self._expects(st, Task.PROVE):
            return st
        st = replace(st, task=None)
        cycle = st.cycle
        assert cycle is not None
        if ev.remaining:
            pids = ", ".join(str(p) for p in ev.remaining)
            detail = f" ({ev.detail})" if ev.detail else ""
            return self._park(
                st,
                f"LS still runs after the stop: pid {pids}{detail}; the LMDB is not touched (I1); "
                "stop it, then "
                "run `lssupervisor resume`",
                now,
                acts,
                code=ExitCode.LS_RUNNING,
            )
        if self.cycle.drain and not cycle.drained and cycle.from_version is not None:
            version = cycle.from_version
            reason = f"draining: sync --only-once on version {version}"
            return self._step(st, Substep.DRAINING, reason, Task.DRAIN, StartDrain(version), now, acts)
        return self._hooks(st, "pre", 0, now, acts)

    def _drain_finished(
        self, st: SupervisorState, ev: DrainFinished, now: float, acts: list[Action]
    ) -> SupervisorState:
        if not self._expects(st, Task.DRAIN):
            return st
        cycle = st.cycle
        assert cycle is not None
        st = replace(st, task=None)
        if ev.returncode == 0:
            acts.append(LogLine(Level.INFO, "drain finished: peers' last changes merged, ours pushed"))
            # The drain LS had the LMDB open too: prove it gone before the first write.
            return self._prove(replace(st, cycle=replace(cycle, drained=True)), now, acts)
        if ev.returncode == 75:
            what = "drain did not finish within lightningstream.drain_timeout (LS exit 75)"
        else:
            what = f"drain failed: LS {ev.description}"
        return self._failed_before_write(st, what, now, acts)

    def _hooks(
        self, st: SupervisorState, phase: str, index: int, now: float, acts: list[Action]
    ) -> SupervisorState:
        cycle = st.cycle
        assert cycle is not None
        count = self.cycle.pre_hooks if phase == "pre" else self.cycle.post_hooks
        if not cycle.steps:
            count = 0  # a stamp of an unmarked LMDB migrates nothing: hooks are for migrations
        if index < count:
            st = replace(st, cycle=replace(cycle, hook=index))
            substep = Substep.PRE_HOOKS if phase == "pre" else Substep.POST_HOOKS
            to = cycle.version if phase == "post" and cycle.version is not None else cycle.target
            action = RunHook(phase=phase, index=index, from_version=cycle.from_version, to_version=to)
            return self._step(
                st, substep, f"{phase}_migrate hook {index + 1}/{count}", Task.HOOK, action, now, acts
            )
        if phase == "pre":
            return self._migrate(st, now, acts)
        assert cycle.version is not None
        return self._render(st, cycle.version, f"schema v{cycle.version} verified", now, acts)

    def _hook_finished(
        self, st: SupervisorState, ev: HookFinished, now: float, acts: list[Action]
    ) -> SupervisorState:
        cycle = st.cycle
        if not self._expects(st, Task.HOOK) or cycle is None or cycle.hook != ev.index:
            return st
        st = replace(st, task=None)
        if ev.ok:
            return self._hooks(st, ev.phase, ev.index + 1, now, acts)
        what = f"{ev.phase}_migrate hook {ev.index + 1} failed: {ev.message}"
        if ev.phase == "pre":
            return self._failed_before_write(st, what, now, acts)
        return self._park(
            st,
            f"{what}; the LMDB is migrated to version {cycle.version}; fix the hook, then run "
            "`lssupervisor resume`",
            now,
            acts,
        )

    def _migrate(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        cycle = st.cycle
        assert cycle is not None
        # The worker backs up first (when enabled and there is something to back up); its progress
        # moves us to MIGRATING. A stamp has no steps and no backup.
        substep = Substep.BACKING_UP if cycle.steps else Substep.MIGRATING
        action = StartMigration(cycle.target)
        return self._step(st, substep, f"migrating {cycle.describe()}", Task.MIGRATE, action, now, acts)

    def _progress(
        self, st: SupervisorState, ev: MigrationProgress, now: float, acts: list[Action]
    ) -> SupervisorState:
        cycle = st.cycle
        if not self._expects(st, Task.MIGRATE) or cycle is None:
            return st
        if ev.phase == "step_committed":
            acts.append(LogLine(Level.INFO, ev.text))
        substep = Substep.BACKING_UP if ev.phase == "backup" else Substep.MIGRATING
        st = replace(st, progress=ev.text)
        if substep is not st.substep:
            st = self._enter(st, State.RECONCILING, st.reason, now, acts, substep=substep)
        acts.append(ShowProgress(ev.text, startup=cycle.startup))
        return st

    def _migrated(self, st: SupervisorState, ev: Migrated, now: float, acts: list[Action]) -> SupervisorState:
        cycle = st.cycle
        if not self._expects(st, Task.MIGRATE) or cycle is None:
            return st
        backup = f", backup {ev.backup_id}" if ev.backup_id else ""
        acts.append(
            LogLine(
                Level.INFO,
                f"migration {cycle.describe()} done: {ev.steps} step(s) in {_secs(ev.duration_s)}{backup}",
            )
        )
        st = replace(
            st, task=None, progress=None, cycle=replace(cycle, migrated=True, backup_id=ev.backup_id)
        )
        if st.desired.goal is Goal.SHUTDOWN:
            return self._exit_after_cycle(st, "shutdown after the migration", now, acts)
        return self._verify(st, now, acts)

    def _verify(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        reason = "reading the schema markers back"
        return self._step(st, Substep.VERIFYING, reason, Task.VERIFY, ReadMarkers(), now, acts)

    def _markers_read(
        self, st: SupervisorState, ev: MarkersRead, now: float, acts: list[Action]
    ) -> SupervisorState:
        cycle = st.cycle
        if not self._expects(st, Task.VERIFY) or cycle is None:
            return st
        st = replace(st, task=None)
        versions = {v for _, v in ev.markers}
        shown = ", ".join(f"{name}={v}" for name, v in ev.markers)
        if len(versions) != 1 or None in versions:
            return self._park(
                st,
                f"after the migration the LMDBs are not at one schema version ({shown}); fix the cause, "
                "then run `lssupervisor resume` to migrate the rest (or stop lssupervisor and run "
                "`lssupervisor rollback`)",
                now,
                acts,
                code=ExitCode.MIGRATION,
            )
        (version,) = versions
        assert version is not None
        cycle = replace(cycle, version=version)
        st = replace(st, cycle=cycle)
        if cycle.failure is not None:
            if self.cycle.on_failure is OnFailure.RESUME:
                acts.append(
                    LogLine(
                        Level.ERROR,
                        f"on_failure resume: LS restarts on version {version}, the version the LMDB has",
                    )
                )
                return self._render(
                    st, version, f"migration failed; resuming on version {version}", now, acts
                )
            restore = (
                f" (or stop lssupervisor and restore the backup: `lssupervisor rollback {cycle.backup_id}`)"
                if cycle.backup_id
                else ""
            )
            return self._park(
                st,
                f"migration to version {cycle.target} failed: {cycle.failure}; the LMDB is consistently at "
                f"version {version}; fix the migration, then run `lssupervisor resume`{restore}",
                now,
                acts,
                code=ExitCode.MIGRATION,
            )
        if version != cycle.target:
            return self._park(
                st,
                f"verification failed: the markers say {shown} after migrating to {cycle.target}; "
                "check `lssupervisor history`, then run `lssupervisor resume`",
                now,
                acts,
                code=ExitCode.MIGRATION,
            )
        return self._hooks(st, "post", 0, now, acts)

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
        return replace(
            st, watch_due_at=due, watch_first_at=first, watch_reload=st.watch_reload or ev.ours
        )

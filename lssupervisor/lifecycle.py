"""The pure lifecycle core: ``handle(state, event, now) -> (new_state, actions)``.

Theory of operation
-------------------
The daemon is a functional core inside an imperative shell. This module is the core: no I/O, no clock,
no processes. The shell (:mod:`lssupervisor.supervisor`) owns one :class:`SupervisorState`, feeds every
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
                                             (failed start)
    BACKOFF      --retry deadline-->         STARTING (via ChildSpawned)

An exit of LS is a failure only in STARTING/RUNNING (and RECONCILING); in STOPPING it is the stop we
asked for, whatever the return code (I5). Events that cannot happen in a state (a spawn result nobody
asked for, a config result outside RECONCILING, an exit without a child) raise :class:`LifecycleError`:
they are bugs in the shell. Stale facts that races can produce (readiness of an LS that already exited,
a signal after shutdown) are ignored.

Seam for the reconcile cycle: ``PrepareConfig`` is where the shell asks a ``VersionSource`` which schema
version to render (the LMDB's marker, I2). The migration sub-steps (DRAINING, BACKING_UP, MIGRATING,
VERIFYING) will be entered from ``_settle`` when the worker reports a plan with steps: stop LS with a
``MIGRATION`` purpose, then ``StartWorker`` actions and ``Worker*`` events, as the ``Substep`` enum names.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import assert_never

from lssupervisor.actions import (
    Action,
    AnnounceState,
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
from lssupervisor.backoff import BackoffPolicy, BackoffState, GiveUp, Retry, record_failure, reset_deadline
from lssupervisor.config import Config
from lssupervisor.errors import ExitCode
from lssupervisor.events import (
    Booted,
    ChildExited,
    ChildReady,
    ChildSpawned,
    ConfigFailed,
    ConfigPrepared,
    Event,
    ReconcileRequested,
    ReloadRequested,
    ShutdownRequested,
    SpawnFailed,
    StatusRequested,
    Tick,
)
from lssupervisor.states import (
    Child,
    Desired,
    Goal,
    Pending,
    State,
    Stopping,
    StopPurpose,
    Substep,
    SupervisorState,
)

# After SIGKILL, how long LS may take to disappear before we say it is unkillable (D state, a
# kernel problem). Not configurable: SIGKILL cannot be caught, so this only covers stuck kernels.
KILL_GRACE_S = 5.0


class LifecycleError(Exception):
    """An event that cannot happen in this state: a bug in the shell, never an operator error."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    stop_timeout: float = 10.0
    ready_timeout: float = 300.0
    settle_time: float = 3.0
    kill_grace: float = KILL_GRACE_S

    @classmethod
    def from_config(cls, cfg: Config) -> Timeouts:
        ls = cfg.lightningstream
        return cls(
            stop_timeout=float(ls.stop_timeout),
            ready_timeout=float(ls.ready_timeout),
            settle_time=float(ls.settle_time),
        )


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
    ) -> None:
        self.timeouts = timeouts or Timeouts()
        self.policy = policy or BackoffPolicy()
        self.rand = rand

    @classmethod
    def from_config(cls, cfg: Config, rand: Callable[[], float] = random.random) -> Lifecycle:
        return cls(Timeouts.from_config(cfg), BackoffPolicy.from_config(cfg.restart), rand)

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
        acts.append(AnnounceState(old=st.state, new=new_state, reason=reason, pid=pid, substep=substep))
        if new_state in (State.RUNNING, State.PAUSED, State.PARKED):
            # READY=1 once settled (also after a reload, which sent RELOADING=1). PAUSED and PARKED are
            # settled too: systemd start must not hang until its timeout on a parked daemon.
            acts.append(Notify(NotifyKind.READY))
        return new

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
        self, st: SupervisorState, now: float, acts: list[Action], reason: str
    ) -> SupervisorState:
        """Move actual state toward desired after a reconcile (or after a stop with nothing pending)."""
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
            return self._enter(st, State.PARKED, reason, now, acts)
        if st.park_reason is not None:
            return self._enter(st, State.PARKED, st.park_reason, now, acts)
        if st.retry_at is not None and st.retry_at > now:
            return self._enter(st, State.BACKOFF, f"restart at +{_secs(st.retry_at - now)}", now, acts)
        return self._spawn(st, reason, acts)

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
    ) -> SupervisorState:
        """LS failed (crashed, did not start, not ready in time): the restart policy decides.
        ``defer``: a reconcile is under way; its result settles into BACKOFF/PARKED (no transition now)."""
        pol = self.policy
        if exit_one and started_at is not None and now - started_at <= pol.config_error_window:
            what = f"LS rejected its config (exit 1 within {_secs(pol.config_error_window)})"
        backoff, decision = record_failure(pol, st.backoff, now, self.rand())
        st = replace(st, backoff=backoff, last_exit=what, child=None, stopping=None, spawn_pending=False)
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
                return self._enter(st, State.PARKED, park, now, acts)
            case _:
                assert_never(decision)

    # -- event handlers ----------------------------------------------------------------------------

    def _booted(self, st: SupervisorState, ev: Booted, now: float, acts: list[Action]) -> SupervisorState:
        if st.booted:
            raise LifecycleError("Booted twice")
        desired = Desired(goal=Goal.PAUSE if ev.paused else Goal.RUN, target_version=ev.target_version)
        st = replace(st, booted=True, desired=desired, prior=None)
        acts.append(SweepOrphans())
        st = self._enter(st, State.RECONCILING, "boot", now, acts, substep=Substep.RENDERING)
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
        st = replace(st, desired=desired, pending=None)
        reason = f"shutdown ({ev.signal})"
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
        code = ExitCode.PARKED if st.state is State.PARKED else ExitCode.OK
        st = replace(st, exit_code=code, retry_at=None)
        st = self._enter(st, State.STOPPED, reason, now, acts)
        acts.append(Exit(code))
        return st

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
        st = replace(st, prior=st.state, pending=None)
        st = self._enter(st, State.RECONCILING, reason, now, acts, substep=Substep.RENDERING)
        acts.append(PrepareConfig(reload=reload))
        return st

    def _config_prepared(
        self, st: SupervisorState, ev: ConfigPrepared, now: float, acts: list[Action]
    ) -> SupervisorState:
        if st.state is not State.RECONCILING or st.spawn_pending:
            raise LifecycleError(f"ConfigPrepared in {st.state.value}")
        leaving_park = st.prior is State.PARKED
        st = replace(
            st,
            digest=ev.digest,
            version=ev.version,
            wait_for_health=ev.wait_for_health,
            desired=replace(st.desired, target_version=ev.target_version),
        )
        if leaving_park and st.child is None and st.unkillable_pid is None:
            # An operator acted (HUP/USR1/resume) and the config is good: a fresh restart budget.
            st = replace(st, park_reason=None, backoff=BackoffState(), retry_at=None)
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        reason = "boot" if st.prior is None else "LS config unchanged"
        return self._settle(st, now, acts, reason)

    def _config_failed(
        self, st: SupervisorState, ev: ConfigFailed, now: float, acts: list[Action]
    ) -> SupervisorState:
        if st.state is not State.RECONCILING or st.spawn_pending:
            raise LifecycleError(f"ConfigFailed in {st.state.value}")
        if st.digest is None:
            # Nothing was ever rendered: there is no old config to keep. Fail closed (EX_CONFIG).
            acts.append(LogLine(Level.ERROR, f"cannot render the LS config: {ev.message}"))
            st = replace(st, exit_code=ExitCode.CONFIG)
            st = self._enter(st, State.STOPPED, ev.message, now, acts)
            acts.append(Exit(ExitCode.CONFIG))
            return st
        acts.append(LogLine(Level.ERROR, f"reload failed, keeping the previous config: {ev.message}"))
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        return self._settle(st, now, acts, "reload failed, previous config kept")

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
            st = replace(st, exit_code=ExitCode.OK)
            st = self._enter(st, State.STOPPED, "shutdown", now, acts)
            acts.append(Exit(ExitCode.OK))
            return st
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
            acts.append(LogLine(Level.WARNING, f"LS pid {ev.pid} finally exited ({ev.description})"))
            acts.append(WriteState())
            return replace(st, unkillable_pid=None)
        if child is None or child.pid != ev.pid:
            raise LifecycleError(f"ChildExited pid={ev.pid} but our LS is {st.pid} in {st.state.value}")
        if st.state is State.STOPPING:
            return self._stopped(st, ev, now, acts)
        if st.state in (State.STARTING, State.RUNNING, State.RECONCILING):
            return self._failure(
                st, f"LS {ev.description}", now, acts,
                started_at=child.started_at, exit_one=ev.returncode == 1,
                defer=st.state is State.RECONCILING,
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
            st = replace(st, exit_code=ExitCode.OK)
            st = self._enter(st, State.STOPPED, stopping.reason, now, acts)
            acts.append(Exit(ExitCode.OK))
            return st
        if stopping.purpose is StopPurpose.FAILED_START:
            return self._failure(st, stopping.reason, now, acts, started_at=started_at, exit_one=False)
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        match stopping.purpose:
            case StopPurpose.PAUSE | StopPurpose.RESTART | StopPurpose.SHUTDOWN:
                # SHUTDOWN purpose with another goal cannot happen: shutdown sets the goal for good.
                return self._settle(st, now, acts, stopping.reason)
            case _:
                raise LifecycleError(f"stop purpose {stopping.purpose.value} after the stop")

    def _tick(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        t = self.timeouts
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
            "check it (D state?) and restart lssupervisor"
        )
        acts.append(LogLine(Level.ERROR, reason))
        st = replace(
            st, child=None, stopping=None, park_reason=reason, retry_at=None, unkillable_pid=st.child.pid
        )
        if st.desired.goal is Goal.SHUTDOWN:
            st = replace(st, exit_code=ExitCode.LS_RUNNING)
            st = self._enter(st, State.STOPPED, reason, now, acts)
            acts.append(Exit(ExitCode.LS_RUNNING))
            return st
        return self._enter(st, State.PARKED, reason, now, acts)

"""The reconcile cycle: the RECONCILING sub-steps of the pure core (see :mod:`lssupervisor.core.lifecycle`
for the whole machine and docs/reconcile.md for the story).

Theory of operation
-------------------
A reconcile is a sequence of RECONCILING sub-steps (:data:`lssupervisor.core.tables.CYCLE`), each
waiting for one asynchronous job of the shell (``state.task``; :data:`lssupervisor.core.tables.TASK_OF`)::

    PLANNING (PrepareConfig -> Planned)                                   LS still runs
      nothing to write -> RENDERING (RenderConfig -> ConfigPrepared) -> settle (LS keeps its pid when
                          the rendered config is unchanged)
      else             -> IMPORTING (ImportMigrations -> Imported)        LS still runs, time-limited
                          -> [STOPPING purpose migration: SIGTERM LS, intended (I5)]
                          -> PROVING (ProveGone -> GoneProven)
                          -> [DRAINING (StartDrain -> DrainFinished) -> PROVING]   lightningstream.drain
                          -> PRE_HOOKS (RunHook -> HookFinished)*
                          -> BACKING_UP/MIGRATING (StartMigration -> MigrationProgress* -> Migrated)
                          -> VERIFYING (ReadMarkers -> MarkersRead)
                          -> POST_HOOKS* -> RENDERING for the version the markers HAVE (I2)
                          -> settle: STARTING -> RUNNING
    failures -> PARKED (reason names the next command) or, with ``on_failure: resume``, RENDERING for
    the version the LMDB has (after a failed step k of n: version k). A failure before LS was stopped
    (planning, importing) leaves a running LS running.

A job's result is accepted only while ``state.task`` names that job (checked once, in
:meth:`~lssupervisor.core.lifecycle.Lifecycle.handle`, against :data:`~lssupervisor.core.tables.RESULT_OF`):
results of a cancelled job are stale and ignored. The import and each step of the migration (its backup
counted as one) run under a time limit (``migrations.import_timeout``, ``migrations.step_timeout``):
when it expires the core cancels the job (the worker is SIGKILLed; LMDB aborts the open transaction),
and the failure names the limit. Shutdown during a migration lets it finish (the second TERM cancels
it); any other job is cancelled at once. Either way LS is not started again and the exit code is 0.

This class is a mixin of :class:`~lssupervisor.core.lifecycle.Lifecycle`: the LS supervision helpers it
needs (entering a state, stopping LS, settling) are declared here and implemented there.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import assert_never

from lssupervisor.core import reasons
from lssupervisor.core.actions import (
    Action,
    CancelTask,
    ImportMigrations,
    Level,
    LogLine,
    Notify,
    NotifyKind,
    PrepareConfig,
    ProveGone,
    ReadMarkers,
    RenderConfig,
    RunHook,
    ShowProgress,
    StartDrain,
    StartMigration,
    WriteState,
)
from lssupervisor.core.backoff import BackoffState
from lssupervisor.core.events import (
    ConfigFailed,
    ConfigPrepared,
    DrainFinished,
    GoneProven,
    HookFinished,
    Imported,
    MarkersRead,
    Migrated,
    MigrationProgress,
    Planned,
    Stage,
    TaskFailed,
)
from lssupervisor.core.states import (
    Cycle as CycleState,
)
from lssupervisor.core.states import (
    Goal,
    OnFailure,
    Pending,
    State,
    StopPurpose,
    Substep,
    SupervisorState,
    Task,
)
from lssupervisor.errors import ErrorCode, ExitCode


class LifecycleError(Exception):
    """An event that cannot happen in this state: a bug in the shell, never an operator error."""


@dataclass(frozen=True, slots=True)
class CyclePolicy:
    """The reconcile cycle's parameters (from our config; swapped with the core on reload)."""

    drain: bool = False
    pre_hooks: int = 0
    post_hooks: int = 0
    on_failure: OnFailure = OnFailure.PARK
    debounce: float = 1.0
    import_timeout: float = 60.0  # migrations.import_timeout: loading the migrations' code
    step_timeout: float = 3600.0  # migrations.step_timeout: each step, and the backup


class Cycle(abc.ABC):
    """The reconcile sub-steps (mixin of Lifecycle; see the module docstring)."""

    cycle: CyclePolicy

    # -- provided by Lifecycle (LS supervision) ------------------------------------------------------

    @abc.abstractmethod
    def _enter(
        self,
        st: SupervisorState,
        new_state: State,
        reason: str | None,
        now: float,
        acts: list[Action],
        *,
        substep: Substep | None = None,
    ) -> SupervisorState: ...

    @abc.abstractmethod
    def _exit(
        self, st: SupervisorState, code: ExitCode, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState: ...

    @abc.abstractmethod
    def _begin_stop(
        self, st: SupervisorState, purpose: StopPurpose, reason: str, now: float, acts: list[Action]
    ) -> SupervisorState: ...

    @abc.abstractmethod
    def _settle(
        self, st: SupervisorState, now: float, acts: list[Action], reason: str, *, start: str | None = None
    ) -> SupervisorState: ...

    @abc.abstractmethod
    def _start_reason(self, st: SupervisorState) -> str: ...

    # -- operator requests ------------------------------------------------------------------------------

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
        cycle = st.cycle
        st = self._task_done(st)
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
        if st.prior is None:
            # The boot reconcile: there is no old config to keep. Fail closed with the stage's code
            # (EX_CONFIG; EX_DATAERR for a migration file that does not load, as offline).
            acts.append(LogLine(Level.ERROR, failed))
            return self._exit(st, ev.exit_code, failed, now, acts)
        # A reload in any state keeps what runs: the previous config, and the state it left.
        acts.append(LogLine(Level.ERROR, f"reload failed, keeping the previous config: {failed}"))
        if st.pending is not None:
            return self._start_reconcile(st, st.pending.reload, "reconcile (requested meanwhile)", now, acts)
        if st.digest is None:
            # Never rendered (parked by the boot reconcile): nothing could be started; stay parked.
            return self._park(st, st.park_reason or failed, now, acts, code=st.park_exit)
        # The status says why, not only the log: an operator reads `lssupervisor status` first.
        kept = f"reload failed, previous config kept: {failed}"
        return self._settle(st, now, acts, kept, start=f"{self._start_reason(st)}; {kept}")

    # -- the reconcile cycle -------------------------------------------------------------------------

    @staticmethod
    def _task_done(st: SupervisorState) -> SupervisorState:
        """The job in flight ended: no task, no time limit running."""
        return replace(
            st, task=None, task_deadline=None, task_limit=None, task_overdue=False, progress_mark=None
        )

    def _limit(self, st: SupervisorState, now: float, seconds: float, what: str) -> SupervisorState:
        """Arm the running job's time limit (``seconds`` > 0, validated in the config)."""
        return replace(st, task_deadline=now + seconds, task_limit=f"{what} ({reasons.secs(seconds)})")

    def _overdue(self, st: SupervisorState, acts: list[Action]) -> SupervisorState:
        """The job's time limit expired (a Tick): cancel it; its failure arrives as ``cancelled``."""
        acts.append(
            LogLine(Level.ERROR, f"{st.task_limit} expired: cancelling {st.task.value if st.task else ''}")
        )
        acts.append(CancelTask(f"{st.task_limit} expired"))
        return replace(st, task_deadline=None, task_overdue=True)

    def _step(
        self,
        st: SupervisorState,
        substep: Substep,
        reason: str,
        task: Task,
        action: Action,
        now: float,
        acts: list[Action],
    ) -> SupervisorState:
        st = self._enter(self._task_done(st), State.RECONCILING, reason, now, acts, substep=substep)
        acts.append(action)
        return replace(st, task=task)

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
            self._task_done(st),
            park_reason=reason,
            park_exit=code,
            cycle=None,
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
        st = replace(self._task_done(st), cycle=None, progress=None)
        if st.child is not None:
            # A job that ran with LS up (planning, importing) was cancelled: stop LS, then exit.
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
        st = replace(self._task_done(st), desired=replace(st.desired, target_version=ev.target))
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
        cycle = CycleState(
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
        if cycle.steps:
            # Load the migrations' code while LS still runs: LS goes down for the migration's own work.
            reason = f"importing the migrations for {cycle.describe()}"
            st = self._step(
                st, Substep.IMPORTING, reason, Task.IMPORT, ImportMigrations(cycle.target), now, acts
            )
            return self._limit(st, now, self.cycle.import_timeout, "migrations.import_timeout")
        return self._stop_for_migration(st, now, acts)

    def _imported(self, st: SupervisorState, ev: Imported, now: float, acts: list[Action]) -> SupervisorState:
        st = self._task_done(st)
        acts.append(LogLine(Level.INFO, f"migrations imported in {reasons.secs(round(ev.duration_s, 3))}"))
        return self._stop_for_migration(st, now, acts)

    def _stop_for_migration(self, st: SupervisorState, now: float, acts: list[Action]) -> SupervisorState:
        cycle = st.cycle
        assert cycle is not None
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
        task = st.task
        assert task is not None  # handle() let only the result of the job in flight through
        message = reasons.with_advice(ev.message, ev.remedy)
        if st.task_overdue and st.task_limit is not None:
            message = f"{st.task_limit} expired: {message}"
        st = replace(self._task_done(st), progress=None)
        if st.desired.goal is Goal.SHUTDOWN:
            acts.append(LogLine(Level.WARNING, f"{task.value} ended: {message}"))
            return self._exit_after_cycle(st, "shutdown", now, acts)
        cycle = st.cycle
        match task:
            case Task.PLAN:
                if ev.code is ErrorCode.TOO_NEW:
                    return self._park(st, message, now, acts, code=ExitCode.TOO_NEW)
                return self._plan_problem(st, message, now, acts)
            case Task.IMPORT:
                return self._plan_problem(st, f"cannot import the migrations: {message}", now, acts)
            case Task.PROVE:
                return self._park(
                    st,
                    f"cannot prove LS gone: {message}; check that no LS has the LMDB open "
                    "(`ps -ef | grep lightningstream`), then run `lssupervisor resume`",
                    now,
                    acts,
                    code=ExitCode.LS_RUNNING,
                )
            case Task.DRAIN | Task.HOOK:
                return self._failed_before_write(st, f"{task.value} could not run: {message}", now, acts)
            case Task.MIGRATE:
                assert cycle is not None
                acts.append(LogLine(Level.ERROR, f"migration {cycle.describe()} failed: {message}"))
                st = replace(st, cycle=replace(cycle, failure=message, backup_id=ev.backup_id))
                return self._verify(st, now, acts)
            case Task.VERIFY:
                return self._park(
                    st,
                    f"cannot read the schema markers back: {message}; see what the LMDB has "
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
        st = self._task_done(st)
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
        cycle = st.cycle
        assert cycle is not None
        st = self._task_done(st)
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
        if cycle is None or cycle.hook != ev.index:
            return st  # a cancelled hook's late result
        st = self._task_done(st)
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
        st = self._step(st, substep, f"migrating {cycle.describe()}", Task.MIGRATE, action, now, acts)
        mark = Stage.BACKUP if cycle.steps else Stage.MIGRATE
        st = replace(st, progress_mark=(mark.value, 0))
        return self._limit(st, now, self.cycle.step_timeout, "migrations.step_timeout")

    def _progress(
        self, st: SupervisorState, ev: MigrationProgress, now: float, acts: list[Action]
    ) -> SupervisorState:
        cycle = st.cycle
        if cycle is None:
            return st
        if ev.stage is Stage.COMMITTED:
            acts.append(LogLine(Level.INFO, ev.text))
        substep = Substep.BACKING_UP if ev.stage is Stage.BACKUP else Substep.MIGRATING
        st = replace(st, progress=ev.text)
        mark = (Stage.MIGRATE.value, ev.step) if ev.stage is not Stage.BACKUP else (Stage.BACKUP.value, 0)
        if ev.stage is Stage.MIGRATE and mark != st.progress_mark and not st.task_overdue:
            # A new step began: it gets its own time limit (the backup had one too).
            st = self._limit(
                replace(st, progress_mark=mark), now, self.cycle.step_timeout, "migrations.step_timeout"
            )
        if substep is not st.substep:
            st = self._enter(st, State.RECONCILING, st.reason, now, acts, substep=substep)
        acts.append(ShowProgress(ev.text, startup=cycle.startup))
        return st

    def _migrated(self, st: SupervisorState, ev: Migrated, now: float, acts: list[Action]) -> SupervisorState:
        cycle = st.cycle
        assert cycle is not None
        backup = f", backup {ev.backup_id}" if ev.backup_id else ""
        acts.append(
            LogLine(
                Level.INFO,
                f"migration {cycle.describe()} done: {ev.steps} step(s) in "
                f"{reasons.secs(ev.duration_s)}{backup}",
            )
        )
        st = replace(
            self._task_done(st), progress=None, cycle=replace(cycle, migrated=True, backup_id=ev.backup_id)
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
        assert cycle is not None
        st = self._task_done(st)
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

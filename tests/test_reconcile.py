"""The reconcile cycle in the pure core: every sub-step transition and failure, literal times, no processes.

``cycler()`` gives a replay (tests/harness/replay.py) that keeps every action; ``substeps()`` is the
sequence of RECONCILING sub-steps as status and logs show it. The shell's side (workers, drain, hooks)
is played by feeding the result events by hand.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from lssupervisor.config import OnFailure
from lssupervisor.core import tables
from lssupervisor.core.actions import (
    Action,
    CancelTask,
    Exit,
    ImportMigrations,
    LogLine,
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
)
from lssupervisor.core.backoff import BackoffPolicy
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
    ShutdownRequested,
    Stage,
    TaskFailed,
    Tick,
)
from lssupervisor.core.lifecycle import CyclePolicy, Lifecycle, LifecycleError, Timeouts
from lssupervisor.core.states import State, StopPurpose, Substep, SupervisorState, Task
from lssupervisor.errors import ErrorCode, ExitCode, Remedy
from tests.harness.replay import Replay

TIMEOUTS = Timeouts(stop_timeout=10.0, ready_timeout=30.0, settle_time=3.0, kill_grace=5.0)
POLICY = BackoffPolicy(initial_delay=1.0, max_delay=60.0, jitter=0.0, burst_limit=5)

MIGRATE_1_2 = Planned(
    render_version=1, target=2, writes=True, steps=("main 1→2 (0002_users_json)",), markers=(("main", 1),)
)
MIGRATE_1_3 = Planned(
    render_version=1,
    target=3,
    writes=True,
    steps=("main 1→2 (0002_users_json)", "main 2→3 (0003_split)"),
    markers=(("main", 1),),
)
NOTHING_V1 = Planned(render_version=1, target=1, writes=False, markers=(("main", 1),))
STAMP_EMPTY = Planned(render_version=None, target=2, writes=True, steps=(), markers=(("main", None),))
EXITED_TERM = ChildExited(pid=10, returncode=-15, description="killed by SIGTERM")


def cycler(**policy: object) -> Replay:
    """A replay of the core with the cycle policy ``policy`` (drain, hooks, on_failure)."""
    return Replay(Lifecycle(TIMEOUTS, POLICY, rand=lambda: 0.0, cycle=CyclePolicy(**policy)))  # type: ignore[arg-type]


def running(c: Replay, pid: int = 10) -> None:
    """Boot on a marked LMDB with nothing to migrate, LS ready."""
    c(Booted(), 0.0)
    c(NOTHING_V1, 0.2)
    c(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 0.3)
    c(ChildSpawned(pid=pid), 0.3)
    c(ChildReady(pid=pid), 1.0)
    assert c.state() is State.RUNNING
    c.acts.clear()


def to_migrating(c: Replay, planned: Planned = MIGRATE_1_2) -> None:
    """From RUNNING: USR1, plan with steps, LS stopped and proven gone, migrate worker started."""
    c(ReconcileRequested(), 10.0)
    c(planned, 10.2)
    c(Imported(), 10.25)
    c(EXITED_TERM, 10.3)
    c(GoneProven(), 10.4)
    assert c.st.task is Task.MIGRATE


# -- the whole cycle ---------------------------------------------------------------------------------


def test_full_cycle_from_running_follows_the_substep_sequence() -> None:
    c = cycler()
    running(c)
    assert c(ReconcileRequested(), 10.0)[-1] == PrepareConfig(reload=False)
    assert (c.st.substep, c.st.task) == (Substep.PLANNING, Task.PLAN)
    assert c(MIGRATE_1_2, 10.2)[-1] == ImportMigrations(target=2)
    # The migrations' code is loaded while LS still runs (LS goes down for the migration's own work).
    assert (c.state(), c.st.substep, c.st.task) == (State.RECONCILING, Substep.IMPORTING, Task.IMPORT)
    assert c.st.pid == 10
    acts = c(Imported(), 10.25)
    # LS is stopped for the migration: an intended stop, never the restart policy (I5).
    assert c.state() is State.STOPPING and c.st.stopping is not None
    assert c.st.stopping.purpose is StopPurpose.MIGRATION
    assert SignalGroup(pid=10) in acts
    assert c(EXITED_TERM, 10.3)[-1] == ProveGone()
    assert c(GoneProven(), 10.4)[-1] == StartMigration(target=2)
    assert c.st.substep is Substep.BACKING_UP
    c(MigrationProgress(Stage.BACKUP, "backing up main: 100%"), 10.5)
    acts = c(MigrationProgress(Stage.MIGRATE, "migrating main 1→2: 45%"), 10.6)
    assert c.st.substep is Substep.MIGRATING and c.st.progress == "migrating main 1→2: 45%"
    assert ShowProgress("migrating main 1→2: 45%", startup=False) in acts
    c(MigrationProgress(Stage.COMMITTED, "committed main 1→2 (0002_users_json), step 1/1"), 10.7)
    assert c(Migrated(backup_id="b1", steps=1, duration_s=0.3), 10.8)[-1] == ReadMarkers()
    assert c(MarkersRead((("main", 2),)), 10.9)[-1] == RenderConfig(version=2)
    acts = c(ConfigPrepared(digest="d2", version=2, wait_for_health=True), 11.0)
    assert acts[-1] == SpawnChild(digest="d2", reason="schema v2 verified")
    c(ChildSpawned(pid=11), 11.0)
    c(ChildReady(pid=11), 11.5)
    assert c.state() is State.RUNNING and c.st.version == 2 and c.st.pid == 11
    assert c.substeps() == [
        "PLANNING", "IMPORTING", "PROVING", "BACKING_UP", "MIGRATING", "VERIFYING", "RENDERING"
    ]
    assert [new for new, _ in c.announced() if new != "RECONCILING"] == ["STOPPING", "STARTING", "RUNNING"]
    assert c.st.cycle is None and c.st.task is None and c.st.progress is None
    assert c.st.backoff.consecutive == 0 and not c.of(Exit)
    assert "committed main 1→2" in c.logged() and "backup b1" in c.logged()


def test_nothing_to_migrate_and_config_unchanged_keeps_the_ls_pid() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    assert c(NOTHING_V1, 10.2)[-1] == RenderConfig(version=1)
    acts = c(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 10.3)
    assert c.state() is State.RUNNING and c.st.pid == 10
    assert not any(isinstance(a, SignalGroup | SpawnChild | ProveGone | StartMigration) for a in acts)
    assert c.substeps() == ["PLANNING", "RENDERING"]


def test_nothing_to_migrate_but_a_changed_template_restarts_ls_once() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    c(NOTHING_V1, 10.2)
    c(ConfigPrepared(digest="d2", version=1, wait_for_health=True), 10.3)
    assert c.st.stopping is not None and c.st.stopping.purpose is StopPurpose.RESTART
    assert c(EXITED_TERM, 10.4)[-1] == SpawnChild(digest="d2", reason="LS config changed")
    assert not c.of(StartMigration)


def test_boot_on_an_empty_lmdb_stamps_the_target_then_starts_ls() -> None:
    c = cycler(pre_hooks=1, post_hooks=1, drain=True)  # a stamp migrates nothing: no drain, no hooks
    c(Booted(), 0.0)
    assert c(STAMP_EMPTY, 0.2)[-1] == ProveGone()  # no LS yet: straight to the proof
    assert c(GoneProven(), 0.3)[-1] == StartMigration(target=2)
    assert c.st.substep is Substep.MIGRATING  # a stamp has no backup phase
    assert c.st.cycle is not None and c.st.cycle.startup  # before READY=1: systemd timeout extended
    acts = c(MigrationProgress(Stage.MIGRATE, "migrating main ?→2: 100%"), 0.4)
    assert ShowProgress("migrating main ?→2: 100%", startup=True) in acts
    c(Migrated(steps=0), 0.5)
    assert c(MarkersRead((("main", 2),)), 0.6)[-1] == RenderConfig(version=2)
    assert isinstance(c(ConfigPrepared(digest="d2", version=2, wait_for_health=False), 0.7)[-1], SpawnChild)
    assert c.substeps() == ["PLANNING", "PROVING", "MIGRATING", "VERIFYING", "RENDERING"]


def test_drain_runs_on_the_old_version_and_ls_is_proven_gone_again() -> None:
    c = cycler(drain=True)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    assert c(GoneProven(), 10.3)[-1] == StartDrain(version=1)
    assert c.st.substep is Substep.DRAINING
    assert c(DrainFinished(0, "exit 0"), 12.0)[-1] == ProveGone()
    assert c(GoneProven(), 12.1)[-1] == StartMigration(target=2)
    assert c.substeps() == ["PLANNING", "IMPORTING", "PROVING", "DRAINING", "PROVING", "BACKING_UP"]


@pytest.mark.parametrize(
    ("rc", "words"), [(75, "drain_timeout (LS exit 75)"), (1, "drain failed: LS exit 1")]
)
def test_drain_failure_parks_by_default_and_nothing_was_written(rc: int, words: str) -> None:
    c = cycler(drain=True)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    c(GoneProven(), 10.3)
    c(DrainFinished(rc, f"exit {rc}"), 12.0)
    assert c.state() is State.PARKED and c.st.reason is not None
    assert words in c.st.reason and "nothing was written" in c.st.reason
    assert "lssupervisor resume" in c.st.reason
    assert not c.of(StartMigration) and not c.of(SpawnChild)


def test_drain_failure_with_on_failure_resume_restarts_ls_on_the_old_version() -> None:
    c = cycler(drain=True, on_failure=OnFailure.RESUME)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    c(GoneProven(), 10.3)
    assert c(DrainFinished(75, "exit 75"), 12.0)[-1] == RenderConfig(version=1)
    assert isinstance(c(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 12.1)[-1], SpawnChild)


def test_pre_and_post_hooks_run_in_order_around_the_migration() -> None:
    c = cycler(pre_hooks=2, post_hooks=1)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    assert c(GoneProven(), 10.3)[-1] == RunHook("pre", 0, from_version=1, to_version=2)
    assert c(HookFinished("pre", 0, ok=True), 10.4)[-1] == RunHook("pre", 1, from_version=1, to_version=2)
    assert c(HookFinished("pre", 1, ok=True), 10.5)[-1] == StartMigration(target=2)
    c(Migrated(steps=1), 11.0)
    assert c(MarkersRead((("main", 2),)), 11.1)[-1] == RunHook("post", 0, from_version=1, to_version=2)
    assert c(HookFinished("post", 0, ok=True), 11.2)[-1] == RenderConfig(version=2)
    assert c.substeps() == [
        "PLANNING", "IMPORTING", "PROVING", "PRE_HOOKS", "PRE_HOOKS", "BACKING_UP", "VERIFYING", "POST_HOOKS",
        "RENDERING",
    ]


def test_pre_hook_failure_aborts_before_any_write() -> None:
    c = cycler(pre_hooks=1)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    c(GoneProven(), 10.3)
    c(HookFinished("pre", 0, ok=False, message="exit 3"), 10.4)
    assert c.state() is State.PARKED and not c.of(StartMigration)
    assert c.st.reason == (
        "pre_migrate hook 1 failed: exit 3; nothing was written (the LMDB is at version 1); fix it, then run "
        "`lssupervisor resume`"
    )


def test_post_hook_failure_parks_whatever_the_policy_naming_the_migrated_version() -> None:
    c = cycler(post_hooks=1, on_failure=OnFailure.RESUME)
    running(c)
    to_migrating(c)
    c(Migrated(steps=1), 11.0)
    c(MarkersRead((("main", 2),)), 11.1)
    c(HookFinished("post", 0, ok=False, message="timed out after 5s"), 11.2)
    assert c.state() is State.PARKED and c.st.reason is not None
    assert "migrated to version 2" in c.st.reason and not c.of(SpawnChild)


def test_resume_after_a_failed_post_hook_starts_ls_on_the_new_version_saying_why() -> None:
    c = cycler(post_hooks=1)
    running(c)
    to_migrating(c)
    c(Migrated(steps=1), 11.0)
    c(MarkersRead((("main", 2),)), 11.1)
    c(HookFinished("post", 0, ok=False, message="exited with status 1"), 11.2)
    assert c.state() is State.PARKED
    c(ReconcileRequested(source="SIGUSR1"), 30.0)  # `lssupervisor resume`
    assert c(Planned(render_version=2, target=2, writes=False, markers=(("main", 2),)), 30.1)[-1] == (
        RenderConfig(version=2)
    )
    acts = c(ConfigPrepared(digest="d2", version=2, wait_for_health=True), 30.2)
    # Not "LS config unchanged": LS was down and starts on another version's config.
    assert acts[-1] == SpawnChild(digest="d2", reason="leaving PARKED on reconcile (SIGUSR1), schema v2")


# -- failures of the migration ---------------------------------------------------------------------------


def test_failed_step_k_of_n_parks_with_the_version_the_lmdb_has_and_what_to_run() -> None:
    c = cycler()
    running(c)
    to_migrating(c, MIGRATE_1_3)
    c(MigrationProgress(Stage.COMMITTED, "committed main 1→2 (0002_users_json), step 1/2"), 11.0)
    failed = TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "0003_split.py:4: KeyError 'x' (step rolled back)")
    acts = c(failed, 11.2)
    assert acts[-1] == ReadMarkers()  # what the LMDB has now decides, not what we hoped
    c(MarkersRead((("main", 2),)), 11.3)
    assert c.state() is State.PARKED and c.st.reason is not None
    assert "consistently at version 2" in c.st.reason and "lssupervisor resume" in c.st.reason
    assert "0003_split.py:4" in c.st.reason and not c.of(SpawnChild)
    assert c(ShutdownRequested(), 20.0)[-1] == Exit(ExitCode.MIGRATION)


def test_failed_step_with_on_failure_resume_renders_for_step_k_never_the_target() -> None:
    c = cycler(on_failure=OnFailure.RESUME)
    running(c)
    to_migrating(c, MIGRATE_1_3)
    c(TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "boom"), 11.2)
    assert c(MarkersRead((("main", 2),)), 11.3)[-1] == RenderConfig(version=2)  # I2: k, not 3, not 1
    with pytest.raises(LifecycleError):  # the shell rendering any other version is a bug
        c.core.handle(c.st, ConfigPrepared(digest="d3", version=3, wait_for_health=True), 11.4)
    acts = c(ConfigPrepared(digest="d2", version=2, wait_for_health=True), 11.4)
    assert acts[-1] == SpawnChild(digest="d2", reason="migration failed; resuming on version 2")
    assert c.st.version == 2


def test_failure_before_any_commit_with_resume_restarts_ls_on_the_old_version() -> None:
    c = cycler(on_failure=OnFailure.RESUME)
    running(c)
    to_migrating(c)
    c(TaskFailed(Task.MIGRATE, ErrorCode.BACKUP, "no space left for the backup"), 11.0)
    assert c(MarkersRead((("main", 1),)), 11.1)[-1] == RenderConfig(version=1)


def test_verification_mismatch_parks() -> None:
    c = cycler()
    running(c)
    to_migrating(c)
    c(Migrated(steps=1), 11.0)
    c(MarkersRead((("main", 1),)), 11.1)
    assert c.state() is State.PARKED and c.st.reason is not None
    assert c.st.reason.startswith("verification failed: the markers say main=1")


def test_lmdbs_at_different_versions_after_a_migration_park() -> None:
    c = cycler(on_failure=OnFailure.RESUME)
    running(c)
    to_migrating(c)
    c(TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "step of dns failed"), 11.0)
    c(MarkersRead((("main", 2), ("dns", 1))), 11.1)
    # No single prefix can be right (I2): even `resume` must not start LS.
    assert c.state() is State.PARKED and not c.of(SpawnChild) and not c.of(RenderConfig)


def test_render_failure_after_a_migration_never_starts_the_old_config() -> None:
    c = cycler()
    running(c)
    to_migrating(c)
    c(Migrated(steps=1), 11.0)
    c(MarkersRead((("main", 2),)), 11.1)
    c(ConfigFailed("lightningstream.yaml.in: bad"), 11.2)
    assert c.state() is State.PARKED and not c.of(SpawnChild) and c.st.reason is not None
    assert "schema version 2" in c.st.reason and "lssupervisor reload" in c.st.reason


def test_schema_too_new_stops_ls_and_parks_naming_the_backup_and_exits_too_new() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    message = "LMDB 'main' is at schema version 5, newer than ...; restore the newest backup: " \
              "`lssupervisor rollback 20240101T000000Z-1`"
    c(TaskFailed(Task.PLAN, ErrorCode.TOO_NEW, message), 10.2)
    assert c.state() is State.STOPPING and c.st.stopping is not None
    assert c.st.stopping.purpose is StopPurpose.PARK
    c(EXITED_TERM, 10.3)
    assert c.state() is State.PARKED and c.st.reason == message
    assert c.st.backoff.consecutive == 0  # an intended stop (I5)
    assert c(ShutdownRequested(), 20.0)[-1] == Exit(ExitCode.TOO_NEW)


def test_plan_failure_with_ls_running_keeps_it_running() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    changed = "0002_users_json.py: changed since it was applied"
    acts = c(TaskFailed(Task.PLAN, ErrorCode.CHECKSUM_MISMATCH, changed), 10.2)
    assert c.state() is State.RUNNING and c.st.pid == 10
    assert not any(isinstance(a, SignalGroup | SpawnChild) for a in acts)
    assert "reconcile failed, LS keeps running: 0002_users_json.py" in c.logged()


def test_plan_failure_at_boot_parks_with_the_message() -> None:
    c = cycler()
    c(Booted(), 0.0)
    msg = "LMDB 'main' at /db: unreadable schema marker (bad json)"  # the fact; the remedy is structured
    c(TaskFailed(Task.PLAN, ErrorCode.MIGRATION, msg, remedy=Remedy.STAMP), 0.2)
    assert c.state() is State.PARKED and not c.of(SpawnChild)
    # `stamp` refuses while the daemon runs: the reason says to stop it first.
    assert c.st.reason == (
        "LMDB 'main' at /db: unreadable schema marker (bad json); fix it: stop lssupervisor, run "
        "`lssupervisor stamp N`, then start it"
    )


# The worker's message (the fact; `lssupervisor plan` words its remedy for a shell) -> the daemon's park
# reason, with the remedy worded for a running daemon.
UNMARKED = "LMDB 'main' at /db has data but no schema marker for instance 'ns1'"


def test_an_unmarked_lmdb_parks_naming_what_works_while_the_daemon_runs() -> None:
    c = cycler()
    c(Booted(), 0.0)
    c(TaskFailed(Task.PLAN, ErrorCode.UNMARKED, UNMARKED, remedy=Remedy.BASELINE_OR_STAMP), 0.2)
    assert c.state() is State.PARKED and not c.of(SpawnChild)
    # `stamp` refuses (75) while the daemon holds the lock: the reason names what really works.
    assert c.st.reason == (
        "LMDB 'main' at /db has data but no schema marker for instance 'ns1'; if its data is at schema "
        "version N: set schema.baseline: N and run `lssupervisor reload`, or stop lssupervisor, run "
        "`lssupervisor stamp N`, then start it"
    )
    # With LS running (a reconcile), the same advice in the one error line; LS keeps running.
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    c(TaskFailed(Task.PLAN, ErrorCode.UNMARKED, UNMARKED, remedy=Remedy.BASELINE_OR_STAMP), 10.1)
    assert c.state() is State.RUNNING and "set schema.baseline: N and run `lssupervisor reload`" in c.logged()
    assert "run: lssupervisor stamp N" not in c.logged()


def test_ls_not_proven_gone_parks_without_touching_the_lmdb() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    c(GoneProven(remaining=(77,), detail="LMDB main reader: lightningstream --config x"), 10.3)
    assert c.state() is State.PARKED and not c.of(StartMigration) and c.st.reason is not None
    assert "pid 77" in c.st.reason and "(I1)" in c.st.reason
    assert c(ShutdownRequested(), 20.0)[-1] == Exit(ExitCode.LS_RUNNING)


def test_paused_operator_holds_the_migration() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(paused=True, source="pause"), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    assert c.st.stopping is not None and c.st.stopping.purpose is StopPurpose.PAUSE
    c(EXITED_TERM, 10.2)
    assert c.state() is State.PAUSED and not c.of(StartMigration)
    assert "waits for `lssupervisor resume`" in c.logged()


def test_resume_from_a_failed_migration_park_retries_the_cycle() -> None:
    c = cycler()
    running(c)
    to_migrating(c)
    c(TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "boom"), 11.0)
    c(MarkersRead((("main", 1),)), 11.1)
    assert c.state() is State.PARKED
    c(ReconcileRequested(source="resume"), 30.0)
    c(MIGRATE_1_2, 30.1)
    c(Imported(), 30.15)
    assert c(GoneProven(), 30.2)[-1] == StartMigration(target=2)  # no LS to stop: straight on
    c(Migrated(steps=1), 31.0)
    c(MarkersRead((("main", 2),)), 31.1)
    assert isinstance(c(ConfigPrepared(digest="d2", version=2, wait_for_health=True), 31.2)[-1], SpawnChild)
    assert c.st.park_reason is None


# -- park reasons name commands that work while the daemon runs ------------------------------------------

OFFLINE = ("lssupervisor migrate", "lssupervisor stamp", "lssupervisor rollback")


def _park_reasons() -> dict[str, str]:
    """Every cycle park whose reason may name an offline command, from literal histories."""
    reasons: dict[str, str] = {}

    c = cycler()
    c(Booted(), 0.0)
    c(Planned(render_version=None, target=2, writes=False, markers=(("main", 2), ("dns", 1))), 0.1)
    reasons["no common version"] = c.st.reason or ""

    c = cycler()
    running(c)
    to_migrating(c)
    c(TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "step of dns failed"), 11.0)
    c(MarkersRead((("main", 2), ("dns", 1))), 11.1)
    reasons["mixed after migration"] = c.st.reason or ""

    c = cycler()
    running(c)
    to_migrating(c)
    c(TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "boom", backup_id="20260101T000000Z-v1"), 11.0)
    c(MarkersRead((("main", 1),)), 11.1)
    reasons["failed migration"] = c.st.reason or ""

    c = cycler()
    running(c)
    to_migrating(c)
    c(Migrated(steps=1), 11.0)
    c(TaskFailed(Task.VERIFY, ErrorCode.WORKER, "worker died"), 11.1)
    reasons["verify failed"] = c.st.reason or ""
    return reasons


def test_park_reasons_say_to_stop_lssupervisor_before_an_offline_command() -> None:
    # migrate/stamp/rollback take the daemon's lock: run while it runs they refuse (75).
    reasons = _park_reasons()
    for name, reason in reasons.items():
        assert "lssupervisor resume" in reason or "stop lssupervisor" in reason, (name, reason)
        for command in OFFLINE:
            if command in reason:
                assert reason.index("stop lssupervisor") < reason.index(command), (name, reason)
    assert "`lssupervisor resume` to migrate the rest" in reasons["mixed after migration"]
    assert "`lssupervisor rollback 20260101T000000Z-v1`" in reasons["failed migration"]
    # `status` does not read the LMDB; `fleet` and `history` do, without the lock.
    assert "`lssupervisor fleet`" in reasons["verify failed"] and "lssupervisor status" not in reasons[
        "verify failed"
    ]


# -- shutdown and cancellation -------------------------------------------------------------------------


def test_first_term_during_the_migration_lets_it_finish_then_exits_without_ls() -> None:
    c = cycler()
    running(c)
    to_migrating(c)
    acts = c(ShutdownRequested(), 11.0)
    assert c.state() is State.RECONCILING and not any(isinstance(a, CancelTask) for a in acts)
    assert "send SIGTERM again to cancel it" in c.logged()
    acts = c(Migrated(steps=1), 12.0)
    assert c.state() is State.STOPPED and acts[-1] == Exit(ExitCode.OK)
    assert not c.of(SpawnChild) and not c.of(ReadMarkers)


def test_second_term_cancels_the_migration_and_exits_zero_without_ls() -> None:
    c = cycler()
    running(c)
    to_migrating(c)
    c(ShutdownRequested(), 11.0)
    acts = c(ShutdownRequested(), 11.5)
    assert CancelTask("cancelled by a second SIGTERM") in acts and c.state() is State.RECONCILING
    assert c(ShutdownRequested(), 11.6) == []  # a third one changes nothing
    acts = c(TaskFailed(Task.MIGRATE, ErrorCode.CANCELLED, "worker killed by SIGKILL (cancelled)"), 11.7)
    assert c.state() is State.STOPPED and acts[-1] == Exit(ExitCode.OK)
    assert not c.of(SpawnChild)


def test_term_while_planning_with_ls_running_cancels_the_plan_and_stops_ls() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    acts = c(ShutdownRequested(), 10.1)
    assert isinstance(acts[0], CancelTask) and c.state() is State.STOPPING
    assert c(MIGRATE_1_2, 10.2) == [] and c.state() is State.STOPPING  # stale: ignored
    assert c(EXITED_TERM, 10.3)[-1] == Exit(ExitCode.OK)


def test_term_while_proving_exits_at_once() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    c(EXITED_TERM, 10.2)
    acts = c(ShutdownRequested(), 10.3)
    assert isinstance(acts[0], CancelTask) and acts[-1] == Exit(ExitCode.OK)
    assert c(GoneProven(), 10.4) == []  # the cancelled job's result


def test_stale_results_outside_their_step_are_ignored() -> None:
    c = cycler()
    running(c)
    before = c.st
    for ev in (MIGRATE_1_2, GoneProven(), Migrated(), MarkersRead((("main", 2),)), DrainFinished(0, "exit 0"),
               HookFinished("pre", 0, ok=True), MigrationProgress(Stage.MIGRATE, "x"),
               TaskFailed(Task.MIGRATE, ErrorCode.WORKER, "x")):
        assert c(ev, 10.0) == [] and c.st == before


def test_a_request_during_the_migration_runs_after_it() -> None:
    c = cycler()
    running(c)
    to_migrating(c)
    c(ReconcileRequested(source="watch"), 10.5)
    assert c.st.pending is not None and c.st.task is Task.MIGRATE
    c(Migrated(steps=1), 11.0)
    c(MarkersRead((("main", 2),)), 11.1)
    acts = c(ConfigPrepared(digest="d2", version=2, wait_for_health=True), 11.2)
    assert acts[-1] == PrepareConfig(reload=False) and c.st.substep is Substep.PLANNING


def test_unkillable_ls_blocks_any_migration() -> None:
    c = cycler()
    running(c)
    c.st = replace(c.st, state=State.PARKED, child=None, unkillable_pid=10, park_reason="LS pid 10 survived")
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.15)
    assert c.state() is State.PARKED and not c.of(ProveGone)
    assert c(ShutdownRequested(), 20.0)[-1] == Exit(ExitCode.LS_RUNNING)  # like the SIGKILL path


# -- the watcher's debounce ------------------------------------------------------------------------------


def test_file_changes_are_debounced_into_one_reconcile() -> None:
    c = cycler(debounce=1.0)
    running(c)
    assert c(FileChanged("/app/migrations"), 10.0) == []
    c(FileChanged("/app/migrations"), 10.5)
    assert c.core.next_deadline(c.st) == pytest.approx(11.5)
    assert c(Tick(), 11.0) == [] and c.state() is State.RUNNING
    assert c(Tick(), 11.5)[-1] == PrepareConfig(reload=False)
    assert c.st.reason == "reconcile (watched file changed)" and c.st.watch_due_at is None


def test_a_file_that_never_stops_changing_cannot_postpone_the_reconcile_forever() -> None:
    from lssupervisor.core.lifecycle import DEBOUNCE_MAX_FACTOR

    c = cycler(debounce=1.0)
    running(c)
    t = 10.0
    while t < 10.0 + DEBOUNCE_MAX_FACTOR - 0.5:  # a change every half debounce period
        c(FileChanged("/app/target"), t)
        assert c.core.next_deadline(c.st) <= 10.0 + DEBOUNCE_MAX_FACTOR
        t += 0.5
    acts = c(Tick(), 10.0 + DEBOUNCE_MAX_FACTOR)
    assert acts and acts[-1] == PrepareConfig(reload=False)
    assert c.st.watch_due_at is None and c.st.watch_first_at is None
    # The next burst is measured from its own first change.
    c.st = replace(c.st, state=State.RUNNING)
    c(FileChanged("/app/target"), 30.0)
    assert c.st.watch_first_at == 30.0 and c.core.next_deadline(c.st) == pytest.approx(31.0)


def test_a_change_of_our_config_file_is_a_reload() -> None:
    c = cycler(debounce=0.2)
    running(c)
    c(FileChanged("/etc/lssupervisor/lssupervisor.yaml", ours=True), 10.0)
    c(FileChanged("/etc/lssupervisor/lightningstream.yaml.in"), 10.1)
    assert c(Tick(), 10.3)[-1] == PrepareConfig(reload=True)


def test_a_change_while_reconciling_is_kept_pending() -> None:
    c = cycler(debounce=0.2)
    running(c)
    to_migrating(c)
    c(FileChanged("/app/migrations"), 11.0)
    c(Tick(), 11.3)
    assert c.st.pending is not None and c.st.task is Task.MIGRATE


def test_no_reconcile_from_the_watcher_after_shutdown() -> None:
    c = cycler(debounce=0.2)
    running(c)
    c(FileChanged("/app/migrations"), 10.0)
    c(ShutdownRequested(), 10.1)
    assert c.st.watch_due_at is None
    assert c(FileChanged("/app/migrations"), 10.2) == [] and c.st.watch_due_at is None


# -- random histories with the cycle: I1 and I5 under any interleaving -----------------------------------



@settings(max_examples=300, deadline=None)
@given(
    hst.lists(hst.integers(min_value=0, max_value=11), min_size=1, max_size=80),
    hst.booleans(),
    hst.booleans(),
)
def test_random_histories_never_run_ls_during_a_job_that_touches_the_lmdb(
    script: list[int], drain: bool, resume: bool
) -> None:
    """A simulated, protocol-abiding shell: jobs finish (or fail) whenever the script says, LS dies when
    signalled. Invariants: no LS is alive while a drain, a migration or a marker read is in flight
    (I1), LS is never spawned while a job runs, and a render is always for the marker the simulated
    LMDB has (I2)."""
    c = Lifecycle(
        TIMEOUTS, POLICY, rand=lambda: 0.0,
        cycle=CyclePolicy(
            drain=drain, pre_hooks=1, on_failure=OnFailure.RESUME if resume else OnFailure.PARK
        ),
    )
    s = SupervisorState()
    now = 0.0
    marker = 1
    live: int | None = None
    next_pid = 100
    job: Action | None = None  # the job the simulated shell runs
    queue: list[Event] = []
    n = 0

    def run(first: Event) -> None:
        queue.append(first)
        while queue:
            one(queue.pop(0))

    def one(ev: Event) -> None:
        nonlocal s, live, next_pid, job
        before = s.state
        s, acts = c.handle(s, ev, now)
        # Every entry into PARKED (cycle, restart policy, deferred crash) logs exactly one `parked:` line.
        parked_lines = [a.msg for a in acts if isinstance(a, LogLine) and a.msg.startswith("parked: ")]
        entered = s.state is State.PARKED and before is not State.PARKED
        assert parked_lines == ([f"parked: {s.reason}"] if entered else [])
        for a in acts:
            if isinstance(a, SpawnChild):
                assert live is None and job is None, "LS started while a job runs (I1)"
                next_pid += 1
                live = next_pid
                queue.append(ChildSpawned(pid=live))
            elif isinstance(a, StartMigration | StartDrain | ReadMarkers | ProveGone):
                assert live is None, f"{type(a).__name__} with LS alive (I1)"
                job = a
            elif isinstance(a, PrepareConfig | RunHook | RenderConfig):
                job = a
                if isinstance(a, RenderConfig):
                    assert a.version == marker, "rendered for a version the LMDB does not have (I2)"
                    job = None
                    queue.append(
                        ConfigPrepared(digest=f"d{a.version}", version=a.version, wait_for_health=True)
                    )
            elif isinstance(a, CancelTask):
                job = None

    def finish(ok: bool) -> None:
        nonlocal job, marker, n
        j, job = job, None
        n += 1
        match j:
            case PrepareConfig():
                run(Planned(render_version=marker, target=3, writes=marker < 3,
                            steps=tuple(f"main {v}→{v + 1}" for v in range(marker, 3)),
                            markers=(("main", marker),))
                    if ok else TaskFailed(Task.PLAN, ErrorCode.WORKER, "x"))
            case ProveGone():
                run(GoneProven())
            case StartDrain():
                run(DrainFinished(0 if ok else 75, "exit"))
            case RunHook(phase=phase, index=index):
                run(HookFinished(phase, index, ok=ok or n % 3 != 0))
            case StartMigration(target=target):
                if ok:
                    marker = target
                    run(Migrated(steps=1))
                else:
                    marker = min(marker + 1, target) if n % 2 else marker  # failed after k steps
                    run(TaskFailed(Task.MIGRATE, ErrorCode.MIGRATION, "boom"))
            case ReadMarkers():
                run(MarkersRead((("main", marker),)))
            case _:
                job = j

    run(Booted())
    for step in script:
        if s.state is State.STOPPED:
            break
        now += 0.3 * (step + 1)
        match step:
            case 0:
                run(ShutdownRequested())
            case 1 | 2:
                run(ReconcileRequested())
            case 3:
                if live is not None:
                    pid, live = live, None
                    run(ChildExited(pid=pid, returncode=1, description="exit 1"))
            case 4:
                if live is not None:
                    run(ChildReady(pid=live))
            case 5 | 6 | 7 | 8:
                if job is not None:
                    finish(ok=step != 5)
            case _:
                deadline = c.next_deadline(s)
                if deadline is not None:
                    now = max(now, deadline)
                run(Tick())
        if s.state is State.STOPPING and live is not None:
            pid, live = live, None
            run(ChildExited(pid=pid, returncode=-15, description="killed by SIGTERM"))
        if s.task in (Task.MIGRATE, Task.DRAIN, Task.VERIFY, Task.PROVE):
            assert live is None and s.child is None


def test_cycle_description_names_where_the_lmdbs_start() -> None:
    from lssupervisor.core.states import Cycle

    one = Cycle(from_version=1, target=2, steps=("main 1→2 (0002_x)",))
    assert one.describe() == "1→2 (main 1→2 (0002_x))"
    assert Cycle(from_version=None, target=3, steps=()).describe() == "unmarked→3 (stamp)"
    mixed = Cycle(from_version=None, target=3, steps=("main 2→3 (0003_x)", "shard 1→3 (marker only)"))
    assert mixed.describe().startswith("mixed→3 (")


# -- importing while LS runs, and the time limits (I10) ------------------------------------------------


def test_a_failed_import_leaves_ls_running_and_touches_nothing() -> None:
    c = cycler()
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    assert c.st.substep is Substep.IMPORTING and c.st.pid == 10
    c(TaskFailed(Task.IMPORT, ErrorCode.MIGRATION_LOAD, "0002_users_json.py:3: NameError: x"), 10.2)
    assert c.state() is State.RUNNING and c.st.pid == 10  # LS was never stopped
    assert not c.of(SignalGroup) and not c.of(StartMigration)
    assert "cannot import the migrations: 0002_users_json.py:3" in c.logged()


def test_an_import_over_its_time_limit_is_cancelled_and_ls_keeps_running() -> None:
    c = cycler(import_timeout=60.0)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    assert c.core.next_deadline(c.st) == pytest.approx(70.1)
    assert c(Tick(), 70.0) == []
    acts = c(Tick(), 70.1)
    assert CancelTask("migrations.import_timeout (1m) expired") in acts
    c(TaskFailed(Task.IMPORT, ErrorCode.CANCELLED, "worker killed by SIGKILL (...)"), 70.2)
    assert c.state() is State.RUNNING and c.st.pid == 10
    assert "migrations.import_timeout (1m) expired: worker killed by SIGKILL" in c.logged()


def test_each_step_and_the_backup_get_their_own_time_limit() -> None:
    c = cycler(step_timeout=100.0)
    running(c)
    to_migrating(c)  # StartMigration at 10.4: the backup's limit runs
    assert c.st.task_limit == "migrations.step_timeout (100s)"
    assert c.core.next_deadline(c.st) == pytest.approx(110.4)
    c(MigrationProgress(Stage.BACKUP, "backing up main"), 50.0)
    assert c.core.next_deadline(c.st) == pytest.approx(110.4)  # backup progress does not re-arm it
    c(MigrationProgress(Stage.MIGRATE, "migrating main 1→2", step=0), 60.0)
    assert c.core.next_deadline(c.st) == pytest.approx(160.0)  # the step's own limit from its start
    c(MigrationProgress(Stage.MIGRATE, "migrating main 1→2: 50%", step=0), 100.0)
    assert c.core.next_deadline(c.st) == pytest.approx(160.0)  # progress within the step does not
    assert c(Tick(), 159.9) == []
    acts = c(Tick(), 160.0)
    assert CancelTask("migrations.step_timeout (100s) expired") in acts
    c(TaskFailed(Task.MIGRATE, ErrorCode.CANCELLED, "worker killed by SIGKILL (...); aborted"), 160.1)
    c(MarkersRead((("main", 1),)), 160.2)
    assert c.state() is State.PARKED and c.st.reason is not None
    assert "migrations.step_timeout (100s) expired: worker killed by SIGKILL" in c.st.reason
    assert "consistently at version 1" in c.st.reason and not c.of(SpawnChild)


def test_a_new_step_rearms_the_limit() -> None:
    c = cycler(step_timeout=100.0)
    running(c)
    to_migrating(c, MIGRATE_1_3)
    c(MigrationProgress(Stage.MIGRATE, "step 1", step=0), 20.0)
    c(MigrationProgress(Stage.COMMITTED, "committed step 1", step=0), 90.0)
    c(MigrationProgress(Stage.MIGRATE, "step 2", step=1), 90.5)
    assert c.core.next_deadline(c.st) == pytest.approx(190.5)
    assert c(Tick(), 120.0) == []  # step 1's limit (120.0) no longer applies


def test_the_substeps_follow_the_cycle_table() -> None:
    c = cycler(drain=True, pre_hooks=1, post_hooks=1)
    running(c)
    c(ReconcileRequested(), 10.0)
    c(MIGRATE_1_2, 10.1)
    c(Imported(), 10.2)
    c(EXITED_TERM, 10.3)
    c(GoneProven(), 10.4)
    c(DrainFinished(0, "exit 0"), 11.0)
    c(GoneProven(), 11.1)
    c(HookFinished("pre", 0, ok=True), 11.2)
    c(MigrationProgress(Stage.MIGRATE, "migrating", step=0), 11.3)
    c(Migrated(steps=1), 11.4)
    c(MarkersRead((("main", 2),)), 11.5)
    c(HookFinished("post", 0, ok=True), 11.6)
    seen = [Substep(s) for s in c.substeps()]
    # The order is the table's; the only step back is PROVING after DRAINING (the drain LS had the
    # LMDB open too).
    assert seen == [*tables.CYCLE[:4], Substep.PROVING, *tables.CYCLE[4:]]
    assert all(c.st.task is not tables.TASK_OF[s] or s is seen[-1] for s in seen)

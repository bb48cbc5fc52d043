"""The pure lifecycle core, table-driven over states x events with literal times (no processes).

TABLE lists, for every situation (a state built from literals) and every event, the state after the
event and the kinds of actions in order, or ``raise`` for an event the shell can never send there.
Scenario tests below replay whole histories; a hypothesis test drives a simulated shell at random and
checks the invariants (one LS at most, no restart after an intended stop, every transition announced).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lssupervisor.core import tables
from lssupervisor.core.actions import (
    Action,
    AnnounceState,
    Exit,
    KillGroup,
    Level,
    LogLine,
    Notify,
    NotifyKind,
    PrepareConfig,
    SignalGroup,
    SpawnChild,
    SweepOrphans,
)
from lssupervisor.core.backoff import BackoffPolicy, BackoffState
from lssupervisor.core.events import (
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
    TaskFailed,
    Tick,
)
from lssupervisor.core.lifecycle import Lifecycle, LifecycleError, Timeouts
from lssupervisor.core.states import (
    Child,
    Desired,
    Goal,
    Pending,
    State,
    Stopping,
    StopPurpose,
    Substep,
    SupervisorState,
    Task,
)
from lssupervisor.errors import ErrorCode, ExitCode
from tests.harness.replay import Replay

NOW = 100.0
LATE = 1000.0

TIMEOUTS = Timeouts(stop_timeout=10.0, ready_timeout=30.0, settle_time=3.0, kill_grace=5.0)
POLICY = BackoffPolicy(
    initial_delay=1.0,
    max_delay=60.0,
    multiplier=2.0,
    jitter=0.5,
    reset_after=60.0,
    burst_limit=5,
    burst_window=300.0,
    config_error_window=5.0,
)


def core(sample: float = 0.0) -> Lifecycle:
    return Lifecycle(TIMEOUTS, POLICY, rand=lambda: sample)


RUN = Desired(goal=Goal.RUN)
SHUT = Desired(goal=Goal.SHUTDOWN, shutdown_requests=1)
LS_READY = Child(pid=10, digest="d1", started_at=50.0, wait_for_health=True, ready=True, ready_at=60.0)
LS_NEW = Child(pid=10, digest="d1", started_at=95.0, wait_for_health=True)
BOOTED = SupervisorState(booted=True, since=90.0, digest="d1", version=1, wait_for_health=True, starts=1)

SITUATIONS: dict[str, SupervisorState] = {
    "unbooted": SupervisorState(),
    "boot_reconciling": SupervisorState(
        state=State.RECONCILING, booted=True, substep=Substep.RENDERING, since=90.0
    ),
    "reconciling_running": replace(
        BOOTED, state=State.RECONCILING, substep=Substep.RENDERING, prior=State.RUNNING, child=LS_READY
    ),
    "spawning": replace(
        BOOTED, state=State.RECONCILING, starts=0, spawn_pending=True, spawn_reason="boot"
    ),
    "starting": replace(BOOTED, state=State.STARTING, child=LS_NEW),
    "starting_settle": replace(
        BOOTED, state=State.STARTING, wait_for_health=False, child=replace(LS_NEW, wait_for_health=False)
    ),
    "running": replace(
        BOOTED, state=State.RUNNING, child=LS_READY, backoff=BackoffState(consecutive=2, recent=(40.0, 45.0))
    ),
    "stopping_shutdown": replace(
        BOOTED,
        state=State.STOPPING,
        desired=SHUT,
        child=LS_READY,
        stopping=Stopping(StopPurpose.SHUTDOWN, "shutdown (SIGTERM)", term_at=95.0, kill_at=105.0),
    ),
    "stopping_restart": replace(
        BOOTED,
        state=State.STOPPING,
        digest="d2",
        child=LS_READY,
        stopping=Stopping(StopPurpose.RESTART, "LS config changed", term_at=95.0, kill_at=105.0),
    ),
    "stopping_killed": replace(
        BOOTED,
        state=State.STOPPING,
        desired=replace(SHUT, shutdown_requests=2),
        child=LS_READY,
        stopping=Stopping(
            StopPurpose.SHUTDOWN, "shutdown", term_at=90.0, kill_at=98.0, killed=True, give_up_at=103.0
        ),
    ),
    "stopping_failed_start": replace(
        BOOTED,
        state=State.STOPPING,
        child=LS_NEW,
        stopping=Stopping(StopPurpose.FAILED_START, "LS not ready within 30s", term_at=96.0, kill_at=106.0),
    ),
    "backoff": replace(
        BOOTED, state=State.BACKOFF, retry_at=102.0, backoff=BackoffState(consecutive=1, recent=(90.0,))
    ),
    "paused": replace(BOOTED, state=State.PAUSED, desired=Desired(goal=Goal.PAUSE)),
    "parked": replace(
        BOOTED,
        state=State.PARKED,
        park_reason="LS exit 2; 5 failures",
        backoff=BackoffState(consecutive=5, recent=(60.0, 70.0, 80.0, 90.0, 95.0)),
    ),
    "stopped_final": replace(BOOTED, state=State.STOPPED, exit_code=ExitCode.OK),
}

EVENTS: dict[str, tuple[Event, float]] = {
    "boot": (Booted(), NOW),
    "term": (ShutdownRequested(), NOW),
    "hup": (ReloadRequested(), NOW),
    "usr1": (ReconcileRequested(), NOW),
    "pause": (ReconcileRequested(paused=True, source="pause"), NOW),
    "usr2": (StatusRequested(), NOW),
    "prepared_same": (ConfigPrepared(digest="d1", version=1, wait_for_health=True), NOW),
    "prepared_new": (ConfigPrepared(digest="d2", version=1, wait_for_health=True), NOW),
    "cfg_failed": (ConfigFailed("lightningstream.yaml.in: bad"), NOW),
    "spawned": (ChildSpawned(pid=11), NOW),
    "spawn_failed": (SpawnFailed("lightningstream: not found"), NOW),
    "ready": (ChildReady(pid=10), NOW),
    "ready_stale": (ChildReady(pid=99), NOW),
    "exited": (ChildExited(pid=10, returncode=-9, description="killed by SIGKILL"), NOW),
    "exit1": (ChildExited(pid=10, returncode=1, description="exit 1"), NOW),
    "tick": (Tick(), NOW),
    "tick_late": (Tick(), LATE),
}

# situation  event -> state-after (or raise; "=" keeps the state)  : action kinds in order
TABLE = """
unbooted boot -> RECONCILING : SweepOrphans AnnounceState PrepareConfig
unbooted term -> = :
unbooted hup -> = :
unbooted usr1 -> = :
unbooted pause -> = :
unbooted usr2 -> = : LogStatus
unbooted prepared_same -> raise
unbooted prepared_new -> raise
unbooted cfg_failed -> raise
unbooted spawned -> raise
unbooted spawn_failed -> raise
unbooted ready -> = :
unbooted ready_stale -> = :
unbooted exited -> raise
unbooted exit1 -> raise
unbooted tick -> = :
unbooted tick_late -> = :

boot_reconciling boot -> raise
boot_reconciling term -> STOPPED : Notify AnnounceState Exit
boot_reconciling hup -> = : WriteState
boot_reconciling usr1 -> = : WriteState
boot_reconciling pause -> = : WriteState
boot_reconciling usr2 -> = : LogStatus
boot_reconciling prepared_same -> = : SpawnChild
boot_reconciling prepared_new -> = : SpawnChild
boot_reconciling cfg_failed -> STOPPED : LogLine AnnounceState Exit
boot_reconciling spawned -> raise
boot_reconciling spawn_failed -> raise
boot_reconciling ready -> = :
boot_reconciling ready_stale -> = :
boot_reconciling exited -> raise
boot_reconciling exit1 -> raise
boot_reconciling tick -> = :
boot_reconciling tick_late -> = :

reconciling_running boot -> raise
reconciling_running term -> STOPPING : Notify SignalGroup AnnounceState
reconciling_running hup -> = : WriteState
reconciling_running usr1 -> = : WriteState
reconciling_running pause -> = : WriteState
reconciling_running usr2 -> = : LogStatus
reconciling_running prepared_same -> RUNNING : AnnounceState Notify
reconciling_running prepared_new -> STOPPING : SignalGroup AnnounceState
reconciling_running cfg_failed -> RUNNING : LogLine AnnounceState Notify
reconciling_running spawned -> raise
reconciling_running spawn_failed -> raise
reconciling_running ready -> = :
reconciling_running ready_stale -> = :
reconciling_running exited -> = :
reconciling_running exit1 -> = :
reconciling_running tick -> = :
reconciling_running tick_late -> = :

spawning boot -> raise
spawning term -> = :
spawning hup -> = : WriteState
spawning usr1 -> = : WriteState
spawning pause -> = : WriteState
spawning usr2 -> = : LogStatus
spawning prepared_same -> raise
spawning prepared_new -> raise
spawning cfg_failed -> raise
spawning spawned -> STARTING : AnnounceState
spawning spawn_failed -> BACKOFF : AnnounceState
spawning ready -> = :
spawning ready_stale -> = :
spawning exited -> raise
spawning exit1 -> raise
spawning tick -> = :
spawning tick_late -> = :

starting boot -> raise
starting term -> STOPPING : Notify SignalGroup AnnounceState
starting hup -> RECONCILING : Notify AnnounceState PrepareConfig
starting usr1 -> RECONCILING : AnnounceState PrepareConfig
starting pause -> RECONCILING : AnnounceState PrepareConfig
starting usr2 -> = : LogStatus
starting prepared_same -> raise
starting prepared_new -> raise
starting cfg_failed -> raise
starting spawned -> raise
starting spawn_failed -> raise
starting ready -> RUNNING : AnnounceState Notify
starting ready_stale -> = :
starting exited -> BACKOFF : AnnounceState
starting exit1 -> BACKOFF : AnnounceState
starting tick -> = :
starting tick_late -> STOPPING : SignalGroup AnnounceState

starting_settle tick -> RUNNING : AnnounceState Notify
starting_settle tick_late -> RUNNING : AnnounceState Notify
starting_settle ready -> RUNNING : AnnounceState Notify
starting_settle exited -> BACKOFF : AnnounceState

running boot -> raise
running term -> STOPPING : Notify SignalGroup AnnounceState
running hup -> RECONCILING : Notify AnnounceState PrepareConfig
running usr1 -> RECONCILING : AnnounceState PrepareConfig
running pause -> RECONCILING : AnnounceState PrepareConfig
running usr2 -> = : LogStatus
running prepared_same -> raise
running prepared_new -> raise
running cfg_failed -> raise
running spawned -> raise
running spawn_failed -> raise
running ready -> = :
running ready_stale -> = :
running exited -> BACKOFF : AnnounceState
running exit1 -> BACKOFF : AnnounceState
running tick -> = :
running tick_late -> = : LogLine WriteState

stopping_shutdown boot -> raise
stopping_shutdown term -> = : LogLine KillGroup
stopping_shutdown hup -> = :
stopping_shutdown usr1 -> = :
stopping_shutdown pause -> = :
stopping_shutdown usr2 -> = : LogStatus
stopping_shutdown prepared_same -> raise
stopping_shutdown prepared_new -> raise
stopping_shutdown cfg_failed -> raise
stopping_shutdown spawned -> raise
stopping_shutdown spawn_failed -> raise
stopping_shutdown ready -> = :
stopping_shutdown ready_stale -> = :
stopping_shutdown exited -> STOPPED : AnnounceState Exit
stopping_shutdown exit1 -> STOPPED : AnnounceState Exit
stopping_shutdown tick -> = :
stopping_shutdown tick_late -> = : LogLine KillGroup

stopping_restart boot -> raise
stopping_restart term -> = : Notify WriteState
stopping_restart hup -> = : WriteState
stopping_restart usr1 -> = : WriteState
stopping_restart pause -> = : WriteState
stopping_restart usr2 -> = : LogStatus
stopping_restart prepared_same -> raise
stopping_restart prepared_new -> raise
stopping_restart cfg_failed -> raise
stopping_restart spawned -> raise
stopping_restart spawn_failed -> raise
stopping_restart ready -> = :
stopping_restart ready_stale -> = :
stopping_restart exited -> = : SpawnChild
stopping_restart exit1 -> = : SpawnChild
stopping_restart tick -> = :
stopping_restart tick_late -> = : LogLine KillGroup

stopping_killed term -> = :
stopping_killed hup -> = :
stopping_killed exited -> STOPPED : AnnounceState Exit
stopping_killed tick -> = :
stopping_killed tick_late -> STOPPED : LogLine AnnounceState Exit

stopping_failed_start term -> = : Notify WriteState
stopping_failed_start exited -> BACKOFF : AnnounceState
stopping_failed_start exit1 -> BACKOFF : AnnounceState
stopping_failed_start ready -> = : WriteState
stopping_failed_start tick_late -> = : LogLine KillGroup

backoff boot -> raise
backoff term -> STOPPED : Notify AnnounceState Exit
backoff hup -> RECONCILING : Notify AnnounceState PrepareConfig
backoff usr1 -> RECONCILING : AnnounceState PrepareConfig
backoff pause -> RECONCILING : AnnounceState PrepareConfig
backoff usr2 -> = : LogStatus
backoff prepared_same -> raise
backoff prepared_new -> raise
backoff cfg_failed -> raise
backoff spawned -> raise
backoff spawn_failed -> raise
backoff ready -> = :
backoff ready_stale -> = :
backoff exited -> raise
backoff exit1 -> raise
backoff tick -> = :
backoff tick_late -> = : SpawnChild

paused boot -> raise
paused term -> STOPPED : Notify AnnounceState Exit
paused hup -> RECONCILING : Notify AnnounceState PrepareConfig
paused usr1 -> RECONCILING : AnnounceState PrepareConfig
paused pause -> RECONCILING : AnnounceState PrepareConfig
paused usr2 -> = : LogStatus
paused prepared_same -> raise
paused cfg_failed -> raise
paused spawned -> raise
paused spawn_failed -> raise
paused ready -> = :
paused exited -> raise
paused tick -> = :
paused tick_late -> = :

parked boot -> raise
parked term -> STOPPED : Notify AnnounceState Exit
parked hup -> RECONCILING : Notify AnnounceState PrepareConfig
parked usr1 -> RECONCILING : AnnounceState PrepareConfig
parked pause -> RECONCILING : AnnounceState PrepareConfig
parked usr2 -> = : LogStatus
parked prepared_same -> raise
parked cfg_failed -> raise
parked spawned -> raise
parked spawn_failed -> raise
parked ready -> = :
parked exited -> raise
parked tick -> = :
parked tick_late -> = :

stopped_final boot -> raise
stopped_final term -> = :
stopped_final hup -> = :
stopped_final usr1 -> = :
stopped_final pause -> = :
stopped_final usr2 -> = : LogStatus
stopped_final prepared_same -> raise
stopped_final cfg_failed -> raise
stopped_final spawned -> raise
stopped_final spawn_failed -> raise
stopped_final ready -> = :
stopped_final exited -> raise
stopped_final tick -> = :
stopped_final tick_late -> = :
"""


def _rows() -> list[tuple[str, str, str, list[str]]]:
    rows = []
    for line in TABLE.strip().splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition("->")
        situation, event = left.split()
        result, _, acts = right.partition(":")
        rows.append((situation, event, result.strip(), acts.split()))
    return rows


ROWS = _rows()


def test_table_covers_every_state_and_event() -> None:
    covered_states = {SITUATIONS[s].state for s, *_ in ROWS}
    assert covered_states == set(State)
    for name in SITUATIONS:
        assert {e for s, e, *_ in ROWS if s == name}, name
    # The core situations are complete over all events.
    for name in ("unbooted", "boot_reconciling", "reconciling_running", "spawning", "starting",
                 "running", "stopping_shutdown", "stopping_restart", "backoff"):
        assert {e for s, e, *_ in ROWS if s == name} == set(EVENTS), name
    assert len(ROWS) > 200


@pytest.mark.parametrize(
    ("situation", "event", "result", "kinds"), ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS]
)
def test_table(situation: str, event: str, result: str, kinds: list[str]) -> None:
    before = SITUATIONS[situation]
    ev, now = EVENTS[event]
    if result == "raise":
        with pytest.raises(LifecycleError):
            core().handle(before, ev, now)
        return
    after, acts = core().handle(before, ev, now)
    expected_state = before.state if result == "=" else State[result]
    assert after.state is expected_state
    assert [type(a).__name__ for a in acts] == kinds
    announces = [a for a in acts if isinstance(a, AnnounceState)]
    if after.state is not before.state:
        # Every transition is announced exactly once, naming both ends.
        assert len(announces) == 1
        assert (announces[0].old, announces[0].new) == (before.state, after.state)
        assert after.since == now
    # At most one LS, and only a spawn (never a signal) when there is none.
    if any(isinstance(a, SpawnChild) for a in acts):
        assert after.child is None and after.spawn_pending
    for a in acts:
        if isinstance(a, SignalGroup | KillGroup):
            assert before.child is not None and a.pid == before.child.pid


# -- reasons, exit codes and details ---------------------------------------------------------------


def _announce(acts: list[Action]) -> AnnounceState:
    (a,) = [a for a in acts if isinstance(a, AnnounceState)]
    return a


FATAL_START = (
    "LS exited 1 within 5s of starting: a fatal start-up error (config, LMDB open, storage init or its "
    "HTTP port in use); LS's log says which"
)


def test_exit_one_soon_after_start_is_reported_as_a_fatal_startup_error() -> None:
    # LS exits 1 for any logrus Fatal at start-up: not only a config it rejects (an HTTP port in use...).
    after, acts = core().handle(SITUATIONS["starting"], EVENTS["exit1"][0], NOW)
    assert after.state is State.BACKOFF
    assert after.reason == f"{FATAL_START}; restart 1 in 1s"
    assert _announce(acts).reason == after.reason
    assert "rejected its config" not in (after.reason or "")
    # With `output: prefix` the shell saw LS's lines: the last one says which error it was.
    fatal = 'level=fatal msg="HTTP server error: listen tcp 127.0.0.1:8500: bind: address already in use"'
    ev = ChildExited(pid=10, returncode=1, description="exited with status 1", last_line=fatal)
    after, _ = core().handle(SITUATIONS["starting"], ev, NOW)
    assert after.reason == f"{FATAL_START}; LS's last line: {fatal}; restart 1 in 1s"
    # Late exit 1 (started 50 s ago) is an ordinary crash, whatever it printed.
    late = replace(ev, description="exit 1")
    after, _ = core().handle(SITUATIONS["running"], late, NOW)
    assert "fatal start-up error" not in (after.reason or "") and "last line" not in (after.reason or "")
    assert "LS exit 1" in (after.reason or "")


def test_crash_backoff_delay_uses_injected_jitter() -> None:
    # running has 2 consecutive failures already: the third waits 1 * 2**2 = 4 s, + 50% jitter x 1.0.
    after, _ = core(sample=1.0).handle(SITUATIONS["running"], EVENTS["exited"][0], NOW)
    assert after.retry_at == pytest.approx(NOW + 6.0)
    after, _ = core(sample=0.0).handle(SITUATIONS["running"], EVENTS["exited"][0], NOW)
    assert after.retry_at == pytest.approx(NOW + 4.0)
    assert after.reason == "LS killed by SIGKILL; restart 3 in 4s"
    assert after.child is None and after.backoff.consecutive == 3


def test_burst_limit_parks_with_the_reason() -> None:
    st = replace(SITUATIONS["running"], backoff=BackoffState(consecutive=4, recent=(60.0, 70.0, 80.0, 90.0)))
    after, acts = core().handle(st, EVENTS["exited"][0], NOW)
    assert after.state is State.PARKED
    assert after.reason is not None
    assert "5 failures within 5m" in after.reason and "lssupervisor resume" in after.reason
    # One grep-able `parked:` line, like every other park (it used to show only as `-> PARKED`).
    assert [type(a) for a in acts] == [LogLine, AnnounceState, Notify]
    assert acts[0] == LogLine(Level.ERROR, f"parked: {after.reason}")
    # Failures outside the window do not count.
    st = replace(st, backoff=BackoffState(consecutive=4, recent=(-250.0, -240.0, 80.0, 90.0)))
    after, _ = core().handle(st, EVENTS["exited"][0], NOW)
    assert after.state is State.BACKOFF


def test_exit_codes() -> None:
    def exit_code(situation: str, event: str) -> ExitCode:
        ev, now = EVENTS[event]
        _, acts = core().handle(SITUATIONS[situation], ev, now)
        (ex,) = [a for a in acts if isinstance(a, Exit)]
        return ex.code

    assert exit_code("stopping_shutdown", "exited") is ExitCode.OK
    assert exit_code("stopping_shutdown", "exit1") is ExitCode.OK  # our own stop is clean (I5)
    assert exit_code("backoff", "term") is ExitCode.OK
    assert exit_code("paused", "term") is ExitCode.OK
    assert exit_code("parked", "term") is ExitCode.PARKED
    assert exit_code("boot_reconciling", "cfg_failed") is ExitCode.CONFIG
    assert exit_code("stopping_killed", "tick_late") is ExitCode.LS_RUNNING


def test_ls_surviving_sigkill_parks_with_ls_running_on_every_path() -> None:
    # Path 1: SIGKILL sent while stopping for a restart (goal run), LS still there after kill_grace.
    killed = Stopping(
        StopPurpose.RESTART, "LS config changed", term_at=90.0, kill_at=98.0, killed=True, give_up_at=103.0
    )
    st = replace(SITUATIONS["stopping_restart"], stopping=killed)
    parked, acts = core().handle(st, Tick(), LATE)
    assert parked.state is State.PARKED and parked.unkillable_pid == 10
    assert parked.park_exit is ExitCode.LS_RUNNING
    _, acts = core().handle(parked, ShutdownRequested(), LATE + 1)
    assert acts[-1] == Exit(ExitCode.LS_RUNNING)
    # Path 2: a reconcile while it lives re-enters PARKED: still 68.
    c = core()
    again, _ = c.handle(parked, ReconcileRequested(), LATE + 2)
    again, _ = c.handle(again, ConfigPrepared(digest="d2", version=1, wait_for_health=True), LATE + 2)
    assert again.state is State.PARKED and again.park_exit is ExitCode.LS_RUNNING
    _, acts = c.handle(again, ShutdownRequested(), LATE + 3)
    assert acts[-1] == Exit(ExitCode.LS_RUNNING)
    # Once it finally exits, no LS runs: a shutdown is a plain park, and the log says how to go on.
    exited = ChildExited(pid=10, returncode=-9, description="killed by SIGKILL")
    gone, acts = c.handle(parked, exited, LATE + 4)
    assert gone.unkillable_pid is None and gone.park_exit is ExitCode.PARKED
    assert any(isinstance(a, LogLine) and "`lssupervisor resume`" in a.msg for a in acts)


def test_notify_kinds() -> None:
    _, acts = core().handle(SITUATIONS["running"], EVENTS["hup"][0], NOW)
    assert Notify(NotifyKind.RELOADING) in acts
    _, acts = core().handle(SITUATIONS["running"], EVENTS["term"][0], NOW)
    assert acts[0] == Notify(NotifyKind.STOPPING)
    _, acts = core().handle(SITUATIONS["starting"], EVENTS["ready"][0], NOW)
    assert Notify(NotifyKind.READY) in acts


def test_stop_deadlines_and_kill() -> None:
    after, acts = core().handle(SITUATIONS["running"], EVENTS["term"][0], NOW)
    expected = Stopping(StopPurpose.SHUTDOWN, "shutdown (SIGTERM)", term_at=NOW, kill_at=NOW + 10)
    assert after.stopping == expected
    assert SignalGroup(10) in acts
    assert core().next_deadline(after) == NOW + 10
    after2, acts = core().handle(after, Tick(), NOW + 9.999)
    assert acts == [] and after2 == after
    after3, acts = core().handle(after, Tick(), NOW + 10)
    assert KillGroup(10) in acts and after3.stopping is not None and after3.stopping.killed
    assert core().next_deadline(after3) == NOW + 15  # kill grace


@pytest.mark.parametrize(("situation", "event"), [(r[0], r[1]) for r in ROWS if "SignalGroup" in r[3]])
def test_sigterm_goes_out_before_the_announcement_and_sigkill_counts_from_it(
    situation: str, event: str
) -> None:
    """stop_timeout is LS's time between SIGTERM and SIGKILL. The shell executes actions in order, and
    announcing a state writes and fsyncs state.json: announced first, a busy disk's fsync came off LS's
    time (the e2e test saw SIGKILL 0.993 s after the SIGTERM with stop_timeout 1 s). Only a notify (one
    datagram) may precede the SIGTERM; the SIGKILL is due stop_timeout after the event's time."""
    ev, now = EVENTS[event]
    after, acts = core().handle(SITUATIONS[situation], ev, now)
    kinds = [type(a).__name__ for a in acts]
    before_term = kinds[: kinds.index("SignalGroup")]
    assert set(before_term) <= {"Notify"}, kinds
    assert after.stopping is not None and after.stopping.kill_at == now + TIMEOUTS.stop_timeout
    _, early = core().handle(after, Tick(), now + TIMEOUTS.stop_timeout - 0.001)
    assert not any(isinstance(a, KillGroup) for a in early)


def test_next_deadline_per_situation() -> None:
    c = core()
    assert c.next_deadline(SITUATIONS["starting"]) == 95.0 + 30.0
    assert c.next_deadline(SITUATIONS["starting_settle"]) == 95.0 + 3.0
    assert c.next_deadline(SITUATIONS["running"]) == 60.0 + 60.0  # backoff reset
    assert c.next_deadline(replace(SITUATIONS["running"], backoff=BackoffState())) is None
    assert c.next_deadline(SITUATIONS["stopping_shutdown"]) == 105.0
    assert c.next_deadline(SITUATIONS["stopping_killed"]) == 103.0
    assert c.next_deadline(SITUATIONS["backoff"]) == 102.0
    for name in ("unbooted", "boot_reconciling", "paused", "parked", "stopped_final", "spawning"):
        assert c.next_deadline(SITUATIONS[name]) is None, name


# -- scenarios: whole histories --------------------------------------------------------------------


def replay(sample: float = 0.0, st: SupervisorState | None = None) -> Replay:
    return Replay(core(sample), st)


def boot_to_running(r: Replay, digest: str = "d1", pid: int = 10) -> None:
    r(Booted(), 0.0)
    r(ConfigPrepared(digest=digest, version=1, wait_for_health=True), 0.0)
    r(ChildSpawned(pid=pid), 0.1)
    r(ChildReady(pid=pid), 1.0)


def test_boot_history() -> None:
    r = replay()
    boot_to_running(r)
    assert r.states() == [("STOPPED", "RECONCILING"), ("RECONCILING", "STARTING"), ("STARTING", "RUNNING")]
    assert isinstance(r.acts[0], SweepOrphans)  # orphans are swept before anything starts
    spawn = next(a for a in r.acts if isinstance(a, SpawnChild))
    assert spawn == SpawnChild(digest="d1", reason="boot")
    assert r.st.starts == 1 and r.st.restarts == 0 and r.st.ready


def test_hup_with_unchanged_config_keeps_the_pid() -> None:
    r = replay()
    boot_to_running(r)
    acts = r(ReloadRequested(), 5.0)
    assert acts[-1] == PrepareConfig(reload=True)
    acts = r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 5.0)
    assert r.st.state is State.RUNNING and r.st.pid == 10
    assert not any(isinstance(a, SignalGroup | SpawnChild) for a in acts)


def test_hup_with_changed_config_restarts_once() -> None:
    r = replay()
    boot_to_running(r)
    r(ReloadRequested(), 5.0)
    r(ConfigPrepared(digest="d2", version=1, wait_for_health=True), 5.0)
    assert r.st.state is State.STOPPING and r.st.stopping is not None
    assert r.st.stopping.purpose is StopPurpose.RESTART
    acts = r(ChildExited(pid=10, returncode=-15, description="killed by SIGTERM"), 5.2)
    assert acts == [SpawnChild(digest="d2", reason="LS config changed")]
    r(ChildSpawned(pid=11), 5.3)
    r(ChildReady(pid=11), 6.0)
    assert r.state() is State.RUNNING and r.st.pid == 11 and r.st.restarts == 1
    assert r.st.backoff.clean  # an intended stop is not a failure (I5)
    assert r.st.failures_total == 0  # ...and not what operators alert on
    assert sum(isinstance(a, SpawnChild) for a in r.acts) == 2


def test_bad_config_on_hup_keeps_running() -> None:
    r = replay()
    boot_to_running(r)
    r(ReloadRequested(), 5.0)
    acts = r(ConfigFailed("lssupervisor.yaml: restart.jitter: expected a number"), 5.0)
    errors = [a for a in acts if isinstance(a, LogLine)]
    assert len(errors) == 1 and "keeping the previous config" in errors[0].msg
    assert r.st.state is State.RUNNING and r.st.pid == 10 and r.st.digest == "d1"


def test_config_error_at_boot_exits_config() -> None:
    r = replay()
    r(Booted(), 0.0)
    acts = r(ConfigFailed("lightningstream.yaml.in: ${FOO} is not set"), 0.0)
    assert Exit(ExitCode.CONFIG) in acts and r.st.state is State.STOPPED


# What failed at boot (nothing to keep) -> the one error line and the exit code.
BOOT_FAILURES = [
    (ConfigFailed("lightningstream.yaml.in: ${FOO} is not set"),
     "cannot render the LS config: lightningstream.yaml.in: ${FOO} is not set", ExitCode.CONFIG),
    (ConfigFailed("migrations/2_x.py: bad migration file name", what="cannot load the migrations",
                  exit_code=ExitCode.MIGRATION),
     "cannot load the migrations: migrations/2_x.py: bad migration file name", ExitCode.MIGRATION),
    (ConfigFailed("target: not a number", what="cannot load the configuration"),
     "cannot load the configuration: target: not a number", ExitCode.CONFIG),
]


@pytest.mark.parametrize(("event", "line", "code"), BOOT_FAILURES)
def test_a_load_failure_at_boot_names_what_failed_and_exits_with_its_code(
    event: ConfigFailed, line: str, code: ExitCode
) -> None:
    r = replay()
    r(Booted(), 0.0)
    acts = r(event, 0.0)
    assert [a.msg for a in acts if isinstance(a, LogLine)] == [line]
    assert acts[-1] == Exit(code) and r.st.state is State.STOPPED and r.st.reason == line
    # While running, the same failure keeps the previous config and says what failed.
    r = replay()
    boot_to_running(r)
    r(ReloadRequested(), 5.0)
    acts = r(event, 5.0)
    assert [a.msg for a in acts if isinstance(a, LogLine)] == [
        f"reload failed, keeping the previous config: {line}"
    ]


def test_crash_restart_after_backoff_then_reset_after_healthy() -> None:
    r = replay(sample=0.0)
    boot_to_running(r)
    r(ChildExited(pid=10, returncode=2, description="exit 2"), 20.0)
    assert r.st.state is State.BACKOFF and r.st.retry_at == 21.0
    assert r.st.failures_total == 1
    assert r(Tick(), 20.9) == []
    assert r(Tick(), 21.0) == [SpawnChild(digest="d1", reason="restart after failure")]
    r(ChildSpawned(pid=11), 21.0)
    r(ChildReady(pid=11), 22.0)
    assert r.st.backoff.consecutive == 1
    assert core().next_deadline(r.st) == 82.0
    acts = r(Tick(), 82.0)
    assert r.st.backoff.clean and any(isinstance(a, LogLine) for a in acts)


def test_crash_burst_parks_then_resume_restarts() -> None:
    r = replay(sample=0.0)
    boot_to_running(r)
    now, pid = 10.0, 10
    for _ in range(4):
        r(ChildExited(pid=pid, returncode=2, description="exit 2"), now)
        assert r.st.state is State.BACKOFF
        assert r.st.retry_at is not None
        now = r.st.retry_at
        r(Tick(), now)
        pid += 1
        r(ChildSpawned(pid=pid), now)
    r(ChildExited(pid=pid, returncode=2, description="exit 2"), now + 1)
    assert r.st.state is State.PARKED and r.core.next_deadline(r.st) is None
    assert r(Tick(), now + 1000) == []  # parked stays parked
    # resume (USR1 with the flag cleared) gets a fresh restart budget.
    r(ReconcileRequested(source="resume"), now + 1000)
    acts = r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), now + 1000)
    assert acts == [SpawnChild(digest="d1", reason="leaving PARKED on reconcile (resume), schema v1")]
    assert r.st.backoff.clean and r.st.park_reason is None


# situation before the reconcile, the request, the prepared config -> why LS starts (SpawnChild.reason).
# "LS config unchanged" is for an LS that keeps running; an LS started fresh says why it starts now.
START_REASONS = [
    ("paused", ReconcileRequested(paused=False, source="SIGUSR1"),
     ConfigPrepared(digest="d1", version=1, wait_for_health=True), "resumed (pause flag removed), schema v1"),
    ("parked", ReconcileRequested(source="SIGUSR1"),
     ConfigPrepared(digest="d1", version=1, wait_for_health=True),
     "leaving PARKED on reconcile (SIGUSR1), schema v1"),
    # Parked after a failed post hook: the LMDB is at v2, LS's last config was v1.
    ("parked", ReloadRequested(), ConfigPrepared(digest="d2", version=2, wait_for_health=True),
     "leaving PARKED on reload (SIGHUP), schema v2"),
    ("paused", ReconcileRequested(paused=False, source="SIGUSR1"), ConfigFailed("lssupervisor.yaml: bad"),
     "resumed (pause flag removed), schema v1; reload failed, previous config kept: "
     "cannot render the LS config: lssupervisor.yaml: bad"),
]


@pytest.mark.parametrize(("situation", "request_", "result", "why"), START_REASONS)
def test_a_fresh_start_after_a_reconcile_says_why_ls_starts(
    situation: str, request_: Event, result: Event, why: str
) -> None:
    c = core()
    st, _ = c.handle(SITUATIONS[situation], request_, NOW)
    st, acts = c.handle(st, result, NOW)
    assert [a for a in acts if isinstance(a, SpawnChild)] == [SpawnChild(digest=st.digest or "", reason=why)]
    st, acts = c.handle(st, ChildSpawned(pid=11), NOW)
    assert _announce(acts).reason == why  # the `-> STARTING` line says it too


def test_parked_with_bad_config_on_hup_stays_parked() -> None:
    st = SITUATIONS["parked"]
    r = replay(st=st)
    r(ReloadRequested(), NOW)
    r(ConfigFailed("bad"), NOW)
    assert r.st.state is State.PARKED and r.st.reason == st.park_reason


def test_second_term_kills_now() -> None:
    r = replay()
    boot_to_running(r)
    r(ShutdownRequested("SIGTERM"), 5.0)
    acts = r(ShutdownRequested("SIGINT"), 5.5)
    assert KillGroup(10) in acts
    acts = r(ChildExited(pid=10, returncode=-9, description="killed by SIGKILL"), 5.6)
    assert acts[-1] == Exit(ExitCode.OK)
    assert r.st.last_exit == "stopped (killed by SIGKILL)"


def test_ls_ignoring_sigterm_gets_sigkill_at_stop_timeout() -> None:
    r = replay()
    boot_to_running(r)
    r(ShutdownRequested(), 5.0)
    assert r(Tick(), 14.9) == []
    assert KillGroup(10) in r(Tick(), 15.0)
    acts = r(ChildExited(pid=10, returncode=-9, description="killed by SIGKILL"), 15.1)
    assert acts[-1] == Exit(ExitCode.OK)


def test_shutdown_while_spawning_stops_the_new_ls() -> None:
    r = replay(st=SITUATIONS["spawning"])
    assert r(ShutdownRequested(), NOW) == []
    acts = r(ChildSpawned(pid=11), NOW)
    assert SignalGroup(11) in acts and r.st.state is State.STOPPING


def test_pause_and_resume() -> None:
    r = replay()
    boot_to_running(r)
    r(ReconcileRequested(paused=True, source="pause"), 5.0)
    r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 5.0)
    assert r.st.state is State.STOPPING and r.st.stopping is not None
    assert r.st.stopping.purpose is StopPurpose.PAUSE
    r(ChildExited(pid=10, returncode=-15, description="killed by SIGTERM"), 5.1)
    assert r.state() is State.PAUSED and r.st.backoff.clean
    r(ReconcileRequested(paused=False, source="resume"), 8.0)
    acts = r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 8.0)
    assert any(isinstance(a, SpawnChild) for a in acts)


def test_boot_paused_renders_but_does_not_start() -> None:
    r = replay()
    r(Booted(paused=True), 0.0)
    acts = r(ConfigPrepared(digest="d1", version=1, wait_for_health=False), 0.0)
    assert r.st.state is State.PAUSED and not any(isinstance(a, SpawnChild) for a in acts)


def test_reconcile_requested_while_stopping_runs_after_the_stop() -> None:
    r = replay()
    boot_to_running(r)
    r(ReloadRequested(), 5.0)
    r(ConfigPrepared(digest="d2", version=1, wait_for_health=True), 5.0)
    r(ReconcileRequested(), 5.05)
    assert r.st.pending == Pending(reload=False)
    acts = r(ChildExited(pid=10, returncode=-15, description="killed by SIGTERM"), 5.1)
    assert acts[-1] == PrepareConfig(reload=False) and r.st.state is State.RECONCILING


# The restart policy's last allowed failure: the next one gives up (burst_limit 5 within 300 s).
AT_BURST_LIMIT = BackoffState(consecutive=4, recent=(60.0, 70.0, 80.0, 90.0))


@pytest.mark.parametrize("reload", [False, True])
def test_a_reconcile_requested_while_a_failed_start_stops_runs_when_the_policy_gives_up(
    reload: bool,
) -> None:
    """The request may carry the fix: parking must not drop it silently."""
    st = replace(SITUATIONS["stopping_failed_start"], backoff=AT_BURST_LIMIT, pending=Pending(reload=reload))
    r = replay(st=st)
    acts = r(ChildExited(pid=10, returncode=-15, description="killed by SIGTERM"), NOW)
    assert r.states() == [("STOPPING", "PARKED"), ("PARKED", "RECONCILING")]
    parked = acts[0]
    assert isinstance(parked, LogLine) and parked.level is Level.ERROR
    assert parked.msg.startswith("parked: ") and "restart policy gave up" in parked.msg
    assert LogLine(Level.INFO, "a reconcile was requested meanwhile: running it now") in acts
    assert acts[-1] == PrepareConfig(reload=reload)
    assert r.st.pending is None and r.st.prior is State.PARKED
    assert r.st.trigger == "reconcile (requested meanwhile)"
    # The fixed config leaves PARKED with a fresh restart budget, as `resume` would.
    acts = r(ConfigPrepared(digest="d2", version=1, wait_for_health=True), NOW + 0.5)
    assert any(isinstance(a, SpawnChild) for a in acts)
    assert r.st.park_reason is None and r.st.backoff == BackoffState()


def test_a_failed_start_that_exhausts_the_policy_without_a_request_stays_parked() -> None:
    st = replace(SITUATIONS["stopping_failed_start"], backoff=AT_BURST_LIMIT)
    after, acts = core().handle(st, ChildExited(pid=10, returncode=-15, description="killed by SIGTERM"), NOW)
    assert after.state is State.PARKED
    assert not any(isinstance(a, PrepareConfig) for a in acts)


def test_a_reconcile_requested_while_spawning_runs_when_the_spawn_failure_gives_up() -> None:
    st = replace(SITUATIONS["spawning"], backoff=AT_BURST_LIMIT, pending=Pending(reload=False))
    r = replay(st=st)
    acts = r(SpawnFailed(message="exec format error"), NOW)
    assert r.states() == [("RECONCILING", "PARKED"), ("PARKED", "RECONCILING")]
    assert acts[-1] == PrepareConfig(reload=False) and r.st.pending is None


def test_not_ready_in_time_is_a_failed_start() -> None:
    r = replay()
    r(Booted(), 0.0)
    r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 0.0)
    r(ChildSpawned(pid=10), 0.0)
    assert r(Tick(), 29.9) == []
    r(Tick(), 30.0)
    assert r.st.state is State.STOPPING and r.st.stopping is not None
    assert r.st.stopping.purpose is StopPurpose.FAILED_START
    r(ChildExited(pid=10, returncode=-15, description="killed by SIGTERM"), 30.1)
    assert r.state() is State.BACKOFF and r.st.backoff.consecutive == 1
    assert r.st.reason is not None and r.st.reason.startswith("LS not ready within 30s")


def test_crash_during_reconcile_lands_in_backoff() -> None:
    r = replay(sample=0.0)
    boot_to_running(r)
    r(ReconcileRequested(), 5.0)
    assert r(ChildExited(pid=10, returncode=2, description="exit 2"), 5.0) == []
    r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 5.0)
    assert r.st.state is State.BACKOFF and r.st.retry_at == 6.0


def test_spawn_failure_counts_as_a_failure() -> None:
    r = replay()
    r(Booted(), 0.0)
    r(ConfigPrepared(digest="d1", version=1, wait_for_health=True), 0.0)
    r(SpawnFailed("lightningstream: No such file or directory"), 0.0)
    assert r.st.state is State.BACKOFF
    assert r.st.reason is not None and r.st.reason.startswith("cannot start LS: lightningstream: No such")


def test_stale_readiness_is_ignored() -> None:
    r = replay(sample=0.0)
    boot_to_running(r)
    r(ChildExited(pid=10, returncode=2, description="exit 2"), 5.0)
    before = r.st
    assert r(ChildReady(pid=10), 5.1) == [] and r.st == before


# -- random histories through a simulated, protocol-abiding shell ----------------------------------

choices = st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(choices, st.floats(min_value=0.0, max_value=1.0))
def test_random_histories_keep_the_invariants(script: list[int], sample: float) -> None:
    simulate(script, sample)


def simulate(script: list[int], sample: float) -> set[State]:
    """Drive the core with a protocol-abiding simulated shell; assert the invariants on the way.
    Returns the states visited."""
    visited: set[State] = set()
    c = core(sample)
    s = SupervisorState()
    now = 0.0
    next_pid = 100
    live: int | None = None  # the LS the simulated shell really has
    shut_down = False
    prepares = 0
    queue: list[Event] = []

    def run(first: Event) -> None:
        # Results of actions are fed back at once, like the real shell does.
        queue.append(first)
        while queue:
            step_one(queue.pop(0))

    def step_one(ev: Event) -> None:
        nonlocal s, next_pid, live, shut_down, prepares
        before = s
        s, acts = c.handle(s, ev, now)
        for a in acts:
            if isinstance(a, SpawnChild):
                assert live is None, "a second LS spawned while one lives (one LS child at a time)"
                assert not shut_down, "LS restarted after shutdown was requested (I5)"
                next_pid += 1
                queue.append(ChildSpawned(pid=next_pid) if next_pid % 7 else SpawnFailed("ENOENT"))
                if next_pid % 7:
                    live = next_pid
            elif isinstance(a, PrepareConfig):
                prepares += 1
                queue.append(
                    ConfigFailed("bad") if prepares % 4 == 0 else
                    ConfigPrepared(
                        digest=f"d{prepares % 3 // 2}", version=1, wait_for_health=bool(prepares % 2)
                    )
                )
            elif isinstance(a, SignalGroup | KillGroup):
                assert live is not None and a.pid == live
        if s.state is not before.state:
            assert [type(a) for a in acts].count(AnnounceState) >= 1
        parked_lines = [a.msg for a in acts if isinstance(a, LogLine) and a.msg.startswith("parked: ")]
        if s.state is State.PARKED and before.state is not State.PARKED:
            assert parked_lines == [f"parked: {s.reason}"], "every entry into PARKED logs one line"
        else:
            assert parked_lines == []
        if s.child is not None:
            assert s.child.pid == live
        if isinstance(ev, ShutdownRequested) and s.state is not State.STOPPED:
            shut_down = True
        visited.add(s.state)

    run(Booted())
    for step in script:
        if s.state is State.STOPPED and s.booted:
            break
        now += 0.7 * step
        match step:
            case 0:
                run(ShutdownRequested())
            case 1:
                run(ReloadRequested())
            case 2:
                run(ReconcileRequested(paused=now % 2 < 0.5))
            case 3 | 4:
                if live is not None:
                    pid, live = live, None
                    run(ChildExited(pid=pid, returncode=step - 2, description=f"exit {step - 2}"))
            case 5:
                if live is not None:
                    run(ChildReady(pid=live))
            case _:
                deadline = c.next_deadline(s)
                if deadline is not None and step > 7:
                    now = max(now, deadline)
                run(Tick())
        # An LS that the core asked to stop dies at the next step (the simulated world obeys SIGTERM).
        if s.state is State.STOPPING and live is not None and step % 2 == 0:
            pid, live = live, None
            run(ChildExited(pid=pid, returncode=-15, description="killed by SIGTERM"))

    return visited


def test_a_long_history_visits_every_state() -> None:
    # Guards the simulator above: a history generator stuck in boot would prove nothing.
    script = [7, 2, 1, 8, 5, 1, 8, 2, 2, 2, 2, 5, 4, 1, 8, 9, 4, 2, 3, 2, 8, 0, 5, 9, 8, 3, 2, 4, 6, 8]
    assert simulate(script, 0.5) == set(State)


# -- the rules as data (core/tables.py) ------------------------------------------------------------


def test_every_state_and_every_event_type_is_in_the_tables() -> None:
    from lssupervisor.core import events as ev_mod

    assert set(tables.ACCEPTS) == set(State)
    event_types = {t for t in vars(ev_mod).values() if isinstance(t, type) and t in ev_mod.Event.__args__}  # type: ignore[attr-defined]
    accepted_somewhere = set().union(*tables.ACCEPTS.values())
    assert event_types == accepted_somewhere
    for state, accepted in tables.ACCEPTS.items():
        assert accepted >= tables.ALWAYS, state
        assert accepted >= tables.RESULTS, state  # a cancelled job's late result may come in any state
    assert set(tables.CYCLE) == set(Substep) and len(tables.CYCLE) == len(Substep)
    assert set(tables.TASK_OF) == set(Substep)


@pytest.mark.parametrize("situation", sorted(SITUATIONS))
def test_handle_applies_the_tables_before_any_handler(situation: str) -> None:
    """What the tables refuse raises, and a result nobody waits for is ignored, in every situation."""
    before = SITUATIONS[situation]
    for name, (ev, now) in EVENTS.items():
        if not tables.accepts(before.state, ev):
            with pytest.raises(LifecycleError):
                core().handle(before, ev, now)
        elif tables.is_stale(before.task, before.state, ev):
            assert core().handle(before, ev, now) == (before, []), name


def test_the_literal_table_agrees_with_the_tables() -> None:
    """Every row of TABLE that does not raise is structurally legal (the raises that remain are data
    checks: a spawn result without a spawn, an exit of a pid that is not ours)."""
    for situation, event, result, _kinds in ROWS:
        st = SITUATIONS[situation]
        ev, _now = EVENTS[event]
        if result != "raise":
            assert tables.accepts(st.state, ev), (situation, event)


# -- reloads keep what runs, in every state (a bad config never exits a running daemon) ---------------


@pytest.mark.parametrize("situation", ["running", "backoff", "paused", "parked"])
def test_a_bad_config_on_reload_keeps_the_state(situation: str) -> None:
    before = SITUATIONS[situation]
    c = core()
    st, acts = c.handle(before, ReloadRequested(paused=before.desired.goal is Goal.PAUSE), NOW)
    assert st.state is State.RECONCILING and PrepareConfig(reload=True) in acts
    st, acts = c.handle(st, ConfigFailed("lss.yaml: restart.burst_limit: expected an integer"), NOW + 0.1)
    assert not any(isinstance(a, Exit) for a in acts)
    assert st.state is before.state, (situation, st.state)
    assert any(isinstance(a, LogLine) and "restart.burst_limit" in a.msg for a in acts)


def test_a_bad_config_on_reload_of_a_daemon_parked_at_boot_stays_parked() -> None:
    """Parked by its boot reconcile (nothing was ever rendered): a bad config later is one error line,
    not an exit (systemd would not restart it: 78 is fail-closed)."""
    c = core()
    st, _ = c.handle(SupervisorState(), Booted(), 0.0)
    st, _ = c.handle(st, TaskFailed(Task.PLAN, ErrorCode.UNMARKED, "LMDB 'main' has data, no marker"), 0.1)
    assert st.state is State.PARKED and st.digest is None
    reason = st.park_reason
    st, _ = c.handle(st, ReloadRequested(), 10.0)
    st, acts = c.handle(st, ConfigFailed("lss.yaml: bogus: unknown option"), 10.1)
    assert not any(isinstance(a, Exit) for a in acts)
    assert st.state is State.PARKED and st.park_reason == reason and st.park_exit is ExitCode.PARKED
    assert any(isinstance(a, LogLine) and "reload failed, keeping the previous config" in a.msg for a in acts)


def test_a_bad_config_requested_during_a_cycle_keeps_the_state_the_cycle_reached() -> None:
    c = core()
    st = SITUATIONS["reconciling_running"]
    st, acts = c.handle(st, ReloadRequested(), NOW)  # busy: pending
    assert st.pending is not None and st.pending.reload
    st, acts = c.handle(st, ConfigPrepared(digest="d1", version=1, wait_for_health=True), NOW + 0.1)
    assert st.state is State.RECONCILING and PrepareConfig(reload=True) in acts  # the pending reload
    st, acts = c.handle(st, ConfigFailed("lss.yaml: bogus: unknown option"), NOW + 0.2)
    assert st.state is State.RUNNING and st.pid == 10 and not any(isinstance(a, Exit) for a in acts)

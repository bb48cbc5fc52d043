"""The worker process and its JSON-lines protocol, against real LMDBs in tmp_path."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lmdb
import pytest

from lssupervisor.errors import ErrorCode, ExitCode, MigrationCancelled, Remedy, UnmarkedDatabase
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.testing.fixtures import build_lmdb, read_marker_version, read_values
from lssupervisor.worker import client, history, lsheader, marker
from lssupervisor.worker import protocol as p
from lssupervisor.worker.client import WorkerSession
from lssupervisor.worker.ops import parse_readers
from lssupervisor.worker.protocol import OVERLAP_ENV
from tests.harness import wait_for
from tests.harness.workers import (
    BASIC_MIGRATIONS,
    GATED_MIGRATIONS,
    INSTANCE,
    Collector,
    make_settings,
    make_view,
    one,
    sample_lmdb,
    write_migrations,
)

# ---------------------------------------------------------------------------------------------------


def test_parse_readers_text() -> None:
    text = "    pid     thread     txnid\n      7056 7f309600bb80 -\n        12 7f3 42\n"
    assert parse_readers(text) == [(7056, "7f309600bb80", None), (12, "7f3", 42)]
    assert parse_readers("(no active readers)\n") == []


def test_markers_report_version_emptiness_and_txn_id(tmp_path: Path) -> None:
    main = sample_lmdb(tmp_path / "main", marker=2)
    empty = build_lmdb(tmp_path / "empty", {}, name="empty")
    missing = LmdbSpec(name="missing", path=str(tmp_path / "missing"))
    request = p.MarkersRequest(make_settings(make_view(main, empty, missing), tmp_path))
    result = one(request, timeout=30)
    assert isinstance(result, p.MarkersResult)
    by_name = {e.lmdb: e for e in result.lmdbs}
    assert by_name["main"].version == 2 and by_name["main"].has_user_data
    assert by_name["main"].marker is not None and by_name["main"].marker.instance == INSTANCE
    assert by_name["main"].last_txnid >= 1 and by_name["main"].used_bytes > 0
    assert by_name["empty"].version is None and not by_name["empty"].has_user_data and by_name["empty"].exists
    assert not by_name["missing"].exists and by_name["missing"].version is None


def test_migrate_streams_progress_then_exactly_one_final_result(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", n=3000)
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    got = Collector()
    done = one(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)), got, timeout=60)
    assert isinstance(done, p.MigrateDone), done
    assert got.replies[-1].body is done and len(got.finals()) == 1  # delivered last, once
    assert done.target == 3 and done.steps == 2 and done.backup_id
    committed = got.progress(p.Phase.STEP_COMMITTED)
    assert [(c.from_version, c.to_version, c.index, c.steps) for c in committed] == [
        (1, 2, 0, 2),
        (2, 3, 1, 2),
    ]
    moving = got.progress(p.Phase.MIGRATE)
    # Each step says at once that its transaction is open (the daemon shows MIGRATING from there);
    # m.progress refines it with done/total.
    assert {(m.index, m.migration) for m in moving} >= {(0, "0002_upper"), (1, "0003_copy")}
    assert any(m.percent == 100.0 for m in moving if m.index == 0)
    assert got.progress(p.Phase.BACKUP) and got.progress(p.Phase.BACKUP_DONE)
    assert all(p.describe(r.body) for r in got.replies if isinstance(r.body, p.Progress))
    # the migration really ran, history has the backup and both steps with checksums
    values = read_values(spec)
    assert values["data"][b"k000001"] == b"VALUE-1" and values["data_v3"][b"k000001"] == b"VALUE-1!"
    assert read_marker_version(spec, instance=INSTANCE) == 3
    entries = history.read(tmp_path / "history.jsonl").entries
    assert [(e.kind.value, e.to_version) for e in entries] == [("backup", 1), ("migrate", 2), ("migrate", 3)]
    assert entries[1].keys == 3000 and entries[1].backup_id == done.backup_id and entries[1].checksum
    # A second run has nothing to do and takes no backup.
    again = one(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)), timeout=60)
    assert isinstance(again, p.MigrateDone) and again.steps == 0 and again.backup_id is None


SLOW_STEP = {
    "0001_init.py": BASIC_MIGRATIONS["0001_init.py"],
    "0002_slow.py": '''
        """Rewrite every record slowly, never calling m.progress."""
        import time

        VERSION = 2

        def upgrade(m):
            for key, value in m.items("data"):
                m.put("data", key, value + b"!")
                time.sleep(0.002)
    ''',
}


def test_a_step_that_never_reports_still_gets_a_heartbeat_from_the_api_counters(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", n=1500)  # ~3 s: at least one heartbeat (every 2 s)
    migs = write_migrations(tmp_path / "migs", SLOW_STEP)
    got = Collector()
    settings = make_settings(make_view(spec), tmp_path, migs, backup=p.BackupSettings(enabled=False))
    done = one(p.MigrateRequest(settings), got, timeout=120)
    assert isinstance(done, p.MigrateDone), done
    beats = [m for m in got.progress(p.Phase.MIGRATE) if m.written]
    assert beats, "no heartbeat with the API's counters"
    assert all(0 < b.written <= 1500 and b.elapsed_s > 0 and b.done is None for b in beats)
    assert "written" in p.describe(beats[-1])


def test_one_worker_serves_a_whole_cycle_in_order(tmp_path: Path) -> None:
    """The daemon's cycle: plan, import, readers, migrate, markers, all in ONE worker process."""
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    settings = make_settings(make_view(spec), tmp_path, migs)
    got = Collector()
    pids: set[int] = set()
    requests: list[p.Request] = [
        p.PlanRequest(settings),
        p.ImportRequest(settings),
        p.ReadersRequest(settings),
        p.MigrateRequest(settings),
        p.MarkersRequest(settings),
    ]
    session = WorkerSession.start(got)
    pids.add(session.pid)
    ids = [session.submit(r) for r in requests]
    session.close()
    assert session.wait(60)
    finals = got.finals()
    assert [f.id for f in finals] == ids  # answered in order, once each
    plan, imported, readers, done, markers = (f.body for f in finals)
    assert (
        isinstance(plan, p.PlanResult)
        and plan.writes
        and [s.line() for s in plan.steps]
        == [
            "main 1→2 (0002_upper)",
            "main 2→3 (0003_copy)",
        ]
    )
    assert isinstance(imported, p.ImportResult) and imported.migrations == (
        "0001_init",
        "0002_upper",
        "0003_copy",
    )
    assert isinstance(readers, p.ReadersResult) and readers.lmdbs[0].readers == ()
    assert isinstance(done, p.MigrateDone) and done.steps == 2
    assert isinstance(markers, p.MarkersResult) and markers.versions() == {"main": 3}
    assert session.returncode == 0


def test_expected_failure_is_one_failure_with_code_remedy_and_exit_code(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", marker=None)  # data, no marker, no baseline
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    failure = one(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)), timeout=30)
    assert isinstance(failure, p.Failure)
    assert failure.code is ErrorCode.UNMARKED and failure.remedy is Remedy.BASELINE_OR_STAMP
    assert failure.exit_code == int(ExitCode.MIGRATION)
    assert "stamp" not in failure.message  # the advice is structured, worded by who shows it
    with pytest.raises(UnmarkedDatabase) as info:
        client.unwrap(failure, p.MigrateDone)
    assert info.value.exit_code == ExitCode.MIGRATION and "lssupervisor stamp N" in str(info.value)
    assert not (tmp_path / "backups").exists()  # refused before any backup or write


@pytest.mark.parametrize("baseline", [0, 1])
def test_baseline_lets_an_unmarked_lmdb_migrate(tmp_path: Path, baseline: int) -> None:
    # 0 is a baseline like any other: the data predates every migration, so all of them run.
    spec = sample_lmdb(tmp_path / "db", marker=None)
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    settings = make_settings(make_view(spec), tmp_path, migs, baseline=baseline)
    done = one(p.MigrateRequest(settings, target=2), timeout=30)
    assert isinstance(done, p.MigrateDone) and done.steps == 2 - baseline
    assert read_marker_version(spec, instance=INSTANCE) == 2


def test_a_request_that_does_not_match_its_type_ends_the_worker_saying_why(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", p.WORKER_MODULE],
        input=b'{"id": 1, "kind": "markers", "body": {"settings": {"ls": "nope"}}}\n',
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == int(ExitCode.SOFTWARE)
    assert b"markers request.settings.ls: expected an object" in proc.stderr


def test_print_in_a_migration_goes_to_stderr_not_into_the_protocol(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(
        tmp_path / "migs",
        {
            "0001_init.py": BASIC_MIGRATIONS["0001_init.py"],
            "0002_chatty.py": '''
            """Print a lot."""
            VERSION = 2

            def upgrade(m):
                print('{"id": 1, "op": "migrate", "kind": "result", "body": {}}')
                print("hello from the migration")
        ''',
        },
    )
    got = Collector()
    session = WorkerSession.start(got)
    session.submit(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)))
    session.close()
    assert session.wait(30)
    (final,) = got.finals()
    assert isinstance(final.body, p.MigrateDone) and final.body.steps == 1
    assert "hello from the migration" in session.stderr_tail()


def start_gated(tmp_path: Path, **over: Any) -> tuple[WorkerSession, Collector, LmdbSpec]:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", GATED_MIGRATIONS)
    got = Collector()
    env = {**os.environ, "GATE": str(tmp_path / "gate")}
    session = WorkerSession.start(got, env=env)
    session.submit(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs, **over)))
    session.close()
    wait_for(lambda: got.progress(p.Phase.MIGRATE), timeout=30, what="the gated step to run")
    return session, got, spec


def final_of(session: WorkerSession, got: Collector) -> p.Result | p.Failure:
    assert session.wait(30)
    (final,) = got.finals()
    assert got.replies[-1] is final
    return final.body  # type: ignore[return-value]


def assert_step_left_nothing(spec: LmdbSpec) -> None:
    assert read_marker_version(spec, instance=INSTANCE) == 1
    assert b"zz-uncommitted" not in read_values(spec)["data"]


def test_cancel_sigkills_and_the_final_reply_still_arrives(tmp_path: Path) -> None:
    session, got, spec = start_gated(tmp_path)
    session.cancel()
    failure = final_of(session, got)
    assert isinstance(failure, p.Failure)
    assert failure.message.startswith("worker killed by SIGKILL")
    assert failure.code is ErrorCode.CANCELLED and session.returncode == -signal.SIGKILL
    with pytest.raises(MigrationCancelled):
        client.unwrap(failure, p.MigrateDone)
    assert_step_left_nothing(spec)


def test_a_worker_killed_from_outside_is_reported_as_killed(tmp_path: Path) -> None:
    session, got, spec = start_gated(tmp_path)
    os.kill(session.pid, signal.SIGKILL)
    failure = final_of(session, got)
    assert isinstance(failure, p.Failure) and failure.code is ErrorCode.WORKER
    assert failure.message.startswith("worker killed by SIGKILL")
    assert_step_left_nothing(spec)


def test_terminate_cancels_at_the_next_check_and_rolls_the_step_back(tmp_path: Path) -> None:
    session, got, spec = start_gated(tmp_path)
    running = history.now_iso()  # the step has been running (and reporting) since before this
    session.terminate()
    failure = final_of(session, got)
    assert isinstance(failure, p.Failure) and failure.code is ErrorCode.CANCELLED, failure
    assert session.returncode == int(ExitCode.MIGRATION)
    assert failure.backup_id is not None  # the backup it took before the first write is named
    assert_step_left_nothing(spec)
    entries = history.read(tmp_path / "history.jsonl").entries
    assert (entries[-1].kind.value, entries[-1].result.value, entries[-1].to_version) == (
        "migrate",
        "cancelled",
        2,
    )
    # The entry spans the step: from its real start, not a zero-length interval at the cancellation.
    assert entries[-1].start < running < entries[-1].end


def test_request_timeout_cancels_the_migration(tmp_path: Path) -> None:
    session, got, spec = start_gated(tmp_path, timeout=0.5)
    failure = final_of(session, got)
    assert isinstance(failure, p.Failure) and failure.code is ErrorCode.CANCELLED
    assert "migrations.timeout of 0.5s expired" in failure.message
    assert_step_left_nothing(spec)


def test_run_timeout_kills_the_worker(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", GATED_MIGRATIONS)
    settings = make_settings(make_view(spec), tmp_path, migs, backup=p.BackupSettings(enabled=False))
    env = {**os.environ, "GATE": str(tmp_path / "gate")}
    failure = one(p.MigrateRequest(settings), timeout=2.0, env=env)
    assert isinstance(failure, p.Failure) and failure.code is ErrorCode.CANCELLED
    assert "timed out after 2s" in failure.message
    assert_step_left_nothing(spec)


def test_gate_open_lets_the_step_commit(tmp_path: Path) -> None:
    session, got, spec = start_gated(tmp_path)
    (tmp_path / "gate").touch()
    done = final_of(session, got)
    assert isinstance(done, p.MigrateDone), done
    assert read_marker_version(spec, instance=INSTANCE) == 2


FORKING_STEP = {
    "0001_init.py": BASIC_MIGRATIONS["0001_init.py"],
    "0002_forks.py": '''
        """Leave a grandchild behind that holds every fd the worker had (a double fork)."""
        import os
        import time

        VERSION = 2

        def upgrade(m):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    with open(os.environ["STRAY_PID"], "w") as f:
                        f.write(str(os.getpid()))
                    time.sleep(600)
                os._exit(0)
            os.wait()
    ''',
}


def test_a_stray_grandchild_holding_the_pipes_does_not_hold_the_session(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", FORKING_STEP)
    stray_file = tmp_path / "stray.pid"
    got = Collector()
    env = {**os.environ, "STRAY_PID": str(stray_file)}
    session = WorkerSession.start(got, env=env)
    session.submit(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)))
    session.close()
    try:
        # The worker exits after its reply; the stray keeps its stdout open, yet the session ends.
        assert session.wait(30), "the session waited on a pipe held by a stray"
        (final,) = got.finals()
        assert isinstance(final.body, p.MigrateDone)
    finally:
        stray = int(wait_for(lambda: stray_file.exists() and stray_file.read_text(), what="the stray"))
        os.kill(stray, signal.SIGKILL)


def test_overlap_knob_records_write_brackets(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    record = tmp_path / "record.jsonl"
    env = {**os.environ, OVERLAP_ENV: str(record)}
    done = one(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)), env=env, timeout=60)
    assert isinstance(done, p.MigrateDone)
    events = [json.loads(line) for line in record.read_text().splitlines()]
    assert [e["event"] for e in events] == ["write_txn_begin", "write_txn_end"]
    assert all(e["pid"] != os.getpid() for e in events)


def test_overlap_knob_fails_the_op_while_the_standin_lock_is_held(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    record = tmp_path / "record.jsonl"
    fd = os.open(f"{record}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what the LS stand-in holds for its whole life
        env = {**os.environ, OVERLAP_ENV: str(record)}
        failure = one(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)), env=env, timeout=60)
    finally:
        os.close(fd)
    assert isinstance(failure, p.Failure) and "runs during" in failure.message
    assert [json.loads(line)["event"] for line in record.read_text().splitlines()] == ["overlap"]
    assert read_marker_version(spec, instance=INSTANCE) == 1


READER_SCRIPT = """
import sys, lmdb
env = lmdb.open(sys.argv[1], max_dbs=64, readonly=True)
txn = env.begin()
print("ready", flush=True)
sys.stdin.read()
"""


def test_readers_name_another_process_holding_the_lmdb(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    holder = subprocess.Popen(
        [sys.executable, "-c", READER_SCRIPT, spec.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    request = p.ReadersRequest(make_settings(make_view(spec), tmp_path))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = one(request, timeout=30)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert isinstance(result, p.ReadersResult)
    (entry,) = result.lmdbs
    assert entry.open_by_pid == holder.pid
    (reader,) = entry.readers
    assert reader.pid == holder.pid and reader.alive and reader.txnid is not None
    assert "python" in reader.name
    # once it is gone, nobody is reported
    after = one(request, timeout=30)
    assert isinstance(after, p.ReadersResult)
    assert after.lmdbs[0].readers == () and after.lmdbs[0].open_by_pid is None


def test_plan_stamp_and_fleet(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", marker=None)
    # another instance's marker, synced into our LMDB by LS
    build_lmdb(spec, {}, marker=3, instance="node-2")
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    settings = make_settings(make_view(spec), tmp_path, migs)
    refused = one(p.PlanRequest(settings), timeout=30)
    assert isinstance(refused, p.Failure) and refused.code is ErrorCode.UNMARKED
    stamped = one(p.StampRequest(settings, version=1), timeout=30)
    assert isinstance(stamped, p.StampResult) and stamped.lmdbs == (p.Stamped("main", None, 1),)
    planned = one(p.PlanRequest(settings, target=2), timeout=30)
    assert isinstance(planned, p.PlanResult) and planned.target == 2 and planned.newest == 3
    assert [(s.from_version, s.to_version, s.migration) for s in planned.steps] == [(1, 2, "0002_upper")]
    fleet = one(p.FleetRequest(settings), timeout=30)
    assert isinstance(fleet, p.FleetResult)
    assert {(m.instance, m.version) for m in fleet.lmdbs[0].markers} == {(INSTANCE, 1), ("node-2", 3)}
    too_far = one(p.StampRequest(settings, version=9), timeout=30)
    assert (
        isinstance(too_far, p.Failure) and too_far.code is ErrorCode.MIGRATION and "0..3" in too_far.message
    )
    kinds = [(e.kind.value, e.to_version) for e in history.read(tmp_path / "history.jsonl").entries]
    assert kinds == [("stamp", 1)]


def test_empty_and_missing_lmdbs_are_stamped_with_the_target_without_backup(tmp_path: Path) -> None:
    empty = build_lmdb(tmp_path / "empty", {}, name="empty")
    missing = LmdbSpec(name="missing", path=str(tmp_path / "missing"))
    (tmp_path / "missing").mkdir()
    first = BASIC_MIGRATIONS["0001_init.py"].replace("VERSION = 1", 'VERSION = 1\n        LMDB = "empty"')
    migs = write_migrations(tmp_path / "migs", {"0001_init.py": first})
    done = one(p.MigrateRequest(make_settings(make_view(empty, missing), tmp_path, migs)), timeout=30)
    assert isinstance(done, p.MigrateDone), done
    assert done.backup_id is None
    assert {e.lmdb: (e.after.version if e.after else None, e.stamped) for e in done.lmdbs} == {
        "empty": (1, "empty"),
        "missing": (1, "empty"),
    }
    assert read_marker_version(missing, instance=INSTANCE) == 1


def test_min_pid_starts_the_worker_above_the_floor(tmp_path: Path) -> None:
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    floor = last + 500
    if floor >= int(Path("/proc/sys/kernel/pid_max").read_text()):
        pytest.skip("too close to pid_max to raise the floor")
    spec = sample_lmdb(tmp_path / "db")
    got = Collector()
    session = WorkerSession.start(got, min_pid=floor)
    session.submit(p.MarkersRequest(make_settings(make_view(spec), tmp_path)))
    session.close()
    assert session.wait(30) and isinstance(got.finals()[0].body, p.MarkersResult)
    assert session.pid >= floor


# -- I3: a step's data and its marker commit in one transaction ---------------------------------------


class PairReader:
    """Reads (marker version, a data value, its data_v3 copy) in ONE read transaction, over and over,
    in a thread of this process while a worker migrates the LMDB in another. A reader that ever sees a
    step's data with the old marker, or the old data with the new marker, has seen the two commit
    apart."""

    def __init__(self, spec: LmdbSpec) -> None:
        self.env = lmdb.open(spec.path, readonly=True, max_dbs=64, subdir=True)
        self.seen: set[tuple[int | None, bytes | None, bytes | None]] = set()
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pair-reader")

    def _read(self) -> tuple[int | None, bytes | None, bytes | None]:
        with self.env.begin() as txn:
            found = marker.read_marker(self.env, txn, INSTANCE, native=True, marker_dbi="lssupervisor")
            values = []
            for dbi in (b"data", b"data_v3"):
                try:
                    db = self.env.open_db(dbi, txn=txn, create=False)
                except lmdb.NotFoundError:
                    values.append(None)
                    continue
                raw = txn.get(b"k000000", db=db)
                values.append(None if raw is None else lsheader.parse(raw)[1])
            return (found.version if found else None, values[0], values[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.add(self._read())
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # the writer grew the map: adopt its size and read again
                continue
            self.reads += 1

    def __enter__(self) -> PairReader:
        self.seen.add(self._read())  # before the worker starts: the old state
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.seen.add(self._read())  # after the worker ended: the new state
        self.env.close()


def headers_txn_ids(spec: LmdbSpec, dbi: bytes) -> set[int]:
    env = lmdb.open(spec.path, readonly=True, max_dbs=64, subdir=True, lock=False)
    try:
        with env.begin() as txn:
            db = env.open_db(dbi, txn=txn, create=False)
            return {lsheader.parse(raw)[0].txn_id for _, raw in txn.cursor(db).iternext()}
    finally:
        env.close()


def last_txnid(spec: LmdbSpec) -> int:
    env = lmdb.open(spec.path, readonly=True, max_dbs=64, subdir=True, lock=False)
    try:
        return int(env.info()["last_txnid"])
    finally:
        env.close()


def test_each_step_commits_its_data_and_its_marker_in_one_transaction(tmp_path: Path) -> None:
    """I3, checked directly rather than by crashing at random: LMDB numbers every write transaction and
    the LS header of every value carries the number of the transaction that wrote it. Two steps are
    two transactions, and the marker carries the same number as the data its step wrote; a reader
    racing the worker only ever sees whole versions."""
    spec = sample_lmdb(tmp_path / "db", n=20_000)
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)  # 2: uppercase data; 3: copy to data_v3
    settings = make_settings(make_view(spec), tmp_path, migs, backup=p.BackupSettings(enabled=False))
    before = last_txnid(spec)
    with PairReader(spec) as reader:
        done = one(p.MigrateRequest(settings), timeout=120)
    assert isinstance(done, p.MigrateDone) and done.steps == 2, done
    # One write transaction per step: no second transaction for a marker.
    assert last_txnid(spec) == before + 2
    (marker_txn,) = headers_txn_ids(spec, b"lssupervisor")
    assert marker_txn == before + 2
    assert headers_txn_ids(spec, b"data_v3") == {marker_txn}  # step 3 wrote data_v3 and the marker
    assert headers_txn_ids(spec, b"data") == {before + 1}  # step 2 rewrote every value of data
    # Whole versions only, whatever moment the reader caught.
    whole = {(1, b"value-0", None), (2, b"VALUE-0", None), (3, b"VALUE-0", b"VALUE-0!")}
    assert reader.seen <= whole, reader.seen - whole
    assert {(1, b"value-0", None), (3, b"VALUE-0", b"VALUE-0!")} <= reader.seen

"""The worker process and its JSON-lines protocol, against real LMDBs in tmp_path.

The helpers at the top (migration files, views, requests) are shared by the other worker-level test
modules (test_backup, test_crash_safety, test_offline_cli).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.errors import ExitCode, MigrationCancelled, UnmarkedDatabase, WorkerError
from lssupervisor.lsmodel import LmdbSpec, LsView
from lssupervisor.testing.fixtures import build_lmdb, read_marker_version, read_values
from lssupervisor.worker import history
from lssupervisor.worker.client import OVERLAP_ENV, Message, WorkerRun, raise_for_error, run_worker
from lssupervisor.worker.ops import parse_readers
from tests.helpers import wait_for

INSTANCE = "node-1"

# A small three-version application: 1 creates nothing, 2 uppercases values, 3 copies into a new DBI.
BASIC_MIGRATIONS = {
    "0001_init.py": '''
        """Initial schema."""
        VERSION = 1

        def upgrade(m):
            pass
    ''',
    "0002_upper.py": '''
        """Uppercase every value of data."""
        VERSION = 2

        def upgrade(m):
            done = 0
            for key, value in m.items("data"):
                m.put("data", key, value.upper())
                done += 1
            m.progress(done, done)
    ''',
    "0003_copy.py": '''
        """Copy data into data_v3 with a suffix."""
        VERSION = 3
        STRATEGY = "new-dbi"

        def upgrade(m):
            m.copy_dbi("data", "data_v3", lambda k, v: (k, v + b"!"))
    ''',
}

# Version 2 blocks until the file named by $GATE exists, reporting progress all the while, after a
# write that must never become visible unless the step commits.
GATED_MIGRATIONS = {
    "0001_init.py": BASIC_MIGRATIONS["0001_init.py"],
    "0002_gated.py": '''
        """Write one key, then wait for a gate file."""
        import os
        import time

        VERSION = 2

        def upgrade(m):
            m.put("data", b"zz-uncommitted", b"must never be visible")
            gate = os.environ.get("GATE", "")
            while not os.path.exists(gate):
                m.progress(0, 1)
                time.sleep(0.01)
            m.progress(1, 1)
    ''',
}


def write_migrations(directory: Path, files: Mapping[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    for name, text in files.items():
        path = directory / name
        path.write_text(textwrap.dedent(text).lstrip())
        os.chmod(path, 0o644)
    return directory


def make_view(*specs: LmdbSpec, instance: str = INSTANCE) -> LsView:
    return LsView(instance=instance, lmdbs=tuple(specs), storage_type="fs", storage_location="/srv/ls/v1")


def make_request(
    op: str, view: LsView, tmp_path: Path, migrations: Path | None = None, **over: Any
) -> Message:
    request: Message = {
        "op": op,
        "ls": view.to_json(),
        "marker_dbi": "lssupervisor",
        "migrations": str(migrations) if migrations else None,
        "target": None,
        "baseline": None,
        "backup": {"enabled": True, "dir": str(tmp_path / "backups"), "keep": 3},
        "history": str(tmp_path / "history.jsonl"),
        "grow_map": False,
        "timeout": None,
        "log_level": "info",
    }
    request.update(over)
    return request


def sample_lmdb(path: Path, n: int = 200, marker: int | None = 1, name: str = "main") -> LmdbSpec:
    data = {"data": {f"k{i:06d}": f"value-{i}" for i in range(n)}}
    return build_lmdb(path, data, marker=marker, instance=INSTANCE, name=name)


class Collector:
    """on_message for tests: keeps every message in order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, msg: Message) -> None:
        self.messages.append(msg)

    def of(self, kind: str, **fields: Any) -> list[Message]:
        return [
            m for m in self.messages if m["type"] == kind and all(m.get(k) == v for k, v in fields.items())
        ]


# ---------------------------------------------------------------------------------------------------


def test_parse_readers_text() -> None:
    text = "    pid     thread     txnid\n      7056 7f309600bb80 -\n        12 7f3 42\n"
    assert parse_readers(text) == [(7056, "7f309600bb80", None), (12, "7f3", 42)]
    assert parse_readers("(no active readers)\n") == []


def test_markers_report_version_emptiness_and_txn_id(tmp_path: Path) -> None:
    main = sample_lmdb(tmp_path / "main", marker=2)
    empty = build_lmdb(tmp_path / "empty", {}, name="empty")
    missing = LmdbSpec(name="missing", path=str(tmp_path / "missing"))
    final = run_worker(make_request("markers", make_view(main, empty, missing), tmp_path), timeout=30)
    assert final["type"] == "result" and final["ok"] and final["returncode"] == 0
    by_name = {e["lmdb"]: e for e in final["lmdbs"]}
    assert by_name["main"]["version"] == 2 and by_name["main"]["has_user_data"]
    assert by_name["main"]["marker"]["instance"] == INSTANCE
    assert by_name["main"]["last_txnid"] >= 1 and by_name["main"]["used_bytes"] > 0
    assert by_name["empty"]["version"] is None and by_name["empty"]["empty"] and by_name["empty"]["exists"]
    assert by_name["missing"] == {**by_name["missing"], "exists": False, "version": None, "empty": True}


def test_migrate_streams_progress_then_exactly_one_final_result(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", n=3000)
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    got = Collector()
    final = run_worker(make_request("migrate", make_view(spec), tmp_path, migs), got, timeout=60)
    assert final["type"] == "result", final
    assert got.messages[-1] is final  # the final message is delivered last, once
    assert [m["type"] for m in got.messages].count("result") == 1
    assert final["target"] == 3 and final["steps"] == 2 and final["backup_id"]
    committed = got.of("progress", phase="step_committed")
    assert [(m["from"], m["to"], m["index"], m["steps"]) for m in committed] == [(1, 2, 1, 2), (2, 3, 2, 2)]
    moving = got.of("progress", phase="migrate")
    assert moving and all(
        {"lmdb", "step", "from", "to", "done", "total", "percent"} <= m.keys() for m in moving
    )
    assert got.of("progress", phase="backup")
    # the migration really ran, history has the backup and both steps with checksums
    values = read_values(spec)
    assert values["data"][b"k000001"] == b"VALUE-1" and values["data_v3"][b"k000001"] == b"VALUE-1!"
    assert read_marker_version(spec, instance=INSTANCE) == 3
    entries = history.read(tmp_path / "history.jsonl").entries
    assert [(e.kind.value, e.to_version) for e in entries] == [("backup", 1), ("migrate", 2), ("migrate", 3)]
    assert entries[1].keys == 3000 and entries[1].backup_id == final["backup_id"] and entries[1].checksum
    # A second run has nothing to do and takes no backup.
    again = run_worker(make_request("migrate", make_view(spec), tmp_path, migs), timeout=60)
    assert again["type"] == "result" and again["steps"] == 0 and again["backup_id"] is None


def test_expected_failure_is_one_error_message_with_class_and_exit_code(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", marker=None)  # data, no marker, no baseline
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    final = run_worker(make_request("migrate", make_view(spec), tmp_path, migs), timeout=30)
    assert final["type"] == "error" and final["error"] == "UnmarkedDatabase"
    assert final["exit_code"] == int(ExitCode.MIGRATION) == final["returncode"]
    assert "lssupervisor stamp N" in final["message"]
    with pytest.raises(UnmarkedDatabase) as info:
        raise_for_error(final)
    assert info.value.exit_code == ExitCode.MIGRATION
    assert not (tmp_path / "backups").exists()  # refused before any backup or write


def test_baseline_lets_an_unmarked_lmdb_migrate(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", marker=None)
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    final = run_worker(
        make_request("migrate", make_view(spec), tmp_path, migs, baseline=1, target=2), timeout=30
    )
    assert final["type"] == "result" and final["steps"] == 1
    assert read_marker_version(spec, instance=INSTANCE) == 2


def test_bad_request_is_a_worker_error(tmp_path: Path) -> None:
    final = run_worker({"op": "markers", "ls": "nope"}, timeout=30)
    assert final["type"] == "error" and final["error"] == "WorkerError" and "ls" in final["message"]
    with pytest.raises(WorkerError):
        raise_for_error(final)


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
                print('{"type": "result", "ok": true, "forged": 1}')
                print("hello from the migration")
        ''',
        },
    )
    run = WorkerRun.start(make_request("migrate", make_view(spec), tmp_path, migs), Collector())
    final = run.wait(30)
    assert final is not None and final["type"] == "result" and "forged" not in final
    assert "hello from the migration" in run.stderr_tail()


def start_gated(tmp_path: Path, **over: Any) -> tuple[WorkerRun, Collector, LmdbSpec]:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", GATED_MIGRATIONS)
    got = Collector()
    env = {**os.environ, "GATE": str(tmp_path / "gate")}
    request = make_request("migrate", make_view(spec), tmp_path, migs, **over)
    run = WorkerRun.start(request, got, env=env)
    wait_for(lambda: got.of("progress", phase="migrate"), timeout=30, what="the gated step to run")
    return run, got, spec


def assert_step_left_nothing(spec: LmdbSpec) -> None:
    assert read_marker_version(spec, instance=INSTANCE) == 1
    assert b"zz-uncommitted" not in read_values(spec)["data"]


def test_cancel_sigkills_and_the_final_message_still_arrives(tmp_path: Path) -> None:
    run, got, spec = start_gated(tmp_path)
    run.cancel()
    final = run.wait(30)
    assert final is not None and final["type"] == "error"
    assert final["message"].startswith("worker killed by SIGKILL")
    assert final["error"] == "MigrationCancelled" and final["returncode"] == -signal.SIGKILL
    assert got.messages[-1] is final
    with pytest.raises(MigrationCancelled):
        raise_for_error(final)
    assert_step_left_nothing(spec)


def test_a_worker_killed_from_outside_is_reported_as_killed(tmp_path: Path) -> None:
    run, _, spec = start_gated(tmp_path)
    os.kill(run.pid, signal.SIGKILL)
    final = run.wait(30)
    assert final is not None and final["error"] == "WorkerError"
    assert final["message"].startswith("worker killed by SIGKILL")
    assert_step_left_nothing(spec)


def test_terminate_cancels_at_the_next_check_and_rolls_the_step_back(tmp_path: Path) -> None:
    run, _, spec = start_gated(tmp_path)
    running = history.now_iso()  # the step has been running (and reporting) since before this
    run.terminate()
    final = run.wait(30)
    assert final is not None and final["error"] == "MigrationCancelled", final
    assert final["returncode"] == int(ExitCode.MIGRATION)
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
    run, _, spec = start_gated(tmp_path, timeout=0.5)
    final = run.wait(30)
    assert final is not None and final["error"] == "MigrationCancelled"
    assert "migrations.timeout of 0.5s expired" in final["message"]
    assert_step_left_nothing(spec)


def test_run_worker_timeout_kills_the_worker(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", GATED_MIGRATIONS)
    request = make_request("migrate", make_view(spec), tmp_path, migs, backup={"enabled": False})
    final = run_worker(request, timeout=2.0, env={**os.environ, "GATE": str(tmp_path / "gate")})
    assert final["error"] == "MigrationCancelled" and "timed out after 2s" in final["message"]
    assert_step_left_nothing(spec)


def test_gate_open_lets_the_step_commit(tmp_path: Path) -> None:
    run, _, spec = start_gated(tmp_path)
    (tmp_path / "gate").touch()
    final = run.wait(30)
    assert final is not None and final["type"] == "result", final
    assert read_marker_version(spec, instance=INSTANCE) == 2


def test_overlap_knob_records_write_brackets(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db")
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    record = tmp_path / "record.jsonl"
    env = {**os.environ, OVERLAP_ENV: str(record)}
    final = run_worker(make_request("migrate", make_view(spec), tmp_path, migs), env=env, timeout=60)
    assert final["type"] == "result"
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
        final = run_worker(make_request("migrate", make_view(spec), tmp_path, migs), env=env, timeout=60)
    finally:
        os.close(fd)
    assert final["type"] == "error" and "runs during" in final["message"]
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
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        final = run_worker(make_request("readers", make_view(spec), tmp_path), timeout=30)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    (entry,) = final["lmdbs"]
    assert entry["open_by_pid"] == holder.pid
    (reader,) = entry["readers"]
    assert reader["pid"] == holder.pid and reader["alive"] and reader["txnid"] is not None
    assert "python" in reader["name"]
    # once it is gone, nobody is reported
    after = run_worker(make_request("readers", make_view(spec), tmp_path), timeout=30)
    assert after["lmdbs"][0]["readers"] == [] and after["lmdbs"][0]["open_by_pid"] is None


def test_plan_stamp_and_fleet(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", marker=None)
    # another instance's marker, synced into our LMDB by LS
    build_lmdb(spec, {}, marker=3, instance="node-2")
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    view = make_view(spec)
    refused = run_worker(make_request("plan", view, tmp_path, migs), timeout=30)
    assert refused["error"] == "UnmarkedDatabase"
    stamped = run_worker(make_request("stamp", view, tmp_path, migs, version=1), timeout=30)
    assert stamped["lmdbs"] == [{"lmdb": "main", "from": None, "to": 1}]
    planned = run_worker(make_request("plan", view, tmp_path, migs, target=2), timeout=30)
    assert planned["target"] == 2 and planned["newest"] == 3
    assert [(s["from"], s["to"], s["migration"]) for s in planned["steps"]] == [(1, 2, "0002_upper")]
    fleet = run_worker(make_request("fleet", view, tmp_path), timeout=30)
    seen = {(m["instance"], m["version"]) for m in fleet["lmdbs"][0]["markers"]}
    assert seen == {(INSTANCE, 1), ("node-2", 3)}
    too_far = run_worker(make_request("stamp", view, tmp_path, migs, version=9), timeout=30)
    assert too_far["error"] == "MigrationError" and "0..3" in too_far["message"]
    kinds = [(e.kind.value, e.to_version) for e in history.read(tmp_path / "history.jsonl").entries]
    assert kinds == [("stamp", 1)]


def test_empty_and_missing_lmdbs_are_stamped_with_the_target_without_backup(tmp_path: Path) -> None:
    empty = build_lmdb(tmp_path / "empty", {}, name="empty")
    missing = LmdbSpec(name="missing", path=str(tmp_path / "missing"))
    (tmp_path / "missing").mkdir()
    one = BASIC_MIGRATIONS["0001_init.py"].replace("VERSION = 1", 'VERSION = 1\n        LMDB = "empty"')
    migs = write_migrations(tmp_path / "migs", {"0001_init.py": one})
    final = run_worker(make_request("migrate", make_view(empty, missing), tmp_path, migs), timeout=30)
    assert final["type"] == "result", final
    assert final["backup_id"] is None
    assert {e["lmdb"]: (e["after"], e["stamped"]) for e in final["lmdbs"]} == {
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
    run = WorkerRun.start(make_request("markers", make_view(spec), tmp_path), Collector(), min_pid=floor)
    final = run.wait(30)
    assert final is not None and final["type"] == "result"
    assert run.pid >= floor

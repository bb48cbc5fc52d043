"""The scenario harness's parts, fast: record formats, the app writer's format switch by marker (and
its wait on LMDB's writer lock), snapshot decoding, dumps and the write checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import psutil
import pytest
import yaml

from lssupervisor.config import load_config
from lssupervisor.testing.fixtures import (
    build_lmdb,
    lmdb_spec,
    read_lmdb,
    read_marker_version,
    run_migrations,
)
from lssupervisor.testing.scenario import (
    APP_DBI,
    BASELINE,
    FORMAT_CHANGE,
    AppWriter,
    Cluster,
    ScenarioError,
    Write,
    check_writes,
    decode,
    encode,
    format_of,
    latest_writes,
    settled,
    wait_until,
)
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import stamp
from tests.harness import wait_for

# ----------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("version", [1, 2])
def test_formats_round_trip(version: int) -> None:
    record = {"name": "Ada Lovelace", "email": "ada@example.org"}
    value = encode(version, record)
    assert decode(value) == (version, record)
    assert format_of(value) == version


def test_format_examples_are_what_the_docs_say() -> None:
    assert encode(1, {"name": "Alice", "email": "a@x"}) == b"email=a@x;name=Alice"
    assert encode(2, {"name": "Alice", "email": "a@x"}) == b'{"email":"a@x","name":"Alice"}'


@pytest.mark.parametrize("value", [b"garbage", b"", b"{not json", b'{"a": 1}'])
def test_format_of_rejects_other_values(value: bytes) -> None:
    assert format_of(value) == 0


def test_encode_refuses_unknown_version() -> None:
    with pytest.raises(ValueError, match="versions 1 and 2, not 3"):
        encode(3, {"name": "x"})


def test_migration_0002_converts_v1_to_the_v2_format_keeping_timestamps(tmp_path: Path) -> None:
    """The demo app's own migration, run by the engine on a real LMDB (what the daemon's worker runs)."""
    record = {"name": "Alice", "email": "a@x"}
    spec = build_lmdb(tmp_path / "db", {APP_DBI: {"user:1": (encode(1, record), 1_000)}},
                      marker=1, instance="alpha")
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    for f in (BASELINE, FORMAT_CHANGE):
        (migrations / f.name).write_bytes(f.read_bytes())
    run_migrations(spec, migrations, instance="alpha")
    assert read_marker_version(spec, "alpha") == 2
    assert read_lmdb(spec)[APP_DBI] == {b"user:1": (b'{"email":"a@x","name":"Alice"}', 1_000)}


# ------------------------------------------------------------------------------------------ writer


def _open(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=64, map_size=64 << 20)


def _read_app(env: lmdb.Environment) -> dict[bytes, bytes]:
    with env.begin() as txn:
        db = env.open_db(APP_DBI.encode(), txn=txn, create=False)
        return {bytes(k): bytes(v) for k, v in txn.cursor(db).iternext()}


def test_writer_picks_the_format_from_its_marker(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {}, marker=1, instance="alpha")
    env = _open(tmp_path / "db")
    try:
        writer = AppWriter(env, "alpha", shared_every=2)
        before = time.time_ns()
        w1 = writer.write_one()
        assert w1 is not None and w1.version == 1 and format_of(w1.value) == 1
        stamp(env, spec, 2, instance="alpha")
        w2 = writer.write_one()
        assert w2 is not None and w2.version == 2 and format_of(w2.value) == 2
        assert w2.key.startswith(b"shared:")  # every 2nd write goes to a shared key
        raw = _read_app(env)
        for w in (w1, w2):
            header, value = lsheader.parse(raw[w.key])
            assert value == w.value
            assert header.timestamp == w.timestamp and before <= w.timestamp <= time.time_ns()
            assert header.txn_id > 0 and not header.deleted
        assert writer.writes() == [w1, w2]
    finally:
        env.close()


def test_writer_follows_only_its_own_marker(tmp_path: Path) -> None:
    """Another instance's marker at v2 (synced in by LS) must not switch our format."""
    spec = build_lmdb(tmp_path / "db", {}, marker=1, instance="alpha")
    env = _open(tmp_path / "db")
    try:
        stamp(env, spec, 2, instance="beta")
        w = AppWriter(env, "alpha").write_one()
        assert w is not None and w.version == 1 and format_of(w.value) == 1
    finally:
        env.close()


def test_writer_writes_nothing_without_a_marker(tmp_path: Path) -> None:
    build_lmdb(tmp_path / "db", {"other": {"k": "v"}})
    env = _open(tmp_path / "db")
    try:
        writer = AppWriter(env, "alpha")
        assert writer.write_one() is None
        assert writer.writes() == []
        with env.begin() as txn:
            assert txn.get(APP_DBI.encode()) is None  # not even the DBI was created
    finally:
        env.close()


_HOLDER = textwrap.dedent(
    """
    import sys, lmdb
    from lssupervisor.worker.marker import write_marker
    env = lmdb.open(sys.argv[1], max_dbs=64, map_size=64 << 20)
    with env.begin(write=True) as txn:
        write_marker(env, txn, instance="alpha", version=2, native=True)
        print("holding", flush=True)
        sys.stdin.readline()   # a migration in progress: the write lock is held until we are told
    print("committed", flush=True)
    """
)


def test_writer_waits_for_a_migration_and_then_writes_the_new_format(tmp_path: Path) -> None:
    """A migration in another process holds LMDB's writer lock: the writer blocks in its own write
    transaction, and the marker it then reads (inside that transaction) is the migrated one."""
    build_lmdb(tmp_path / "db", {}, marker=1, instance="alpha")
    env = _open(tmp_path / "db")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    writer = AppWriter(env, "alpha", interval=0.01)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "holding"
        writer.start()
        # Once the writer has tried, it sits in mdb_txn_begin until the holder commits: any write it
        # could make now would carry format 1 and fail the check below.
        wait_for(lambda: writer.attempts >= 1, what="the writer's first attempt")
        assert writer.writes() == []
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
        writes = wait_for(lambda: writer.writes()[:3] if len(writer.writes()) >= 3 else None,
                          what="writes after the 'migration'")
        assert {w.version for w in writes} == {2}
        assert all(format_of(w.value) == 2 for w in writes)
    finally:
        writer.stop()
        holder.kill()
        holder.wait()
        env.close()


def test_writer_records_an_error_instead_of_dying_silently(tmp_path: Path) -> None:
    build_lmdb(tmp_path / "db", {}, marker=7, instance="alpha")  # a version the app does not know
    env = _open(tmp_path / "db")
    writer = AppWriter(env, "alpha", interval=0.01).start()
    try:
        wait_for(lambda: not writer.running, what="the writer to stop on its error")
        assert isinstance(writer.error, ValueError) and "not 7" in str(writer.error)
    finally:
        writer.stop()
        env.close()


# ---------------------------------------------------------------------------------- write checks


def _w(instance: str, key: str, version: int, ts: int, name: str) -> Write:
    return Write(instance, key.encode(), encode(version, {"name": name}), ts, version)


def test_latest_write_per_key() -> None:
    a = _w("alpha", "shared:1", 1, 10, "a")
    b = _w("beta", "shared:1", 1, 20, "b")
    assert latest_writes([b, a]) == {b"shared:1": b}


def test_check_writes_accepts_superseded_and_migrated_values() -> None:
    writes = [
        _w("alpha", "shared:1", 1, 10, "old"),
        _w("beta", "shared:1", 2, 30, "new"),
        _w("alpha", "user:alpha-0001", 1, 15, "u1"),  # written in v1, migrated to v2 since
    ]
    app = {
        b"shared:1": (encode(2, {"name": "new"}), 30),
        b"user:alpha-0001": (encode(2, {"name": "u1"}), 15),
    }
    assert check_writes(app, writes) == []


def test_check_writes_names_every_kind_of_problem() -> None:
    writes = [
        _w("alpha", "shared:1", 1, 10, "old"),
        _w("beta", "shared:1", 2, 30, "new"),
        _w("alpha", "user:alpha-0001", 1, 15, "u1"),
        _w("beta", "user:beta-0001", 1, 16, "b1"),
    ]
    app = {
        b"shared:1": (encode(2, {"name": "old"}), 10),  # the earlier write won: wrong
        b"user:alpha-0001": (encode(2, {"name": "changed"}), 15),  # same time, other content
        b"user:ghost": (encode(2, {"name": "?"}), 1),  # never written
        # user:beta-0001 lost
    }
    problems = "\n".join(check_writes(app, writes))
    assert "shared:1: timestamp 10, expected the latest write's 30 (by beta)" in problems
    assert "user:alpha-0001: value" in problems
    assert "user:beta-0001: written by beta at 16, missing" in problems
    assert "user:ghost: present but never written" in problems


# ------------------------------------------------------------------------------ cluster (no daemon)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # DAEMON driver without starting anything: ship_migration only renames, nothing runs.
    with Cluster(tmp_path / "work") as c:
        yield c


def test_add_instance_writes_a_valid_tuned_config_set(cluster: Cluster) -> None:
    inst = cluster.add_instance("alpha")
    cfg = load_config(inst.config)
    assert cfg.watch.debounce == pytest.approx(0.2)
    assert cfg.lightningstream.env["LSSTANDIN_HEALTH_INTERVAL_MS"] == "100"
    assert cfg.lightningstream.binary == cluster.ls.path
    template = yaml.safe_load((inst.dir / "lightningstream.yaml.in").read_text())
    assert template["instance"] == "alpha"
    assert template["storage"]["options"]["root_path"] == f"{cluster.storage}/v${{APP_SCHEMA_VERSION}}"
    assert template["lmdb_poll_interval"] == "200ms"
    assert [p.name for p in inst.migrations.iterdir()] == [BASELINE.name]
    assert "# Added by the demo" in inst.config.read_text()  # comments of init kept
    with pytest.raises(ScenarioError, match="exists already"):
        cluster.add_instance("alpha")


def test_ship_migration_renames_a_complete_file_into_place(cluster: Cluster) -> None:
    inst = cluster.add_instance("alpha")
    dest = cluster.ship_migration("alpha", FORMAT_CHANGE)
    assert dest == inst.migrations / FORMAT_CHANGE.name
    assert dest.read_bytes() == FORMAT_CHANGE.read_bytes()
    assert sorted(p.name for p in inst.migrations.iterdir()) == [BASELINE.name, FORMAT_CHANGE.name]
    assert oct(dest.stat().st_mode & 0o777) == oct(0o644)


def test_dump_markers_and_settled_compare_two_lmdbs(cluster: Cluster) -> None:
    for name in ("alpha", "beta"):
        inst = cluster.add_instance(name)
        spec = build_lmdb(inst.lmdb_path, {APP_DBI: {"user:1": (encode(2, {"name": "x"}), 5)}},
                          marker=2, instance=name, default_timestamp=100)
        # Each LMDB also holds the other's marker, as after sync.
        other = "beta" if name == "alpha" else "alpha"
        build_lmdb(spec, {}, marker=2, instance=other, default_timestamp=100)
    assert cluster.markers("alpha") == {"alpha": (2, 100), "beta": (2, 100)}
    dump = cluster.dump("alpha")
    assert dump[APP_DBI] == {b"user:1": (b'{"name":"x"}', 5)}
    assert set(dump) == {APP_DBI, "lssupervisor"}
    assert settled(cluster)
    # A difference in a timestamp alone is a difference.
    env = cluster.env("beta")
    with cluster.dbi_lock("beta"), env.begin(write=True) as txn:
        db = env.open_db(APP_DBI.encode(), txn=txn)
        txn.put(b"user:1", lsheader.encode(b'{"name":"x"}', 6), db=db)
    assert not settled(cluster)


def dump_until(cluster: Cluster, stop: threading.Event, errors: list[BaseException]) -> None:
    while not stop.is_set():
        try:
            cluster.dump("alpha")
        except lmdb.Error as exc:
            errors.append(exc)


def test_dump_while_the_writer_starts_never_meets_a_half_opened_dbi(tmp_path: Path) -> None:
    """The demo once failed with `mdb_dbi_flags: Invalid argument` in Cluster.dump: the writer
    released the DBI lock before its first transaction (the one creating the application DBI)
    committed, and a dump's read transaction opened a DBI meanwhile, which LMDB forbids within one
    process. A dump loop racing each fresh writer's first writes reproduced it about every run of ten
    starts (writer and dump sharing one environment, as in the demo)."""
    for i in range(10):
        with Cluster(tmp_path / f"w{i}") as cluster:
            inst = cluster.add_instance("alpha")
            build_lmdb(inst.lmdb_path, {}, marker=1, instance="alpha")
            errors: list[BaseException] = []
            stop = threading.Event()
            dumper = threading.Thread(target=dump_until, args=(cluster, stop, errors), name="dump-loop")
            dumper.start()
            try:
                writer = cluster.start_writer("alpha", interval=0)
                wait_for(lambda w=writer: len(w.writes()) >= 3 or not w.running, what="three writes")
            finally:
                stop.set()
                dumper.join(30)
            assert writer.error is None and errors == [], (writer.error, errors)
            assert set(cluster.dump("alpha")) == {APP_DBI, "lssupervisor"}


def test_snapshots_are_listed_and_decoded_per_version(cluster: Cluster, tmp_path: Path) -> None:
    """A real snapshot written by LS (the real one when installed, else the stand-in) under storage/v1."""
    spec = lmdb_spec(tmp_path / "src")
    build_lmdb(spec, {APP_DBI: {"user:1": (encode(1, {"name": "x"}), 42)}}, marker=1, instance="alpha")
    config = tmp_path / "ls.yaml"
    config.write_text(json.dumps({
        "instance": "alpha",
        "lmdbs": {"main": {"path": spec.path, "schema_tracks_changes": True}},
        "storage": {"type": "fs", "options": {"root_path": str(cluster.storage / "v1")}},
    }))
    done = subprocess.run([cluster.ls.path, "--config", str(config), "sync", "--only-once"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "LSSTANDIN_HEALTH_INTERVAL_MS": "100"})
    assert done.returncode == 0, done.stderr
    snaps = cluster.snapshots(1)
    assert len(snaps) == 1 and cluster.snapshots(2) == []
    snap = snaps[0]
    assert (snap.instance, snap.db, snap.version) == ("alpha", "main", 1)
    assert snap.entries[APP_DBI] == {b"user:1": (b"name=x", 42)}
    assert b"schema_version/alpha" in snap.entries["lssupervisor"]
    assert cluster.snapshot_counts(1) == {"alpha": 1}


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(ScenarioError, match=r"timed out after 0\.05s waiting for the moon"):
        wait_until(lambda: None, 0.05, "the moon", interval=0.01)


def test_daemon_driver_starts_and_stops_a_supervised_instance(tmp_path: Path) -> None:
    """The daemon-driven plumbing (start, state.json, rendered prefix, stop with LS gone) works with
    the daemon as it is, migrations or not."""
    with Cluster(tmp_path / "work") as c:
        inst = c.add_instance("alpha")
        c.start("alpha")
        doc = c.wait_state("alpha", lambda d: d.get("state") == "RUNNING", 30, "RUNNING")
        pid = c.ls_pid("alpha")
        assert isinstance(pid, int) and doc["lightningstream"]["ready"]
        assert c.prefix("alpha") == c.storage / "v1"
        c.stop("alpha")
        assert inst.daemon is not None and inst.daemon.returncode == 0, c.log_tail("alpha")
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(pid).status()
        assert c.state("alpha")["state"] == "STOPPED"


def test_an_ls_outliving_its_supervisor_fails_the_scenario(tmp_path: Path) -> None:
    """I6 in the harness: close() ends a stray LS and reports it (the demo then fails), instead of
    swallowing it; a `with` block raises it."""
    c = Cluster(tmp_path / "work")
    inst = c.add_instance("alpha")
    # An "LS" whose command line names the instance's rendered config, left behind by its supervisor.
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "--config", str(inst.rendered_config)]
    )
    supervisor = subprocess.Popen(["true"])  # the instance's supervisor, already gone
    supervisor.wait()
    try:
        inst.daemon = supervisor
        inst.ls_pids_seen.add(stray.pid)
        problems = c.close()
        assert len(problems) == 1 and "outlived their supervisor (I6)" in problems[0], problems
        stray.wait(timeout=30)  # gone (reaped by the harness's psutil wait, so no returncode to check)
        assert not psutil.pid_exists(stray.pid)
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()

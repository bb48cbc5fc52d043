"""Running steps against real LMDB files: strategies, timestamps, tombstones, verifier, failures."""

from __future__ import annotations

import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.errors import (
    ChecksumMismatch,
    MapFull,
    MigrationCancelled,
    MigrationError,
    SchemaTooNew,
    UnmarkedDatabase,
    VerificationFailed,
)
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.testing.fixtures import (
    build_lmdb,
    read_lmdb,
    read_marker_version,
    read_values,
    run_migrations,
)
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import dbi_names, open_dbi
from lssupervisor.worker.migrations import Step, load
from lssupervisor.worker.migrator import Progress, migrate, open_env, run_step
from lssupervisor.worker.wire import to_wire

NOW = 2_000_000_000_000_000_000  # the injected clock
OLD = 1_500_000_000_000_000_000
MODES = [pytest.param(True, id="native"), pytest.param(False, id="shadow")]


def clock() -> int:
    return NOW


def migrations(tmp_path: Path, *bodies: str, strategies: tuple[str, ...] = ()) -> Path:
    """Write bodies as 0001.., each with `upgrade(m)` made of the given lines."""
    directory = tmp_path / "migrations"
    directory.mkdir(exist_ok=True)
    for i, body in enumerate(bodies, start=1):
        strategy = strategies[i - 1] if i - 1 < len(strategies) else "prefix"
        text = f'"""Step {i}."""\nVERSION = {i}\nSTRATEGY = "{strategy}"\n\n\ndef upgrade(m):\n'
        text += textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
        (directory / f"{i:04d}_step{i}.py").write_text(text)
    return directory


def raw_dump(spec: LmdbSpec) -> tuple[int, dict[str, dict[bytes, bytes]]]:
    """Last txn id and every DBI byte for byte: proof that nothing was written."""
    env = open_env(spec, readonly=True)
    try:
        with env.begin() as txn:
            out = {}
            for name in dbi_names(env, txn):
                out[name] = {bytes(k): bytes(v) for k, v in txn.cursor(open_dbi(env, txn, name)).iternext()}
        return env.info()["last_txnid"], out
    finally:
        env.close()


USERS = {"users": {"a": ("alice", OLD), "b": ("bob", OLD + 1), "c": ("carol", OLD + 2)}}


# --------------------------------------------------------------------------------------- prefix


@pytest.mark.parametrize("native", MODES)
def test_prefix_keeps_timestamps_and_derived_keys_take_their_source(tmp_path: Path, native: bool) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, native=native, marker=0)
    mdir = migrations(
        tmp_path,
        """
        for key, value in m.items("users"):
            m.put("users", key, value.upper())
            m.put("by_name", value, key)          # derived: takes the source's timestamp
        m.put("users", b"a", b"ALICE")           # unchanged: no-op
        m.put("meta", b"derived", b"x", timestamp_from=("users", b"c"))
        m.put("meta", b"fresh", b"y")            # no source: the step's clock
        """,
    )
    result = run_migrations(spec, mdir, clock=clock)
    assert result.after is not None and result.after.version == 1
    dump = read_lmdb(spec)
    assert dump["users"] == {b"a": (b"ALICE", OLD), b"b": (b"BOB", OLD + 1), b"c": (b"CAROL", OLD + 2)}
    assert dump["by_name"] == {b"alice": (b"a", OLD), b"bob": (b"b", OLD + 1), b"carol": (b"c", OLD + 2)}
    assert dump["meta"] == {b"derived": (b"x", OLD + 2), b"fresh": (b"y", NOW)}
    if not native:
        shadow = read_lmdb(spec, include_sync=True)["_sync_shadow_users"]
        assert shadow == dump["users"]  # rewritten alongside, same timestamps


@pytest.mark.parametrize("native", MODES)
def test_in_place_gives_fresh_timestamps_strictly_above_old(tmp_path: Path, native: bool) -> None:
    future = NOW + 1000  # an entry from a peer whose clock runs ahead
    data = {"users": {"a": ("alice", OLD), "f": ("fut", future), "same": ("same", OLD)}}
    spec = build_lmdb(tmp_path / "db", data, native=native, marker=0)
    mdir = migrations(
        tmp_path,
        """
        for key, value in m.items("users"):
            if key != b"same":
                m.put("users", key, value + b"!")
        m.put("users", b"new", b"n")
        m.delete("users", b"same")
        """,
        strategies=("in-place",),
    )
    run_migrations(spec, mdir, clock=clock)
    dump = read_lmdb(spec, tombstones=True)["users"]
    assert dump[b"a"] == (b"alice!", NOW)
    assert dump[b"f"] == (b"fut!", future + 1)
    assert dump[b"new"] == (b"n", NOW)
    assert dump[b"same"] == (None, NOW)


@pytest.mark.parametrize("native", MODES)
def test_new_dbi_copies_keep_source_timestamps_and_old_dbis_are_read_only(
    tmp_path: Path, native: bool
) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, native=native, marker=0)
    mdir = migrations(
        tmp_path,
        """
        n = m.copy_dbi("users", "users_v2", lambda k, v: (k, b'{"name": "' + v + b'"}'))
        assert n == 3
        """,
        """
        m.put("users", b"a", b"changed")
        """,
        strategies=("new-dbi", "new-dbi"),
    )
    run_migrations(spec, mdir, clock=clock, target=1)
    dump = read_lmdb(spec)
    assert dump["users_v2"][b"b"] == (b'{"name": "bob"}', OLD + 1)
    assert dump["users"] == read_lmdb(spec)["users"]
    before = raw_dump(spec)
    with pytest.raises(
        VerificationFailed, match=r"STRATEGY 'new-dbi' may only write DBIs that did not exist"
    ):
        run_migrations(spec, mdir, clock=clock)
    assert raw_dump(spec) == before
    assert read_marker_version(spec) == 1


# ----------------------------------------------------------------------------------- tombstones


def test_native_delete_writes_a_tombstone_with_the_entry_timestamp(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(
        tmp_path,
        """
        assert m.delete("users", b"b") is True
        assert m.delete("users", b"b") is False      # already a tombstone
        assert m.delete("users", b"zz") is False     # never existed
        assert m.get("users", b"b") is None
        assert [k for k, _ in m.items("users")] == [b"a", b"c"]
        """,
    )
    run_migrations(spec, mdir, clock=clock)
    users = read_lmdb(spec, tombstones=True)["users"]
    assert users[b"b"] == (None, OLD + 1)
    env = open_env(spec, readonly=True)
    try:
        with env.begin() as txn:
            raw = txn.get(b"b", db=open_dbi(env, txn, "users"))
    finally:
        env.close()
    assert raw is not None and len(raw) == lsheader.MIN_HEADER_SIZE and lsheader.parse_header(raw).deleted


def test_shadow_delete_removes_main_entry_and_tombstones_shadow(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, native=False, marker=0)
    mdir = migrations(tmp_path, 'm.delete("users", b"b")')
    run_migrations(spec, mdir, clock=clock)
    assert b"b" not in read_values(spec)["users"]
    shadow = read_lmdb(spec, include_sync=True, tombstones=True)["_sync_shadow_users"]
    assert shadow[b"b"] == (None, OLD + 1)


def test_shadow_entry_missing_means_ls_never_saw_it(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, native=False, marker=0, shadow=False)
    mdir = migrations(
        tmp_path,
        """
        for k, v in m.items("users"):
            m.put("users", k, v + b"2")
            m.put("idx", v, k)
        """,
    )
    run_migrations(spec, mdir, clock=clock)
    dump = read_lmdb(spec)
    assert dump["users"][b"a"] == (b"alice2", NOW) and dump["idx"][b"alice"] == (b"a", NOW)


@pytest.mark.parametrize("strategy", ["prefix", "in-place"])
@pytest.mark.parametrize("native", MODES)
def test_putting_back_the_original_value_after_a_change_is_written(
    tmp_path: Path, native: bool, strategy: str
) -> None:
    # put() skips a value equal to the current source's; that must be the value stored NOW, not the
    # one items() yielded (a put or delete of the source in between changed it).
    spec = build_lmdb(tmp_path / "db", USERS, native=native, marker=0)
    mdir = migrations(
        tmp_path,
        """
        for k, v in m.items("users"):
            if k == b"a":
                m.put("users", k, b"tmp")
                m.put("users", k, v)
            if k == b"b":
                m.delete("users", k)
                m.put("users", k, v)
        """,
        strategies=(strategy,),
    )
    run_migrations(spec, mdir, clock=clock)
    assert read_values(spec)["users"] == {b"a": b"alice", b"b": b"bob", b"c": b"carol"}


# --------------------------------------------------------------------------------- marker state


def test_unmarked_empty_lmdb_is_stamped_at_target(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"users": {}})
    mdir = migrations(tmp_path, "raise AssertionError('must not run')", "raise AssertionError('no')")
    result = run_migrations(spec, mdir, clock=clock)
    assert result.stamped == "empty" and result.after is not None and result.after.version == 2
    assert result.steps == ()
    assert read_marker_version(spec) == 2


def test_unmarked_lmdb_with_data_is_refused_naming_stamp(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS)
    mdir = migrations(tmp_path, "pass")
    before = raw_dump(spec)
    with pytest.raises(UnmarkedDatabase, match=r"has data but no schema marker .*lssupervisor stamp N"):
        run_migrations(spec, mdir, clock=clock)
    assert raw_dump(spec) == before


def test_data_written_between_the_emptiness_check_and_the_stamp_is_not_stamped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The application may commit after the read transaction that found the LMDB empty: the stamp's
    own write transaction must see that data and refuse, not mark it with the target version."""
    import lssupervisor.worker.migrator as migrator_mod

    spec = build_lmdb(tmp_path / "db", USERS)
    mdir = migrations(tmp_path, "pass", "pass")
    real = migrator_mod.has_user_data
    seen: list[bool] = []

    def first_sees_empty(*args: Any, **kwargs: Any) -> bool:
        # The first (read-transaction) check sees an empty LMDB, as if the data came just after it.
        seen.append(True)
        return False if len(seen) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(migrator_mod, "has_user_data", first_sees_empty)
    before = raw_dump(spec)
    with pytest.raises(UnmarkedDatabase, match="lssupervisor stamp N"):
        run_migrations(spec, mdir, clock=clock)
    assert raw_dump(spec) == before and read_marker_version(spec) is None


def test_unmarked_lmdb_with_baseline_migrates_from_it(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS)
    mdir = migrations(tmp_path, "raise AssertionError('baseline 1 skips me')", 'm.put("users", b"a", b"A")')
    result = run_migrations(spec, mdir, clock=clock, baseline=1)
    assert result.stamped == "baseline" and [s.to_version for s in result.steps] == [2]
    assert read_values(spec)["users"][b"a"] == b"A"
    spec2 = build_lmdb(tmp_path / "db2", USERS)
    assert run_migrations(spec2, mdir, clock=clock, baseline=2).after.version == 2  # type: ignore[union-attr]
    assert read_marker_version(spec2) == 2


def test_marker_newer_than_migrations_is_schema_too_new(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=5)
    mdir = migrations(tmp_path, "pass", "pass")
    with pytest.raises(SchemaTooNew, match="at schema version 5, newer than the newest migration 2"):
        run_migrations(spec, mdir, clock=clock)


def test_checksum_drift_of_the_applied_migration_is_refused(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(tmp_path, 'm.put("users", b"a", b"1")')
    run_migrations(spec, mdir, clock=clock)
    path = mdir / "0001_step1.py"
    path.write_text(path.read_text() + "# edited\n")
    (mdir / "0002_more.py").write_text('"""More."""\nVERSION = 2\n\ndef upgrade(m):\n    pass\n')
    with pytest.raises(ChecksumMismatch, match=r"0001_step1.py: changed since it was applied"):
        run_migrations(spec, mdir, clock=clock)


def test_other_instances_marker_does_not_count(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=1, instance="peer")
    mdir = migrations(tmp_path, 'm.put("users", b"a", b"1")')
    with pytest.raises(UnmarkedDatabase, match="instance 'me'"):
        run_migrations(spec, mdir, clock=clock, instance="me")


# ------------------------------------------------------------------------------------- verifier


def test_verifier_catches_headerless_write_through_raw_txn(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(tmp_path, 'm.txn.put(b"a", b"no header", db=m.db("users"))')
    before = raw_dump(spec)
    with pytest.raises(VerificationFailed, match=r"DBI 'users' key b'a' has no valid LS header"):
        run_migrations(spec, mdir, clock=clock)
    assert raw_dump(spec) == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            'm.txn.put(b"a", lsheader.encode(b"x", 12345, m.txn.id()), db=m.db("users"))',
            r"changed the timestamp .* keeps timestamps",
        ),
        ('m.txn.delete(b"a", db=m.db("users"))', r"really deleted a key \(native mode needs a tombstone\)"),
        (
            'm.txn.cursor(m.db("users")).put(b"zz", lsheader.encode(b"x", m.now_ns + 1))',
            r"new key timestamp .* outside",
        ),
        (
            'raw = bytearray(lsheader.encode(b"x", m.now_ns)); raw[19] = 1\n'
            'm.txn.put(b"n", bytes(raw), db=m.db("users"))',
            "reserved header bytes",
        ),
        (
            'm.txn.put(b"n", lsheader.build(m.now_ns)[:23] + b"\\x01" + bytes(8) + b"v", db=m.db("users"))',
            "extension blocks",
        ),
        ('m.txn.put(b"n", lsheader.build(m.now_ns, flags=4), db=m.db("users"))', "unknown header flags 0x04"),
        (
            'm.txn.put(b"n", lsheader.build(m.now_ns, flags=1) + b"v", db=m.db("users"))',
            "tombstone with a value",
        ),
        ('m.txn.put(b"k", b"v", db=m.db("_sync_shadow_users", create=True))', r"_sync\* DBIs belong to"),
        ('m.txn.put(b"k", b"v", db=m.db("lssupervisor"))', "marker DBI"),
        ('m.txn.put(b"k", b"v")', r"need a named DBI handle"),
        ('m.txn.cursor().put(b"k", b"v")', r"need a named DBI handle"),
        ('m.txn.drop(m.db("users"))', "drop refused"),
    ],
)
def test_verifier_rejects_bad_raw_writes(tmp_path: Path, body: str, message: str) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(tmp_path, "from lssupervisor.worker import lsheader\n" + body)
    before = raw_dump(spec)
    with pytest.raises(VerificationFailed, match=message):
        run_migrations(spec, mdir, clock=clock)
    assert raw_dump(spec) == before


def test_in_place_raw_write_needs_fresh_timestamp(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(
        tmp_path,
        "from lssupervisor.worker import lsheader\n"
        'm.txn.put(b"a", lsheader.encode(b"x", 7), db=m.db("users"))',
        strategies=("in-place",),
    )
    with pytest.raises(VerificationFailed, match="STRATEGY 'in-place' needs a fresh one"):
        run_migrations(spec, mdir, clock=clock)


def test_correct_raw_writes_commit(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(
        tmp_path,
        """
        from lssupervisor.worker import lsheader
        db = m.db("users")
        for key, raw in m.txn.cursor(db):
            header, value = lsheader.parse(raw)
            m.txn.put(key, lsheader.encode(value * 2, header.timestamp, m.txn.id()), db=db)
        m.txn.put(b"tomb", lsheader.encode(b"", OLD, deleted=True), db=db)
        """.replace("OLD", str(OLD)),
    )
    result = run_migrations(spec, mdir, clock=clock)
    assert result.steps[0].raw_writes == 4
    assert read_lmdb(spec, tombstones=True)["users"][b"b"] == (b"bobbob", OLD + 1)


def test_raw_writes_in_shadow_mode_get_their_shadow_entries(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, native=False, marker=0)
    mdir = migrations(
        tmp_path,
        """
        db = m.db("users")
        m.txn.put(b"a", b"ALICE", db=db)
        m.txn.put(b"new", b"N", db=db)
        m.txn.delete(b"b", db=db)
        """,
    )
    run_migrations(spec, mdir, clock=clock)
    shadow = read_lmdb(spec, include_sync=True, tombstones=True)["_sync_shadow_users"]
    assert shadow[b"a"] == (b"ALICE", OLD)
    assert shadow[b"new"] == (b"N", NOW)
    assert shadow[b"b"] == (None, OLD + 1)


# ------------------------------------------------------------------------- failures roll back


def test_exception_in_upgrade_names_file_and_line_and_rolls_back(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(
        tmp_path, 'm.put("users", b"a", b"1")', 'm.put("users", b"a", b"2")\nraise KeyError("boom")'
    )
    with pytest.raises(MigrationError, match=r"0002_step2.py:8: upgrade failed: KeyError: 'boom'"):
        run_migrations(spec, mdir, clock=clock)
    # Step 1 committed with its marker; step 2 left nothing behind.
    assert read_marker_version(spec) == 1
    assert read_values(spec)["users"][b"a"] == b"1"


def test_map_full_aborts_cleanly_and_grow_map_retries(tmp_path: Path) -> None:
    data = {"users": {f"user{i:05d}": "x" * 100 for i in range(2000)}}
    spec = build_lmdb(tmp_path / "db", data, marker=0, map_size=1 << 20)
    mdir = migrations(
        tmp_path,
        """
        for k, v in m.items("users"):
            m.put("users", k, v * 4)
        """,
    )
    before = raw_dump(spec)
    with pytest.raises(
        MapFull, match=r"map full during step main: 0 -> 1 \(0001_step1\).*needs about"
    ) as info:
        run_migrations(spec, mdir, clock=clock)
    assert info.value.needed_bytes is not None and info.value.needed_bytes > 1 << 20
    assert raw_dump(spec) == before
    result = run_migrations(spec, mdir, clock=clock, grow_map=True)
    assert result.steps[0].map_size > 1 << 20
    assert read_values(spec)["users"][b"user00007"] == b"x" * 400


@pytest.mark.parametrize("native", MODES)
def test_cancellation_mid_iteration_leaves_lmdb_unchanged(tmp_path: Path, native: bool) -> None:
    data = {"users": {f"u{i:05d}": f"v{i}" for i in range(5000)}}
    spec = build_lmdb(tmp_path / "db", data, native=native, marker=0)
    mdir = migrations(
        tmp_path,
        """
        for k, v in m.items("users"):
            m.put("users", k, v + b"!")
        """,
    )
    calls = 0

    def cancel() -> bool:
        nonlocal calls
        calls += 1
        return calls > 2  # let ~2000 entries be rewritten first

    before = raw_dump(spec)
    with pytest.raises(MigrationCancelled, match="cancelled; the step was rolled back"):
        run_migrations(spec, mdir, clock=clock, cancel=cancel)
    assert calls == 3
    assert raw_dump(spec) == before


def test_cancellation_event_during_copy(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"users": {f"u{i:05d}": "v" for i in range(6000)}}, marker=0)
    mdir = migrations(tmp_path, 'm.copy_dbi("users", "users_v2")', strategies=("new-dbi",))
    event = threading.Event()
    reports: list[Progress] = []

    def progress(p: Progress) -> None:
        reports.append(p)
        event.set()  # cancel once the first batch is written

    before = raw_dump(spec)
    with pytest.raises(MigrationCancelled):
        run_migrations(spec, mdir, clock=clock, cancel=event, progress=progress)
    assert reports and reports[0].total == 6000 and reports[0].done == 4096
    assert raw_dump(spec) == before


# ------------------------------------------------------------------------------------ API details


def test_copy_dbi_out_of_order_keys_duplicates_and_tombstones(tmp_path: Path) -> None:
    data = {"src": {"a": ("1", 10), "b": ("2", 20), "c": (None, 30), "d": ("4", 40)}}
    spec = build_lmdb(tmp_path / "db", data, marker=0)
    mdir = migrations(
        tmp_path,
        """
        n = m.copy_dbi("src", "rev", lambda k, v: (b"z" if k == b"d" else bytes([200 - k[0]]), v))
        assert n == 3, n
        assert m.copy_dbi("src", "dup", lambda k, v: (b"same", v)) == 3
        assert m.copy_dbi("src", "plain") == 3
        try:
            m.copy_dbi("src", "plain")
        except Exception as exc:
            assert "needs an empty destination" in str(exc)
        else:
            raise AssertionError("non-empty destination accepted")
        """,
    )
    run_migrations(spec, mdir, clock=clock)
    dump = read_lmdb(spec, tombstones=True)
    assert dump["rev"] == {bytes([103]): (b"1", 10), bytes([102]): (b"2", 20), b"z": (b"4", 40)}
    assert dump["dup"] == {b"same": (b"4", 40)}  # last one wins
    assert dump["plain"] == {b"a": (b"1", 10), b"b": (b"2", 20), b"d": (b"4", 40)}


def test_dbis_get_items_prefix_and_missing_dbi(tmp_path: Path) -> None:
    data = {"users": {"a/1": "x", "a/2": "y", "b/1": "z"}, "other": {}}
    spec = build_lmdb(tmp_path / "db", data, marker=0)
    mdir = migrations(
        tmp_path,
        """
        assert m.dbis() == ["other", "users"], m.dbis()
        assert list(m.items("users", prefix=b"a/")) == [(b"a/1", b"x"), (b"a/2", b"y")]
        assert m.get("users", b"b/1") == b"z" and m.get("users", b"nope", b"d") == b"d"
        assert m.timestamp("users", b"a/1") is not None
        m.put("fresh", b"k", b"v")
        assert "fresh" in m.dbis()
        m.items("nope")
        next(m.items("nope"))
        """,
    )
    with pytest.raises(
        MigrationError, match=r"DBI 'nope' does not exist in LMDB 'main' \(synced DBIs: fresh"
    ):
        run_migrations(spec, mdir, clock=clock)


def test_progress_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(
        tmp_path,
        """
        for i in range(1, 4):
            m.progress(i, 3)
        m.log.info("hello from %s", m.migration)
        """,
    )
    reports: list[Progress] = []
    caplog.set_level("INFO")
    run_migrations(spec, mdir, clock=clock, progress=reports.append)
    assert reports[0] == Progress("main", "0001_step1", 1, 3) and reports[-1].done == 3
    assert "hello from 0001_step1" in caplog.text


def test_run_external_tool(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    py = sys.executable
    mdir = migrations(
        tmp_path,
        f"""
        out = m.run([{py!r}, "-c", "import os; print(os.environ['LSSUPERVISOR_WRITE_TXN_OPEN'])"])
        m.put("users", b"tool", out.stdout.strip().encode())
        m.run([{py!r}, "-c", "import sys; sys.exit(3)"])
        """,
    )
    with pytest.raises(MigrationError, match="exited 3"):
        run_migrations(spec, mdir, clock=clock)
    assert b"tool" not in read_values(spec)["users"]


def test_run_times_out_instead_of_deadlocking(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(
        tmp_path, f'm.run([{sys.executable!r}, "-c", "import time; time.sleep(60)"], timeout=0.3)'
    )
    with pytest.raises(MigrationError, match=r"did not finish within 0\.3s"):
        run_migrations(spec, mdir, clock=clock)


def test_run_step_marker_only_and_json(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=2)
    env = open_env(spec)
    try:
        result = run_step(env, spec, Step("main", 2, 4, None), instance="test", clock=clock)
    finally:
        env.close()
    assert result.marker.version == 4 and result.migration == "" and result.puts == 0
    assert to_wire(result)["to_version"] == 4
    assert read_marker_version(spec) == 4


def test_headerless_data_in_native_lmdb_is_explained(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, native=False, marker=0)
    native_view = LmdbSpec(name=spec.name, path=spec.path, map_size=spec.map_size, native=True)
    mdir = migrations(tmp_path, 'list(m.items("users"))')
    with pytest.raises(MigrationError, match="is schema_tracks_changes right"):
        env = open_env(native_view)
        try:
            # The marker was written in shadow mode (plain JSON): read it as shadow to get going.
            found = load(mdir, ("main",))
            run_step(env, native_view, Step("main", 0, 1, found.migrations[0]), instance="test", clock=clock)
        finally:
            env.close()


def test_on_step_is_called_after_each_commit(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    mdir = migrations(tmp_path, "pass", "pass", "pass")
    seen: list[Any] = []
    env = open_env(spec)
    try:
        migrate(env, spec, load(mdir, ("main",)), instance="test", clock=clock, on_step=seen.append, target=2)
    finally:
        env.close()
    assert [(r.from_version, r.to_version, r.migration) for r in seen] == [
        (0, 1, "0001_step1"),
        (1, 2, "0002_step2"),
    ]


def test_releasing_map_pages_mid_transaction_keeps_every_write(tmp_path: Path) -> None:
    """The RSS trim (madvise DONTNEED on the shared map) must never lose dirty writemap pages."""
    from lssupervisor.worker.migrator import _map_ranges, _release_map

    spec = build_lmdb(tmp_path / "db", {"users": {}}, marker=0)
    env = open_env(spec, writemap=True)
    try:
        assert _map_ranges(env), "the data file mapping is found in /proc/self/maps"
        with env.begin(write=True) as txn:
            db = open_dbi(env, txn, "users")
            for i in range(20000):
                txn.put(b"k%06d" % i, lsheader.encode(b"v%d" % i, i + 1), db=db)
            _release_map(env)
            assert txn.get(b"k012345", db=db) == lsheader.encode(b"v12345", 12346)
        _release_map(env)
    finally:
        env.close()
    users = read_lmdb(spec)["users"]
    assert len(users) == 20000 and users[b"k019999"] == (b"v19999", 20000)


# --------------------------------------------------------------------------------------- m.rewrite


@pytest.mark.parametrize("native", MODES)
@pytest.mark.parametrize(("strategy", "fresh"), [("prefix", False), ("in-place", True)])
def test_rewrite_is_an_items_put_loop_in_one_call(
    tmp_path: Path, native: bool, strategy: str, fresh: bool
) -> None:
    """m.rewrite(dbi, fn) gives exactly what the items/put loop gives: same values, same timestamp
    rule, unchanged entries and tombstones left alone, a prefix honoured."""
    data = {"users": {"a": ("alice", OLD), "b": ("bob", OLD + 1), "c": ("carol", OLD + 2), "x": ("x", OLD)}}
    loop = build_lmdb(tmp_path / "loop", data, native=native, marker=0)
    batch = build_lmdb(tmp_path / "batch", data, native=native, marker=0)
    (tmp_path / "l").mkdir()
    (tmp_path / "r").mkdir()
    by_loop = migrations(
        tmp_path / "l",
        """
        for key, value in m.items("users"):
            if key != b"c":
                m.put("users", key, value.upper())
        """,
        strategies=(strategy,),
    )
    by_rewrite = migrations(
        tmp_path / "r",
        """
        n = m.rewrite("users", lambda key, value: None if key == b"c" else value.upper())
        assert n == 3, n  # a, b, x written; c left alone
        """,
        strategies=(strategy,),
    )
    run_migrations(loop, by_loop, clock=clock)
    result = run_migrations(batch, by_rewrite, clock=clock)
    # Everything but the markers (they name their migration file's checksum) is byte for byte equal.
    def data_of(spec: LmdbSpec) -> dict[str, Any]:
        return {n: d for n, d in read_lmdb(spec, include_sync=True).items() if "lssupervisor" not in n}

    assert data_of(batch) == data_of(loop)
    users = read_lmdb(batch)["users"]
    assert users[b"c"] == (b"carol", OLD + 2)  # untouched, timestamp kept whatever the strategy
    assert users[b"a"] == (b"ALICE", NOW if fresh else OLD)
    assert result.steps[0].puts == 3


def test_rewrite_honours_a_prefix_and_skips_tombstones(tmp_path: Path) -> None:
    data = {"users": {"a:1": ("one", OLD), "a:2": ("two", OLD), "b:1": ("bee", OLD)}}
    spec = build_lmdb(tmp_path / "db", data, marker=0)
    mdir = migrations(
        tmp_path,
        """
        m.delete("users", b"a:2")
        assert m.rewrite("users", lambda key, value: value + b"!", prefix=b"a:") == 1
        """,
    )
    run_migrations(spec, mdir, clock=clock)
    dump = read_lmdb(spec, tombstones=True)["users"]
    assert dump[b"a:1"] == (b"one!", OLD) and dump[b"b:1"] == (b"bee", OLD)
    assert dump[b"a:2"] == (None, OLD)  # the tombstone stays a tombstone


def test_rewrite_of_an_existing_dbi_is_refused_under_new_dbi(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", USERS, marker=0)
    before = raw_dump(spec)
    mdir = migrations(tmp_path, 'm.rewrite("users", lambda k, v: v + b"!")', strategies=("new-dbi",))
    with pytest.raises(VerificationFailed, match="may only write DBIs that did not exist"):
        run_migrations(spec, mdir, clock=clock)
    assert raw_dump(spec) == before

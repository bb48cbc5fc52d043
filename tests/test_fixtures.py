"""The public test helpers users test their migrations with."""

from __future__ import annotations

from pathlib import Path

import pytest

from lssupervisor.testing.fixtures import (
    DEFAULT_TIMESTAMP,
    build_lmdb,
    lmdb_spec,
    read_lmdb,
    read_marker_version,
    read_values,
    run_migrations,
)
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import open_dbi
from lssupervisor.worker.migrator import open_env

DATA = {
    "users": {"a": "alice", b"b": (b"bob", 5), "gone": (None, 7), "gone2": None},
    "empty": {},
}


@pytest.mark.parametrize("native", [True, False], ids=["native", "shadow"])
def test_build_and_read_round_trip(tmp_path: Path, native: bool) -> None:
    spec = build_lmdb(tmp_path / "db", DATA, native=native)
    assert spec.native is native
    assert read_lmdb(spec) == {"users": {b"a": (b"alice", DEFAULT_TIMESTAMP), b"b": (b"bob", 5)}, "empty": {}}
    with_tombstones = read_lmdb(spec, tombstones=True)["users"]
    assert with_tombstones[b"gone"] == (None, 7) and with_tombstones[b"gone2"] == (None, DEFAULT_TIMESTAMP)
    assert read_values(spec) == {"users": {b"a": b"alice", b"b": b"bob"}, "empty": {}}


def test_native_values_carry_headers(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", DATA)
    env = open_env(spec, readonly=True)
    try:
        with env.begin() as txn:
            raw = txn.get(b"b", db=open_dbi(env, txn, "users"))
    finally:
        env.close()
    assert raw is not None
    header, value = lsheader.parse(raw)
    assert (header.timestamp, value) == (5, b"bob")


def test_shadow_mode_layout_is_what_ls_leaves(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", DATA, native=False)
    env = open_env(spec, readonly=True)
    try:
        with env.begin() as txn:
            assert txn.get(b"b", db=open_dbi(env, txn, "users")) == b"bob"  # plain
            assert txn.get(b"gone", db=open_dbi(env, txn, "users")) is None  # no tombstones in main
            shadow = txn.get(b"gone", db=open_dbi(env, txn, "_sync_shadow_users"))
    finally:
        env.close()
    assert shadow is not None and lsheader.parse_header(shadow).deleted
    sync = read_lmdb(spec, include_sync=True, tombstones=True)
    assert sync["_sync_shadow_users"][b"b"] == (b"bob", 5)


def test_shadow_false_simulates_data_ls_never_saw(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"users": {"a": "x"}}, native=False, shadow=False)
    assert read_lmdb(spec) == {"users": {b"a": (b"x", 0)}}
    assert "_sync_shadow_users" not in read_lmdb(spec, include_sync=True)


def test_marker_and_adding_to_an_existing_lmdb(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"users": {"a": "1"}}, marker=3, instance="node")
    build_lmdb(spec, {"users": {"b": "2"}})
    assert read_marker_version(spec, "node") == 3 and read_marker_version(spec, "other") is None
    assert read_values(spec)["users"] == {b"a": b"1", b"b": b"2"}
    assert "lssupervisor" not in read_lmdb(spec) and "lssupervisor" in read_lmdb(spec, include_marker=True)


def test_no_subdir_lmdb(tmp_path: Path) -> None:
    spec = build_lmdb(lmdb_spec(tmp_path / "sub" / "data.mdb", no_subdir=True), {"users": {"a": "1"}})
    assert (tmp_path / "sub" / "data.mdb").is_file()
    assert read_values(spec) == {"users": {b"a": b"1"}}


def test_run_migrations_from_a_directory(tmp_path: Path) -> None:
    mdir = tmp_path / "m"
    mdir.mkdir()
    (mdir / "0001_add.py").write_text(
        '"""Add."""\nVERSION = 1\n\ndef upgrade(m):\n    m.put("users", b"n", b"v")\n'
    )
    (mdir / "test_0001_add.py").write_text("raise AssertionError('tests beside migrations are not loaded')\n")
    spec = build_lmdb(tmp_path / "db", {"users": {"a": "1"}}, marker=0)
    result = run_migrations(spec, mdir, clock=lambda: 42)
    assert result.after is not None and result.after.version == 1
    assert read_lmdb(spec)["users"][b"n"] == (b"v", 42)

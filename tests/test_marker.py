"""Schema markers inside the LMDB: per instance, fleet view, native and shadow mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lssupervisor.errors import MigrationError
from lssupervisor.testing.fixtures import build_lmdb, read_lmdb
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import (
    has_user_data,
    marker_key,
    read_marker,
    read_markers,
    read_state,
    stamp,
)
from lssupervisor.worker.migrator import open_env

NOW = 2_000_000_000_000_000_000


@pytest.mark.parametrize("native", [True, False])
def test_stamp_and_read_back(tmp_path: Path, native: bool) -> None:
    spec = build_lmdb(tmp_path / "db", {"users": {"a": "1"}}, native=native)
    env = open_env(spec)
    try:
        written = stamp(env, spec, 3, instance="node-1", clock=lambda: NOW, migration="0003_x", checksum="ab")
        with env.begin() as txn:
            found = read_marker(env, txn, "node-1", native=native)
            assert read_marker(env, txn, "node-2", native=native) is None
    finally:
        env.close()
    assert found == written
    assert (found.version, found.migration, found.checksum, found.instance) == (3, "0003_x", "ab", "node-1")
    assert found.timestamp == NOW and found.time == "2033-05-18T03:33:20.000Z"
    dump = read_lmdb(spec, include_marker=True, include_sync=True)
    value, ts = dump["lssupervisor"][marker_key("node-1")]
    assert value is not None and ts == NOW
    assert json.loads(value) == {
        "version": 3,
        "migration": "0003_x",
        "checksum": "ab",
        "time": "2033-05-18T03:33:20.000Z",
        "tool_version": found.tool_version,
        "instance": "node-1",
    }
    if not native:
        # Shadow mode: the shadow copy carries the same JSON with our timestamp, so LS sees no change.
        assert dump["_sync_shadow_lssupervisor"][marker_key("node-1")] == (value, NOW)


@pytest.mark.parametrize("native", [True, False])
def test_fleet_view_and_per_instance_markers(tmp_path: Path, native: bool) -> None:
    spec = build_lmdb(tmp_path / "db", {}, native=native)
    env = open_env(spec)
    try:
        stamp(env, spec, 2, instance="b", clock=lambda: NOW)
        stamp(env, spec, 1, instance="a", clock=lambda: NOW)
        stamp(env, spec, 5, instance="c", marker_dbi="other_markers", clock=lambda: NOW)
        with env.begin() as txn:
            fleet = read_markers(env, txn, native=native)
        state = read_state(env, spec, "a")
    finally:
        env.close()
    assert [(m.instance, m.version) for m in fleet] == [("a", 1), ("b", 2)]
    assert state.marker is not None and state.marker.version == 1
    assert len(state.markers) == 2
    assert state.has_user_data  # another DBI (other_markers) holds entries: that is user data here
    assert state.to_json()["marker"]["version"] == 1


def test_marker_timestamp_always_moves_forward(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {})
    env = open_env(spec)
    try:
        first = stamp(env, spec, 1, instance="a", clock=lambda: NOW)
        second = stamp(env, spec, 2, instance="a", clock=lambda: NOW - 10**9)  # clock went back
    finally:
        env.close()
    assert second.timestamp == first.timestamp + 1


def test_has_user_data_ignores_markers_and_sync_dbis(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"empty_dbi": {}}, marker=1)
    env = open_env(spec)
    try:
        with env.begin(write=True) as txn:
            assert not has_user_data(env, txn)
            shadow = env.open_db(b"_sync_shadow_x", txn=txn)
            txn.put(b"k", lsheader.encode(b"v", 1), db=shadow)
            assert not has_user_data(env, txn)
            data = env.open_db(b"x", txn=txn)
            txn.put(b"k", lsheader.encode(b"", 1, deleted=True), db=data)
            assert has_user_data(env, txn)  # a tombstone is history: fail closed
            txn.abort()
    finally:
        env.close()


def test_unreadable_marker_is_a_clear_error(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"lssupervisor": {marker_key("a"): "not json"}})
    env = open_env(spec)
    try:
        with env.begin() as txn, pytest.raises(MigrationError, match=r"key 'schema_version/a'.*unreadable"):
            read_marker(env, txn, "a", native=True)
    finally:
        env.close()


def test_headerless_marker_in_native_mode_is_a_clear_error(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {})
    env = open_env(spec)
    try:
        with env.begin(write=True) as txn:
            txn.put(marker_key("a"), b"{}", db=env.open_db(b"lssupervisor", txn=txn))
        with env.begin() as txn, pytest.raises(MigrationError, match="without a valid LS header"):
            read_marker(env, txn, "a", native=True)
    finally:
        env.close()


def test_damaged_shadow_copy_of_a_marker_is_a_clear_error(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"users": {"a": "1"}}, native=False)
    env = open_env(spec)
    try:
        stamp(env, spec, 3, instance="a")
        with env.begin(write=True) as txn:
            txn.put(marker_key("a"), b"short", db=env.open_db(b"_sync_shadow_lssupervisor", txn=txn))
        with env.begin() as txn:
            for read in (
                lambda: read_marker(env, txn, "a", native=False),
                lambda: read_markers(env, txn, native=False),
            ):
                with pytest.raises(MigrationError, match=r"shadow copy .* no valid LS header.*stamp N"):
                    read()
    finally:
        env.close()


def test_tombstoned_marker_reads_as_unmarked(tmp_path: Path) -> None:
    spec = build_lmdb(tmp_path / "db", {"lssupervisor": {marker_key("a"): (None, 5)}})
    env = open_env(spec)
    try:
        with env.begin() as txn:
            assert read_marker(env, txn, "a", native=True) is None
            assert read_markers(env, txn, native=True) == ()
    finally:
        env.close()

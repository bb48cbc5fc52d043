"""The prefix example: values rewritten with their timestamps kept, derived keys, tombstones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, read_marker_version, run_migrations

HERE = Path(__file__).parent
T_ADA, T_BOB = 1_600_000_000_000_000_000, 1_650_000_000_000_000_000


def user(**fields: object) -> str:
    return json.dumps(fields)


@pytest.mark.parametrize("native", [True, False], ids=["native", "shadow"])
def test_prefix_example(tmp_path: Path, native: bool) -> None:
    spec = build_lmdb(
        tmp_path / "db",
        {
            "users": {
                "u1": (user(name="Ada Lovelace", active=True), T_ADA),
                "u2": (user(name="Bob Stale", active=False), T_BOB),
            }
        },
        native=native,
        marker=0,
    )
    result = run_migrations(spec, HERE, clock=lambda: 2_000_000_000_000_000_000)
    assert [s.migration for s in result.steps] == ["0001_split_names", "0002_drop_inactive"]
    assert read_marker_version(spec) == 2
    dump = read_lmdb(spec, tombstones=True)
    value, ts = dump["users"][b"u1"]
    assert value is not None and json.loads(value) == {"first": "Ada", "last": "Lovelace", "active": True}
    assert ts == T_ADA  # kept: the new prefix merges by the real time of each change
    assert dump["users_by_last"][b"lovelace/u1"] == (b"", T_ADA)  # derived key: its source's time
    assert dump["users"][b"u2"] == (None, T_BOB)  # tombstone, same timestamp
    assert dump["users_by_last"][b"stale/u2"] == (None, T_BOB)

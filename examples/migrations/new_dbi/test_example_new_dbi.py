"""The new-dbi example: a copy into a new DBI that keeps timestamps; the old DBI stays untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, run_migrations

HERE = Path(__file__).parent
T1, T2 = 1_600_000_000_000_000_000, 1_600_000_000_000_000_001


@pytest.mark.parametrize("native", [True, False], ids=["native", "shadow"])
def test_new_dbi_example(tmp_path: Path, native: bool) -> None:
    data = {"users": {"u1": ("Ada,ada@example.org", T1), "u2": ("Broken", T2), "u3": (None, T2)}}
    spec = build_lmdb(tmp_path / "db", data, native=native, marker=0)
    before = read_lmdb(spec, tombstones=True)["users"]
    run_migrations(spec, HERE)
    dump = read_lmdb(spec, tombstones=True)
    assert dump["users_v2"] == {b"u1": (b'{"email": "ada@example.org", "name": "Ada"}', T1)}
    assert dump["users"] == before  # the old DBI is read-only for this strategy

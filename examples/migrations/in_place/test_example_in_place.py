"""The in-place example: changed entries get fresh timestamps, unchanged ones keep theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lssupervisor.migrator import Progress
from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, run_migrations

HERE = Path(__file__).parent
OLD = 1_600_000_000_000_000_000
NOW = 2_000_000_000_000_000_000


@pytest.mark.parametrize("native", [True, False], ids=["native", "shadow"])
def test_in_place_example(tmp_path: Path, native: bool) -> None:
    data = {
        "users": {"u1": ('{"email": "Ada@Example.ORG"}', OLD), "u2": ('{"email": "bob@example.org"}', OLD)}
    }
    spec = build_lmdb(tmp_path / "db", data, native=native, marker=0)
    reports: list[Progress] = []
    run_migrations(spec, HERE, clock=lambda: NOW, progress=reports.append)
    users = read_lmdb(spec)["users"]
    assert users[b"u1"] == (b'{"email": "ada@example.org"}', NOW)  # fresh: survives LS's own old snapshot
    assert users[b"u2"] == (b'{"email": "bob@example.org"}', OLD)  # unchanged: not rewritten
    assert reports[-1].done == reports[-1].total == 2

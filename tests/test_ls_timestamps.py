"""Why the strategies' timestamp rules exist, shown with Lightning Stream itself.

Each test runs against the LS stand-in, and again against the real binary when one is installed
(``$LIGHTNINGSTREAM_BIN``, else ``lightningstream`` on PATH: the ``real_ls`` cases; they skip with the
reason otherwise). Every LS run is
``sync --only-once`` (merge every instance's latest snapshot, upload ours, exit 0), so the tests are
deterministic and wait on process exits only.

The facts (reference "Timestamps across a migration", observed on the real LS):
1. a rewrite keeping its timestamp, restarted on the SAME prefix, is reverted wherever the old value
   sorts lower (LS loads its own old snapshot; equal timestamps: the lower value wins);
2. ``in-place`` (fresh, strictly greater timestamps) survives a restart on the same prefix;
3. ``prefix`` (timestamps kept) survives when LS starts on the new, empty prefix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, run_migrations
from tests.harness.real_ls import real_ls_binary

# The migrated values ("~..." ) sort HIGHER than the old ones, so on a timestamp tie LS keeps the old.
OLD = {b"user:1": b"alice", b"user:2": b"bob"}
NEW = {b"user:1": b"~ALICE-v2", b"user:2": b"~BOB-v2"}

REWRITE = '''"""Rewrite every user value (the new format sorts higher than the old)."""

VERSION = 2
STRATEGY = "{strategy}"


def upgrade(m):
    for key, value in list(m.items("users")):
        m.put("users", key, b"~" + value.upper() + b"-v2")
'''

BASELINE = '''"""Baseline."""

VERSION = 1


def upgrade(m):
    pass
'''


def _standin() -> list[str]:
    return [sys.executable, "-m", "lssupervisor.testing.standin"]


def _real() -> list[str]:
    return [real_ls_binary()]


@pytest.fixture(params=["standin", pytest.param("real", marks=pytest.mark.real_ls)])
def ls(request: pytest.FixtureRequest) -> list[str]:
    return _standin() if request.param == "standin" else _real()


def _ls_config(tmp_path: Path, spec: LmdbSpec, root: Path) -> Path:
    cfg = tmp_path / f"ls-{root.name}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "instance": "alpha",
                "lmdbs": {"main": {"path": spec.path, "schema_tracks_changes": True}},
                "storage": {"type": "fs", "options": {"root_path": str(root)}},
                "lmdb_poll_interval": "100ms",
                "storage_poll_interval": "100ms",
            }
        )
    )
    return cfg


def _sync_once(ls: list[str], config: Path) -> None:
    out = subprocess.run(
        [*ls, "--config", str(config), "--timeout", "20s", "sync", "--only-once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"LS exited {out.returncode}:\n{out.stderr[-2000:]}"


def _users(spec: LmdbSpec) -> dict[bytes, bytes]:
    return {k: v for k, (v, _ts) in read_lmdb(spec)["users"].items() if v is not None}


def _migrations(tmp_path: Path, strategy: str) -> Path:
    d = tmp_path / f"migrations-{strategy}"
    d.mkdir(mode=0o755)
    (d / "0001_baseline.py").write_text(BASELINE)
    (d / "0002_rewrite.py").write_text(REWRITE.format(strategy=strategy))
    return d


def _synced_v1(tmp_path: Path, ls: list[str]) -> tuple[LmdbSpec, Path]:
    """An LMDB at version 1 whose data LS has already uploaded under the v1 prefix."""
    spec = build_lmdb(tmp_path / "lmdb", {"users": dict(OLD)}, marker=1, instance="alpha")
    v1 = tmp_path / "storage" / "v1"
    _sync_once(ls, _ls_config(tmp_path, spec, v1))
    assert list(v1.glob("main__alpha__*.pb.gz")), "LS uploaded no snapshot under v1"
    return spec, v1


def test_keeping_timestamps_on_the_same_prefix_is_reverted_by_ls(tmp_path: Path, ls: list[str]) -> None:
    spec, v1 = _synced_v1(tmp_path, ls)
    # A prefix-strategy migration keeps timestamps; started on the SAME prefix, LS undoes it.
    run_migrations(spec, _migrations(tmp_path, "prefix"), instance="alpha")
    assert _users(spec) == NEW
    _sync_once(ls, _ls_config(tmp_path, spec, v1))
    assert _users(spec) == OLD, "LS kept the rewrite: the equal-timestamp rule did not apply"


def test_prefix_strategy_survives_on_the_new_prefix(tmp_path: Path, ls: list[str]) -> None:
    spec, _v1 = _synced_v1(tmp_path, ls)
    before = {k: ts for k, (_v, ts) in read_lmdb(spec)["users"].items()}
    run_migrations(spec, _migrations(tmp_path, "prefix"), instance="alpha")
    v2 = tmp_path / "storage" / "v2"
    _sync_once(ls, _ls_config(tmp_path, spec, v2))
    assert _users(spec) == NEW
    # Timestamps kept: once every instance is on v2 they merge by the real time of each change.
    assert {k: ts for k, (_v, ts) in read_lmdb(spec)["users"].items()} == before
    assert list(v2.glob("main__alpha__*.pb.gz")), "LS uploaded nothing under the new prefix"


def test_in_place_strategy_survives_on_the_same_prefix(tmp_path: Path, ls: list[str]) -> None:
    spec, v1 = _synced_v1(tmp_path, ls)
    before = {k: ts for k, (_v, ts) in read_lmdb(spec)["users"].items()}
    run_migrations(spec, _migrations(tmp_path, "in-place"), instance="alpha")
    after = {k: ts for k, (_v, ts) in read_lmdb(spec)["users"].items()}
    assert all(after[k] > before[k] for k in before)
    _sync_once(ls, _ls_config(tmp_path, spec, v1))
    assert _users(spec) == NEW

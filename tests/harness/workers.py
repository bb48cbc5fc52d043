"""Worker-level fixtures: migration files, LS views, request settings, sample LMDBs, replies.

Used by the tests that drive the worker (process or in-process session) with real LMDBs in tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lmdb
import pytest

from lssupervisor.lsmodel import LmdbSpec, LsView
from lssupervisor.testing.fixtures import build_lmdb
from lssupervisor.worker import backup, backupdir, client, marker
from lssupervisor.worker import protocol as p
from lssupervisor.worker.ops import open_lmdb

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


def make_settings(view: LsView, tmp_path: Path, migrations: Path | None = None, **over: Any) -> p.Settings:
    settings = p.Settings(
        ls=view,
        marker_dbi="lssupervisor",
        migrations=str(migrations) if migrations else None,
        backup=p.BackupSettings(enabled=True, dir=str(tmp_path / "backups"), keep=3),
        history=str(tmp_path / "history.jsonl"),
    )
    return dataclasses.replace(settings, **over)


def sample_lmdb(path: Path, n: int = 200, marker: int | None = 1, name: str = "main") -> LmdbSpec:
    data = {"data": {f"k{i:06d}": f"value-{i}" for i in range(n)}}
    return build_lmdb(path, data, marker=marker, instance=INSTANCE, name=name)


class Collector:
    """on_reply for tests: keeps every reply in order."""

    def __init__(self) -> None:
        self.replies: list[p.Reply] = []

    def __call__(self, reply: p.Reply) -> None:
        self.replies.append(reply)

    def progress(self, phase: p.Phase) -> list[p.Progress]:
        return [r.body for r in self.replies if isinstance(r.body, p.Progress) and r.body.phase is phase]

    def finals(self) -> list[p.Reply]:
        return [r for r in self.replies if r.final]


def one(request: p.Request, on_reply: Collector | None = None, **kwargs: Any) -> p.Result | p.Failure:
    """The final reply body of ``request`` in a worker of its own."""
    (body,) = client.run([request], on_reply, **kwargs)
    return body


MARKER_DBI = "lssupervisor"


def read_marker(env: lmdb.Environment, spec: LmdbSpec) -> int | None:
    """This instance's marker version in ``env`` (the reader ``backup.create`` takes)."""
    with env.begin() as txn:
        found = marker.read_marker(env, txn, INSTANCE, native=spec.native, marker_dbi=MARKER_DBI)
    return found.version if found else None


class Opened:
    """LMDBs opened read-only in this process, as the worker opens them to back them up."""

    def __init__(self, *specs: LmdbSpec) -> None:
        self.specs = specs
        self.envs = {s.name: open_lmdb(s, write=False) for s in specs}

    def backup(self, directory: Path, keep: int = 5, **kw: object) -> backupdir.Manifest:
        return backup.create(self.envs, self.specs, directory, INSTANCE, read_marker, keep=keep, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs.clear()


REPO = Path(__file__).resolve().parents[2]


def python_on_tiny_tmpfs(
    mountpoint: Path, size: str, script: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c script args`` in a private mount namespace where a ``size`` tmpfs is mounted on
    ``mountpoint`` (a really full filesystem, nothing of the host's touched); skip the test when this
    machine cannot (no unshare, or mounting is not permitted)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not available")
    mount = f'mount -t tmpfs -o size={size} tmpfs {mountpoint} || exit 77; exec {sys.executable} -c "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    if proc.returncode == 77 or "Operation not permitted" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    return proc

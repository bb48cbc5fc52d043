"""I9, a restore point per version survives, and backups are their owner's only (issue 13 rows 5, 6).

- Row 5 reproduced: a failing ``0003`` retried five times by ``lssupervisor migrate``. Before: five
  identical v2 backups, and the v1 backup (the restore point from before ``0002``) rotated out. Now: the
  retries reuse the one v2 backup (same last txn id and digest), and retention never deletes the newest
  backup of a version, even with ``backup.keep: 1``; ``lssupervisor backups`` names the restore points.
- Row 6 reproduced: ``umask 022`` and an LMDB at 0600. Backup files are 0600 and their directories
  0700, the state directory ``run`` or ``migrate`` creates is 0700; a restore gives the data file back
  the mode and owner of the file it replaces.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lssupervisor.worker import backupdir, history
from tests.harness import wait_for
from tests.harness.e2e import ConfigSet, kill_recorded_ls
from tests.harness.workers import Opened, sample_lmdb

STEP2 = '''"""Step 2: a record."""

VERSION = 2


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"two", b"2")
'''

FAILING3 = '''"""Step 3: fails every time."""

VERSION = 3


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"three", b"3")
    raise RuntimeError("boom in step 3")
'''


def lssupervisor(cs: ConfigSet, *argv: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lssupervisor", *argv, "-c", str(cs.config)],
        capture_output=True,
        text=True,
        cwd=cs.root,
        timeout=120,
        check=False,
        umask=umask,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def at_v1(tmp_path: Path) -> ConfigSet:
    """A config set whose LMDB exists at schema v1 (stamped by `migrate --to 1`), made 0600."""
    cs = ConfigSet(tmp_path)
    cs.write(extra="backup:\n  keep: 1\n")
    done = lssupervisor(cs, "migrate", "--to", "1")
    assert done.returncode == 0, done.stderr
    for f in cs.lmdb.iterdir():
        f.chmod(0o600)
    return cs


def test_row5_retries_of_a_failing_step_keep_the_restore_point_of_every_version(at_v1: ConfigSet) -> None:
    cs = at_v1
    (cs.migrations / "0002_two.py").write_text(STEP2)
    (cs.migrations / "0003_three.py").write_text(FAILING3)
    for _ in range(5):
        failed = lssupervisor(cs, "migrate")
        assert failed.returncode == 65 and "boom in step 3" in failed.stderr, failed.stderr
    found = backupdir.list_backups(cs.state / "backups")
    # keep: 1, yet two remain: the v1 backup (from before 0002) and one v2 backup, both restore points.
    assert [b.manifest.schema_version for b in found] == [1, 2]
    assert backupdir.restore_points(found) == {found[0].id: 1, found[1].id: 2}
    entries = [e for e in history.read(cs.state / "history.jsonl").entries if e.kind is history.Kind.BACKUP]
    assert [e.result for e in entries] == [history.Result.OK] * 2 + [history.Result.NOOP] * 3
    assert all(e.backup_id == found[1].id for e in entries[2:])
    assert all("LMDB unchanged since it was taken" in (e.message or "") for e in entries[2:])
    # Every failed attempt says which backup it had (the reused one for the retries).
    listing = lssupervisor(cs, "backups")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("20")}
    assert " v1 " in rows[found[0].id] and " v2 " in rows[found[1].id]
    doc = json.loads(lssupervisor(cs, "backups", "--json").stdout)
    assert [b["restore_point"] for b in doc] == [True, True]


def test_a_changed_lmdb_is_backed_up_again_and_old_copies_of_a_version_rotate(at_v1: ConfigSet) -> None:
    """Reuse only while nothing was written; older copies of one version are what retention deletes."""
    cs = at_v1
    backups = cs.state / "backups"
    (cs.migrations / "0002_two.py").write_text(FAILING3.replace("VERSION = 3", "VERSION = 2"))
    assert lssupervisor(cs, "migrate").returncode == 65
    first = backupdir.list_backups(backups)
    assert [b.manifest.schema_version for b in first] == [1]
    assert lssupervisor(cs, "migrate").returncode == 65  # unchanged: reused
    assert [b.id for b in backupdir.list_backups(backups)] == [first[0].id]
    assert lssupervisor(cs, "stamp", "1").returncode == 0  # a write: the LMDB changed
    assert lssupervisor(cs, "migrate").returncode == 65
    now = backupdir.list_backups(backups)
    assert len(now) == 1 and now[0].id != first[0].id  # keep: 1; the newer v1 copy is v1's restore point


def test_retention_keeps_the_newest_backup_of_each_version(tmp_path: Path) -> None:
    versions = [1, 1, 2, 2, 3]
    ids: list[str] = []
    for i, version in enumerate(versions):
        spec = sample_lmdb(tmp_path / f"db{i}", n=5, marker=version)
        opened = Opened(spec)
        try:
            ids.append(opened.backup(tmp_path / "b", keep=2).id)
        finally:
            opened.close()
    left = backupdir.list_backups(tmp_path / "b")
    # keep: 2 would leave only the last two; the newest v1 (ids[1]) is v1's restore point and stays.
    assert [b.id for b in left] == [ids[1], ids[3], ids[4]]
    assert set(backupdir.restore_points(left)) == {ids[1], ids[3], ids[4]}


def test_row6_backup_files_are_0600_and_dirs_0700_whatever_the_umask(at_v1: ConfigSet) -> None:
    cs = at_v1
    (cs.migrations / "0002_two.py").write_text(STEP2)
    done = lssupervisor(cs, "migrate", umask=0o022)
    assert done.returncode == 0, done.stderr
    (b,) = backupdir.list_backups(cs.state / "backups")
    assert mode(cs.state / "backups") == 0o700
    for path in [b.path, *b.path.rglob("*")]:
        assert mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(mode(path)))
    # Even a umask that would leave everything open to everyone.
    (cs.migrations / "0003_three.py").write_text(STEP2.replace("VERSION = 2", "VERSION = 3"))
    assert lssupervisor(cs, "migrate", umask=0).returncode == 0
    for path in [x.path for x in backupdir.list_backups(cs.state / "backups")]:
        assert mode(path) == 0o700 and mode(path / "main" / "data.mdb") == 0o600
        assert mode(path / "manifest.json") == 0o600


def test_row6_the_state_dir_made_by_migrate_or_run_is_0700(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    assert lssupervisor(cs, "migrate", umask=0o022).returncode == 0
    assert mode(cs.state) == 0o700
    other = tmp_path / "run-state"
    cs.write(state_dir=str(other))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lssupervisor", "run", "-c", str(cs.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        umask=0o022,
    )
    try:
        wait_for((other / "state.json").exists, timeout=30, what="state.json of run")
        assert mode(other) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

        kill_recorded_ls(cs)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the LMDB to another user (chown) needs root")
def test_a_restore_keeps_the_data_files_mode_and_owner(at_v1: ConfigSet) -> None:
    cs = at_v1
    data = cs.lmdb / "data.mdb"
    os.chown(data, 65534, 65534)
    data.chmod(0o640)
    (cs.migrations / "0002_two.py").write_text(STEP2)
    assert lssupervisor(cs, "migrate").returncode == 0  # backup of v1 (0600 copy), then v2 in place
    done = lssupervisor(cs, "rollback")
    assert done.returncode == 0, done.stderr
    st = data.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o640)

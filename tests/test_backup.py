"""backup.py on real LMDBs: verified compact copies, retention, stale .partial cleaning, free-space
refusal (in-process and on a real tiny tmpfs), restore refused while the LMDB is open, idempotent
restore, damaged backups refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import lmdb
import pytest

from lssupervisor.errors import BackupError, ErrorCode, SupervisorError
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.testing.fixtures import build_lmdb, read_marker_version, read_values
from lssupervisor.worker import backup, backupdir, ops
from lssupervisor.worker import protocol as p
from lssupervisor.worker.wire import to_wire
from tests.harness.workers import (
    BASIC_MIGRATIONS,
    INSTANCE,
    Opened,
    make_settings,
    make_view,
    python_on_tiny_tmpfs,
    read_marker,
    sample_lmdb,
    write_migrations,
)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Opened]:
    main = sample_lmdb(tmp_path / "main", n=2000, marker=2)
    other = sample_lmdb(tmp_path / "other", n=10, marker=2, name="other")
    opened = Opened(main, other)
    yield opened
    opened.close()


def test_backup_is_verified_complete_and_described_by_its_manifest(tmp_path: Path, two: Opened) -> None:
    events: list[dict[str, object]] = []
    manifest = two.backup(tmp_path / "b", reason="test", progress=events.append)
    final = tmp_path / "b" / manifest.id
    assert final.is_dir() and not list((tmp_path / "b").glob("*.partial"))
    assert not (final / backupdir.OWNER).exists()
    on_disk = json.loads((final / backupdir.MANIFEST).read_text())
    assert on_disk["id"] == manifest.id and on_disk["instance"] == INSTANCE and on_disk["reason"] == "test"
    assert manifest.schema_version == 2 and manifest.id.endswith("-v2")
    for entry in manifest.lmdbs:
        copy = final / entry.file
        assert backupdir.file_digest(copy) == entry.digest and copy.stat().st_size == entry.size
        assert entry.schema_version == 2 and entry.last_txnid >= 1 and entry.source_path.endswith(entry.name)
        assert not (copy.parent / "lock.mdb").exists()  # verification never created a lock file
    assert [e["lmdb"] for e in events] == ["main", "other"]
    two.close()
    copy_spec = LmdbSpec(name="main", path=str(final / "main"))
    assert read_values(copy_spec) == read_values(two.specs[0])


def test_retention_keeps_the_newest_and_protected(tmp_path: Path, two: Opened) -> None:
    ids = [two.backup(tmp_path / "b", keep=2).id for _ in range(3)]
    assert [b.id for b in backupdir.list_backups(tmp_path / "b")] == ids[1:]
    # a protected (older) backup survives, the rest is trimmed around it
    newest = two.backup(tmp_path / "b", keep=2, protect=(ids[1],)).id
    assert [b.id for b in backupdir.list_backups(tmp_path / "b")] == [ids[1], newest]
    assert not list((tmp_path / "b").glob(".deleting-*"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partials_of_dead_writers_are_cleaned_live_ones_kept(tmp_path: Path, two: Opened) -> None:
    directory = tmp_path / "b"
    directory.mkdir()
    crashed = directory / "20200101T000000.000000Z-v1.partial"
    (crashed / "main").mkdir(parents=True)
    (crashed / backupdir.OWNER).write_text(json.dumps({"pid": dead_pid(), "create_time": 1.0}))
    no_owner = directory / "20200101T000001.000000Z-v1.partial"  # crash before owner.json
    no_owner.mkdir()
    running = directory / "20200101T000002.000000Z-v1.partial"
    running.mkdir()
    backupdir.claim(running)  # this (live) process is writing it
    manifest = two.backup(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([running.name, manifest.id])


def test_backup_refused_when_space_is_short_and_nothing_is_left(
    tmp_path: Path, two: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backupdir, "free_bytes", lambda directory: 1024 * 1024)
    with pytest.raises(
        BackupError, match=r"not enough free space .* need .* have 1\.0 MiB \(1048576 bytes\)"
    ):
        two.backup(tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


TMPFS_SCRIPT = """
import sys, threading
from lssupervisor.worker import ops
from lssupervisor.worker import protocol as p
from lssupervisor.worker.wire import from_wire
request = from_wire(p.BackupRequest, __import__("json").loads(sys.argv[1]))
try:
    ops.Session(lambda body: None, threading.Event()).serve(request)
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("no error")
"""


def test_backup_refused_on_a_really_full_disk(tmp_path: Path) -> None:
    """A 2 MiB tmpfs in a private mount namespace as the backup dir: the real statvfs says no."""
    spec = sample_lmdb(tmp_path / "db", n=20000)  # a few MiB
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    backups = p.BackupSettings(enabled=True, dir=str(tiny), keep=2)
    request = to_wire(p.BackupRequest(make_settings(make_view(spec), tmp_path, backup=backups)))
    proc = python_on_tiny_tmpfs(tiny, "2m", TMPFS_SCRIPT, json.dumps(request))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("BackupError") and "not enough free space" in proc.stdout
    assert "have 2.0 MiB" in proc.stdout or "have 1." in proc.stdout


def test_restore_round_trip_is_idempotent(tmp_path: Path, two: Opened) -> None:
    manifest = two.backup(tmp_path / "b")
    two.close()
    before = read_values(two.specs[0])
    build_lmdb(two.specs[0], {"data": {"k000001": "changed", "new": "x"}}, marker=3, instance=INSTANCE)
    assert read_marker_version(two.specs[0], instance=INSTANCE) == 3
    restored_manifest, results = backup.restore(tmp_path / "b", None, two.specs, read_marker)
    assert restored_manifest.id == manifest.id
    # a live file is not byte-equal to its compact copy, so both are replaced the first time
    assert {r.name: r.restored for r in results} == {"main": True, "other": True}
    assert read_values(two.specs[0]) == before
    assert read_marker_version(two.specs[0], instance=INSTANCE) == 2
    _, again = backup.restore(tmp_path / "b", manifest.id, two.specs, read_marker)
    assert [r.restored for r in again] == [False, False]
    assert not list(Path(two.specs[0].path).glob(".*restore*"))


HOLDER = textwrap.dedent("""
    import sys, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=64)
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_restore_refused_while_another_process_has_the_lmdb_open(tmp_path: Path, two: Opened) -> None:
    manifest = two.backup(tmp_path / "b")
    two.close()
    build_lmdb(two.specs[0], {"data": {"k000001": "changed"}}, marker=3, instance=INSTANCE)
    changed = backupdir.file_digest(backupdir.data_file(two.specs[0]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, two.specs[0].path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(BackupError, match=rf"is open by pid {holder.pid} \(lock\.mdb is locked\)"):
            backup.restore(tmp_path / "b", manifest.id, two.specs, read_marker)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert backupdir.file_digest(backupdir.data_file(two.specs[0])) == changed  # untouched
    _, results = backup.restore(tmp_path / "b", manifest.id, two.specs, read_marker)
    assert results[0].restored


def test_damaged_backup_is_refused_before_anything_is_replaced(tmp_path: Path, two: Opened) -> None:
    manifest = two.backup(tmp_path / "b")
    two.close()
    build_lmdb(two.specs[0], {"data": {"k000001": "changed"}}, marker=3, instance=INSTANCE)
    live = backupdir.file_digest(backupdir.data_file(two.specs[0]))
    copy = tmp_path / "b" / manifest.id / "main" / backupdir.DATA_FILE
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="does not match the manifest"):
        backup.restore(tmp_path / "b", manifest.id, two.specs, read_marker)
    assert backupdir.file_digest(backupdir.data_file(two.specs[0])) == live


def test_no_subdir_lmdb_backs_up_and_restores(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    spec = LmdbSpec(name="flat", path=str(tmp_path / "flat" / "app.mdb"), no_subdir=True, map_size=64 << 20)
    build_lmdb(spec, {"data": {"a": "1"}}, marker=1, instance=INSTANCE)
    opened = Opened(spec)
    try:
        manifest = opened.backup(tmp_path / "b")
    finally:
        opened.close()
    assert (tmp_path / "b" / manifest.id / "flat" / backupdir.DATA_FILE).is_file()
    build_lmdb(spec, {"data": {"a": "2"}}, marker=2, instance=INSTANCE)
    _, results = backup.restore(tmp_path / "b", manifest.id, [spec], read_marker)
    assert results[0].restored and results[0].path == spec.path
    assert read_values(spec)["data"][b"a"] == b"1"
    assert (tmp_path / "flat" / "app.mdb-lock").exists()


def test_find_backup_by_prefix_and_default_skips_pre_rollback_copies(tmp_path: Path, two: Opened) -> None:
    first = two.backup(tmp_path / "b", reason="before migrating to 3")
    two.backup(tmp_path / "b", reason=f"{backupdir.PRE_ROLLBACK_REASON}{first.id}")
    assert backupdir.find_backup(tmp_path / "b", None).id == first.id
    assert backupdir.find_backup(tmp_path / "b", first.id[:-3]).id == first.id
    with pytest.raises(BackupError, match="no backup 'nope'"):
        backupdir.find_backup(tmp_path / "b", "nope")


# -- one pass, and I7's cheap check -----------------------------------------------------------------


def test_the_manifest_digest_is_the_blake3_of_the_copy_on_disk_written_in_one_pass(
    tmp_path: Path, two: Opened
) -> None:
    manifest = two.backup(tmp_path / "b")
    on_disk = json.loads((tmp_path / "b" / manifest.id / backupdir.MANIFEST).read_text())
    for entry, doc in zip(manifest.lmdbs, on_disk["lmdbs"], strict=True):
        file = tmp_path / "b" / manifest.id / entry.file
        # Hashed by the library itself, not by our code: what `b3sum data.mdb` prints.
        assert doc["blake3"] == blake3.blake3(file.read_bytes()).hexdigest() and "sha256" not in doc
        assert file.stat().st_size == entry.size == doc["size"]
    # The full check (rollback, `verify`) re-reads the copy and agrees.
    assert backup.verify(tmp_path / "b", manifest.id, two.specs, read_marker).id == manifest.id


def _as_legacy(directory: Path, manifest: backupdir.Manifest) -> None:
    """Rewrite a manifest as backups before BLAKE3 had it: a "sha256" per file."""
    path = directory / manifest.id / backupdir.MANIFEST
    doc = json.loads(path.read_text())
    for entry in doc["lmdbs"]:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256((directory / manifest.id / entry["file"]).read_bytes()).hexdigest()
    path.write_text(json.dumps(doc))


def test_a_backup_from_before_blake3_still_verifies_and_restores(tmp_path: Path, two: Opened) -> None:
    manifest = two.backup(tmp_path / "b")
    _as_legacy(tmp_path / "b", manifest)
    legacy = backupdir.find_backup(tmp_path / "b", manifest.id).manifest
    assert {e.algorithm for e in legacy.lmdbs} == {"sha256"}
    assert backup.verify(tmp_path / "b", manifest.id, two.specs, read_marker).id == manifest.id
    two.close()
    before = read_values(two.specs[0])
    build_lmdb(two.specs[0], {"data": {"k000001": "changed"}}, marker=3, instance=INSTANCE)
    _, results = backup.restore(tmp_path / "b", manifest.id, two.specs, read_marker)
    assert all(r.restored for r in results) and read_values(two.specs[0]) == before
    _, again = backup.restore(tmp_path / "b", manifest.id, two.specs, read_marker)
    assert [r.restored for r in again] == [False, False]  # byte-identical by its sha256: left alone
    # ...and a damaged one is refused by its sha256.
    copy = tmp_path / "b" / manifest.id / legacy.lmdbs[0].file
    with copy.open("r+b") as f:
        f.seek(legacy.lmdbs[0].size - 1)
        f.write(b"\xaa")
    with pytest.raises(BackupError, match=r"sha256 \w+ does not match the manifest"):
        backup.verify(tmp_path / "b", manifest.id, two.specs, read_marker)


def _damaging(monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    """Let the copy be written, then damage it before the check looks at it."""
    original = backup.copy_hashed

    def copy_then_damage(
        env: lmdb.Environment, txn: lmdb.Transaction, dest: Path, spec: LmdbSpec
    ) -> tuple[int, str]:
        size, sha = original(env, txn, dest, spec)
        if damage == "truncated":
            with dest.open("r+b") as f:
                f.truncate(size // 2)
        elif damage == "a DBI emptied":
            copy = lmdb.open(str(dest.parent), max_dbs=16)
            with copy.begin(write=True) as wtxn:
                wtxn.drop(copy.open_db(b"data", txn=wtxn), delete=False)
            copy.close()
        return size, sha

    monkeypatch.setattr(backup, "copy_hashed", copy_then_damage)


@pytest.mark.parametrize("damage", ["truncated", "a DBI emptied"])
def test_a_copy_that_fails_its_check_blocks_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """I7: a verified backup exists before the first write. The migrate op runs in this process (the
    worker's own code), with the copy damaged between writing and checking: the op fails, no step
    ran, and nothing that looks like a backup is left."""
    from lssupervisor.worker import history

    spec = sample_lmdb(tmp_path / "db", n=500, marker=1)
    before = read_values(spec)
    migs = write_migrations(tmp_path / "migs", BASIC_MIGRATIONS)
    _damaging(monkeypatch, damage)
    session = ops.Session(lambda body: None, threading.Event())
    with pytest.raises(SupervisorError, match=r"(truncated|does not match).*nothing was migrated") as info:
        session.serve(p.MigrateRequest(make_settings(make_view(spec), tmp_path, migs)))
    assert info.value.code is ErrorCode.BACKUP  # what the daemon sees: a failed backup, not a step
    assert read_marker_version(spec, instance=INSTANCE) == 1 and read_values(spec) == before
    assert backupdir.list_backups(tmp_path / "backups") == []
    entries = history.read(tmp_path / "history.jsonl").entries
    assert [e.kind.value for e in entries if e.kind.value in ("migrate", "backup")] == []


class _RewritesItsHead:
    """An LMDB whose copier goes back and patches the first page once the rest is written and hashed:
    what the hasher that follows the writer must never hash wrongly and call good."""

    def __init__(self, env: lmdb.Environment, hashed: threading.Event) -> None:
        self.env = env
        self.hashed = hashed

    def copyfd(self, fd: int, compact: bool, txn: lmdb.Transaction) -> None:
        self.env.copyfd(fd, compact=compact, txn=txn)
        assert self.hashed.wait(30), "the hasher never read the copy"
        os.pwrite(fd, b"\xff" * 16, 64)


def test_a_copy_changed_behind_its_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = sample_lmdb(tmp_path / "db", n=500, marker=1)
    hashed = threading.Event()
    preadv = os.preadv

    def preadv_then_tell(fd: int, buffers: list[memoryview], offset: int) -> int:
        n = preadv(fd, buffers, offset)
        hashed.set()
        return n

    monkeypatch.setattr(os, "preadv", preadv_then_tell)
    env = lmdb.open(spec.path, readonly=True, max_dbs=16)
    (tmp_path / "copy").mkdir()
    try:
        with env.begin() as txn, pytest.raises(BackupError, match="changed behind its hash"):
            copier = _RewritesItsHead(env, hashed)
            backup.copy_hashed(copier, txn, tmp_path / "copy" / "data.mdb", spec)  # type: ignore[arg-type]
    finally:
        env.close()

"""Verified compact backups of the LMDBs, retention, and restore (rollback).

Runs inside the worker process (the daemon never opens an LMDB). Layout of the backup directory::

    <backup_dir>/
        20251126T001800.123456Z-v3/          a complete, verified backup (its id is the dir name)
            manifest.json
            main/data.mdb                    compact copy of LMDB "main" (always <name>/data.mdb)
        20251126T011500.000001Z-v4.partial/  being written, or left by a crash (cleaned next time)
            owner.json                       pid + start time of the worker writing it

Creating a backup: free-space check first (fail closed, with the numbers) → for each LMDB, one read
transaction is the snapshot: LMDB's compact copy of it streams through a pipe into
``<id>.partial/<name>/data.mdb`` while a thread hashes it (the copy is written once and never re-read)
→ one fsync → the cheap check of I7 (the copy opens as an LMDB, its pages are all in the file, every
DBI holds the snapshot's entry count, the marker is the source's) → ``manifest.json`` → fsync files and
directories → rename ``<id>.partial`` → ``<id>`` → fsync the backup dir → retention. A backup
directory without ``.partial`` therefore always holds a checked backup. The full re-read (digest of the
file against the manifest) is what ``verify`` and ``rollback`` do before they trust a backup.

A ``.partial`` is removed only when its owner process is gone (pid dead, or pid reused by a process
started at another time), so a concurrent run could never lose its backup under our feet even if the
state-dir lock were bypassed.

Restoring (:func:`restore`) replaces each LMDB's data file atomically (copy to a temp file in the same
directory, fsync, rename, fsync the directory). It must not happen while any process has the
environment open: a process with the old file mapped would keep using the old inode (its later writes
lost) and its reader slots in the lock file would describe the wrong file. LMDB's own protocol gives us
a reliable test: every process that opens an environment holds a POSIX ``fcntl`` read lock on byte 0 of
the lock file (``lock.mdb``, or ``<path>-lock`` with ``no_subdir``); the first opener takes it
exclusively to initialise the lock file. We take that byte exclusively for the whole restore: it fails
when anyone has the environment open (we report the pid), and anyone opening it meanwhile blocks until
we are done. Because the next opener then gets the exclusive lock and re-initialises ``lock.mdb``, we
never delete ``lock.mdb``: deleting it while a process held it would split readers between two lock
files. (Processes that open the LMDB with ``MDB_NOLOCK`` escape this check; LS and sane applications
do not.)

A restored compact copy starts its LMDB transaction ids again at 1. Lightning Stream keeps the last txn
id it synced only in memory, so this is harmless across the LS restart that follows a rollback.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import lmdb

from lssupervisor import __version__
from lssupervisor.errors import BackupError
from lssupervisor.fsutil import ensure_private_dir
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.worker.backupdir import (
    BACKUP_HASH,
    DATA_FILE,
    FREE_SPACE_FACTOR,
    FREE_SPACE_MARGIN,
    HASHES,
    MANIFEST,
    OWNER,
    PARTIAL_SUFFIX,
    LmdbBackup,
    Manifest,
    Progress,
    RestoredLmdb,
    _mib,
    _write_json_durably,
    apply_retention,
    check_free_space,
    claim,
    clean_stale_partials,
    data_file,
    file_digest,
    find_backup,
    fsync_path,
    holds_copy,
    list_backups,
    lock_file,
    make_private_dir,
    new_backup_id,
    space_needed,
)
from lssupervisor.worker.marker import dbi_names, open_dbi

_CHUNK = 1024 * 1024
# (env of a copy or source, spec) -> the marker version of our instance (None = no marker).
MarkerReader = Callable[[lmdb.Environment, LmdbSpec], int | None]


def state_digest(env: lmdb.Environment, spec: LmdbSpec) -> str:
    """What identifies the LMDB's state without reading its data: the last committed txn id and page,
    the main DB's shape, and the data file's identity (a restore or copy replaces the inode and may
    restart txn ids). Equal digests: nothing was committed in between (every write txn bumps the id)."""
    info, st = env.info(), env.stat()
    try:
        fst = os.stat(data_file(spec))
        ident: list[int] = [fst.st_dev, fst.st_ino, fst.st_size]
    except OSError:
        ident = []
    doc = {
        "txnid": int(info["last_txnid"]),
        "pgno": int(info["last_pgno"]),
        "main": [
            int(st["psize"]),
            int(st["depth"]),
            int(st["branch_pages"]),
            int(st["leaf_pages"]),
            int(st["overflow_pages"]),
            int(st["entries"]),
        ],
        "file": ident,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def reusable(
    directory: Path,
    envs: Mapping[str, lmdb.Environment],
    specs: Sequence[LmdbSpec],
    read_marker: MarkerReader,
) -> Manifest | None:
    """The newest complete backup when it already holds exactly the LMDBs' current state (same set of
    LMDBs, same last txn id and state digest each) and still verifies: a retried migration step reuses
    it instead of taking one more copy of the same data (issue 13: five retries made five copies and
    rotated the real restore point out)."""
    backups = list_backups(directory)
    if not backups:
        return None
    newest = backups[-1]
    entries = {e.name: e for e in newest.manifest.lmdbs}
    if set(entries) != {s.name for s in specs}:
        return None
    for spec in specs:
        entry, env = entries[spec.name], envs[spec.name]
        if not entry.state_digest or entry.last_txnid != int(env.info()["last_txnid"]):
            return None
        if entry.state_digest != state_digest(env, spec):
            return None
    try:
        _verify_dir(newest.path, newest.manifest, specs, read_marker)
    except BackupError:
        return None  # damaged: take a fresh one
    return newest.manifest


def env_used_bytes(env: lmdb.Environment) -> int:
    """Bytes of the pages the environment uses (what a copy needs at most)."""
    info = env.info()
    return (int(info["last_pgno"]) + 1) * int(env.stat()["psize"])


# Kept whole: keyword-only options of one public operation.
def create(  # noqa: PLR0913
    envs: Mapping[str, lmdb.Environment],
    specs: Sequence[LmdbSpec],
    directory: Path,
    instance: str,
    read_marker: MarkerReader,
    *,
    keep: int,
    reason: str = "",
    progress: Progress | None = None,
    protect: Sequence[str] = (),
) -> Manifest:
    """Take a verified compact backup of every LMDB in ``specs`` (opened as ``envs[name]``).

    Raises BackupError (nothing half-done is left as a complete backup) on any failure.
    """
    ensure_private_dir(directory)
    clean_stale_partials(directory)
    used = sum(env_used_bytes(envs[s.name]) for s in specs)
    check_free_space(
        directory,
        space_needed(used),
        f"a backup of {len(specs)} LMDB(s) (used size x {FREE_SPACE_FACTOR} + {_mib(FREE_SPACE_MARGIN)})",
    )
    versions = {s.name: read_marker(envs[s.name], s) for s in specs}
    known = [v for v in versions.values() if v is not None]
    backup_id = new_backup_id(max(known) if known else None)
    partial = directory / f"{backup_id}{PARTIAL_SUFFIX}"
    make_private_dir(partial)  # 0700 whatever the umask: nobody else may read the copy (I9)
    claim(partial)
    entries: list[LmdbBackup] = []
    try:
        for index, spec in enumerate(specs):
            env = envs[spec.name]
            target_dir = partial / spec.name
            make_private_dir(target_dir)
            last_txnid = int(env.info()["last_txnid"])
            digest = state_digest(env, spec)
            dest = target_dir / DATA_FILE
            # One read transaction is the copy's snapshot AND what the copy is checked against: the
            # application may write while LS is stopped, and its commits after this snapshot are not
            # in this backup (nor are they wanted: the step's own transaction comes after them).
            with env.begin(write=False) as txn:
                expected = snapshot_facts(env, txn)
                size, digest_hex = copy_hashed(env, txn, dest, spec)
            fsync_path(target_dir)
            # I7's "verified", cheaply and still for real: the copy opens as an LMDB and holds the
            # snapshot's marker and the same entries in every DBI. The full re-read (digest of the
            # file) is for `rollback` and `verify`, not for the LS-down window.
            check_copy(dest, spec, expected, versions[spec.name], read_marker)
            entries.append(
                LmdbBackup(
                    name=spec.name,
                    source_path=spec.path,
                    no_subdir=spec.no_subdir,
                    schema_version=versions[spec.name],
                    size=size,
                    digest=digest_hex,
                    algorithm=BACKUP_HASH,
                    last_txnid=last_txnid,
                    file=f"{spec.name}/{DATA_FILE}",
                    state_digest=digest,
                )
            )
            if progress:
                progress(
                    {
                        "phase": "backup",
                        "lmdb": spec.name,
                        "done": index + 1,
                        "total": len(specs),
                        "percent": round(100.0 * (index + 1) / len(specs), 1),
                        "bytes": entries[-1].size,
                    }
                )
        manifest = Manifest(
            id=backup_id,
            time=_dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            instance=instance,
            tool_version=__version__,
            lmdbs=tuple(entries),
            reason=reason,
        )
        _write_json_durably(partial / MANIFEST, manifest.to_json())
        (partial / OWNER).unlink()
        final = directory / backup_id
        os.rename(partial, final)
        fsync_path(directory)
    except BaseException:
        # Leave nothing that looks complete. (A SIGKILL skips this; the .partial is cleaned next time.)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    apply_retention(directory, keep, protect=(backup_id, *protect))
    return manifest


# What the hasher reads at once: 1 MiB stays in the CPU's cache between the read and the hash.
_HASH_BYTES = 1 << 20
# How long the hasher waits when it has caught up with the copy (it never waits once the copy is done).
_FOLLOW_S = 0.0005


class _Follower(threading.Thread):
    """Hashes the copy's file behind LMDB's writer, reading only bytes the writes have already made.

    LMDB writes a compact copy front to back with plain write(2)s, never seeking back (checked with
    strace on the LMDB py-lmdb bundles; the test that re-hashes the file on disk guards it). A read of
    bytes below the file size a write has established sees that write (POSIX), and they are still in
    the page cache: the copy is hashed while it is written, not copied and then read again."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="lssupervisor-backup-hash", daemon=True)
        self.fd = fd
        self.digest = HASHES[BACKUP_HASH]()
        self.size = 0
        self.head = b""  # the first bytes hashed: the meta pages, compared again at the end
        self.flushed = 0
        self.copy_done = threading.Event()
        self.error: OSError | None = None

    def run(self) -> None:
        buf = bytearray(_HASH_BYTES)
        view = memoryview(buf)
        try:
            while True:
                finished = self.copy_done.is_set()  # before fstat: a size seen after it is final
                written = os.fstat(self.fd).st_size
                while self.size < written:
                    n = os.preadv(self.fd, [view[: min(_HASH_BYTES, written - self.size)]], self.size)
                    if n == 0:
                        raise OSError(errno.EIO, "the copy shrank while it was hashed")
                    if self.size < _HEAD_BYTES:
                        self.head += bytes(view[: min(n, _HEAD_BYTES - self.size)])
                    self.digest.update(view[:n])  # releases the GIL: LMDB's copy goes on meanwhile
                    self.size += n
                    if self.size - self.flushed >= _FLUSH_BYTES:
                        # Hashed bytes go to the disk now, not all at the final fsync, and leave the
                        # page cache once clean: a backup must not evict the application's hot pages.
                        _drop_cache(self.fd, self.flushed, self.size - self.flushed)
                        self.flushed = self.size
                if finished:
                    return
                self.copy_done.wait(_FOLLOW_S)
        except OSError as exc:
            self.error = exc


# How much hashed copy is handed to the disk at once (write-back starts, the final fsync has less to do).
_FLUSH_BYTES = 8 << 20


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Start writing back ``length`` bytes from ``offset`` and drop them from the page cache once clean
    (Linux: POSIX_FADV_DONTNEED does both). Advice only: where unsupported, nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# LMDB's two meta pages at the largest page size it uses: the only bytes a copier could patch late.
_HEAD_BYTES = 2 * 65536


def copy_hashed(env: lmdb.Environment, txn: lmdb.Transaction, dest: Path, spec: LmdbSpec) -> tuple[int, str]:
    """A compact copy of ``txn``'s snapshot into ``dest`` (created 0600), hashed while it is written by
    a thread that follows the writer (:class:`_Follower`); one fsync, run while the hasher finishes.
    Returns (size, hex digest with BACKUP_HASH).

    BackupError naming the file and the reason (a full disk says so) on any failure; a partial file
    is left for the caller's cleanup of the ``.partial`` directory."""
    try:
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise BackupError(f"{dest}: cannot create the backup copy: {exc.strerror}") from exc
    follower = _Follower(fd)
    follower.start()
    failure: Exception | None = None
    try:
        try:
            env.copyfd(fd, compact=True, txn=txn)
        except lmdb.Error as exc:
            failure = exc
        finally:
            follower.copy_done.set()
        if failure is None:
            try:
                os.fsync(fd)  # the page cache reaches the disk while the hasher reads the tail
            except OSError as exc:
                failure = exc
        follower.join()
        if failure is None and follower.error is None:
            # The guard on "front to back": the meta pages as hashed are the meta pages on disk.
            head = os.pread(fd, len(follower.head), 0)
            if follower.size != os.fstat(fd).st_size or head != follower.head:
                raise BackupError(f"{dest}: the backup copy changed behind its hash; nothing was migrated")
            _drop_cache(fd, 0, 0)  # all of it is on disk now: the cache is the application's again
    finally:
        follower.copy_done.set()
        follower.join()
        os.close(fd)
    failure = failure or follower.error
    if failure is not None:
        text = failure.strerror if isinstance(failure, OSError) else str(failure)
        if getattr(failure, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(failure):
            raise BackupError(
                f"{dest}: no space left for the backup copy of LMDB {spec.name!r} ({_mib(follower.size)} "
                "written); free space or move backup.dir; nothing was migrated"
            ) from failure
        raise BackupError(f"{spec.path}: backup copy of LMDB {spec.name!r} failed: {text}") from failure
    return follower.size, follower.digest.hexdigest()


def snapshot_facts(env: lmdb.Environment, txn: lmdb.Transaction) -> dict[str, int]:
    """Entries of the main DB and of every named DBI in ``txn``'s snapshot (read from each DBI's root:
    cheap whatever the data's size)."""
    facts = {"": int(txn.stat()["entries"])}
    for name in dbi_names(env, txn):
        db = open_dbi(env, txn, name)
        if db is not None:
            facts[name] = int(txn.stat(db)["entries"])
    return facts


def check_copy(
    dest: Path, spec: LmdbSpec, expected: Mapping[str, int], version: int | None, read_marker: MarkerReader
) -> None:
    """The copy opens as an LMDB, has the snapshot's DBIs with the same entry counts, and the marker the
    source had. BackupError otherwise: the migration does not start without a good restore point (I7)."""
    try:
        copy = _open_copy(dest.parent, spec)
    except lmdb.Error as exc:
        raise BackupError(
            f"{dest}: backup copy does not open as an LMDB: {exc}; nothing was migrated"
        ) from exc
    try:
        # The meta page says how far the data goes: a shorter file would fault (SIGBUS) on first read.
        needed = (int(copy.info()["last_pgno"]) + 1) * int(copy.stat()["psize"])
        if dest.stat().st_size < needed:
            raise BackupError(
                f"{dest}: backup copy is truncated ({dest.stat().st_size} bytes, its pages need {needed}); "
                "nothing was migrated"
            )
        with copy.begin(write=False) as txn:
            got = snapshot_facts(copy, txn)
        found = read_marker(copy, spec)
    except BackupError:
        raise
    except lmdb.Error as exc:
        raise BackupError(f"{dest}: backup copy is unreadable: {exc}; nothing was migrated") from exc
    except Exception as exc:
        raise BackupError(f"{dest}: schema marker in the backup copy is unreadable: {exc}") from exc
    finally:
        copy.close()
    if got != expected:
        diff = sorted(k or "(main)" for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise BackupError(
            f"{dest}: backup copy does not match the LMDB it copies (entries differ in {', '.join(diff)}); "
            "nothing was migrated"
        )
    if found != version:
        raise BackupError(f"{dest}: backup copy holds schema version {found}, the LMDB has {version}")


def _open_copy(path: Path, spec: LmdbSpec) -> lmdb.Environment:
    # lock=False: nobody else may open a backup, and a read-only check must not create lock.mdb in it.
    return lmdb.open(
        str(path), readonly=True, lock=False, subdir=True, max_dbs=max(spec.max_dbs, 1), create=False
    )


def _verify_dir(root: Path, manifest: Manifest, specs: Sequence[LmdbSpec], read_marker: MarkerReader) -> None:
    by_name = {s.name: s for s in specs}
    for entry in manifest.lmdbs:
        file = root / entry.file
        if not file.is_file():
            raise BackupError(f"{root}: backup of LMDB {entry.name!r} is missing {entry.file}")
        actual = file_digest(file, entry.algorithm)
        if actual != entry.digest:
            raise BackupError(
                f"{file}: {entry.algorithm} {actual} does not match the manifest's {entry.digest}; "
                "the backup is damaged, do not restore it"
            )
        spec = by_name.get(entry.name) or LmdbSpec(name=entry.name, path=entry.source_path)
        try:
            env = _open_copy(file.parent, spec)
        except lmdb.Error as exc:
            raise BackupError(f"{file}: backup copy does not open as an LMDB: {exc}") from exc
        try:
            version = read_marker(env, spec)
        except Exception as exc:
            raise BackupError(f"{file}: schema marker in the backup is unreadable: {exc}") from exc
        finally:
            env.close()
        if version != entry.schema_version:
            raise BackupError(
                f"{file}: backup holds schema version {version}, the source had {entry.schema_version}"
            )


def verify(
    directory: Path, backup_id: str | None, specs: Sequence[LmdbSpec], read_marker: MarkerReader
) -> Manifest:
    """Check a complete backup again (files, digests, openable, marker). Returns its manifest."""
    info = find_backup(directory, backup_id)
    _verify_dir(info.path, info.manifest, specs, read_marker)
    return info.manifest


# ---------------------------------------------------------------------------------------------------
# restoring

_FLOCK = struct.Struct("hhqqi")  # struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid)


def _lock_holder(fd: int) -> int | None:
    """Pid holding a conflicting lock on byte 0 (F_GETLK), when the kernel tells us."""
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0) + b"\0" * 8
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _, _, _, pid = _FLOCK.unpack(answer[: _FLOCK.size])
        return int(pid) if l_type != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None


def lock_holder(spec: LmdbSpec) -> int | None:
    """A pid that has the LMDB environment open (holds LMDB's lock-file lock), or None.

    Never call this in a process that has the same environment open: closing our descriptor of the
    lock file would drop that process's own LMDB locks (POSIX lock semantics)."""
    path = lock_file(spec)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _lock_holder(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_env(spec: LmdbSpec) -> Iterator[None]:
    """Hold LMDB's own "first opener" lock exclusively: proves no process has the environment open
    and keeps any from opening it until we leave (see the module docstring). The calling process must
    not have the environment open itself (POSIX locks of one process never conflict, and closing our
    descriptor would drop that environment's locks)."""
    path = lock_file(spec)
    if not path.parent.is_dir():
        raise BackupError(f"{spec.path}: directory of LMDB {spec.name!r} does not exist")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(fd)
            who = f"pid {holder}" if holder else "another process"
            raise BackupError(
                f"{spec.path}: LMDB {spec.name!r} is open by {who} ({path.name} is locked); stop every "
                "process using it (Lightning Stream, the application) before a restore"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_like(tmp: Path, target: Path) -> BinaryIO:
    """Create ``tmp`` for writing with the mode and owner of the data file it will replace (the
    application and LS must still open the restored LMDB; a backup's own 0600 is not theirs), 0600
    when there is none."""
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)
        if st is not None and os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
            os.fchown(fd, st.st_uid, st.st_gid)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def restore(
    directory: Path,
    backup_id: str | None,
    specs: Sequence[LmdbSpec],
    read_marker: MarkerReader,
    *,
    before_replace: Callable[[], None] | None = None,
) -> tuple[Manifest, list[RestoredLmdb]]:
    """Restore a backup over the live LMDBs named in its manifest (by name, at the paths of ``specs``).

    The caller must have stopped Lightning Stream; :func:`exclusive_env` additionally refuses when any
    process has an environment open. Idempotent: an LMDB whose data file already has the backup's
    digest is left alone. ``before_replace`` runs once, after all checks, before the first file is
    replaced (the worker uses it for the overlap test knob).
    """
    info = find_backup(directory, backup_id)
    manifest = info.manifest
    by_name = {s.name: s for s in specs}
    missing = [b.name for b in manifest.lmdbs if b.name not in by_name]
    if missing:
        raise BackupError(
            f"{info.path}: backup has LMDB(s) {', '.join(missing)} that the LS config does not "
            f"(configured: {', '.join(sorted(by_name)) or 'none'})"
        )
    # Verify the whole backup before touching anything (fail closed on a damaged backup).
    _verify_dir(info.path, manifest, specs, read_marker)
    results: list[RestoredLmdb] = []
    started = False
    with contextlib.ExitStack() as stack:
        for entry in manifest.lmdbs:
            spec = by_name[entry.name]
            if not spec.no_subdir:
                Path(spec.path).mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_env(spec))
        for entry in manifest.lmdbs:
            spec = by_name[entry.name]
            target = data_file(spec)
            if holds_copy(target, entry):
                results.append(RestoredLmdb(entry.name, str(target), False, entry.schema_version))
                continue
            if not started and before_replace is not None:
                before_replace()
            started = True
            check_free_space(
                target.parent,
                entry.size + FREE_SPACE_MARGIN,
                f"restoring LMDB {entry.name!r} (its backup's size + {_mib(FREE_SPACE_MARGIN)})",
                "free space on that filesystem (the old data file is replaced only after the copy)",
            )
            tmp = target.with_name(f".{target.name}.restore-{os.getpid()}")
            try:
                with (info.path / entry.file).open("rb") as src, _open_like(tmp, target) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
                if file_digest(tmp, entry.algorithm) != entry.digest:
                    raise BackupError(f"{tmp}: copy of the backup does not match its digest; disk trouble?")
                os.replace(tmp, target)
                fsync_path(target.parent)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            results.append(RestoredLmdb(entry.name, str(target), True, entry.schema_version))
    # Check what is now live: openable, marker as in the manifest.
    for entry in manifest.lmdbs:
        spec = by_name[entry.name]
        target = data_file(spec)
        if not holds_copy(target, entry):
            raise BackupError(f"{target}: changed during the restore (its digest differs from the backup's)")
    return manifest, results

"""Retire DBIs that ``new-dbi`` migrations replaced (``REPLACES``): tombstone every live entry.

LS cannot delete a DBI, and a key simply removed comes back from the other instances' snapshots. So
retiring a DBI means writing LS's own deletion for every entry, with a *fresh* timestamp
(``max(now, old + 1)``, the ``in-place`` rule of :mod:`lssupervisor.worker.migrator`): it beats the
value everywhere, LS syncs it to every instance, and their values are gone from the snapshots (the
keys stay as tombstones until LS's sweeper removes them, when it is enabled).

- native mode: the value becomes the 24-byte header with the deleted flag and no value;
- shadow mode: the main entry is really deleted and ``_sync_shadow_<dbi>`` gets the tombstone, as
  LS's own main-to-shadow pass would write it.

``batch`` entries per write transaction, each one committed on its own: a crash or a cancel leaves
whole batches done, and a rerun skips what is already a tombstone. A dry run only counts (entries,
bytes of key + value). ``lssupervisor prune`` sends the request with the daemon stopped and its lock
held (I4), and never while an LS has the LMDB open.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lmdb

from lssupervisor.errors import MigrationCancelled, UsageError
from lssupervisor.worker import backupdir, lsheader
from lssupervisor.worker import protocol as p
from lssupervisor.worker.marker import SHADOW_PREFIX, SYNC_PREFIX, open_dbi

if TYPE_CHECKING:
    from lssupervisor.worker.ops import Job

Guard = Callable[[str], contextlib.AbstractContextManager[None]]


def run(job: Job, request: p.RetireRequest, guard: Guard) -> p.RetireResult:
    out: list[p.RetiredDbi] = []
    batch = max(1, request.batch)
    for item in request.dbis:
        if item.dbi.startswith(SYNC_PREFIX) or item.dbi == job.marker_dbi:
            raise UsageError(f"retire: DBI {item.dbi!r} is not application data (LS's or our marker DBI)")
        try:
            spec = job.view.lmdb(item.lmdb)
        except KeyError:
            raise UsageError(f"retire: no LMDB {item.lmdb!r} in the LS config ({item.replaced_by})") from None
        if not backupdir.data_file(spec).is_file():
            out.append(p.RetiredDbi(item.lmdb, item.dbi, item.replaced_by, exists=False))
            continue
        env = job.open(spec, write=not request.dry_run)
        out.append(_retire_one(job, env, item, native=spec.native, dry_run=request.dry_run, batch=batch,
                               guard=guard))
    return p.RetireResult(dry_run=request.dry_run, dbis=tuple(out))


def _count(env: lmdb.Environment, name: str, native: bool) -> tuple[bool, int, int, int]:
    """(exists, live entries, their bytes, tombstones)."""
    with env.begin(write=False) as txn:
        db = open_dbi(env, txn, name)
        if db is None:
            return False, 0, 0, 0
        live = size = dead = 0
        for key, raw in txn.cursor(db=db):
            if native:
                header = lsheader.parse_header(raw)
                if header.deleted:
                    dead += 1
                    continue
                size += len(key) + len(raw) - header.size
            else:
                size += len(key) + len(raw)
            live += 1
    return True, live, size, dead


def _retire_one(
    job: Job, env: lmdb.Environment, item: p.RetireDbi, *, native: bool, dry_run: bool, batch: int,
    guard: Guard,
) -> p.RetiredDbi:
    exists, live, size, dead = _count(env, item.dbi, native)
    if not exists or dry_run or live == 0:
        return p.RetiredDbi(item.lmdb, item.dbi, item.replaced_by, exists, live, size, 0, dead)
    done = 0
    start: bytes | None = None
    while True:
        if job.cancelled():
            raise MigrationCancelled(
                f"retire of DBI {item.dbi!r} cancelled after {done} of {live} entries; rerun prune to finish"
            )
        with guard(f"retire of DBI {item.dbi} in LMDB {item.lmdb}"), env.begin(write=True) as txn:
            wrote, start = _tombstone_batch(env, txn, item.dbi, native=native, batch=batch, start=start)
        done += wrote
        if start is None:
            break
    return p.RetiredDbi(item.lmdb, item.dbi, item.replaced_by, True, live, size, done, dead)


def _tombstone_batch(
    env: lmdb.Environment, txn: lmdb.Transaction, name: str, *, native: bool, batch: int, start: bytes | None
) -> tuple[int, bytes | None]:
    """Up to ``batch`` live entries of ``name`` from key ``start`` on become deletions in ``txn``.
    Returns how many, and the key to go on from (None: the DBI is done)."""
    db = open_dbi(env, txn, name)
    assert db is not None
    now = time.time_ns()
    txn_id = txn.id()
    todo: list[tuple[bytes, Any]] = []
    shadow = None if native else open_dbi(env, txn, SHADOW_PREFIX + name, create=True)
    cursor = txn.cursor(db=db)
    more = cursor.set_range(start) if start is not None else cursor.first()
    next_key: bytes | None = None
    while more:
        key, raw = cursor.item()
        if len(todo) >= batch:
            next_key = bytes(key)
            break
        more = cursor.next()
        if native:
            header = lsheader.parse_header(raw)
            if header.deleted:
                continue
            todo.append((bytes(key), header.timestamp))
        else:
            old = txn.get(key, db=shadow)
            old_ts = lsheader.parse_header(old).timestamp if old is not None else 0
            todo.append((bytes(key), old_ts))
    for key, old_ts in todo:
        ts = max(now, old_ts + 1)
        tomb = lsheader.build(ts, txn_id, lsheader.FLAG_DELETED)
        if native:
            txn.put(key, tomb, db=db)
        else:
            txn.delete(key, db=db)
            txn.put(key, tomb, db=shadow)
    return len(todo), next_key

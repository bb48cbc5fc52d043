"""Run migration steps inside LMDB write transactions: the API ``m``, timestamp rules, verifier.

Theory of operation
-------------------
One :class:`~lssupervisor.worker.migrations.Step` = ONE write transaction: the migration's ``upgrade(m)``
runs, then the verifier, then the marker is written, then commit. Any exception (from the migration,
the verifier, cancellation, a full map) aborts the transaction: nothing of the step is written
(invariant I3). Nothing here knows the daemon's config; everything is an explicit parameter.

``m`` (:class:`MigrationApi`) hides the LS header and enforces the step's strategy:

============  ===================================================================================
strategy      timestamp of a written entry
============  ===================================================================================
prefix        an existing entry keeps its own timestamp; a new key takes its source's (the entry
              last yielded by ``m.items``/returned by ``m.get``, or ``timestamp_from=(dbi, key)``);
              no source: the step's clock. Shadow mode: ``_sync_shadow_<dbi>`` rewritten alongside.
new-dbi       only DBIs that did not exist before the step may be written; timestamps as prefix.
in-place      every written entry gets ``max(step_now, old + 1)``: fresh, strictly above the old one.
============  ===================================================================================

Deletes are tombstones in native mode (header with the deleted flag, empty value, timestamp by the
rule above). In shadow mode the main entry is really deleted (LS keeps no tombstones in main DBIs) and
the ``_sync_shadow_<dbi>`` entry becomes the tombstone, as LS's own main-to-shadow pass would do.

Verifier: API writes are checked when they are made (the header and timestamp are computed here, never
taken from the caller). Writes through the raw escape hatch ``m.txn`` are recorded by a proxy (first
old value of every touched key) and diffed before commit: valid header, reserved bytes 0, no extension
blocks, no stray flags, tombstones empty, the timestamp rule, no real delete in native mode, no
``_sync*`` or marker DBI, new-dbi writes only to new DBIs. In shadow mode raw main writes get their
shadow entries mirrored by the engine, by the same rule.

Cancellation (a callable or ``threading.Event``) is checked every 1024 entries while iterating, per
copy batch, and in ``m.progress``. A full map aborts and raises :class:`~lssupervisor.errors.MapFull`
with an estimate of the room needed; ``grow_map=True`` grows the map and retries the step.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import lmdb

from lssupervisor.errors import (
    ChecksumMismatch,
    MapFull,
    MigrationCancelled,
    MigrationError,
    Remedy,
    SupervisorError,
    UnmarkedDatabase,
    VerificationFailed,
)
from lssupervisor.lsmodel import LS_DEFAULT_DIR_MODE, LS_DEFAULT_FILE_MODE, LS_DEFAULT_MAP_SIZE, LmdbSpec
from lssupervisor.redaction import credential_values, redact_argv
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import (
    DEFAULT_MARKER_DBI,
    SHADOW_PREFIX,
    SYNC_PREFIX,
    Clock,
    dbi_names,
    has_user_data,
    open_dbi,
    read_marker,
    shadow_name,
    stamp,
    stamp_if_empty,
    wall_clock_ns,
    write_marker,
)
from lssupervisor.worker.migrations import (
    Migration,
    MigrationSet,
    Step,
    Strategy,
    import_migration,
    plan,
)
from lssupervisor.worker.protocol import MigrateResult, StepResult

log = logging.getLogger(__name__)

Cancel = Callable[[], bool] | threading.Event | None

_HDR = struct.Struct(">QQBB4xH")  # timestamp, txn id, version, flags, (reserved), num extra blocks
_HDR_SIZE = lsheader.MIN_HEADER_SIZE
_DELETED = lsheader.FLAG_DELETED
_CANCEL_EVERY = 1024  # entries between cancellation checks (a power of two: checked with a mask)
_COPY_BATCH = 4096
_ZERO4 = b"\0\0\0\0"
DEFAULT_WRITEMAP = True  # see docs/performance.md: dirty pages stay in the file map, not in RSS
DEFAULT_RUN_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report from ``m.progress`` or ``m.copy_dbi``."""

    lmdb: str
    migration: str
    done: int
    total: int
    read: int = 0  # records read through the API so far in this step (to the nearest 1024)
    written: int = 0  # records written through the API so far in this step


ProgressFn = Callable[[Progress], None]


# ---------------------------------------------------------------------------------------------------
# environment


def open_env(
    spec: LmdbSpec,
    *,
    writemap: bool = DEFAULT_WRITEMAP,
    readonly: bool = False,
    create: bool = False,
) -> lmdb.Environment:
    """Open the LMDB described by ``spec`` (once per path per process).

    ``map_size`` 0 keeps the size recorded in the file. ``writemap`` keeps a big step's dirty pages in
    the file mapping instead of anonymous memory (docs/performance.md).
    """
    kwargs: dict[str, Any] = {
        "subdir": not spec.no_subdir,
        "max_dbs": spec.max_dbs,
        "readonly": readonly,
        "create": create,
        "writemap": writemap and not readonly,
        "lock": True,
    }
    # map_size 0 makes LMDB use the size recorded in the file (the one LS or the application chose);
    # py-lmdb's own default (10 MiB) would shrink a bigger map down to the pages in use.
    kwargs["map_size"] = spec.map_size
    # py-lmdb creates files (and a missing directory!) with its `mode`, 0755 by default.
    kwargs["mode"] = LS_DEFAULT_FILE_MODE
    data = Path(spec.path) if spec.no_subdir else Path(spec.path) / "data.mdb"
    if create and not data.exists():
        # A new LMDB gets what LS would give it: options.map_size, else LS's 1 GiB (LMDB's own default
        # of 1 MiB made the first real migration of an LMDB created offline hit MDB_MAP_FULL).
        kwargs["map_size"] = spec.map_size or LS_DEFAULT_MAP_SIZE
        if not spec.no_subdir:
            os.makedirs(spec.path, LS_DEFAULT_DIR_MODE, exist_ok=True)
    try:
        env = lmdb.open(spec.path, **kwargs)
    except lmdb.Error as exc:
        raise MigrationError(f"LMDB {spec.name!r} at {spec.path}: cannot open ({exc})") from exc
    return env


_MADV_DONTNEED = 4
_RELEASE_EVERY_TICKS = 64  # x 1024 entries
_libc: Any = None


def _map_ranges(env: lmdb.Environment) -> list[tuple[int, int]]:
    """Address ranges where this process maps the LMDB data file (from /proc/self/maps)."""
    path = env.path()
    data = os.path.join(path, "data.mdb") if env.flags().get("subdir", True) else path
    target = os.path.realpath(data)
    ranges: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end - start))
    return ranges


def _release_map(env: lmdb.Environment) -> None:
    """Drop this process's page-table entries of the LMDB map (Linux ``madvise(MADV_DONTNEED)``).

    Iterating a big DBI faults every page of the file mapping into our RSS (and with writemap the
    dirty pages too). The mapping is MAP_SHARED, so the data stays in the page cache (dirty pages keep
    their dirty state and are written back as usual) and the next access is a minor fault: this only
    keeps the worker's RSS flat. Best effort: any failure is ignored.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for start, length in _map_ranges(env):
            _libc.madvise(start, length, _MADV_DONTNEED)
    except (OSError, AttributeError, ValueError, lmdb.Error):
        pass


def _is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _batch_bytes(batch: list[tuple[bytes, bytes]]) -> int:
    """Bytes of a batch of (key, value) pairs, counted in C (the copy's hot loop stays lean)."""
    return sum(map(len, map(itemgetter(0), batch))) + sum(map(len, map(itemgetter(1), batch)))


# ---------------------------------------------------------------------------------------------------
# the API m


class MigrationApi:
    """The object a migration's ``upgrade(m)`` receives. Keys and values are ``bytes``.

    Attributes: ``lmdb`` (name), ``migration`` (file stem), ``strategy``, ``native`` (True: LS
    headers), ``instance``, ``now_ns`` (the step's fresh timestamp), ``log`` (a Logger), ``txn`` (the
    raw escape hatch, see :class:`RawTxn`).
    """

    # Kept whole: keyword-only: the step's whole context, built in one place (run_step)
    def __init__(  # noqa: PLR0913
        self,
        env: lmdb.Environment,
        txn: lmdb.Transaction,
        *,
        lmdb_name: str,
        migration: Migration | None,
        strategy: Strategy,
        native: bool,
        instance: str,
        marker_dbi: str,
        now_ns: int,
        cancel: Cancel = None,
        progress: ProgressFn | None = None,
        logger: logging.Logger | None = None,
        lmdb_path: str = "",
        run_timeout: float = DEFAULT_RUN_TIMEOUT,
    ) -> None:
        self._env = env
        # Any: py-lmdb's stubs type every read as bytes | memoryview; we never open with buffers=True.
        self._txn: Any = txn
        self._txn_id: int = txn.id()
        self.lmdb = lmdb_name
        self.lmdb_path = lmdb_path
        self.migration = migration.name if migration else ""
        self.strategy = strategy
        self.native = native
        self.instance = instance
        self.now_ns = now_ns
        self._marker_dbi = marker_dbi
        self._cancel = cancel
        self._progress_fn = progress
        self._last_progress = 0.0
        self._run_timeout = run_timeout
        base = logger or logging.getLogger("lssupervisor.migration")
        self.log = base.getChild(self.migration or "stamp")
        # Keep the existing timestamp (prefix, new-dbi) or give a fresh one (in-place).
        self._keep_ts = strategy is not Strategy.IN_PLACE
        self._pre_dbis = frozenset(dbi_names(env, txn))
        self._dbs: dict[str, Any] = {}
        self._handle_names: dict[int, str] = {}
        self._writable: dict[str, Any] = {}
        self._created: set[str] = set()
        # The "current source": the entry last yielded by items() / returned by get().
        self._src_dbi: str | None = None
        self._src_key: bytes | None = None
        self._src_val: bytes | None = None  # None also after the source was tombstoned
        self._src_ts = -1  # -1: not resolved yet (shadow mode resolves lazily)
        # Last write target, cached: the hot path writes to one DBI many times in a row.
        self._w_name: str | None = None
        self._w_db: Any = None
        self._w_shadow: Any = None
        self.puts = 0
        self.deletes = 0
        self.copied = 0
        self.bytes_written = 0
        self._raw_old: dict[tuple[str, bytes], bytes | None] = {}
        self.txn = RawTxn(self)
        self.done = 0
        self.total = 0
        self._ticks = 0
        # Records read, counted per 1024 in _tick: a heartbeat thread reads it (no per-record cost).
        self.read = 0
        # The last whole-DBI iteration (items() without prefix): how far it got of how many entries,
        # to extrapolate the room a step needs when the map fills up (_needed_room).
        self._iter_dbi: str | None = None
        self._iter_total = 0
        self._iter_seen = 0

    @property
    def written(self) -> int:
        """Records written so far through the API (m.put, m.delete, copy_dbi, raw writes)."""
        return self.puts + self.deletes + self.copied + len(self._raw_old)

    def snapshot(self) -> Progress:
        """The API's own counters as a progress report (read by the worker's heartbeat thread)."""
        return Progress(self.lmdb, self.migration, self.done, self.total, self.read, self.written)

    # -- DBIs ---------------------------------------------------------------------------------------

    def dbis(self) -> list[str]:
        """Synced DBIs (not ``_sync*``, not the marker DBI), including those created in this step."""
        names = set(self._pre_dbis) | self._created
        return sorted(n for n in names if not n.startswith(SYNC_PREFIX) and n != self._marker_dbi)

    def exists(self, dbi: str) -> bool:
        return dbi in self._pre_dbis or dbi in self._created

    def _db(self, dbi: str, create: bool = False) -> Any:
        db = self._dbs.get(dbi)
        if db is None:
            db = open_dbi(self._env, self._txn, dbi, create=create)
            if db is None:
                known = ", ".join(self.dbis()) or "none"
                raise MigrationError(
                    f"migration {self.migration}: DBI {dbi!r} does not exist in LMDB {self.lmdb!r} "
                    f"(synced DBIs: {known})"
                )
            if dbi not in self._pre_dbis:
                self._created.add(dbi)
            self._dbs[dbi] = db
            self._handle_names[id(db)] = dbi
        return db

    def db(self, dbi: str, create: bool = False) -> Any:
        """A raw DBI handle for use with ``m.txn`` (opened with ``txn=``: no deadlock)."""
        if create and not self.exists(dbi):
            self._check_writable(dbi)
        return self._db(dbi, create=create)

    def _check_writable(self, dbi: str) -> None:
        if dbi.startswith(SYNC_PREFIX):
            raise VerificationFailed(
                f"migration {self.migration}: refused a write to DBI {dbi!r}: _sync* DBIs belong to "
                "Lightning Stream (shadow DBIs are kept by m itself)"
            )
        if dbi == self._marker_dbi:
            raise VerificationFailed(
                f"migration {self.migration}: refused a write to the marker DBI {dbi!r}; the marker is "
                "written by lssupervisor in the same transaction"
            )
        if self.strategy is Strategy.NEW_DBI and dbi in self._pre_dbis:
            raise VerificationFailed(
                f"migration {self.migration}: STRATEGY 'new-dbi' may only write DBIs that did not exist "
                f"before the step, and {dbi!r} did; write a new DBI (e.g. {dbi}_v2) or use 'prefix'"
            )

    def _select_write(self, dbi: str) -> None:
        db = self._writable.get(dbi)
        if db is None:
            self._check_writable(dbi)
            db = self._db(dbi, create=True)
            self._writable[dbi] = db
        self._w_name = dbi
        self._w_db = db
        self._w_shadow = None if self.native else self._db(shadow_name(dbi), create=True)

    # -- reading ------------------------------------------------------------------------------------

    def _bad_value(self, dbi: str, key: bytes, why: str) -> MigrationError:
        return MigrationError(
            f"migration {self.migration}: DBI {dbi!r} key {bytes(key)!r}: stored value has no valid LS "
            f"header ({why}); is schema_tracks_changes right for LMDB {self.lmdb!r}?"
        )

    def items(self, dbi: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Live entries of ``dbi`` in key order (header stripped, tombstones hidden), optionally only
        keys starting with ``prefix``. Each yielded entry becomes the current source for timestamps."""
        db = self._db(dbi)
        cursor = self._txn.cursor(db)
        if prefix:
            if not cursor.set_range(prefix):
                return
        elif not cursor.first():
            return
        else:
            self._iter_dbi, self._iter_total, self._iter_seen = dbi, int(self._txn.stat(db)["entries"]), 0
        n = 0
        try:
            if self.native:
                for key, value, ts in self._live_native(dbi, cursor, prefix):
                    self._iter_seen += 1
                    self._src_dbi = dbi
                    self._src_key = key
                    self._src_val = value
                    self._src_ts = ts
                    yield key, value
            else:
                for key, value in cursor.iternext(keys=True, values=True):
                    if prefix and not key.startswith(prefix):
                        break
                    n += 1
                    self._iter_seen = n
                    if not n & (_CANCEL_EVERY - 1):
                        self._tick()
                    self._src_dbi = dbi
                    self._src_key = key
                    self._src_val = value
                    self._src_ts = -1
                    yield key, value
        finally:
            # After the loop there is no current source: a later put of a new key must not inherit
            # the last item's timestamp by accident.
            self._src_dbi = self._src_key = self._src_val = None
            cursor.close()

    def get(self, dbi: str, key: bytes, default: bytes | None = None) -> bytes | None:
        """The live value of ``key`` (None/default if absent or a tombstone). A found entry becomes the
        current source for timestamps."""
        db = self._db(dbi)
        raw = self._txn.get(key, db=db)
        if raw is None:
            return default
        if self.native:
            header = self._parse(dbi, key, raw)
            if header.deleted:
                return default
            value = bytes(raw[header.size :])
            ts = header.timestamp
        else:
            value = raw
            ts = -1
        self._src_dbi, self._src_key, self._src_val, self._src_ts = dbi, bytes(key), value, ts
        return value

    def timestamp(self, dbi: str, key: bytes) -> int | None:
        """The LS timestamp (ns) of an entry, tombstones included; None if there is none."""
        if self.native:
            raw = self._txn.get(key, db=self._db(dbi))
            return None if raw is None else self._parse(dbi, key, raw).timestamp
        if not self.exists(shadow_name(dbi)):
            return None
        raw = self._txn.get(key, db=self._db(shadow_name(dbi)))
        return None if raw is None else self._parse(shadow_name(dbi), key, raw).timestamp

    def _parse(self, dbi: str, key: bytes, raw: bytes) -> lsheader.Header:
        try:
            return lsheader.parse_header(raw)
        except lsheader.HeaderError as exc:
            raise self._bad_value(dbi, key, str(exc)) from None

    def _source_ts(self, timestamp_from: tuple[str, bytes] | None) -> int:
        """Timestamp for a key that has no entry yet (the rule's "derived new key")."""
        if not self._keep_ts:
            return self.now_ns
        if timestamp_from is not None:
            ts = self.timestamp(*timestamp_from)
            if ts is None:
                raise MigrationError(
                    f"migration {self.migration}: timestamp_from={timestamp_from!r} names no entry"
                )
            return ts
        if self._src_key is not None:
            if self._src_ts < 0:
                assert self._src_dbi is not None
                found = self.timestamp(self._src_dbi, self._src_key)
                # A main entry without shadow entry was written while LS was stopped: LS would
                # stamp it "now" too.
                self._src_ts = self.now_ns if found is None else found
            return self._src_ts
        return self.now_ns

    # -- writing ------------------------------------------------------------------------------------

    def put(
        self, dbi: str, key: bytes, value: bytes, *, timestamp_from: tuple[str, bytes] | None = None
    ) -> None:
        """Write ``value`` (without header) at ``key``; the header and timestamp follow the strategy.

        Writing an unchanged value is a no-op (no new timestamp). ``timestamp_from=(dbi, key)`` names
        the source entry of a new key explicitly (prefix/new-dbi); otherwise the current source is used.
        """
        if dbi != self._w_name:
            self._select_write(dbi)
        if not self.native:
            self._put_shadow_mode(dbi, key, value, timestamp_from)
            return
        db = self._w_db
        if timestamp_from is None and key == self._src_key and dbi == self._src_dbi:
            # Fast path: rewriting the entry items()/get() just gave us; its header is known.
            if value == self._src_val:
                return
            ts = self._src_ts
            if not self._keep_ts:
                ts = ts + 1 if ts >= self.now_ns else self.now_ns
            # The source entry holds this value from now on: a later put of the original value must
            # not be skipped as "unchanged".
            self._src_val = value
        else:
            raw = self._txn.get(key, db=db)
            if raw is None:
                ts = self._source_ts(timestamp_from)
            else:
                header = self._parse(dbi, key, raw)
                if not header.deleted and raw[header.size :] == value:
                    return
                ts = header.timestamp
                if not self._keep_ts:
                    ts = ts + 1 if ts >= self.now_ns else self.now_ns
            if key == self._src_key and dbi == self._src_dbi:
                self._src_val = value
        self._txn.put(key, _HDR.pack(ts, self._txn_id, 0, 0, 0) + value, db=db)
        self.puts += 1
        self.bytes_written += len(key) + len(value) + _HDR_SIZE

    def _put_shadow_mode(
        self, dbi: str, key: bytes, value: bytes, timestamp_from: tuple[str, bytes] | None
    ) -> None:
        db, shadow = self._w_db, self._w_shadow
        old_shadow = self._txn.get(key, db=shadow)
        if old_shadow is None:
            ts = self._source_ts(timestamp_from)
        else:
            header = self._parse(shadow_name(dbi), key, old_shadow)
            unchanged = not header.deleted and old_shadow[header.size :] == value
            if unchanged and self._txn.get(key, db=db) == value:
                return
            ts = header.timestamp
            if not self._keep_ts:
                ts = ts + 1 if ts >= self.now_ns else self.now_ns
        self._txn.put(key, value, db=db)
        self._txn.put(key, _HDR.pack(ts, self._txn_id, 0, 0, 0) + value, db=shadow)
        self.puts += 1
        self.bytes_written += 2 * (len(key) + len(value)) + _HDR_SIZE

    def rewrite(
        self, dbi: str, fn: Callable[[bytes, bytes], bytes | None], prefix: bytes = b""
    ) -> int:
        """Rewrite the live values of ``dbi`` in place: ``fn(key, value)`` returns the new value (without
        header), or None (or the same value) to leave the entry alone. Optionally only keys starting with
        ``prefix``. Timestamps follow the strategy as with :meth:`put`. Returns the number of entries
        written. The same result as an ``items``/``put`` loop at close to a raw cursor loop's speed:
        the header is parsed and rebuilt inline, with no per-entry method call."""
        if dbi != self._w_name:
            self._select_write(dbi)
        if not self.native:
            # Shadow mode: each write updates the shadow DBI too; the general path keeps them in step.
            count = 0
            for key, value in self.items(dbi, prefix):
                new = fn(key, value)
                if new is not None and new != value:
                    self.put(dbi, key, new)
                    count += 1
            return count
        db = self._w_db
        cursor = self._txn.cursor(db)
        if not (cursor.set_range(prefix) if prefix else cursor.first()):
            return 0
        put, pack, unpack = self._txn.put, _HDR.pack, _HDR.unpack_from
        txn_id, keep, now = self._txn_id, self._keep_ts, self.now_ns
        seen = written = nbytes = flushed = 0
        try:
            for key, raw in cursor.iternext(keys=True, values=True):
                if prefix and not key.startswith(prefix):
                    break
                seen += 1
                if not seen & (_CANCEL_EVERY - 1):
                    self.puts += written
                    self.bytes_written += nbytes + written * _HDR_SIZE
                    flushed += written
                    written = nbytes = 0
                    self._tick()  # cancellation, map release; the heartbeat reads the counters
                try:
                    ts, _txn, version, flags, extra = unpack(raw, 0)
                except struct.error:
                    raise self._bad_value(dbi, key, f"{len(raw)} bytes") from None
                if version:
                    raise self._bad_value(dbi, key, f"header version {version}")
                if flags & _DELETED:
                    continue
                value = raw[_HDR_SIZE + 8 * extra :] if extra else raw[_HDR_SIZE:]
                new = fn(key, value)
                if new is None or new == value:
                    continue
                if not keep:
                    ts = ts + 1 if ts >= now else now
                put(key, pack(ts, txn_id, 0, 0, 0) + new, db=db)
                written += 1
                nbytes += len(key) + len(new)
        finally:
            cursor.close()
            self.puts += written
            self.bytes_written += nbytes + written * _HDR_SIZE
        return flushed + written

    def delete(self, dbi: str, key: bytes) -> bool:
        """Delete ``key``: a tombstone in native mode (timestamp by the strategy), a real delete plus a
        shadow tombstone in shadow mode. Returns False if there was no live entry."""
        if dbi != self._w_name:
            self._select_write(dbi)
        db = self._w_db
        if self.native:
            raw = self._txn.get(key, db=db)
            if raw is None:
                return False
            header = self._parse(dbi, key, raw)
            if header.deleted:
                return False
            ts = self._rule_ts(header.timestamp)
            self._txn.put(key, _HDR.pack(ts, self._txn_id, 0, _DELETED, 0), db=db)
            if key == self._src_key and dbi == self._src_dbi:
                self._src_val = None  # the source is a tombstone now: no put of it is "unchanged"
        else:
            existed = self._txn.delete(key, db=db)
            raw = self._txn.get(key, db=self._w_shadow)
            if raw is not None:
                header = self._parse(shadow_name(dbi), key, raw)
                if not header.deleted:
                    ts = self._rule_ts(header.timestamp)
                    self._txn.put(key, _HDR.pack(ts, self._txn_id, 0, _DELETED, 0), db=self._w_shadow)
                    existed = True
            if not existed:
                return False
        self.deletes += 1
        self.bytes_written += len(key) + _HDR_SIZE
        return True

    def _rule_ts(self, old_ts: int) -> int:
        if self._keep_ts:
            return old_ts
        return old_ts + 1 if old_ts >= self.now_ns else self.now_ns

    # Kept whole: the no-fn loop is inlined for speed (docs/performance.md)
    def copy_dbi(  # noqa: PLR0912, PLR0915
        self,
        src: str,
        dst: str,
        fn: Callable[[bytes, bytes], tuple[bytes, bytes] | None] | None = None,
    ) -> int:
        """Copy the live entries of ``src`` into the empty or new DBI ``dst``, keeping each entry's
        timestamp. ``fn(key, value)`` returns the new ``(key, value)`` or None to skip the entry.

        Uses sorted append (``putmulti(append=True)``) while output keys ascend; falls back to normal
        puts after the first out-of-order key (duplicate output keys: the last one wins). Tombstones are
        not copied. Reports progress. Returns the number of entries written.
        """
        if src == dst:
            raise MigrationError(
                f"migration {self.migration}: copy_dbi source and destination are both {src!r}"
            )
        src_db = self._db(src)
        self._select_write(dst)
        dst_db, dst_shadow = self._w_db, self._w_shadow
        if self._txn.stat(dst_db)["entries"] or (
            dst_shadow is not None and self._txn.stat(dst_shadow)["entries"]
        ):
            raise MigrationError(
                f"migration {self.migration}: copy_dbi needs an empty destination and {dst!r} has entries; "
                "merge with m.items + m.put instead"
            )
        total = self._txn.stat(src_db)["entries"]
        pack = _HDR.pack
        txn_id = self._txn_id
        now = self.now_ns
        keep = self._keep_ts
        batch: list[tuple[bytes, bytes]] = []
        shadow_batch: list[tuple[bytes, bytes]] = []
        append = True
        prev = b""
        done = written = 0
        nbytes = 0
        dst_cursor = self._txn.cursor(dst_db)
        shadow_cursor = self._txn.cursor(dst_shadow) if dst_shadow is not None else None

        def flush() -> None:
            nonlocal written
            if not batch:
                return
            _consumed, added = dst_cursor.putmulti(batch, append=append)
            if append and added != len(batch):
                raise MigrationError(f"migration {self.migration}: copy_dbi append lost entries in {dst!r}")
            if shadow_cursor is not None:
                shadow_cursor.putmulti(shadow_batch, append=append)
            written += len(batch)
            batch.clear()
            shadow_batch.clear()

        fast = fn is None and shadow_cursor is None and keep
        if fast:
            # Fast path for the plain native copy: the same work per entry as a raw putmulti(append)
            # loop. Counters are kept per batch (in C: len, sum/map), not per entry.
            unpack = _HDR.unpack_from
            append_entry = batch.append
            tombstones = 0
            for key, raw in self._txn.cursor(src_db).iternext(keys=True, values=True):
                try:
                    ts, _txn, version, flags, extra = unpack(raw, 0)
                except struct.error:
                    raise self._bad_value(src, key, f"{len(raw)} bytes") from None
                if version:
                    raise self._bad_value(src, key, f"header version {version}")
                if flags & _DELETED:
                    tombstones += 1
                    continue
                value = raw[_HDR_SIZE + 8 * extra :] if extra else raw[_HDR_SIZE:]
                append_entry((key, pack(ts, txn_id, 0, 0, 0) + value))
                if len(batch) >= _COPY_BATCH:
                    nbytes += _batch_bytes(batch) - len(batch) * _HDR_SIZE  # the header counts below
                    flush()
                    done = written + tombstones
                    self.progress(done, total)  # checks cancellation too
                    if not written & (_COPY_BATCH * 16 - 1):
                        _release_map(self._env)
            nbytes += _batch_bytes(batch) - len(batch) * _HDR_SIZE
            done = written + len(batch) + tombstones
        # The general path (a mapping fn, shadow mode, fresh timestamps); empty after the fast path.
        rows: Iterable[tuple[bytes, bytes, int]] = () if fast else self._iter_with_ts(src, src_db)
        for src_key, src_value, src_ts in rows:
            done += 1
            key, value, ts = src_key, src_value, src_ts
            if fn is not None:
                out = fn(key, value)
                if out is None:
                    continue
                key, value = out
                if append and key <= prev and (written or batch):
                    flush()
                    append = False  # keys no longer ascend: ordinary puts from here on
            if not keep:
                ts = src_ts + 1 if src_ts >= now else now
            if shadow_cursor is None:
                batch.append((key, pack(ts, txn_id, 0, 0, 0) + value))
            else:
                batch.append((key, value))
                shadow_batch.append((key, pack(ts, txn_id, 0, 0, 0) + value))
            nbytes += len(key) + len(value)
            prev = key
            if len(batch) >= _COPY_BATCH:
                flush()
                self.progress(done, total)
        flush()
        self.progress(done, total)
        self.copied += written
        self.bytes_written += nbytes + written * _HDR_SIZE
        return written

    def _live_native(self, dbi: str, cursor: Any, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes, int]]:
        """Native mode: live (key, value, timestamp) from the cursor's position on, header stripped,
        tombstones skipped, up to the first key without ``prefix``; checks cancellation. (copy_dbi's
        fast path inlines the same loop: a generator per record costs it ~10%.)"""
        unpack = _HDR.unpack_from
        n = 0
        for key, raw in cursor.iternext(keys=True, values=True):
            if prefix and not key.startswith(prefix):
                return
            n += 1
            if not n & (_CANCEL_EVERY - 1):
                self._tick()
            try:
                ts, _txn, version, flags, extra = unpack(raw, 0)
            except struct.error:
                raise self._bad_value(dbi, key, f"{len(raw)} bytes") from None
            if version:
                raise self._bad_value(dbi, key, f"header version {version}")
            if flags & _DELETED:
                continue
            yield key, (raw[_HDR_SIZE + 8 * extra :] if extra else raw[_HDR_SIZE:]), ts

    def _iter_with_ts(self, dbi: str, db: Any) -> Iterator[tuple[bytes, bytes, int]]:
        """Live (key, value, timestamp) of a DBI; checks cancellation."""
        cursor = self._txn.cursor(db)
        if self.native:
            yield from self._live_native(dbi, cursor)
            return
        # Shadow mode: merge-join the main DBI with its shadow to find each entry's timestamp.
        shadow_iter: Iterator[tuple[bytes, bytes]] = iter(())
        if self.exists(shadow_name(dbi)):
            shadow_iter = self._txn.cursor(self._db(shadow_name(dbi))).iternext(keys=True, values=True)
        skey, sraw = next(shadow_iter, (None, b""))
        for n, (key, value) in enumerate(cursor.iternext(keys=True, values=True), start=1):
            if not n & (_CANCEL_EVERY - 1):
                self._tick()
            while skey is not None and skey < key:
                skey, sraw = next(shadow_iter, (None, b""))
            ts = self.now_ns
            if skey == key:
                ts = self._parse(shadow_name(dbi), key, sraw).timestamp
            yield key, value, ts

    # -- progress, cancellation, logging, tools -----------------------------------------------------

    def _tick(self) -> None:
        """Every 1024 entries: cancellation; every 64k: let go of the pages of the map we touched."""
        self._ticks += 1
        self.read += _CANCEL_EVERY
        if self._cancel is not None:
            self._check_cancel()
        if not self._ticks & (_RELEASE_EVERY_TICKS - 1):
            _release_map(self._env)

    def _check_cancel(self) -> None:
        if _is_cancelled(self._cancel):
            raise MigrationCancelled(
                f"migration {self.migration or 'stamp'} on LMDB {self.lmdb!r} cancelled; the step was "
                "rolled back, the LMDB is unchanged"
            )

    def progress(self, done: int, total: int) -> None:
        """Report progress (throttled to 4/s; the last report always goes out). Checks cancellation."""
        self.done, self.total = done, total
        self._check_cancel()
        if self._progress_fn is None:
            return
        now = time.monotonic()
        if done < total and now - self._last_progress < 0.25:
            return
        self._last_progress = now
        self._progress_fn(self.snapshot())

    def run(
        self, argv: Sequence[str], *, timeout: float | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run an external tool (LS is stopped) and return its output; raises on a non-zero exit.

        The step's write transaction is open while the tool runs: the tool may READ the LMDB (it sees
        the state before this step) but must never open it for writing, or it waits for our write lock
        forever. The timeout (default 600 s) and cancellation end such a tool (SIGKILL) and fail the step.
        The tool gets LSSUPERVISOR_LMDB_PATH and LSSUPERVISOR_WRITE_TXN_OPEN=1 in its environment.
        """
        limit = self._run_timeout if timeout is None else timeout
        child_env = dict(os.environ if env is None else env)
        child_env["LSSUPERVISOR_LMDB_PATH"] = self.lmdb_path
        child_env["LSSUPERVISOR_WRITE_TXN_OPEN"] = "1"
        self.log.info("running %s", " ".join(redact_argv(argv, credential_values(child_env))))
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
        )
        deadline = time.monotonic() + limit
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if _is_cancelled(self._cancel):
                        self._check_cancel()
                    if time.monotonic() > deadline:
                        raise MigrationError(
                            f"migration {self.migration}: {argv[0]} did not finish within {limit:g}s "
                            "(a tool that opens this LMDB for writing waits for our write transaction "
                            "forever); the step was rolled back"
                        ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for line in err.splitlines():
            self.log.info("%s: %s", argv[0], line)
        if proc.returncode != 0:
            raise MigrationError(
                f"migration {self.migration}: {' '.join(redact_argv(argv, credential_values(child_env)))} "
                f"exited {proc.returncode}: "
                f"{(err.strip().splitlines() or [''])[-1]}"
            )
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    # -- raw writes and the verifier ----------------------------------------------------------------

    def _raw_target(self, db: Any) -> str:
        if db is None:
            raise VerificationFailed(
                f"migration {self.migration}: m.txn writes need a named DBI handle from m.db(name)"
            )
        name = self._handle_names.get(id(db))
        if name is None:
            raise VerificationFailed(
                f"migration {self.migration}: unknown DBI handle; get handles with m.db(name)"
            )
        self._check_writable(name)
        return name

    def _raw_record(self, name: str, db: Any, key: bytes) -> None:
        k = bytes(key)
        if (name, k) not in self._raw_old:
            self._raw_old[(name, k)] = self._txn.get(k, db=db)

    @property
    def raw_writes(self) -> int:
        return len(self._raw_old)

    def finish(self) -> None:
        """Mirror raw main writes into shadow DBIs (shadow mode), then verify raw writes. Called by
        :func:`run_step` before the marker is written."""
        for (name, key), old in sorted(self._raw_old.items()):
            db = self._dbs[name]
            new = self._txn.get(key, db=db)
            if new == old:
                continue
            if self.native:
                self._verify_native(name, key, old, new)
            else:
                self._mirror_shadow(name, key, old, new)

    def _fail(self, dbi: str, key: bytes, why: str) -> VerificationFailed:
        return VerificationFailed(
            f"migration {self.migration}: write through m.txn to DBI {dbi!r} key {key!r} {why}; "
            "the step was rolled back (use m.put/m.delete, which write headers and timestamps for you)"
        )

    def _verify_native(self, dbi: str, key: bytes, old: bytes | None, new: bytes | None) -> None:
        if new is None:
            raise self._fail(dbi, key, "really deleted a key (native mode needs a tombstone)")
        try:
            header, value = lsheader.parse(new)
        except lsheader.HeaderError as exc:
            raise self._fail(dbi, key, f"has no valid LS header ({exc})") from None
        if new[18:22] != _ZERO4:
            raise self._fail(dbi, key, "set reserved header bytes (must be 0)")
        if header.num_extra:
            raise self._fail(dbi, key, "wrote header extension blocks (never written by us)")
        if header.flags & ~lsheader.FLAG_SYNC_MASK:
            raise self._fail(dbi, key, f"set unknown header flags 0x{header.flags:02x}")
        if header.deleted and value:
            raise self._fail(dbi, key, "wrote a tombstone with a value")
        old_ts: int | None = None
        if old is not None:
            try:
                old_ts = lsheader.parse_header(old).timestamp
            except lsheader.HeaderError:
                old_ts = None
        self._verify_ts(dbi, key, old_ts, header.timestamp)

    def _verify_ts(self, dbi: str, key: bytes, old_ts: int | None, ts: int) -> None:
        match self.strategy:
            case Strategy.PREFIX | Strategy.NEW_DBI:
                if old_ts is not None and ts != old_ts:
                    raise self._fail(
                        dbi,
                        key,
                        f"changed the timestamp {old_ts} -> {ts} (STRATEGY {self.strategy.value!r} "
                        "keeps timestamps)",
                    )
                if old_ts is None and not 0 < ts <= self.now_ns:
                    raise self._fail(
                        dbi, key, f"gave a new key timestamp {ts}, outside (0, now={self.now_ns}]"
                    )
            case Strategy.IN_PLACE:
                if ts < self.now_ns or (old_ts is not None and ts <= old_ts):
                    raise self._fail(
                        dbi,
                        key,
                        f"wrote timestamp {ts}: STRATEGY 'in-place' needs a fresh one "
                        f"(>= m.now_ns {self.now_ns} and > the old {old_ts})",
                    )

    def _mirror_shadow(self, dbi: str, key: bytes, old: bytes | None, new: bytes | None) -> None:
        """Shadow mode: give a raw main write its shadow entry, by the strategy's rule."""
        shadow = self._db(shadow_name(dbi), create=True)
        raw = self._txn.get(key, db=shadow)
        old_header = None if raw is None else self._parse(shadow_name(dbi), key, raw)
        if new is None:
            if old_header is not None and not old_header.deleted:
                ts = self._rule_ts(old_header.timestamp)
                self._txn.put(key, _HDR.pack(ts, self._txn_id, 0, _DELETED, 0), db=shadow)
            return
        ts = self.now_ns if old_header is None else self._rule_ts(old_header.timestamp)
        self._txn.put(key, _HDR.pack(ts, self._txn_id, 0, 0, 0) + new, db=shadow)


class RawCursor:
    """A cursor of ``m.txn``: reads pass through; writes are recorded for the verifier."""

    def __init__(self, api: MigrationApi, db: Any, cursor: Any) -> None:
        self._api = api
        self._db = db
        self._cursor = cursor

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._cursor, attr)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._cursor)

    def _record(self, key: bytes) -> None:
        # The same check as m.txn.put: a cursor of the unnamed DB (the DBI directory) or of a handle
        # not from m.db() must not write at all.
        self._api._raw_record(self._api._raw_target(self._db), self._db, key)

    def put(
        self, key: bytes, value: bytes, dupdata: bool = True, overwrite: bool = True, append: bool = False
    ) -> bool:
        self._record(key)
        return bool(self._cursor.put(key, value, dupdata=dupdata, overwrite=overwrite, append=append))

    def putmulti(
        self,
        items: Iterable[tuple[bytes, bytes]],
        dupdata: bool = True,
        overwrite: bool = True,
        append: bool = False,
    ) -> tuple[int, int]:
        listed = list(items)
        for key, _ in listed:
            self._record(key)
        consumed, added = self._cursor.putmulti(listed, dupdata=dupdata, overwrite=overwrite, append=append)
        return int(consumed), int(added)

    def replace(self, key: bytes, value: bytes) -> bytes | None:
        self._record(key)
        return self._cursor.replace(key, value)  # type: ignore[no-any-return]

    def pop(self, key: bytes) -> bytes | None:
        self._record(key)
        return self._cursor.pop(key)  # type: ignore[no-any-return]

    def delete(self, dupdata: bool = False) -> bool:
        key = self._cursor.key()
        if key:
            self._record(key)
        return bool(self._cursor.delete(dupdata=dupdata))


class RawTxn:
    """``m.txn``: the step's write transaction, raw values (headers included, no rules applied).

    Get DBI handles with ``m.db(name)``. Every write is recorded (key and its value before the first
    write) and checked by the verifier before commit; ``drop`` is refused (a real delete of everything).
    """

    def __init__(self, api: MigrationApi) -> None:
        self._api = api
        self._txn: Any = api._txn

    def id(self) -> int:
        return int(self._txn.id())

    def get(self, key: bytes, default: bytes | None = None, db: Any = None) -> bytes | None:
        return self._txn.get(key, default, db=db)  # type: ignore[no-any-return]

    def stat(self, db: Any) -> dict[str, int]:
        return self._txn.stat(db)  # type: ignore[no-any-return]

    def cursor(self, db: Any = None) -> RawCursor:
        return RawCursor(self._api, db, self._txn.cursor(db=db))

    def put(  # mirrors py-lmdb's Transaction.put
        self,
        key: bytes,
        value: bytes,
        dupdata: bool = True,
        overwrite: bool = True,
        append: bool = False,
        db: Any = None,
    ) -> bool:
        name = self._api._raw_target(db)
        self._api._raw_record(name, db, key)
        return bool(self._txn.put(key, value, dupdata=dupdata, overwrite=overwrite, append=append, db=db))

    def replace(self, key: bytes, value: bytes, db: Any = None) -> bytes | None:
        name = self._api._raw_target(db)
        self._api._raw_record(name, db, key)
        return self._txn.replace(key, value, db=db)  # type: ignore[no-any-return]

    def pop(self, key: bytes, db: Any = None) -> bytes | None:
        name = self._api._raw_target(db)
        self._api._raw_record(name, db, key)
        return self._txn.pop(key, db=db)  # type: ignore[no-any-return]

    def delete(self, key: bytes, value: bytes = b"", db: Any = None) -> bool:
        name = self._api._raw_target(db)
        self._api._raw_record(name, db, key)
        return bool(self._txn.delete(key, value, db=db))

    def drop(self, db: Any, delete: bool = True) -> None:
        raise VerificationFailed(
            f"migration {self._api.migration}: m.txn.drop refused: dropping a synced DBI is a real delete "
            "of every key; tombstone keys with m.delete, or move to a new DBI (STRATEGY 'new-dbi')"
        )


# ---------------------------------------------------------------------------------------------------
# steps


def _needed_room(env: lmdb.Environment, api: MigrationApi | None) -> tuple[int, int, int, str]:
    """(map size, bytes in use, estimated bytes needed, how it was estimated) after a MapFull abort.

    From the data the step wrote before the map filled up, extrapolated to the whole step: by its
    ``m.progress(done, total)``, else by how far its last whole-DBI ``m.items()`` loop got. Without
    either, the map at least doubles."""
    info = env.info()
    psize = env.stat()["psize"]
    used = (info["last_pgno"] + 1) * psize
    written = api.bytes_written if api else 0
    basis = f"{written} bytes written before the map filled up"
    if api is not None and api.total and 0 < api.done < api.total:
        basis += f", {api.done} of {api.total} done (m.progress)"
        written = int(written * api.total / api.done)
    elif api is not None and api._iter_dbi is not None and 0 < api._iter_seen < api._iter_total:
        basis += f" at entry {api._iter_seen} of {api._iter_total} of DBI {api._iter_dbi!r}"
        written = int(written * api._iter_total / api._iter_seen)
    else:
        basis += " (no m.progress and no DBI loop to extrapolate from: at least double the map)"
    # Copy-on-write: a rewritten page exists twice until commit, and pages are not full: count the
    # payload 2.5 times, plus room for the B-tree's own pages.
    needed = max(used + written * 5 // 2 + 64 * psize, info["map_size"] * 2)
    mib = 1 << 20
    return info["map_size"], used, (needed + mib - 1) // mib * mib, basis


# Kept whole: keyword-only options of the public engine entry point.
def run_step(  # noqa: PLR0913
    env: lmdb.Environment,
    spec: LmdbSpec,
    step: Step,
    *,
    instance: str,
    marker_dbi: str = DEFAULT_MARKER_DBI,
    clock: Clock = wall_clock_ns,
    cancel: Cancel = None,
    progress: ProgressFn | None = None,
    logger: logging.Logger | None = None,
    grow_map: bool = False,
    max_map_size: int = 0,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    on_start: Callable[[MigrationApi], None] | None = None,
) -> StepResult:
    """Run one step in ONE write transaction, marker included; commit or leave the LMDB untouched.

    Raises MigrationCancelled, MapFull (``grow_map=False``, or the map would exceed ``max_map_size``
    when that is > 0), VerificationFailed, MigrationError (the migration raised: its file and line
    are named; the original exception is chained).
    """
    mig = import_migration(step.migration) if step.migration is not None else None
    strategy = mig.strategy if mig else Strategy.PREFIX
    name = mig.name if mig else ""
    out = logger or log
    while True:
        started = time.monotonic()
        api: MigrationApi | None = None
        txn = env.begin(write=True)
        try:
            api = MigrationApi(
                env,
                txn,
                lmdb_name=spec.name,
                migration=mig,
                strategy=strategy,
                native=spec.native,
                instance=instance,
                marker_dbi=marker_dbi,
                now_ns=clock(),
                cancel=cancel,
                progress=progress,
                logger=logger,
                lmdb_path=spec.path,
                run_timeout=run_timeout,
            )
            api._check_cancel()
            if on_start is not None:
                on_start(api)  # the step's transaction is open: it is migrating from here on
            if mig is not None:
                assert mig.upgrade is not None
                try:
                    mig.upgrade(api)
                except (SupervisorError, lmdb.MapFullError):
                    raise
                except Exception as exc:
                    raise _upgrade_error(mig, exc) from exc
                api.finish()
            # Last chance: a cancel that arrived after the final iteration still wins over commit.
            api._check_cancel()
            marker = write_marker(
                env,
                txn,
                instance=instance,
                version=step.to_version,
                native=spec.native,
                clock=clock,
                migration=name,
                checksum=mig.checksum if mig else "",
                marker_dbi=marker_dbi,
            )
            txn_id = txn.id()
            txn.commit()
        except lmdb.MapFullError:
            txn.abort()
            size, used, needed, basis = _needed_room(env, api)
            if grow_map and (not max_map_size or needed <= max_map_size):
                out.warning(
                    "LMDB %s: map full during %s (map_size %d); growing to %d and retrying",
                    spec.name,
                    step.describe(),
                    size,
                    needed,
                )
                env.set_mapsize(needed)
                continue
            raise MapFull(
                f"LMDB {spec.name!r}: map full during step {step.describe()} (map_size {size} bytes, "
                f"{used} in use); needs about {needed} bytes (estimated from {basis}): raise "
                f"lmdbs.{spec.name}.options.map_size in the LS config (or allow grow_map); the step was "
                "rolled back",
                needed_bytes=needed,
            ) from None
        except BaseException:
            txn.abort()
            raise
        duration = time.monotonic() - started
        assert api is not None
        result = StepResult(
            lmdb=spec.name,
            from_version=step.from_version,
            to_version=step.to_version,
            migration=name,
            checksum=mig.checksum if mig else "",
            marker=marker,
            puts=api.puts,
            deletes=api.deletes,
            copied=api.copied,
            raw_writes=api.raw_writes,
            bytes_written=api.bytes_written,
            duration_s=duration,
            txn_id=txn_id,
            map_size=env.info()["map_size"],
        )
        out.info(
            "step done lmdb=%s %d->%d migration=%s puts=%d deletes=%d copied=%d raw=%d duration=%.3fs",
            spec.name,
            step.from_version,
            step.to_version,
            name or "-",
            api.puts,
            api.deletes,
            api.copied,
            api.raw_writes,
            duration,
        )
        return result


def _upgrade_error(mig: Migration, exc: Exception) -> MigrationError:
    line = 0
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(mig.path):
            line = frame.lineno or 0
    where = f"{mig.path}:{line}" if line else str(mig.path)
    return MigrationError(f"{where}: upgrade failed: {type(exc).__name__}: {exc}; the step was rolled back")


def unmarked_with_data(spec: LmdbSpec, instance: str) -> UnmarkedDatabase:
    """The refusal for an LMDB with data and no marker (and no ``schema.baseline``)."""
    return UnmarkedDatabase(
        f"LMDB {spec.name!r} at {spec.path} has data but no schema marker for instance {instance!r}",
        remedy=Remedy.BASELINE_OR_STAMP,
    )


def checksum_mismatch(applied: Migration, spec: LmdbSpec, recorded: str) -> ChecksumMismatch:
    """The refusal when the migration file named by the marker changed since it ran."""
    return ChecksumMismatch(
        f"{applied.path}: changed since it was applied to LMDB {spec.name!r}: recorded sha256 "
        f"{recorded}, now {applied.checksum}; restore the applied file (add a new migration instead "
        "of editing one)"
    )


# Kept whole: keyword-only options of the public engine entry point.
def migrate(  # noqa: PLR0913
    env: lmdb.Environment,
    spec: LmdbSpec,
    migrations: MigrationSet,
    *,
    instance: str,
    target: int | None = None,
    baseline: int | None = None,
    marker_dbi: str = DEFAULT_MARKER_DBI,
    clock: Clock = wall_clock_ns,
    cancel: Cancel = None,
    progress: ProgressFn | None = None,
    logger: logging.Logger | None = None,
    grow_map: bool = False,
    max_map_size: int = 0,
    on_step: Callable[[StepResult], None] | None = None,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    on_start: Callable[[MigrationApi], None] | None = None,
) -> MigrateResult:
    """Bring one LMDB from its marker to ``target`` (default newest), one transaction per step.

    Unmarked LMDB: without user data it is stamped ``target``; with data, ``baseline`` is taken as its
    version, else UnmarkedDatabase. A marker whose migration file changed raises ChecksumMismatch; a
    marker above the newest migration raises SchemaTooNew. ``on_step`` is called after each commit
    (record history there); ``on_start`` when each step's transaction is open, with its API object
    (whose counters a heartbeat may read from another thread). On failure after k steps, the LMDB is
    consistently at step k.
    """
    with env.begin(write=False) as txn:
        before = read_marker(env, txn, instance, native=spec.native, marker_dbi=marker_dbi)
        data = has_user_data(env, txn, marker_dbi) if before is None else True
    if before is None and not data:
        goal = plan(migrations, {}, target).target
        # Re-checked inside the write transaction: the application may have written meanwhile.
        marker = stamp_if_empty(env, spec, goal, instance=instance, marker_dbi=marker_dbi, clock=clock)
        if marker is not None:
            return MigrateResult(spec.name, None, marker, "empty")
        with env.begin(write=False) as txn:
            before = read_marker(env, txn, instance, native=spec.native, marker_dbi=marker_dbi)
    if before is None:
        if baseline is None:
            raise unmarked_with_data(spec, instance)
        current = baseline
    else:
        current = before.version
        applied = migrations.by_name(before.migration) if before.migration else None
        if applied is not None and before.checksum and applied.checksum != before.checksum:
            raise checksum_mismatch(applied, spec, before.checksum)
    the_plan = plan(migrations, {spec.name: current}, target)
    results: list[StepResult] = []
    after = before
    if before is None and the_plan.empty:
        after = stamp(env, spec, current, instance=instance, marker_dbi=marker_dbi, clock=clock)
    for step in the_plan.steps:
        result = run_step(
            env,
            spec,
            step,
            instance=instance,
            marker_dbi=marker_dbi,
            clock=clock,
            cancel=cancel,
            progress=progress,
            logger=logger,
            grow_map=grow_map,
            max_map_size=max_map_size,
            run_timeout=run_timeout,
            on_start=on_start,
        )
        results.append(result)
        after = result.marker
        if on_step is not None:
            on_step(result)
    return MigrateResult(spec.name, before, after, "baseline" if before is None else "", tuple(results))


__all__ = [
    "DEFAULT_WRITEMAP",
    "SHADOW_PREFIX",
    "Cancel",
    "MigrateResult",
    "MigrationApi",
    "Progress",
    "RawCursor",
    "RawTxn",
    "StepResult",
    "checksum_mismatch",
    "migrate",
    "open_env",
    "run_step",
    "unmarked_with_data",
]

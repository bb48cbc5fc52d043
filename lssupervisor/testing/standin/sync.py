"""The sync loop of the stand-in: one thread per configured LMDB, as LS ``syncer/sync.go``.

Faithful to LS v1.0 (each rule names its source):
- start: list storage, retrying every second forever (``syncLoop``); every instance seen is waited
  for, our own included, and no snapshot is written before our own latest one is loaded.
- ``hasDataAtStart && !hasSnapshots``: upload a full snapshot at once.
- shadow mode (``schema_tracks_changes: false``): ``mainToShadow`` with timestamp 1 at start when
  the LMDB has data; every send/load goes through ``_sync_shadow_<dbi>`` (``shadow.go``).
- merge (``iterators.go`` ``NativeIterator.Merge``): newer timestamp wins; equal timestamps keep
  the lexicographically lower (or equal) application value; keys missing from a snapshot are left
  alone; merged values get this transaction's txn id; flags are masked to ``deleted``.
- change detection by ``env.info().last_txnid`` against the last synced txn id (``LoadOnce`` bumps
  it when nothing changed locally, so loads do not trigger uploads).
- the receiver lists ``<db>__`` every ``storage_poll_interval``, takes the lexicographically last
  snapshot per instance, skips our own after start, and ignores corrupt files from then on.
Simplified: the receiver runs inside the loop (not in its own goroutine), downloads are synchronous,
no cleaner, no sweeper, no ``dupsort_hack``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from lssupervisor.testing.standin import snapshot as snap
from lssupervisor.testing.standin.config import Config, LMDBConfig, format_go_duration
from lssupervisor.testing.standin.health import Health
from lssupervisor.testing.standin.log import log
from lssupervisor.testing.standin.storage import Backend

SYNC_PREFIX = b"_sync"
SHADOW_PREFIX = b"_sync_shadow_"
FLAG_DELETED = 0x01
MDB_REVERSEKEY = 0x02
MDB_DUPSORT = 0x04
MDB_INTEGERKEY = 0x08
MDB_DUPFIXED = 0x10
MDB_INTEGERDUP = 0x20
MAX_CONSECUTIVE_SNAPSHOT_LOADS = 10
HEADER = 24

try:
    HOSTNAME = socket.gethostname()
except OSError:
    HOSTNAME = ""


class SyncError(Exception):
    pass


def _flag_bits(d: dict[str, bool]) -> int:
    return (
        (MDB_REVERSEKEY if d.get("reverse_key") else 0)
        | (MDB_DUPSORT if d.get("dupsort") else 0)
        | (MDB_INTEGERKEY if d.get("integerkey") else 0)
        | (MDB_DUPFIXED if d.get("dupfixed") else 0)
        | (MDB_INTEGERDUP if d.get("integerdup") else 0)
    )


def _flag_kwargs(bits: int) -> dict[str, bool]:
    return {
        "reverse_key": bool(bits & MDB_REVERSEKEY),
        "dupsort": bool(bits & MDB_DUPSORT),
        "integerkey": bool(bits & MDB_INTEGERKEY),
        "dupfixed": bool(bits & MDB_DUPFIXED),
        "integerdup": bool(bits & MDB_INTEGERDUP),
    }


def _display(key: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in key)


def parse_header(val: bytes) -> tuple[int, int, bytes]:
    """(timestamp, flags, app value) like LS ``header.Parse``; SyncError when invalid."""
    if len(val) < HEADER:
        raise SyncError("value too short to contain a header")
    if val[16] != 0:
        raise SyncError("unsupported header version or not a header")
    off = HEADER + 8 * int.from_bytes(val[22:24], "big")
    if len(val) < off:
        raise SyncError("value too short to contain a header")
    return int.from_bytes(val[0:8], "big"), val[17], val[off:]


def make_header(ts: int, txn_id: int, flags: int, padding: bool = False) -> bytes:
    h = (
        ts.to_bytes(8, "big")
        + txn_id.to_bytes(8, "big")
        + bytes((0, flags, 0, 0, 0, 0, 0, 1 if padding else 0))
    )
    return h + (b"\0" * 8 if padding else b"")


def open_env(lc: LMDBConfig) -> Any:
    """LS ``lmdbenv.NewWithOptions``: map size 1GB only when creating, else the file's own."""
    import os

    import lmdb

    o = lc.options
    if o.create:
        dir_path = os.path.dirname(lc.path) if o.no_subdir else lc.path
        if dir_path:
            try:
                os.makedirs(dir_path, o.dir_mask, exist_ok=True)
            except OSError as exc:
                raise SyncError(f"lmdb env: mkdir: {exc}") from None
    map_size = o.map_size or (1 << 30 if o.create else 0)
    try:
        return lmdb.open(
            lc.path,
            map_size=map_size,
            subdir=not o.no_subdir,
            max_dbs=o.max_dbs,
            create=o.create,
            mode=o.file_mask,
            readahead=True,
        )
    except lmdb.Error as exc:
        raise SyncError(f"lmdb env: open: {exc}") from None


class Syncer:
    def __init__(  # noqa: PLR0917 - mirrors syncer.New
        self,
        cfg: Config,
        lc: LMDBConfig,
        env: Any,
        backend: Backend,
        instance: str,
        receive_only: bool,
        only_once: bool,
        health: Health,
        metrics: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.lc = lc
        self.name = lc.name
        self.env = env
        self.st = backend
        self.instance = instance
        self.receive_only = receive_only
        self.only_once = only_once
        self.health = health
        self.metric = metrics
        self.native = lc.schema_tracks_changes
        self._dbis: dict[bytes, Any] = {}
        self.fields = {"db": self.name, "instance": instance}
        self.ignored: set[str] = set()
        self.notified: dict[str, str] = {}
        self.seen: set[str] = set()
        self.pending: dict[str, snap.NameInfo] = {}
        self.has_snapshots = False
        self.last_snapshot_time = time.monotonic()
        self.list_health = health.tracker(
            f"{self.name}_storage_list",
            "list snapshots on storage backend",
            cfg.storage_health["storage_list"],
        )
        self.load_health = health.tracker(
            f"{self.name}_storage_load",
            "load a snapshot from storage backend",
            cfg.storage_health["storage_load"],
        )
        self.store_health = health.tracker(
            f"{self.name}_storage_store", "write to storage backend", cfg.storage_health["storage_store"]
        )
        self.start = health.start_tracker(self.name, cfg.start_health)
        if self.native:
            log.info("schema_tracks_changes enabled", **self.fields)
        else:
            log.info(
                "This LMDB has schema_tracks_changes disabled and will use shadow databases "
                "for version tracking.",
                **self.fields,
            )
        log.info("Initialised syncer", **self.fields)

    # ------------------------------------------------------------------ LMDB helpers

    def _names(self, txn: Any) -> list[bytes]:
        # LS ReadDBINames: every key of the root DB names a DBI.
        return list(txn.cursor().iternext(keys=True, values=False))

    def _ensure_handles(self) -> None:
        """Open handles for every DBI name in the root, in a committed write txn (py-lmdb: a
        handle opened in a read txn dies with it; open_db inside another write txn deadlocks)."""
        with self.env.begin() as txn:
            missing = [n for n in self._names(txn) if n not in self._dbis]
        if missing:
            with self.env.begin(write=True) as wtxn:
                for n in missing:
                    self._dbis[n] = self.env.open_db(n, txn=wtxn, create=False)

    def _handle(self, txn: Any, name: bytes, create_flags: int | None = None) -> Any:
        """A handle for ``name`` inside the write txn ``txn``, creating the DBI when asked."""
        h = self._dbis.get(name)
        if h is not None:
            return h
        if create_flags is None:
            h = self.env.open_db(name, txn=txn, create=False)
        else:
            h = self.env.open_db(name, txn=txn, create=True, **_flag_kwargs(create_flags))
        self._dbis[name] = h
        return h

    def _exists(self, txn: Any, name: bytes) -> bool:
        return txn.get(name) is not None

    def _read_dbi(
        self, txn: Any, name: bytes, orig: bytes, raw: bool
    ) -> tuple[int, list[tuple[bytes, bytes, int, int]]]:
        """LS ``readDBI``: (flags of the original DBI, [(key, app value, ts, masked flags)])."""
        h = self._dbis[name]
        flags = _flag_bits(self._dbis[orig].flags(txn))
        if flags & MDB_DUPSORT:
            if not self.lc.dupsort_hack:
                raise SyncError(
                    f'readDBI: dupsort db "{name.decode(errors="replace")}" found and dupsort_hack disabled'
                )
            raise SyncError("dupsort_hack is not supported by the stand-in")
        out: list[tuple[bytes, bytes, int, int]] = []
        append = out.append
        for key, val in txn.cursor(db=h).iternext():
            if raw:
                append((key, val, 0, 0))
                continue
            if len(val) < HEADER or val[16] != 0:
                reason = (
                    "value too short to contain a header"
                    if len(val) < HEADER
                    else "unsupported header version or not a header"
                )
                raise SyncError(
                    f"invalid entry (dbi {name.decode(errors='replace')}, key {_display(key)}): {reason}"
                )
            off = HEADER + 8 * ((val[22] << 8) | val[23])
            if len(val) < off:
                raise SyncError(
                    f"invalid entry (dbi {name.decode(errors='replace')}, key {_display(key)}): "
                    "value too short to contain a header"
                )
            append((key, val[off:], int.from_bytes(val[0:8], "big"), val[17] & FLAG_DELETED))
        return flags, out

    # ------------------------------------------------------------------ shadow (shadow.go)

    def _main_to_shadow(self, txn: Any, ts: int) -> None:
        txn_id = int(txn.id())
        for name in self._names(txn):
            if name.startswith(SYNC_PREFIX):
                continue
            self._handle(txn, name)
            flags, entries = self._read_dbi(txn, name, name, raw=True)
            shadow = self._handle(txn, SHADOW_PREFIX + name, flags & MDB_INTEGERKEY)
            main = {k: v for k, v, _, _ in entries}
            puts: list[tuple[bytes, bytes]] = []
            seen: set[bytes] = set()
            for key, old in txn.cursor(db=shadow).iternext():
                seen.add(key)
                old_ts, old_flags, old_app = parse_header(old)
                if key not in main:
                    # Clean: mark deleted (with the default timestamp) unless already deleted
                    if not old_flags & FLAG_DELETED:
                        puts.append((key, make_header(ts, txn_id, FLAG_DELETED)))
                    continue
                new_val = main[key]
                if old_app == new_val:
                    continue  # unchanged: keep the old timestamp
                if ts < old_ts or (ts == old_ts and old_app <= new_val):
                    continue
                puts.append((key, make_header(ts, txn_id, 0) + new_val))
            for key, val in main.items():
                if key not in seen:
                    puts.append((key, make_header(ts, txn_id, 0) + val))
            for key, val in puts:
                txn.put(key, val, db=shadow)

    def _shadow_to_main(self, txn: Any) -> None:
        for name in self._names(txn):
            if name.startswith(SYNC_PREFIX):
                continue
            main_h = self._handle(txn, name)
            sname = SHADOW_PREFIX + name
            if not self._exists(txn, sname):
                raise SyncError(
                    f"mdb_dbi_open: MDB_NOTFOUND: No matching key/data pair found ({sname.decode()})"
                )
            self._handle(txn, sname)
            _, entries = self._read_dbi(txn, sname, name, raw=False)
            shadow = {k: v for k, v, _, _ in entries}
            dels: list[bytes] = []
            puts: list[tuple[bytes, bytes]] = []
            seen: set[bytes] = set()
            for key, cur in txn.cursor(db=main_h).iternext():
                seen.add(key)
                if key not in shadow:
                    dels.append(key)
                    continue
                want = shadow[key]
                if not want:
                    dels.append(key)
                elif want != cur:
                    puts.append((key, want))
            for key, want in shadow.items():
                if key not in seen and want:
                    puts.append((key, want))
            for key in dels:
                txn.delete(key, db=main_h)
            for key, want in puts:
                txn.put(key, want, db=main_h)

    # ------------------------------------------------------------------ send (send.go)

    def _dump(self, meta: snap.Meta) -> tuple[int, int, list[tuple[str, int, str, bytes]]] | None:
        """One dump transaction; None when a DBI appeared that has no handle yet (retry)."""
        dbis: list[tuple[str, int, str, bytes]] = []
        with self.env.begin(write=not self.native) as txn:
            ts = time.time_ns()
            meta.timestamp_ns = ts
            txn_id = int(txn.id())
            if not self.native:
                self._main_to_shadow(txn, ts)
            if not self.receive_only:
                names = [n for n in self._names(txn) if not n.startswith(SYNC_PREFIX)]
                if any(n not in self._dbis for n in names):
                    if not self.native:
                        raise SyncError("a DBI without handle inside a write txn")
                    return None
                enc = snap.encode_kv
                for name in names:
                    read = name if self.native else SHADOW_PREFIX + name
                    flags, entries = self._read_dbi(txn, read, name, raw=False)
                    body = b"".join([enc(k, v, t, f) for k, v, t, f in entries])
                    dbis.append((name.decode("utf-8", "surrogateescape"), flags, "", body))
        return ts, txn_id, dbis

    def send_once(self) -> int:
        meta = snap.Meta(
            generation_id=snap.GENERATION_ID,
            instance_id=self.instance,
            hostname=HOSTNAME,
            database_name=self.name,
        )
        t0 = time.monotonic()
        for _attempt in range(100):
            self._ensure_handles()
            got = self._dump(meta)
            if got is not None:
                break
        else:
            raise SyncError("DBIs keep appearing while dumping; giving up")
        ts, txn_id, dbis = got
        last = int(self.env.info()["last_txnid"])
        txn_id = min(txn_id, last)  # empty write txn: LMDB reuses the id
        meta.lmdb_txn_id = txn_id
        if self.receive_only:
            log.info("Snapshot store skipped, because running in receive-only mode", **self.fields)
            return txn_id
        name = snap.build_name(self.name, self.instance, ts)
        out = snap.compress(snap.encode_snapshot(meta, dbis))
        self.metric("generated")
        i = 0
        while True:
            if not (i < self.cfg.storage_retry_count or self.cfg.storage_retry_forever):
                log.warn("Store failed too many times, giving up", **self.fields)
                raise SyncError(f"store {name}: gave up")
            i += 1
            self.metric("store_calls")
            try:
                self.st.store(name, out)
            except OSError as exc:
                log.warn("Store failed, retrying", error=str(exc), **self.fields)
                self.store_health.add_failure(str(exc))
                time.sleep(self.cfg.storage_retry_interval / 1e9)
                continue
            self.store_health.add_success()
            break
        log.info(
            "Stored snapshot",
            snapshot_name=name,
            snapshot_kind="snapshot",
            txnID=txn_id,
            time_total=format_go_duration(int((time.monotonic() - t0) * 1e9)),
            snapshot_size=f"{len(out)} B",
            **self.fields,
        )
        self.last_snapshot_time = time.monotonic()
        return txn_id

    # ------------------------------------------------------------------ load (sync.go LoadOnce)

    def load_once(
        self, instance: str, s: snap.Snapshot, ni: snap.NameInfo, last_txn: int
    ) -> tuple[int, bool]:
        self._ensure_handles()
        padding = self.lc.header_extra_padding_block
        with self.env.begin(write=True) as txn:
            now = time.time_ns()
            txn_id = int(txn.id())
            local_changed = last_txn < txn_id - 1
            if not self.native and local_changed:
                self._main_to_shadow(txn, now)
            if s.format_version == 0:
                raise SyncError("create native iterator: no snapshot formatVersion provided, or 0")
            if s.compat_version > snap.CURRENT_FORMAT_VERSION:
                raise SyncError(
                    f"create native iterator: snapshot compatVersion too new for this version "
                    f"({s.compat_version} > {snap.CURRENT_FORMAT_VERSION}, formatVersion "
                    f"{s.format_version})"
                )
            for d in s.databases:
                bname = d.name.encode("utf-8", "surrogateescape")
                if bname.startswith(SYNC_PREFIX):
                    log.warn("Remote snapshot contains private DBI, ignoring", dbi=d.name, **self.fields)
                    continue
                self._validate_transform(d, s.format_version)
                override = self.lc.override_create_flags.get(d.name)
                target = bname
                if not self.native:
                    target = SHADOW_PREFIX + bname
                    if not self._exists(txn, bname):
                        if s.format_version < 3 and override is None:
                            raise SyncError(
                                f"DBI {d.name} does not exist yet, and we cannot safely create it "
                                f"from a formatVersion={s.format_version} snapshot"
                            )
                        fl = override if override is not None else d.flags
                        log.warn("Creating new DBI from snapshot", dbi=d.name, flags=fl, **self.fields)
                        self._handle(txn, bname, fl)
                if not self._exists(txn, target):
                    fl = override if override is not None else d.flags
                    if not self.native:
                        fl &= MDB_INTEGERKEY
                    log.warn(
                        "Creating new DBI from snapshot",
                        dbi=target.decode(errors="replace"),
                        flags=fl,
                        **self.fields,
                    )
                    h = self._handle(txn, target, fl)
                else:
                    h = self._handle(txn, target)
                self._merge(txn, h, d, txn_id, s.format_version, padding and self.native)
            if not self.native:
                self._shadow_to_main(txn)
        last = int(self.env.info()["last_txnid"])
        txn_id = min(txn_id, last)
        log.info(
            "Loaded remote update",
            snapshot_instance=instance,
            timestamp=ni.timestamp_string,
            txnID=txn_id,
            kind="snapshot",
            **self.fields,
        )
        self.metric("loaded")
        return txn_id, local_changed

    def _validate_transform(self, d: snap.DBI, fv: int) -> None:
        if d.transform not in ("", "dupsort_hack_v1"):
            raise SyncError(f'snapshot dbi "{d.name}": transform "{d.transform}" not supported')
        if self.native and d.transform:
            raise SyncError(
                f'snapshot dbi "{d.name}": no transforms supported for native schema, got "{d.transform}"'
            )
        if fv >= 3:
            dup = bool(d.flags & MDB_DUPSORT)
            if dup and d.transform != "dupsort_hack_v1":
                raise SyncError(
                    f'snapshot dbi "{d.name}": dupsort DBI flag without expected transform '
                    f'(got "{d.transform}", expected "dupsort_hack_v1")'
                )
            if not dup and d.transform:
                raise SyncError(
                    f'snapshot dbi "{d.name}": non-dupsort DBI flags with unexpected dupsort '
                    f'transform (got "{d.transform}")'
                )
        if d.transform:
            raise SyncError("dupsort_hack is not supported by the stand-in")

    def _merge(
        self, txn: Any, h: Any, d: snap.DBI, txn_id: int, fv: int, padding: bool
    ) -> None:
        """``strategy.Update`` with ``NativeIterator.Merge`` (no sweeper: no deleted cutoff)."""
        get = txn.get
        put = txn.put
        for kv in d.entries:
            key = bytes(kv.key)
            new_app = bytes(kv.value)
            new_ts = kv.timestamp_ns
            flags = kv.flags & FLAG_DELETED
            if not new_app and fv < 2:
                flags |= FLAG_DELETED  # v1 snapshots marked deletion by an empty value
            old = get(key, db=h)
            if old is not None:
                try:
                    old_ts, _, old_app = parse_header(old)
                except SyncError as exc:
                    raise SyncError(f"merge: oldval header parse error ({_display(key)}): {exc}") from None
                if new_ts == 0:
                    if old_app == new_app:
                        continue
                    new_ts = 0  # DefaultTimestampNano is 0 for snapshot loads
                if new_ts < old_ts:
                    continue
                if new_ts == old_ts and old_app <= new_app:
                    continue  # equal timestamps: the lower application value wins
            if flags & FLAG_DELETED:
                new_app = b""
            val = make_header(new_ts, txn_id, flags, padding) + new_app
            if val != old:
                put(key, val, db=h)

    # ------------------------------------------------------------------ receiver

    def _list(self, including_own: bool) -> None:
        """Receiver ``RunOnce``: latest snapshot per instance; new ones become pending."""
        self.metric("list_calls")
        try:
            blobs = self.st.list(self.name + "__")
        except OSError as exc:
            self.metric("list_failed")
            self.list_health.add_failure(f"list snapshots: {exc}")
            raise
        self.list_health.add_success()
        latest: dict[str, snap.NameInfo] = {}
        for b in blobs:
            if b.name in self.ignored:
                continue
            try:
                ni = snap.parse_name(b.name)
            except snap.SnapshotError:
                self.ignored.add(b.name)
                continue
            latest[ni.instance_id] = ni  # sorted by name: the last one wins
        self.seen = set(latest)
        self.has_snapshots = bool(latest)
        for inst, ni in latest.items():
            if self.notified.get(inst) == ni.full_name:
                continue
            if not including_own and inst == self.instance:
                continue
            self.pending[inst] = ni
            self.notified[inst] = ni.full_name

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        cfg = self.cfg
        has_data_at_start = int(self.env.info()["last_txnid"]) > 0
        last_synced = 0
        warned_empty = False
        while True:
            try:
                self._list(including_own=True)
                break
            except OSError as exc:
                log.info(
                    "Waiting for initial receiver listing", error=f"list snapshots: {exc}", **self.fields
                )
                time.sleep(1.0)
        self.start.set("listing")
        waiting = set(self.seen)
        if self.instance in waiting:
            log.info(
                "This instance has existing snapshots that must be loaded before we create new snapshots",
                **self.fields,
            )
        if has_data_at_start and not self.native:
            log.info("Syncing main to shadow, in case data was changed before start", **self.fields)
            self._ensure_handles()
            with self.env.begin(write=True) as txn:
                self._main_to_shadow(txn, 1)  # 1 ns after the epoch: never beats real data
        if has_data_at_start and not self.has_snapshots:
            log.info("Performing initial snapshot, because none exists yet", **self.fields)
            last_synced = self.send_once()
            self.start.set("store")
        if not has_data_at_start:
            self.start.set("store")
        self.last_snapshot_time = time.monotonic()
        force = cfg.storage_force_snapshot_interval
        force_enabled = not self.receive_only and force > 0
        last_list = time.monotonic()
        while True:
            n_loads = 0
            for inst in sorted(self.pending):
                ni = self.pending.pop(inst)
                self.metric("load_calls")
                try:
                    data = self.st.load(ni.full_name)
                except OSError as exc:
                    self.metric("load_failed")
                    self.load_health.add_failure(str(exc))
                    log.warn("Download failed", error=str(exc), file=ni.full_name, **self.fields)
                    self.notified.pop(inst, None)  # retried at the next listing
                    continue
                self.load_health.add_success()
                try:
                    s = snap.load_data(data)
                except snap.SnapshotError as exc:
                    log.warn(
                        "Snapshot marked as corrupt and will be ignored",
                        filename=ni.full_name,
                        error=str(exc),
                        **self.fields,
                    )
                    self.ignored.add(ni.full_name)
                    self.notified.pop(inst, None)
                    continue
                n_loads += 1
                if inst in waiting:
                    log.info("No longer waiting for instance", other_instance=inst, **self.fields)
                    waiting.discard(inst)
                txn_id, changed = self.load_once(inst, s, ni, last_synced)
                if not changed:
                    last_synced = txn_id
                if changed and n_loads > MAX_CONSECUTIVE_SNAPSHOT_LOADS:
                    break
            if waiting:
                for gone in sorted(waiting - self.seen):
                    log.info(
                        "No longer waiting for instance, because its snapshots disappeared",
                        cleaned_instance=gone,
                        **self.fields,
                    )
                waiting &= self.seen
                if waiting:
                    log.info(
                        "Still waiting for snapshots from instances",
                        instances=" ".join(sorted(waiting)),
                        **self.fields,
                    )
            overdue = False
            if force_enabled and (time.monotonic() - self.last_snapshot_time) * 1e9 > force:
                overdue = True
                log.info("Snapshot overdue, forcing one", **self.fields)
            last_txnid = self.env.info()["last_txnid"]
            if last_txnid > last_synced or overdue:
                if self.instance in waiting:
                    log.info("Waiting to load own old snapshot before writing a new one", **self.fields)
                else:
                    last_synced = last_txnid
                    if has_data_at_start or last_synced > 0:
                        last_synced = self.send_once()
                        self.start.set("store")
                    elif not warned_empty:
                        log.warn("LMDB is empty, waiting for data", **self.fields)
                        warned_empty = True
            if not waiting:
                self.start.set("pass")
            if self.only_once and not waiting:
                log.info("Stopping, because requested to only do a single pass", **self.fields)
                return
            time.sleep(cfg.lmdb_poll_interval / 1e9)
            if (time.monotonic() - last_list) * 1e9 >= cfg.storage_poll_interval:
                last_list = time.monotonic()
                try:
                    self._list(including_own=False)
                except OSError as exc:
                    log.error(
                        "Fetch error", error=f"list snapshots: {exc}", component="receiver", **self.fields
                    )


def run_syncers(
    syncers: list[Syncer], on_error: Callable[[Syncer, BaseException], None]
) -> list[threading.Thread]:
    threads = []
    for s in syncers:

        def target(s: Syncer = s) -> None:
            try:
                s.run()
            except BaseException as exc:
                on_error(s, exc)

        t = threading.Thread(target=target, name=f"syncer-{s.name}", daemon=True)
        t.start()
        threads.append(t)
    return threads

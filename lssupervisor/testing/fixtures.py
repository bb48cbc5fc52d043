"""Helpers for testing your own migrations against real LMDB files (public API).

Typical test::

    from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, run_migrations

    def test_split_names(tmp_path):
        spec = build_lmdb(tmp_path / "db", {"users": {"u1": ('{"name": "Ada Lovelace"}', 1_000)}},
                          marker=1)
        run_migrations(spec, "myapp/migrations", target=2)
        assert read_lmdb(spec)["users"][b"u1"] == (b'{"first": "Ada", "last": "Lovelace"}', 1_000)

Data is given as plain dicts ``{dbi: {key: value}}`` where a value is ``bytes``/``str`` (timestamp
``default_timestamp``), ``(value, timestamp)``, or ``None`` / ``(None, timestamp)`` for a tombstone.
Native mode writes LS headers; shadow mode writes plain values plus ``_sync_shadow_<dbi>`` entries as
Lightning Stream would have left them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import (
    DEFAULT_MARKER_DBI,
    SYNC_PREFIX,
    Clock,
    dbi_names,
    open_dbi,
    shadow_name,
)
from lssupervisor.worker.marker import stamp as _stamp
from lssupervisor.worker.migrations import load
from lssupervisor.worker.migrator import Cancel, MigrateResult, ProgressFn, migrate, open_env

DEFAULT_TIMESTAMP = 1_700_000_000_000_000_000  # 2023-11-14, a fixed "old" time
DEFAULT_MAP_SIZE = 64 << 20

Scalar = bytes | str
Entry = Scalar | None | tuple[Scalar | None, int]
Data = Mapping[str, Mapping[Any, Entry]]  # keys: bytes or str (Mapping keys are invariant)
# {dbi: {key: (value or None for a tombstone, timestamp)}}
Dump = dict[str, dict[bytes, tuple[bytes | None, int]]]


def _b(x: Scalar) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


def lmdb_spec(
    path: str | os.PathLike[str],
    *,
    name: str = "main",
    native: bool = True,
    map_size: int = DEFAULT_MAP_SIZE,
    no_subdir: bool = False,
    max_dbs: int = 64,
) -> LmdbSpec:
    """An LmdbSpec for a test LMDB."""
    return LmdbSpec(
        name=name,
        path=os.fspath(path),
        no_subdir=no_subdir,
        map_size=map_size,
        max_dbs=max_dbs,
        native=native,
    )


def build_lmdb(
    path: str | os.PathLike[str] | LmdbSpec,
    data: Data,
    *,
    native: bool = True,
    name: str = "main",
    map_size: int = DEFAULT_MAP_SIZE,
    default_timestamp: int = DEFAULT_TIMESTAMP,
    marker: int | None = None,
    instance: str = "test",
    marker_dbi: str = DEFAULT_MARKER_DBI,
    shadow: bool = True,
) -> LmdbSpec:
    """Create (or add to) an LMDB from plain dicts; returns its LmdbSpec.

    ``marker``: stamp this instance at that schema version. ``shadow`` (shadow mode only): also write
    ``_sync_shadow_<dbi>`` as LS keeps it; False simulates data LS never saw.
    """
    spec = (
        path if isinstance(path, LmdbSpec) else lmdb_spec(path, name=name, native=native, map_size=map_size)
    )
    directory = Path(spec.path).parent if spec.no_subdir else Path(spec.path)
    directory.mkdir(parents=True, exist_ok=True)
    env = open_env(spec, create=True)
    try:
        with env.begin(write=True) as txn:
            txn_id = txn.id()
            for dbi, entries in data.items():
                db = open_dbi(env, txn, dbi, create=True)
                sdb = None if spec.native or not shadow else open_dbi(env, txn, shadow_name(dbi), create=True)
                for key, entry in entries.items():
                    if isinstance(entry, tuple):
                        raw_value, ts = entry
                    else:
                        raw_value, ts = entry, default_timestamp
                    value = None if raw_value is None else _b(raw_value)
                    headed = lsheader.encode(value or b"", ts, txn_id, deleted=value is None)
                    if spec.native:
                        txn.put(_b(key), headed, db=db)
                        continue
                    if value is not None:
                        txn.put(_b(key), value, db=db)
                    if sdb is not None:
                        txn.put(_b(key), headed, db=sdb)
        if marker is not None:
            _stamp(
                env, spec, marker, instance=instance, marker_dbi=marker_dbi, clock=lambda: default_timestamp
            )
    finally:
        env.close()
    return spec


def read_lmdb(
    spec: LmdbSpec,
    *,
    tombstones: bool = False,
    include_sync: bool = False,
    include_marker: bool = False,
    marker_dbi: str = DEFAULT_MARKER_DBI,
) -> Dump:
    """Every synced DBI as ``{dbi: {key: (value, timestamp)}}``.

    Native mode: values without header; tombstones (value None) only if ``tombstones``. Shadow mode:
    main values with the timestamp of their ``_sync_shadow_<dbi>`` entry (0 if none); shadow
    tombstones of keys absent from main appear with ``tombstones``. ``include_sync`` adds the raw
    ``_sync*`` DBIs (header parsed, as native).
    """
    env = open_env(spec, readonly=True)
    out: Dump = {}
    try:
        with env.begin() as txn:
            for dbi in dbi_names(env, txn):
                if dbi == marker_dbi and not include_marker:
                    continue
                is_sync = dbi.startswith(SYNC_PREFIX)
                if is_sync and not include_sync:
                    continue
                db = open_dbi(env, txn, dbi)
                entries: dict[bytes, tuple[bytes | None, int]] = {}
                cursor: Any = txn.cursor(db)
                if spec.native or is_sync:
                    for key, raw in cursor.iternext():
                        header, value = lsheader.parse(raw)
                        if header.deleted:
                            if tombstones:
                                entries[bytes(key)] = (None, header.timestamp)
                        else:
                            entries[bytes(key)] = (value, header.timestamp)
                else:
                    sdb = open_dbi(env, txn, shadow_name(dbi))
                    for key, value in cursor.iternext():
                        ts = 0
                        if sdb is not None:
                            raw = txn.get(key, db=sdb)
                            if raw is not None:
                                ts = lsheader.parse_header(raw).timestamp
                        entries[bytes(key)] = (bytes(value), ts)
                    if tombstones and sdb is not None:
                        for key, raw in txn.cursor(sdb).iternext():
                            header = lsheader.parse_header(raw)
                            if header.deleted and bytes(key) not in entries:
                                entries[bytes(key)] = (None, header.timestamp)
                out[dbi] = entries
    finally:
        env.close()
    return out


def read_values(spec: LmdbSpec, **kwargs: Any) -> dict[str, dict[bytes, bytes]]:
    """Like :func:`read_lmdb` but live values only, no timestamps."""
    return {
        dbi: {k: v for k, (v, _ts) in entries.items() if v is not None}
        for dbi, entries in read_lmdb(spec, **kwargs).items()
    }


def run_migrations(
    spec: LmdbSpec,
    migrations: str | os.PathLike[str],
    *,
    instance: str = "test",
    target: int | None = None,
    baseline: int | None = None,
    marker_dbi: str = DEFAULT_MARKER_DBI,
    clock: Clock | None = None,
    cancel: Cancel = None,
    progress: ProgressFn | None = None,
    grow_map: bool = False,
    lmdb_names: tuple[str, ...] | None = None,
    logger: logging.Logger | None = None,
) -> MigrateResult:
    """Load a migrations directory (or package) and run it against ``spec``, in this process."""
    found = load(migrations, lmdb_names or (spec.name,))
    env = open_env(spec)
    try:
        kwargs: dict[str, Any] = {}
        if clock is not None:
            kwargs["clock"] = clock
        return migrate(
            env,
            spec,
            found,
            instance=instance,
            target=target,
            baseline=baseline,
            marker_dbi=marker_dbi,
            cancel=cancel,
            progress=progress,
            grow_map=grow_map,
            logger=logger,
            **kwargs,
        )
    finally:
        env.close()


def read_marker_version(
    spec: LmdbSpec, instance: str = "test", marker_dbi: str = DEFAULT_MARKER_DBI
) -> int | None:
    """This instance's schema version in the LMDB (None when unmarked)."""
    from lssupervisor.worker.marker import read_marker

    env = open_env(spec, readonly=True)
    try:
        with env.begin() as txn:
            found = read_marker(env, txn, instance, native=spec.native, marker_dbi=marker_dbi)
            return None if found is None else found.version
    finally:
        env.close()


__all__ = [
    "DEFAULT_TIMESTAMP",
    "Dump",
    "build_lmdb",
    "lmdb_spec",
    "read_lmdb",
    "read_marker_version",
    "read_values",
    "run_migrations",
]

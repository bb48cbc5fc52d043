"""The schema version marker kept inside each LMDB, per instance.

Where: a synced DBI (default ``lssupervisor``), key ``schema_version/<instance>``. Because the DBI is
synced, every instance sees the whole fleet's versions in its own LMDB (:func:`read_markers`), and
because the key is per instance, another instance's migration never makes us believe we migrated.

Value: JSON ``{"version", "migration", "checksum", "time", "tool_version", "instance"}``.

- Native mode: behind an LS header, timestamp = the time of the write (strictly above the previous
  marker's, so LS never prefers an older marker).
- Shadow mode: plain JSON in the DBI (as every shadow-mode value), AND the same JSON behind a header in
  ``_sync_shadow_lssupervisor``, written with the same timestamp. LS compares main with shadow to find
  changes; writing both means LS sees "no local change" and ships our marker with our timestamp instead
  of stamping it with "now" (or its 1970 start-up timestamp) later.

The marker is written in the SAME write transaction as the step it records (invariant I3):
:func:`write_marker` takes the caller's transaction. :func:`stamp` is the operator's override in its own
transaction. Everything here takes explicit parameters (no daemon config).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import lmdb

from lssupervisor import __version__
from lssupervisor.errors import MigrationError, Remedy
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.worker import lsheader
from lssupervisor.worker.protocol import Marker

DEFAULT_MARKER_DBI = "lssupervisor"
KEY_PREFIX = b"schema_version/"
SYNC_PREFIX = "_sync"  # LS never syncs DBIs whose name starts with this
SHADOW_PREFIX = "_sync_shadow_"

Clock = Callable[[], int]  # ns since the epoch


def wall_clock_ns() -> int:
    return time.time_ns()


def marker_key(instance: str) -> bytes:
    return KEY_PREFIX + instance.encode()


def shadow_name(dbi: str) -> str:
    return SHADOW_PREFIX + dbi


def is_synced(dbi: str) -> bool:
    return not dbi.startswith(SYNC_PREFIX)


def marker_json(marker: Marker) -> bytes:
    """The marker's value as stored (the timestamp lives in the LS header, not in the JSON)."""
    data = asdict(marker)
    del data["timestamp"]
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def parse_marker(raw: bytes, timestamp: int, where: str) -> Marker:
    try:
        data: Any = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Marker(
            version=int(data["version"]),
            migration=str(data.get("migration", "")),
            checksum=str(data.get("checksum", "")),
            time=str(data.get("time", "")),
            tool_version=str(data.get("tool_version", "")),
            instance=str(data["instance"]),
            timestamp=timestamp,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise MigrationError(f"{where}: unreadable schema marker ({exc})", remedy=Remedy.STAMP) from exc


def new_marker(
    version: int, instance: str, timestamp: int, migration: str = "", checksum: str = ""
) -> Marker:
    when = datetime.fromtimestamp(timestamp / 1e9, tz=UTC).isoformat(timespec="milliseconds")
    return Marker(
        version=version,
        migration=migration,
        checksum=checksum,
        time=when.replace("+00:00", "Z"),
        tool_version=__version__,
        instance=instance,
        timestamp=timestamp,
    )


# ---------------------------------------------------------------------------------------------------
# DBIs


def dbi_names(env: lmdb.Environment, txn: lmdb.Transaction) -> list[str]:
    """Names of all named DBIs (keys of the unnamed DB that are sub-databases), sorted."""
    names: list[str] = []
    for key in txn.cursor().iternext(keys=True, values=False):
        try:
            name = bytes(key).decode()
        except UnicodeDecodeError:
            continue
        try:
            env.open_db(bytes(key), txn=txn, create=False)
        except lmdb.Error:
            continue  # a plain key in the unnamed DB, not a sub-database
        names.append(name)
    return names


def open_dbi(env: lmdb.Environment, txn: lmdb.Transaction, name: str, create: bool = False) -> Any | None:
    """The handle of DBI ``name`` inside ``txn`` (None if it does not exist and not ``create``).

    Always passes ``txn=``: opening a DBI without it inside a write transaction of the same thread
    starts a second write transaction and deadlocks.
    """
    try:
        return env.open_db(name.encode(), txn=txn, create=create)
    except lmdb.NotFoundError:
        return None


def has_user_data(env: lmdb.Environment, txn: lmdb.Transaction, marker_dbi: str = DEFAULT_MARKER_DBI) -> bool:
    """True if any synced DBI other than the marker DBI holds any entry (tombstones count: fail
    closed, a tombstone is history another instance may need)."""
    for name in dbi_names(env, txn):
        if not is_synced(name) or name == marker_dbi:
            continue
        db = open_dbi(env, txn, name)
        if db is not None and txn.stat(db)["entries"] > 0:
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# read


def _decode(raw: bytes, native: bool, where: str) -> tuple[bytes, int] | None:
    """(JSON, header timestamp) or None for a tombstone."""
    if not native:
        return raw, 0
    try:
        header, value = lsheader.parse(raw)
    except lsheader.HeaderError as exc:
        raise MigrationError(f"{where}: schema marker without a valid LS header ({exc})") from exc
    if header.deleted:
        return None
    return value, header.timestamp


def _shadow_timestamp(raw: bytes | memoryview, where: str, marker_dbi: str) -> int:
    """The timestamp of a marker's shadow copy (shadow mode), or one clear error line."""
    try:
        return lsheader.timestamp_of(raw)
    except lsheader.HeaderError as exc:
        raise MigrationError(
            f"{where}: its shadow copy in {shadow_name(marker_dbi)!r} has no valid LS header ({exc})",
            remedy=Remedy.STAMP,
        ) from exc


def _iter_markers(
    env: lmdb.Environment, txn: lmdb.Transaction, native: bool, marker_dbi: str
) -> Iterator[Marker]:
    db = open_dbi(env, txn, marker_dbi)
    if db is None:
        return
    shadow = None if native else open_dbi(env, txn, shadow_name(marker_dbi))
    cursor: Any = txn.cursor(db)
    if not cursor.set_range(KEY_PREFIX):
        return
    for key, raw in cursor.iternext():
        if not key.startswith(KEY_PREFIX):
            break
        where = f"DBI {marker_dbi!r} key {key.decode(errors='replace')!r}"
        decoded = _decode(raw, native, where)
        if decoded is None:
            continue
        value, ts = decoded
        if shadow is not None:
            shadow_raw = txn.get(key, db=shadow)
            if shadow_raw is not None:
                ts = _shadow_timestamp(shadow_raw, where, marker_dbi)
        yield parse_marker(value, ts, where)


def read_markers(
    env: lmdb.Environment, txn: lmdb.Transaction, *, native: bool, marker_dbi: str = DEFAULT_MARKER_DBI
) -> tuple[Marker, ...]:
    """Every instance's marker seen in this LMDB (the fleet view), ordered by instance."""
    return tuple(_iter_markers(env, txn, native, marker_dbi))


def read_marker(
    env: lmdb.Environment,
    txn: lmdb.Transaction,
    instance: str,
    *,
    native: bool,
    marker_dbi: str = DEFAULT_MARKER_DBI,
) -> Marker | None:
    """This instance's marker, or None when the LMDB is unmarked (for this instance)."""
    db = open_dbi(env, txn, marker_dbi)
    if db is None:
        return None
    key = marker_key(instance)
    raw = txn.get(key, db=db)
    if raw is None:
        return None
    raw = bytes(raw)
    where = f"DBI {marker_dbi!r} key {key.decode(errors='replace')!r}"
    decoded = _decode(raw, native, where)
    if decoded is None:
        return None
    value, ts = decoded
    if not native:
        shadow = open_dbi(env, txn, shadow_name(marker_dbi))
        shadow_raw = None if shadow is None else txn.get(key, db=shadow)
        if shadow_raw is not None:
            ts = _shadow_timestamp(shadow_raw, where, marker_dbi)
    marker = parse_marker(value, ts, where)
    if marker.instance != instance:
        raise MigrationError(f"{where}: marker names instance {marker.instance!r}", remedy=Remedy.STAMP)
    return marker


@dataclass(frozen=True, slots=True)
class MarkerState:
    """What a worker reports about one LMDB before planning."""

    lmdb: str
    marker: Marker | None  # this instance's
    markers: tuple[Marker, ...]  # every instance's (fleet view)
    has_user_data: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "lmdb": self.lmdb,
            "marker": asdict(self.marker) if self.marker else None,
            "markers": [asdict(m) for m in self.markers],
            "has_user_data": self.has_user_data,
        }


def read_state(
    env: lmdb.Environment, spec: LmdbSpec, instance: str, marker_dbi: str = DEFAULT_MARKER_DBI
) -> MarkerState:
    """Read this instance's marker, all markers and whether there is user data, in one read txn."""
    with env.begin(write=False) as txn:
        return MarkerState(
            lmdb=spec.name,
            marker=read_marker(env, txn, instance, native=spec.native, marker_dbi=marker_dbi),
            markers=read_markers(env, txn, native=spec.native, marker_dbi=marker_dbi),
            has_user_data=has_user_data(env, txn, marker_dbi),
        )


# ---------------------------------------------------------------------------------------------------
# write


# Kept whole: keyword-only: every field the marker records.
def write_marker(  # noqa: PLR0913
    env: lmdb.Environment,
    txn: lmdb.Transaction,
    *,
    instance: str,
    version: int,
    native: bool,
    clock: Clock = wall_clock_ns,
    migration: str = "",
    checksum: str = "",
    marker_dbi: str = DEFAULT_MARKER_DBI,
) -> Marker:
    """Write this instance's marker inside the caller's write transaction (same txn as the step)."""
    db = open_dbi(env, txn, marker_dbi, create=True)
    key = marker_key(instance)
    shadow = None if native else open_dbi(env, txn, shadow_name(marker_dbi), create=True)
    previous = 0
    old = txn.get(key, db=db if native else shadow)
    if old is not None:
        try:
            previous = lsheader.timestamp_of(old)
        except lsheader.HeaderError:
            previous = 0  # an unreadable old marker is replaced; nothing to keep from it
    # Strictly newer than the marker it replaces, so LS never keeps the old one on merge.
    timestamp = max(clock(), previous + 1)
    marker = new_marker(version, instance, timestamp, migration, checksum)
    payload = marker_json(marker)
    headed = lsheader.encode(payload, timestamp, txn.id())
    if native:
        txn.put(key, headed, db=db)
    else:
        txn.put(key, payload, db=db)
        txn.put(key, headed, db=shadow)
    return marker


def stamp_if_empty(
    env: lmdb.Environment,
    spec: LmdbSpec,
    version: int,
    *,
    instance: str,
    marker_dbi: str = DEFAULT_MARKER_DBI,
    clock: Clock = wall_clock_ns,
) -> Marker | None:
    """Stamp ``version`` only if, inside the stamping write transaction, the LMDB still has no user
    data and no marker of ours; None when it has. Checking in an earlier read transaction would let
    the application commit in between, and its data would be marked with a version it is not at."""
    with env.begin(write=True) as txn:
        if has_user_data(env, txn, marker_dbi):
            return None
        if read_marker(env, txn, instance, native=spec.native, marker_dbi=marker_dbi) is not None:
            return None
        return write_marker(
            env,
            txn,
            instance=instance,
            version=version,
            native=spec.native,
            clock=clock,
            marker_dbi=marker_dbi,
        )


def stamp(
    env: lmdb.Environment,
    spec: LmdbSpec,
    version: int,
    *,
    instance: str,
    marker_dbi: str = DEFAULT_MARKER_DBI,
    clock: Clock = wall_clock_ns,
    migration: str = "",
    checksum: str = "",
) -> Marker:
    """Set this instance's marker to ``version`` without running anything (``lssupervisor stamp N``).

    The caller decides whether ``version`` is sensible (known migrations, operator intent).
    """
    if version < 0:
        raise MigrationError(f"LMDB {spec.name!r}: cannot stamp negative version {version}")
    with env.begin(write=True) as txn:
        return write_marker(
            env,
            txn,
            instance=instance,
            version=version,
            native=spec.native,
            clock=clock,
            migration=migration,
            checksum=checksum,
            marker_dbi=marker_dbi,
        )

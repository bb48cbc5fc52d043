"""LS snapshot object names (LS ``snapshot/name.go`` ``ParseName``), read-only.

``<db>__<instance>__<YYYYMMDD-HHMMSS-nnnnnnnnn>__<generation>[__extra...].pb.gz``, the timestamp in
UTC. A name LS would skip as invalid is None here, so listings count exactly what LS loads.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

EXTENSION = "pb.gz"
_TS_LEN = len("20060102-150405-000000000")


@dataclass(frozen=True, slots=True)
class SnapshotName:
    db: str
    instance: str
    timestamp_ns: int
    generation: str


def parse(name: str) -> SnapshotName | None:
    """The parts of an LS snapshot name, or None for anything LS would not load as a snapshot."""
    basename, dot, ext = name.partition(".")
    if not dot or ext != EXTENSION or "/" in name:
        return None
    parts = basename.split("__")
    if len(parts) < 4:
        return None
    tss = parts[2]
    if len(tss) != _TS_LEN or tss[15] != "-" or not tss[16:].isdigit():
        return None
    try:
        base = time.strptime(tss[:15], "%Y%m%d-%H%M%S")
    except ValueError:
        return None
    ts_ns = calendar.timegm(base) * 1_000_000_000 + int(tss[16:])
    return SnapshotName(db=parts[0], instance=parts[1], timestamp_ns=ts_ns, generation=parts[3])

"""The fleet as the storage shows it: per version, per instance, how many snapshots and how fresh.

Pure: a :class:`~lssupervisor.storage.backend.Listing` and the time in, the report out. The document
(``lssupervisor fleet --storage --json``, the daemon's ``/fleet``)::

    {"versions": {"<N>": {"instances": {"<instance>": {"snapshots": int, "newest": "ISO-8601",
                                                        "age_s": float}}}},
     "stragglers": ["<instance>", ...], "stale": ["<instance>", ...]}

- An instance's *current* version is the one holding its newest snapshot (LS writes only to the
  location its config names, so that is where it syncs now).
- A **straggler**'s current version is below the highest version any instance is on.
- A **stale** instance has written no snapshot, anywhere, for longer than ``stale_after``.

Snapshot times come from the names LS gives them (the writer's clock); objects that are not LS
snapshots (an ``update-marker``, a ``.tmp``) are not counted.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lssupervisor.storage import names
from lssupervisor.storage.backend import Listing


@dataclass(frozen=True, slots=True)
class InstanceAtVersion:
    snapshots: int
    newest_ns: int


@dataclass(frozen=True, slots=True)
class FleetReport:
    now: float
    versions: dict[int, dict[str, InstanceAtVersion]]
    stragglers: tuple[str, ...]
    stale: tuple[str, ...]
    current: dict[str, int] = field(default_factory=dict)  # instance -> version of its newest snapshot

    @property
    def highest(self) -> int | None:
        used = [v for v, insts in self.versions.items() if insts]
        return max(used) if used else None

    def counts(self) -> dict[int, int]:
        """Per version: instances whose newest snapshot is there (the metric's value)."""
        out = dict.fromkeys(self.versions, 0)
        for version in self.current.values():
            out[version] = out.get(version, 0) + 1
        return out

    def document(self) -> dict[str, Any]:
        return {
            "versions": {
                str(v): {
                    "instances": {
                        inst: {
                            "snapshots": at.snapshots,
                            "newest": iso_ns(at.newest_ns),
                            "age_s": round(max(0.0, self.now - at.newest_ns / 1e9), 3),
                        }
                        for inst, at in sorted(insts.items())
                    }
                }
                for v, insts in sorted(self.versions.items())
            },
            "stragglers": list(self.stragglers),
            "stale": list(self.stale),
        }


def iso_ns(ns: int) -> str:
    stamp = _dt.datetime.fromtimestamp(ns / 1e9, _dt.UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def report(listing: Listing, now: float, stale_after: float, ignore: Iterable[str] = ()) -> FleetReport:
    """The fleet of ``listing`` at wall time ``now`` (epoch seconds)."""
    skip = set(ignore)
    versions: dict[int, dict[str, InstanceAtVersion]] = {}
    newest: dict[str, tuple[int, int]] = {}  # instance -> (timestamp ns, version)
    for version, objs in listing.versions.items():
        per: dict[str, list[int]] = {}
        for obj in objs:
            parsed = names.parse(obj.name)
            if parsed is None or parsed.instance in skip:
                continue
            per.setdefault(parsed.instance, []).append(parsed.timestamp_ns)
        versions[version] = {inst: InstanceAtVersion(len(ts), max(ts)) for inst, ts in per.items()}
        for inst, at in versions[version].items():
            # Equal times (a copy?) count for the higher version: it is where LS writes now.
            if inst not in newest or (at.newest_ns, version) > newest[inst]:
                newest[inst] = (at.newest_ns, version)
    current = {inst: v for inst, (_, v) in sorted(newest.items())}
    highest = max(current.values()) if current else None
    stragglers = tuple(inst for inst, v in current.items() if highest is not None and v < highest)
    stale = tuple(inst for inst, (ts, _) in sorted(newest.items()) if now - ts / 1e9 > stale_after)
    return FleetReport(now=now, versions=versions, stragglers=stragglers, stale=stale, current=current)


def table(rep: FleetReport) -> str:
    """The readable form: one row per version and instance, then the stragglers and stale ones."""
    rows: list[list[str]] = []
    for v, insts in sorted(rep.versions.items()):
        if not insts:
            rows.append([str(v), "-", "0", "-", "-", ""])
        for inst, at in sorted(insts.items()):
            notes = []
            if rep.current.get(inst) == v:
                notes.append("current")
            if inst in rep.stragglers and rep.current.get(inst) == v:
                notes.append("STRAGGLER")
            if inst in rep.stale and rep.current.get(inst) == v:
                notes.append("STALE")
            rows.append([
                str(v), inst, str(at.snapshots), iso_ns(at.newest_ns),
                _age(rep.now - at.newest_ns / 1e9), ", ".join(notes),
            ])
    head = ["VERSION", "INSTANCE", "SNAPSHOTS", "NEWEST", "AGE", "NOTE"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    if not rep.versions:
        lines.append("(no version location found in the storage)")
    lines.append(f"stragglers: {', '.join(rep.stragglers) or 'none'}")
    lines.append(f"stale: {', '.join(rep.stale) or 'none'}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"

"""Retiring old version locations: plan (with every refusal), then delete in batches.

Refusals, each one line naming the instance or object (``Refused``, exit 77), checked before anything
is deleted:

- ``below`` above the version this instance's LMDB has: prune never deletes the location this
  instance syncs (nor one it would still need);
- an instance whose newest snapshot is under a version below ``below`` (a straggler below N: it still
  syncs there) unless the operator names it as gone (``ignore``);
- an object under a version below ``below`` younger than ``grace``: someone wrote there recently.

:func:`run` deletes version by version, :data:`~lssupervisor.storage.backend.MAX_BATCH` (or fewer)
objects per request. A batch that fails stops the run; the :class:`Outcome` says what was deleted and
what was not, and a rerun (which lists again) deletes the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lssupervisor.errors import Refused, StorageError, UsageError
from lssupervisor.storage import fleet, names
from lssupervisor.storage.backend import MAX_BATCH, Backend, Listing, StoredObject


@dataclass(frozen=True, slots=True)
class VersionPlan:
    version: int
    location: str
    objects: tuple[StoredObject, ...]

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.objects)


@dataclass(frozen=True, slots=True)
class Plan:
    below: int
    versions: tuple[VersionPlan, ...]

    @property
    def objects(self) -> int:
        return sum(len(v.objects) for v in self.versions)

    @property
    def bytes(self) -> int:
        return sum(v.bytes for v in self.versions)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s % 3600 == 0 and s:
        return f"{s // 3600}h"
    if s % 60 == 0 and s:
        return f"{s // 60}m"
    return f"{seconds:g}s"


def plan(
    listing: Listing,
    *,
    below: int,
    lmdb_version: int | None,
    now: float,
    grace: float,
    describe: Callable[[int], str],
    ignore: Iterable[str] = (),
) -> Plan:
    """What ``prune --below`` would delete, or Refused naming why not (nothing is deleted then)."""
    if below < 1:
        raise UsageError(f"prune --below {below}: expected a schema version >= 1")
    if lmdb_version is None:
        raise Refused(
            f"prune --below {below}: this instance's LMDB has no schema marker; prune runs on an instance "
            "that is migrated (run it where `lssupervisor status` shows the version)"
        )
    if below > lmdb_version:
        raise Refused(
            f"prune --below {below}: this instance's LMDB is at version {lmdb_version}; N must not be above "
            f"it (version {lmdb_version} is what this instance syncs): run prune on a migrated instance, or "
            f"lower N"
        )
    skip = set(ignore)
    rep = fleet.report(listing, now, stale_after=float("inf"), ignore=skip)
    for inst, version in sorted(rep.current.items(), key=lambda kv: (kv[1], kv[0])):
        if version < below:
            at = rep.versions[version][inst]
            raise Refused(
                f"prune --below {below}: instance {inst} still syncs version {version} (newest snapshot "
                f"{fleet.iso_ns(at.newest_ns)}, in {describe(version)}); wait until it runs version "
                f">= {below} (`lssupervisor fleet --storage`), or pass --ignore-instance {inst} if it is "
                "gone for good"
            )
    out: list[VersionPlan] = []
    for version, objs in sorted(listing.versions.items()):
        if version >= below:
            continue
        for obj in objs:
            parsed = names.parse(obj.name)
            written = max(obj.modified, parsed.timestamp_ns / 1e9 if parsed else 0.0)
            age = now - written
            if age < grace:
                who = f" (instance {parsed.instance})" if parsed else ""
                raise Refused(
                    f"prune --below {below}: {obj.name}{who} in {describe(version)} was written "
                    f"{max(0, int(age))}s ago, within --grace {_duration(grace)}; something still writes "
                    "there: find it with `lssupervisor fleet --storage`, wait, or lower --grace"
                )
        out.append(VersionPlan(version, describe(version), tuple(objs)))
    return Plan(below, tuple(out))


@dataclass(slots=True)
class Outcome:
    deleted: dict[int, list[str]] = field(default_factory=dict)
    failed: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    not_attempted: dict[int, list[str]] = field(default_factory=dict)
    error: str | None = None  # the failure that stopped the run

    @property
    def complete(self) -> bool:
        return self.error is None and not any(self.failed.values()) and not any(self.not_attempted.values())

    def count(self, what: dict[int, list[Any]]) -> int:
        return sum(len(v) for v in what.values())


def run(
    backend: Backend,
    the_plan: Plan,
    *,
    batch: int = MAX_BATCH,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> Outcome:
    """Delete the plan's objects, ``batch`` per request, oldest version first. ``on_batch(version,
    deleted_so_far, total)`` after each batch. Stops at the first batch that fails as a whole."""
    batch = max(1, min(batch, MAX_BATCH))
    out = Outcome()
    total = the_plan.objects
    done = 0
    pending = [(v.version, [o.name for o in v.objects]) for v in the_plan.versions]
    for index, (version, todo) in enumerate(pending):
        out.deleted.setdefault(version, [])
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            try:
                result = backend.delete(version, chunk)
            except StorageError as exc:
                out.error = str(exc)
                out.not_attempted[version] = todo[start:]
                for later, names_left in pending[index + 1 :]:
                    out.not_attempted[later] = list(names_left)
                return out
            out.deleted[version].extend(result.deleted)
            if result.failed:
                out.failed.setdefault(version, []).extend(result.failed)
            done += len(result.deleted)
            if on_batch is not None:
                on_batch(version, done, total)
    return out

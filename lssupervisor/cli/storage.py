"""``fleet --storage`` and ``prune``: the fleet as the shared storage shows it, and retiring old versions.

Both read the storage with LS's own options and credentials (the template rendered in the environment
LS would get; nothing is written to a file). ``fleet --storage`` only lists. ``prune --below N``:

1. lists the storage and reads this instance's schema version (a worker, read-only);
2. plans, refusing (exit 77, one line naming the instance or object) while any instance is a straggler
   below N, any object to delete is younger than ``--grace``, or N is above this instance's version;
3. finds the DBIs that ``new-dbi`` migrations up to N replaced (``REPLACES``) and, when some still
   hold entries, refuses while any instance's synced marker is below N;
4. without ``--yes``: prints what it would delete (objects and bytes per version, entries and bytes per
   DBI) and exits 0;
5. with ``--yes``: tombstones the replaced DBIs first (a worker, with the daemon's lock held: refused
   while the daemon runs, I4), then deletes the objects in batches. A failure half-way prints what was
   and was not deleted and exits 74; a rerun finishes the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from lssupervisor.config import Config, load_config
from lssupervisor.durations import parse_seconds as parse_duration
from lssupervisor.errors import ExitCode, LockHeld, Refused, UsageError
from lssupervisor.storage import fleet, location
from lssupervisor.storage import prune as pruning
from lssupervisor.storage.backend import Backend


def _duration(text: str, flag: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a duration like 24h, 30m or 90s") from None


def open_storage(cfg: Config) -> Backend:
    """The backend of ``cfg``'s storage, credentials from this process's environment (as LS gets them)."""
    return location.open_backend(location.layout_for(cfg, os.environ), timeout=float(cfg.fleet.timeout))


def cmd_fleet(args: argparse.Namespace) -> int:
    if not args.storage:
        from lssupervisor.cli.offline import cmd_fleet as markers_fleet

        return markers_fleet(args)
    cfg = load_config(args.config)
    stale = _duration(args.stale_after, "--stale-after") if args.stale_after else float(cfg.fleet.stale_after)
    backend = open_storage(cfg)
    try:
        rep = fleet.report(backend.list_versions(), time.time(), stale)
    finally:
        backend.close()
    if args.json:
        print(json.dumps(rep.document(), indent=2, sort_keys=True))
    else:
        print(f"storage: {backend.describe()}")
        print(fleet.table(rep))
    return int(ExitCode.OK)


# ---------------------------------------------------------------------------------------------------
# prune


def _replaced(cfg: Config, lmdbs: list[str], below: int) -> list[tuple[str, str, str]]:
    """(lmdb, dbi, migration) for every DBI replaced by a new-dbi migration at a version <= below."""
    from lssupervisor.worker import migrations

    source = cfg.migrations.package or cfg.migrations.path
    if source is None:
        return []
    found = migrations.discover(source, lmdbs)
    return [(m.lmdb, dbi, m.name) for m in found.migrations if m.version <= below for dbi in m.replaces]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def cmd_prune(args: argparse.Namespace) -> int:
    from lssupervisor.cli.offline import _call, _guarded, _load, locked
    from lssupervisor.worker import client
    from lssupervisor.worker import protocol as p

    below = int(args.below)
    grace = _duration(args.grace, "--grace")
    ignore = list(args.ignore_instance)
    cfg, view = _load(args)
    settings = client.settings(cfg, view)

    # 1. this instance's version (read-only; fine while the daemon runs)
    markers = _call(cfg, p.MarkersRequest(settings), p.MarkersResult)
    versions = [s.version for s in markers.lmdbs if s.exists]
    lmdb_version = None if not versions or None in versions else min(v for v in versions if v is not None)

    # 2. the storage plan, with its refusals
    backend = open_storage(cfg)
    try:
        listing = backend.list_versions()
        plan = pruning.plan(
            listing, below=below, lmdb_version=lmdb_version, now=time.time(), grace=grace,
            describe=backend.describe, ignore=ignore,
        )

        # 3. DBIs replaced up to N
        replaced = _replaced(cfg, [s.name for s in view.lmdbs], below)
        retire = [p.RetireDbi(lmdb, dbi, mig) for lmdb, dbi, mig in replaced]
        counted: p.RetireResult | None = None
        if retire:
            counted = _call(cfg, p.RetireRequest(settings, tuple(retire), dry_run=True), p.RetireResult)
            if any(d.entries for d in counted.dbis):
                seen = _call(cfg, p.FleetRequest(settings), p.FleetResult)
                for entry in seen.lmdbs:
                    for m in sorted(entry.markers, key=lambda m: (m.version, m.instance)):
                        if m.instance not in ignore and m.version < below:
                            names = ", ".join(sorted({d.dbi for d in counted.dbis if d.entries}))
                            raise Refused(
                                f"prune --below {below}: instance {m.instance}'s synced marker (LMDB "
                                f"{entry.lmdb}) says version {m.version}; it still reads DBI(s) {names} that "
                                f"migrations up to {below} replaced: wait until it is migrated, or pass "
                                f"--ignore-instance {m.instance} if it is gone for good"
                            )

        if not args.yes:
            _print_plan(args, plan, counted, dry_run=True)
            return int(ExitCode.OK)

        # 5. retire DBIs (daemon stopped, lock held), then delete objects
        retired: p.RetireResult | None = counted
        if counted is not None and any(d.entries for d in counted.dbis):
            try:
                with locked(cfg, view, "prune") as fds:
                    request = p.RetireRequest(settings, tuple(retire), dry_run=False)
                    retired = _guarded(cfg, request, p.RetireResult, fds)
            except LockHeld as exc:
                raise LockHeld(
                    f"prune --below {below}: the replaced DBI(s) must be tombstoned in this instance's LMDB, "
                    f"which the running daemon holds (pid {exc.holder_pid}); stop it (`systemctl stop "
                    "lssupervisor`), rerun prune --yes, start it: LS then syncs the deletions to every "
                    "instance (nothing was deleted)",
                    holder_pid=exc.holder_pid,
                ) from None

        def progress(version: int, done: int, total: int) -> None:
            print(f"prune: version {version}: {done}/{total} object(s) deleted", file=sys.stderr)

        outcome = pruning.run(backend, plan, on_batch=progress)
    finally:
        backend.close()
    _print_plan(args, plan, retired, dry_run=False, outcome=outcome)
    if not outcome.complete:
        left = outcome.count(outcome.failed) + outcome.count(outcome.not_attempted)
        failures = [f"{n}: {r}" for fails in outcome.failed.values() for n, r in fails[:3]]
        why = outcome.error or "; ".join(failures)
        print(
            f"lssupervisor: error: prune --below {below}: {left} object(s) not deleted ({why}); "
            f"rerun `lssupervisor prune --below {below} --yes` to finish",
            file=sys.stderr,
        )
        return int(ExitCode.STORAGE)
    return int(ExitCode.OK)


def _print_plan(
    args: argparse.Namespace,
    plan: pruning.Plan,
    retire: Any,
    *,
    dry_run: bool,
    outcome: pruning.Outcome | None = None,
) -> None:
    dbis = list(retire.dbis) if retire is not None else []
    if args.json:
        doc: dict[str, Any] = {
            "below": plan.below,
            "dry_run": dry_run,
            "versions": {
                str(v.version): {
                    "location": v.location,
                    "objects": len(v.objects),
                    "bytes": v.bytes,
                    **(
                        {
                            "deleted": len(outcome.deleted.get(v.version, [])),
                            "failed": [
                                {"name": n, "reason": r} for n, r in outcome.failed.get(v.version, [])
                            ],
                            "not_attempted": len(outcome.not_attempted.get(v.version, [])),
                        }
                        if outcome is not None
                        else {}
                    ),
                }
                for v in plan.versions
            },
            "dbis": [
                {"lmdb": d.lmdb, "dbi": d.dbi, "replaced_by": d.replaced_by, "exists": d.exists,
                 "entries": d.entries, "bytes": d.bytes, "tombstoned": d.tombstoned}
                for d in dbis
            ],
            "complete": None if outcome is None else outcome.complete,
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    verb = "would delete" if dry_run else "deleted"
    if not plan.versions:
        print(f"prune --below {plan.below}: no version below {plan.below} in the storage")
    for v in plan.versions:
        done = "" if outcome is None else f" ({len(outcome.deleted.get(v.version, []))} deleted)"
        print(f"version {v.version}: {len(v.objects)} object(s), {_size(v.bytes)} in {v.location}{done}")
    for d in dbis:
        if not d.exists:
            print(f"DBI {d.dbi} (LMDB {d.lmdb}, replaced by {d.replaced_by}): not in this LMDB")
            continue
        what = f"{d.entries} live entr{'y' if d.entries == 1 else 'ies'}, {_size(d.bytes)}"
        tomb = "" if dry_run else f", {d.tombstoned} tombstoned"
        print(f"DBI {d.dbi} (LMDB {d.lmdb}, replaced by {d.replaced_by}): {what}{tomb}")
    total = f"{plan.objects} object(s), {_size(plan.bytes)}"
    if dry_run:
        print(f"prune: {verb} {total}; nothing was deleted (dry run): add --yes to delete")
    elif outcome is not None and outcome.complete:
        print(f"prune: {verb} {total}")


__all__ = ["cmd_fleet", "cmd_prune", "open_storage"]

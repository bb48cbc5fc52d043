"""Offline migration commands: ``plan``, ``migrate``, ``stamp``, ``history``, ``backups``, ``rollback``,
``fleet``.

``migrate``, ``stamp`` and ``rollback`` work while the daemon is NOT running: each takes the daemon's
own lock (``lssupervisor.daemon.lock``: the state-dir flock plus one per LMDB) and refuses, naming the
daemon's pid, when the daemon holds it; it also refuses when a Lightning Stream process has an LMDB
open. ``plan``, ``fleet``, ``history``, ``backups`` and ``migrate --dry-run`` only read and take no
lock. The LMDB work itself runs in the same worker process the daemon uses (``python -m
lssupervisor.worker``), so there is one implementation of every operation. Progress goes to stderr;
results to stdout (a readable table, or JSON with ``--json``). Errors are one line with the exit code
from ``lssupervisor.errors``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from lssupervisor import fsutil, trust
from lssupervisor.config import Config, load_config, resolve_target
from lssupervisor.errors import (
    LightningStreamRunning,
    LockHeld,
    SupervisorError,
    UsageError,
)
from lssupervisor.lsmodel import LsView
from lssupervisor.proc import describe_pid
from lssupervisor.worker import backupdir, client, history, migrations
from lssupervisor.worker import protocol as p
from lssupervisor.worker.migrations import MigrationSet
from lssupervisor.worker.wire import to_wire

# Names a Lightning Stream process goes by (the real binary, and the test stand-in).
_LS_NAMES = ("lightningstream",)


# ---------------------------------------------------------------------------------------------------
# shared plumbing


def _load(args: argparse.Namespace) -> tuple[Config, LsView]:
    from lssupervisor.lsconfig import render as lsconfig

    cfg = load_config(args.config)
    # What these commands run (migrations, as root perhaps) is decided by these files: trust first (I8).
    trust.require(trust.check_inputs(cfg, os.environ))
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, os.environ))
    return cfg, view


def refusal_advice(purpose: str, command: str) -> str:
    """What to do when the daemon holds the lock, for each offline command: only `migrate` is something
    the running daemon does itself; it never stamps and never rolls back."""
    if purpose == "migrate":
        return (
            "offline commands run only while the daemon is stopped; a running daemon migrates by itself "
            "(it watches the migrations; `lssupervisor reconcile` makes it plan now)"
        )
    return (
        "offline commands run only while the daemon is stopped: stop it (e.g. `systemctl stop "
        f"lssupervisor`), run `{command}` again, then start it"
        + (" (the rollback's output says how to keep the daemon from migrating forward again)"
           if purpose == "rollback" else "")
    )


@contextlib.contextmanager
def locked(cfg: Config, view: LsView, purpose: str, command: str | None = None) -> Iterator[Sequence[int]]:
    """Hold the daemon's own locks (state dir + every LMDB) for an offline command; yields the fds to
    pass to the worker, so the lock lives exactly as long as both of us. Refuses with LockHeld naming
    the holder's pid when the daemon (or another command) holds it; ``command`` is the command line to
    run again once it is stopped (default: ``lssupervisor <purpose>``)."""
    from lssupervisor.daemon import lock

    try:
        held = lock.acquire(cfg, view.lmdbs, purpose)
    except LockHeld as exc:
        raise LockHeld(
            f"lssupervisor {purpose}: {exc}; {refusal_advice(purpose, command or f'lssupervisor {purpose}')}",
            holder_pid=exc.holder_pid,
        ) from None
    with held:
        yield (held.fileno(),)


R = TypeVar("R")


def _call(
    cfg: Config,
    request: p.Request,
    expected: type[R],
    fds: Sequence[int] = (),
    *,
    on_reply: _Progress | None = None,
    timeout: float | None = None,
) -> R:
    """One request in its own worker; its failure becomes the matching SupervisorError. Every worker
    opens an LMDB, so each one starts above ``lightningstream.min_pid`` (the PID-keyed lock table)."""
    return client.call(
        request, expected, on_reply, timeout=timeout, min_pid=cfg.lightningstream.min_pid, pass_fds=fds
    )


def _looks_like_ls(name: str, cmdline: Sequence[str]) -> bool:
    text = " ".join(cmdline)
    return any(n in name or n in text for n in _LS_NAMES)


def refuse_if_ls_runs(result: p.ReadersResult) -> None:
    """Refuse when a Lightning Stream process has one of the LMDBs open (the daemon may be gone but
    its LS not, or someone started LS by hand)."""
    for entry in result.lmdbs:
        for reader in entry.readers:
            if reader.alive and _looks_like_ls(reader.name, reader.cmdline):
                raise LightningStreamRunning(
                    f"LMDB {entry.lmdb!r}: Lightning Stream pid {reader.pid} has it open; stop it "
                    "before migrating (LS must never run during a migration)"
                )
        holder = entry.open_by_pid
        if holder:
            info = describe_pid(holder)
            if info["alive"] and _looks_like_ls(str(info["name"]), [str(c) for c in info["cmdline"]]):
                raise LightningStreamRunning(
                    f"LMDB {entry.lmdb!r}: Lightning Stream pid {holder} has it open; stop it first"
                )


def _guarded(
    cfg: Config,
    request: p.Request,
    expected: type[R],
    fds: Sequence[int],
    *,
    on_reply: _Progress | None = None,
    timeout: float | None = None,
) -> R:
    """``request`` once no LS has an LMDB open: the readers check and the write run in ONE worker,
    the write sent only after the check passed."""
    with client.Conversation(on_reply, min_pid=cfg.lightningstream.min_pid, pass_fds=fds) as worker:
        refuse_if_ls_runs(worker.ask(p.ReadersRequest(request.settings), p.ReadersResult))
        return worker.ask(request, expected, timeout)


class _Progress:
    """Progress and worker logs on stderr, one line per event, throttled by the worker."""

    def __init__(self, out: TextIO, quiet_logs: bool = False) -> None:
        self.out = out
        self.quiet_logs = quiet_logs

    def __call__(self, reply: p.Reply) -> None:
        body = reply.body
        if isinstance(body, p.Progress):
            print(p.describe(body), file=self.out, flush=True)
        elif isinstance(body, p.LogLine) and not self.quiet_logs and body.level in ("warning", "error"):
            print(f"lssupervisor: {body.level}: {body.msg}", file=self.out, flush=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ---------------------------------------------------------------------------------------------------
# commands


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    target = resolve_target(cfg, args.to)
    # Read-only (LMDB readers never block anyone): no lock, works while the daemon runs too.
    result = _call(cfg, p.PlanRequest(client.settings(cfg, view), target), p.PlanResult)
    if args.json:
        _print_json(to_wire(result))
        return 0
    print(
        _table(
            ["LMDB", "MARKER", "FROM", "TARGET", "ACTION"],
            [[pl.lmdb, pl.marker_version, pl.current, result.target, pl.action.value] for pl in result.lmdbs],
        )
    )
    if result.steps:
        print()
        print(
            _table(
                ["#", "LMDB", "FROM", "TO", "MIGRATION", "STRATEGY", "DESCRIPTION"],
                [
                    [i, s.lmdb, s.from_version, s.to_version, s.migration, s.strategy, s.description]
                    for i, s in enumerate(result.steps, start=1)
                ],
            )
        )
    else:
        print("\nnothing to migrate")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    target = resolve_target(cfg, args.to)
    settings = client.settings(cfg, view, backup_enabled=False if args.no_backup else None)
    # The worker cancels itself at migrations.timeout; the extra time is the backstop for a hang.
    timeout = None if cfg.migrations.timeout is None else cfg.migrations.timeout + 30.0
    if args.dry_run:
        # No lock, so a dry run of a live instance works while the daemon and LS run: the worker opens
        # the live LMDB read-only (MDB_RDONLY), takes a compact copy under one read transaction (which
        # blocks no writer), runs the plan on the copy in a private .dryrun-*.partial directory and
        # deletes it. It writes nothing to the live LMDB, the history or the backups.
        request = p.DryRunRequest(settings, target)
        dry = _call(cfg, request, p.DryRunResult, on_reply=_Progress(sys.stderr), timeout=timeout)
        if args.json:
            _print_json(to_wire(dry))
            return 0
        print(
            _table(
                ["LMDB", "STEPS", "KEYS", "BYTES", "SECONDS", "LIVE TXN BEFORE", "LIVE TXN AFTER"],
                [
                    [
                        e.lmdb,
                        len(e.steps),
                        e.keys,
                        e.bytes,
                        e.duration_s,
                        e.live_last_txnid_before,
                        e.live_last_txnid_after,
                    ]
                    for e in dry.lmdbs
                ],
            )
        )
        print(f"\ndry run to version {dry.target} on a copy; the dry run did not write the live LMDBs")
        if dry.live_changed_by_others:
            print(
                f"note: {', '.join(dry.live_changed_by_others)} changed meanwhile: LS or the application "
                "wrote to it while the copy was taken (the dry run opens the live LMDB read-only)"
            )
        return 0
    with locked(cfg, view, "migrate", "lssupervisor migrate") as fds:
        migrate = p.MigrateRequest(settings, target)
        done = _guarded(cfg, migrate, p.MigrateDone, fds, on_reply=_Progress(sys.stderr), timeout=timeout)
    if args.json:
        _print_json(to_wire(done))
        return 0
    rows = []
    for e in done.lmdbs:
        keys = sum(s.puts + s.deletes + s.copied + s.raw_writes for s in e.steps)
        before = e.before.version if e.before else None
        after = e.after.version if e.after else None
        rows.append([e.lmdb, before, after, len(e.steps), keys, e.stamped or ""])
    print(_table(["LMDB", "BEFORE", "AFTER", "STEPS", "KEYS", "STAMPED"], rows))
    backup_note = f"backup {done.backup_id}" if done.backup_id else "no backup taken"
    print(f"\nmigrated to version {done.target} in {done.duration_s}s ({backup_note})")
    print("the daemon renders the LS config for the new version at its next start")
    return 0


def cmd_stamp(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    if args.version < 0:
        raise UsageError(f"stamp: version must be >= 0, got {args.version}")
    again = f"lssupervisor stamp {args.version}" + (f" --lmdb {args.lmdb}" if args.lmdb else "")
    with locked(cfg, view, "stamp", again) as fds:
        request = p.StampRequest(client.settings(cfg, view), version=args.version, lmdb=args.lmdb)
        result = _guarded(cfg, request, p.StampResult, fds, on_reply=_Progress(sys.stderr))
    for e in result.lmdbs:
        was = e.from_version if e.from_version is not None else "unmarked"
        print(f"stamped LMDB {e.lmdb}: {was} -> {e.to_version}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:

    cfg = load_config(args.config)
    hist = history.read(cfg.history_file)
    if hist.torn_lines:
        print(
            f"lssupervisor: warning: {cfg.history_file}: skipped line(s) {list(hist.torn_lines)} torn by a "
            "crash while appending",
            file=sys.stderr,
        )
    if args.json:
        _print_json([e.to_json() for e in hist.entries])
        return 0
    if not hist.entries:
        print(f"no history yet ({cfg.history_file})")
        return 0
    print(
        _table(
            ["END", "KIND", "LMDB", "FROM", "TO", "MIGRATION", "RESULT", "KEYS", "BACKUP"],
            [
                [
                    e.end,
                    e.kind.value,
                    e.lmdb,
                    e.from_version,
                    e.to_version,
                    e.migration,
                    e.result.value,
                    e.keys,
                    e.backup_id,
                ]
                for e in hist.entries
            ],
        )
    )
    return 0


def cmd_backups(args: argparse.Namespace) -> int:

    cfg = load_config(args.config)
    # Listing reads only manifests (no LMDB is opened), so it needs neither the lock nor a worker.
    found = backupdir.list_backups(cfg.backup_dir)
    # The newest backup of each version is its restore point: retention never deletes it (I9).
    points = backupdir.restore_points(found)
    if args.json:
        _print_json([{**b.manifest.to_json(), "restore_point": b.id in points} for b in found])
        return 0
    if not found:
        print(f"no backups in {cfg.backup_dir}")
        return 0
    print(
        _table(
            ["ID", "TIME", "VERSION", "SIZE", "LMDBS", "RESTORE POINT", "REASON"],
            [
                [
                    b.id,
                    b.manifest.time,
                    b.manifest.schema_version,
                    _size(b.manifest.size),
                    ",".join(x.name for x in b.manifest.lmdbs),
                    _restore_point(points, b.id),
                    b.manifest.reason,
                ]
                for b in found
            ],
        )
    )
    print(
        "restore point: the newest backup of that schema version; retention keeps it whatever "
        "backup.keep says (`lssupervisor rollback ID` restores it)"
    )
    return 0


def _restore_point(points: dict[str, int | None], backup_id: str) -> str:
    if backup_id not in points:
        return ""
    version = points[backup_id]
    return "unmarked" if version is None else f"v{version}"


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    again = f"lssupervisor rollback {args.backup}" if args.backup else "lssupervisor rollback"
    with locked(cfg, view, "rollback", again) as fds:
        request = p.RollbackRequest(client.settings(cfg, view), backup_id=args.backup)
        result = _guarded(cfg, request, p.RollbackResult, fds, on_reply=_Progress(sys.stderr))
        rendered = _rerender(cfg, result.schema_version)
        restored = result.schema_version
        next_start = _next_start(cfg, view, fds, restored) if restored is not None else None
    for e in result.lmdbs:
        what = "restored" if e.restored else "already in place"
        print(f"LMDB {e.lmdb}: {what} (version {e.from_version} -> {e.to_version})")
    if result.pre_rollback_backup:
        print(f"the state before the rollback was saved as backup {result.pre_rollback_backup}")
    print(f"rolled back to backup {result.backup_id} (schema version {result.schema_version})")
    if rendered:
        print(f"LS config re-rendered for version {result.schema_version}: {rendered}")
    if next_start is not None:
        summary, warning = next_start
        print(summary)
        if warning:
            print(f"lssupervisor: warning: {warning}", file=sys.stderr)
    return 0


def _target_source(cfg: Config, target: int) -> tuple[str, str]:
    """Where the daemon's target comes from (resolve_target's order), and how to pin version N there:
    a text with ``{n}`` for the version."""
    where = str(cfg.source) if cfg.source else "the config"
    if cfg.schema.target is not None:
        return f"schema.target: {target} in {where}", f"set `schema.target: {{n}}` in {where}"
    if cfg.schema.target_file is not None:
        path = Path(cfg.schema.target_file)
        pin = f"write {{n}} to schema.target_file: `echo {{n}} > {path}`"
        if path.exists():
            return f"{path} says {target}", pin
        return f"the newest migration, {target}; {path} does not exist", pin
    return (
        f"the newest migration, {target}",
        f"set `schema.target: {{n}}` in {where} (or deploy the release without the migrations above {{n}})",
    )


def _next_start(cfg: Config, view: LsView, fds: Sequence[int], restored: int) -> tuple[str, str | None]:
    """What the daemon does with the restored LMDBs at its next start or reconcile: the plan it will
    make (same worker op, same target resolution). Returns a summary line for stdout and, when the
    daemon would NOT stay on ``restored``, a warning saying so and how to pin the target: the daemon
    migrates straight back otherwise, undoing the rollback a few seconds after `systemctl start`."""
    try:
        request = p.PlanRequest(client.settings(cfg, view), resolve_target(cfg, None))
        planned = _call(cfg, request, p.PlanResult, fds)
    except SupervisorError as exc:
        return (
            f"at its next start the daemon cannot plan from version {restored} (see the warning)",
            f"the daemon will not start LS on the restored version {restored}: {exc}",
        )
    target = planned.target
    source, pin = _target_source(cfg, target)
    moving = [pl.lmdb for pl in planned.lmdbs if pl.action is not p.PlanAction.NONE]
    if not moving:
        return f"at its next start the daemon stays on version {restored} (target {source})", None
    return (
        f"at its next start the daemon migrates {', '.join(moving)} from {restored} to {target} again "
        "(see the warning)",
        f"the target is still {target} ({source}): the daemon will migrate {restored} -> {target} again at "
        f"its next start or reconcile, undoing this rollback; to stay on version {restored}, "
        f"{pin.format(n=restored)} before starting it, then check `lssupervisor plan` shows ACTION none",
    )


def _rerender(cfg: Config, version: int | None) -> str | None:
    """Point the rendered LS config back at the restored version (invariant I2). The daemon does the
    same at its next start; doing it here keeps a hand-started LS from using the newer prefix."""
    if version is None:
        return None
    from lssupervisor.lsconfig import render as lsconfig

    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    rendered = lsconfig.render(template, version, lsconfig.ls_environment(cfg, version, os.environ))
    for warning in rendered.warnings:
        print(f"lssupervisor: warning: {warning}", file=sys.stderr)
    target = cfg.rendered_config
    target.parent.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(target, rendered.text)
    return str(target)


def cmd_fleet(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    # Read-only and harmless while the daemon runs (LMDB readers never block anyone), so no lock.
    result = _call(cfg, p.FleetRequest(client.settings(cfg, view)), p.FleetResult)
    migs = _known_migrations(cfg, view)
    if args.json:
        doc = to_wire(result)
        for entry, lmdb_doc in zip(result.lmdbs, doc["lmdbs"], strict=True):
            for m, marker_doc in zip(entry.markers, lmdb_doc["markers"], strict=True):
                marker_doc["set_by"] = set_by(m, entry.lmdb, migs)
        _print_json(doc)
        return 0
    rows: list[list[Any]] = []
    for entry in result.lmdbs:
        if not entry.markers:
            rows.append([entry.lmdb, "-", None, None, None, None])
        for m in entry.markers:
            me = " (this instance)" if m.instance == result.instance else ""
            rows.append(
                [entry.lmdb, m.instance + me, m.version, set_by(m, entry.lmdb, migs), m.time, m.tool_version]
            )
    print(_table(["LMDB", "INSTANCE", "VERSION", "MIGRATION", "TIME", "TOOL"], rows))
    return 0


def _known_migrations(cfg: Config, view: LsView) -> MigrationSet | None:
    """The migration files, read but not imported (None when they cannot be read: fleet still shows
    the markers)."""
    source = cfg.migrations.package or cfg.migrations.path
    try:
        return None if source is None else migrations.discover(source, [s.name for s in view.lmdbs])
    except SupervisorError:
        return None


def set_by(m: p.Marker, lmdb: str, migs: MigrationSet | None) -> str:
    """What moved one marker (a ``fleet`` row) to its version, as far as the marker can tell.

    A marker records the migration that ran ON ITS LMDB. A marker-only step (this LMDB moved along with
    a migration of another LMDB, e.g. shard 5->6 by main's 0006) records no name, like a stamp; the
    migration files tell the two apart where they can: a step on this LMDB always records its name, so
    an empty name at a version whose migration is for this LMDB (or at one without a migration) was a
    stamp; at a version whose migration is for another LMDB only the marker moved."""
    name = m.migration
    if name:
        return name
    if migs is None:
        return "(no migration ran: stamp or marker only)"
    version = m.version
    if 1 <= version <= migs.newest:
        mig = migs.get(version)
        if mig.lmdb != lmdb:
            return f"(marker only: {mig.name} is for LMDB {mig.lmdb})"
    return "(stamp)"

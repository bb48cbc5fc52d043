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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from lssupervisor import fsutil
from lssupervisor.config import Config, load_config, resolve_target
from lssupervisor.errors import (
    LightningStreamRunning,
    LockHeld,
    SupervisorError,
    UsageError,
)
from lssupervisor.lsmodel import LsView
from lssupervisor.proc import describe_pid
from lssupervisor.worker import backupdir, history, migrations
from lssupervisor.worker.client import (
    Message,
    build_request,
    describe_progress,
    raise_for_error,
    run_worker,
)
from lssupervisor.worker.migrations import MigrationSet

# Names a Lightning Stream process goes by (the real binary, and the test stand-in).
_LS_NAMES = ("lightningstream",)


# ---------------------------------------------------------------------------------------------------
# shared plumbing


def _load(args: argparse.Namespace) -> tuple[Config, LsView]:
    from lssupervisor.lsconfig import render as lsconfig

    cfg = load_config(args.config)
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, os.environ))
    return cfg, view


@contextlib.contextmanager
def locked(cfg: Config, view: LsView, purpose: str) -> Iterator[Sequence[int]]:
    """Hold the daemon's own locks (state dir + every LMDB) for an offline command; yields the fds to
    pass to the worker, so the lock lives exactly as long as both of us. Refuses with LockHeld naming
    the holder's pid when the daemon (or another command) holds it."""
    from lssupervisor.daemon import lock

    try:
        held = lock.acquire(cfg, view.lmdbs, purpose)
    except LockHeld as exc:
        raise LockHeld(
            f"lssupervisor {purpose}: {exc}; offline commands run only while the daemon is stopped "
            "(or let the running daemon do it: lssupervisor reconcile)",
            holder_pid=exc.holder_pid,
        ) from None
    with held:
        yield (held.fileno(),)


def _run(
    cfg: Config,
    request: Message,
    fds: Sequence[int] = (),
    on_message: _Progress | None = None,
    timeout: float | None = None,
) -> Message:
    """One worker run to its end; its error becomes the matching SupervisorError. Every worker opens an
    LMDB, so each one starts above ``lightningstream.min_pid`` (the PID-keyed lock table)."""
    final = run_worker(request, on_message, timeout, min_pid=cfg.lightningstream.min_pid, pass_fds=fds)
    return raise_for_error(final)


def _looks_like_ls(entry: Mapping[str, Any]) -> bool:
    name = str(entry.get("name", ""))
    cmdline = " ".join(str(a) for a in entry.get("cmdline", []))
    return any(n in name or n in cmdline for n in _LS_NAMES)


def refuse_if_ls_runs(cfg: Config, view: LsView, fds: Sequence[int]) -> None:
    """Refuse when a Lightning Stream process has one of the LMDBs open (the daemon may be gone but
    its LS not, or someone started LS by hand)."""
    final = _run(cfg, build_request("readers", cfg, view), fds)
    for entry in final["lmdbs"]:
        for reader in entry["readers"]:
            if reader.get("alive") and _looks_like_ls(reader):
                raise LightningStreamRunning(
                    f"LMDB {entry['lmdb']!r}: Lightning Stream pid {reader['pid']} has it open; stop it "
                    "before migrating (LS must never run during a migration)"
                )
        holder = entry.get("open_by_pid")
        if holder:
            info = describe_pid(int(holder))
            if info["alive"] and _looks_like_ls(info):
                raise LightningStreamRunning(
                    f"LMDB {entry['lmdb']!r}: Lightning Stream pid {holder} has it open; stop it first"
                )


class _Progress:
    """Progress and worker logs on stderr, one line per event, throttled by the worker."""

    def __init__(self, out: TextIO, quiet_logs: bool = False) -> None:
        self.out = out
        self.quiet_logs = quiet_logs

    def __call__(self, msg: Message) -> None:
        kind = msg.get("type")
        if kind == "progress":
            line = describe_progress(msg)
            if line:
                print(line, file=self.out, flush=True)
        elif kind == "log" and not self.quiet_logs:
            level = str(msg.get("level", "info"))
            if level in ("warning", "error", "critical"):
                print(f"lssupervisor: {level}: {msg.get('msg')}", file=self.out, flush=True)


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


def _clean(final: Message) -> Message:
    return {k: v for k, v in final.items() if k not in ("type", "returncode")}


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
    final = _run(cfg, build_request("plan", cfg, view, target=target))
    if args.json:
        _print_json(_clean(final))
        return 0
    print(
        _table(
            ["LMDB", "MARKER", "FROM", "TARGET", "ACTION"],
            [
                [p["lmdb"], p["marker_version"], p["current"], final["target"], p["action"]]
                for p in final["lmdbs"]
            ],
        )
    )
    steps = final["steps"]
    if steps:
        print()
        print(
            _table(
                ["#", "LMDB", "FROM", "TO", "MIGRATION", "STRATEGY", "DESCRIPTION"],
                [
                    [i, s["lmdb"], s["from"], s["to"], s["migration"], s["strategy"], s["description"]]
                    for i, s in enumerate(steps, start=1)
                ],
            )
        )
    else:
        print("\nnothing to migrate")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    target = resolve_target(cfg, args.to)
    op = "dry_run" if args.dry_run else "migrate"
    extra: dict[str, Any] = {}
    if args.no_backup:
        extra["backup_enabled"] = False
    request = build_request(op, cfg, view, target=target, **extra)
    # The worker cancels itself at migrations.timeout; the extra time is the backstop for a hang.
    timeout = None if cfg.migrations.timeout is None else cfg.migrations.timeout + 30.0
    if args.dry_run:
        # No lock, so a dry run of a live instance works while the daemon and LS run: the worker opens
        # the live LMDB read-only (MDB_RDONLY), takes a compact copy under one read transaction (which
        # blocks no writer), runs the plan on the copy in a private .dryrun-*.partial directory and
        # deletes it. It writes nothing to the live LMDB, the history or the backups.
        final = _run(cfg, request, (), _Progress(sys.stderr), timeout)
    else:
        with locked(cfg, view, "migrate") as fds:
            refuse_if_ls_runs(cfg, view, fds)
            final = _run(cfg, request, fds, _Progress(sys.stderr), timeout)
    if args.json:
        _print_json(_clean(final))
        return 0
    if args.dry_run:
        print(
            _table(
                ["LMDB", "STEPS", "KEYS", "BYTES", "SECONDS", "LIVE TXN BEFORE", "LIVE TXN AFTER"],
                [
                    [
                        e["lmdb"],
                        len(e["steps"]),
                        e["keys"],
                        e["bytes"],
                        e["duration_s"],
                        e["live_last_txnid_before"],
                        e["live_last_txnid_after"],
                    ]
                    for e in final["lmdbs"]
                ],
            )
        )
        print(f"\ndry run to version {final['target']} on a copy; the dry run did not write the live LMDBs")
        others = final.get("live_changed_by_others") or []
        if others:
            print(
                f"note: {', '.join(others)} changed meanwhile: LS or the application wrote to it while the "
                "copy was taken (the dry run opens the live LMDB read-only)"
            )
        return 0
    rows = []
    for e in final["lmdbs"]:
        keys = sum(s["puts"] + s["deletes"] + s["copied"] + s["raw_writes"] for s in e["steps"])
        rows.append([e["lmdb"], e["before"], e["after"], len(e["steps"]), keys, e["stamped"] or ""])
    print(_table(["LMDB", "BEFORE", "AFTER", "STEPS", "KEYS", "STAMPED"], rows))
    backup_note = f"backup {final['backup_id']}" if final.get("backup_id") else "no backup taken"
    print(f"\nmigrated to version {final['target']} in {final['duration_s']}s ({backup_note})")
    print("the daemon renders the LS config for the new version at its next start")
    return 0


def cmd_stamp(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    if args.version < 0:
        raise UsageError(f"stamp: version must be >= 0, got {args.version}")
    with locked(cfg, view, "stamp") as fds:
        refuse_if_ls_runs(cfg, view, fds)
        request = build_request("stamp", cfg, view, version=args.version, lmdb=args.lmdb)
        final = _run(cfg, request, fds, _Progress(sys.stderr))
    for e in final["lmdbs"]:
        print(f"stamped LMDB {e['lmdb']}: {e['from'] if e['from'] is not None else 'unmarked'} -> {e['to']}")
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
    if args.json:
        _print_json([b.manifest.to_json() for b in found])
        return 0
    if not found:
        print(f"no backups in {cfg.backup_dir}")
        return 0
    print(
        _table(
            ["ID", "TIME", "VERSION", "SIZE", "LMDBS", "REASON"],
            [
                [
                    b.id,
                    b.manifest.time,
                    b.manifest.schema_version,
                    _size(b.manifest.size),
                    ",".join(x.name for x in b.manifest.lmdbs),
                    b.manifest.reason,
                ]
                for b in found
            ],
        )
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg, view = _load(args)
    with locked(cfg, view, "rollback") as fds:
        refuse_if_ls_runs(cfg, view, fds)
        request = build_request("rollback", cfg, view, backup_id=args.backup)
        final = _run(cfg, request, fds, _Progress(sys.stderr))
        rendered = _rerender(cfg, final.get("schema_version"))
        restored = final.get("schema_version")
        next_start = _next_start(cfg, view, fds, restored) if isinstance(restored, int) else None
    for e in final["lmdbs"]:
        what = "restored" if e["restored"] else "already in place"
        print(f"LMDB {e['lmdb']}: {what} (version {e['from']} -> {e['to']})")
    if final.get("pre_rollback_backup"):
        print(f"the state before the rollback was saved as backup {final['pre_rollback_backup']}")
    print(f"rolled back to backup {final['backup_id']} (schema version {final['schema_version']})")
    if rendered:
        print(f"LS config re-rendered for version {final['schema_version']}: {rendered}")
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
        final = _run(cfg, build_request("plan", cfg, view, target=resolve_target(cfg, None)), fds)
    except SupervisorError as exc:
        return (
            f"at its next start the daemon cannot plan from version {restored} (see the warning)",
            f"the daemon will not start LS on the restored version {restored}: {exc}",
        )
    target = int(final["target"])
    source, pin = _target_source(cfg, target)
    moving = [p["lmdb"] for p in final["lmdbs"] if p["action"] != "none"]
    if not moving:
        return f"at its next start the daemon stays on version {restored} (target {source})", None
    return (
        f"at its next start the daemon migrates {', '.join(moving)} from {restored} to {target} again "
        "(see the warning)",
        f"the target is still {target} ({source}): the daemon will migrate {restored} -> {target} again at "
        f"its next start or reconcile, undoing this rollback; to stay on version {restored}, "
        f"{pin.format(n=restored)} before starting it, then check `lssupervisor plan` shows ACTION none",
    )


def _rerender(cfg: Config, version: Any) -> str | None:
    """Point the rendered LS config back at the restored version (invariant I2). The daemon does the
    same at its next start; doing it here keeps a hand-started LS from using the newer prefix."""
    if not isinstance(version, int):
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
    final = _run(cfg, build_request("fleet", cfg, view))
    migs = _known_migrations(cfg, view)
    for entry in final["lmdbs"]:
        for m in entry["markers"]:
            m["set_by"] = set_by(m, entry["lmdb"], migs)
    if args.json:
        _print_json(_clean(final))
        return 0
    rows = []
    for entry in final["lmdbs"]:
        if not entry["markers"]:
            rows.append([entry["lmdb"], "-", None, None, None, None])
        for m in entry["markers"]:
            me = " (this instance)" if m["instance"] == final["instance"] else ""
            row = [entry["lmdb"], m["instance"] + me, m["version"], m["set_by"], m["time"], m["tool_version"]]
            rows.append(row)
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


def set_by(m: Mapping[str, Any], lmdb: str, migs: MigrationSet | None) -> str:
    """What moved one marker (a ``fleet`` row) to its version, as far as the marker can tell.

    A marker records the migration that ran ON ITS LMDB. A marker-only step (this LMDB moved along with
    a migration of another LMDB, e.g. shard 5->6 by main's 0006) records no name, like a stamp; the
    migration files tell the two apart where they can: a step on this LMDB always records its name, so
    an empty name at a version whose migration is for this LMDB (or at one without a migration) was a
    stamp; at a version whose migration is for another LMDB only the marker moved."""
    name = str(m.get("migration") or "")
    if name:
        return name
    if migs is None:
        return "(no migration ran: stamp or marker only)"
    version = int(m["version"])
    if 1 <= version <= migs.newest:
        mig = migs.get(version)
        if mig.lmdb != lmdb:
            return f"(marker only: {mig.name} is for LMDB {mig.lmdb})"
    return "(stamp)"

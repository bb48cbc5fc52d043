"""``<state_dir>/state.json``: the daemon's state, rewritten atomically on every transition, and
``lssupervisor status``.

The document is the same one ``/status`` serves (see :mod:`lssupervisor.http`)::

    state, substate, reason, pid (the daemon), since, desired, paused, target_version, schema_version,
    lightningstream: {pid, restarts, starts, ready, config, started_at, last_exit, failures, retry_at,
                      record: {pid, create_time, pgid} | null, argv},
    lmdbs: {<name>: {path, schema_version (null until markers are read)}},
    migration: {progress, last_result, last_duration_s, last_success_at},
    backups: {count, last: {id, created_at, size_bytes, version} | null} (the backup dir's manifests,
              listed at start and after each migration),
    version (of lssupervisor), updated_at

Times are ISO 8601 UTC. ``lightningstream.record`` is what the next daemon uses to find an LS
orphaned by a crash of this one.

Writing: temp file in the same directory, fsync, rename, fsync the directory: a reader (or a crash)
sees the old document or the new one, never half of each.

A state.json whose writer is gone is stale: ``status`` checks the state-dir lock and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lssupervisor.errors import ExitCode
from lssupervisor.lsconfig import write_atomic

NOT_RUNNING_EXIT = ExitCode.NOT_RUNNING  # `status` when no daemon runs (LSB: 3 = not running)


def write_state(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``doc`` as JSON, atomically and durably. OSError propagates."""
    text = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644: no secrets in here (the daemon writes no env or config text); operators and monitoring read
    # it. No .prev copy: the next transition rewrites it anyway.
    write_atomic(path, text, mode=0o644, keep_previous=False)


def read_state(path: Path) -> dict[str, Any] | None:
    """The last state document, or None when there is none (or it is not a JSON object)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def format_human(doc: Mapping[str, Any], *, running: bool, holder: str | None = None) -> str:
    """A few lines for people."""
    ls = doc.get("lightningstream") or {}
    lines = []
    state = doc.get("state", "?")
    sub = f" ({doc['substate']})" if doc.get("substate") else ""
    if running:
        lines.append(f"lssupervisor pid {doc.get('pid')}: {state}{sub} since {doc.get('since')}")
    else:
        lines.append(
            f"lssupervisor is not running; state.json is stale (last: {state}{sub} at "
            f"{doc.get('updated_at')}, pid {doc.get('pid')})"
        )
    if holder:
        lines.append(f"state dir locked by {holder}")
    if doc.get("reason"):
        lines.append(f"reason: {doc['reason']}")
    if doc.get("paused"):
        lines.append("paused: yes (run `lssupervisor resume` to start LS again)")
    ready = "ready" if ls.get("ready") else "not ready"
    if ls.get("pid"):
        lines.append(
            f"lightningstream: pid {ls['pid']}, {ready}, started {ls.get('started_at')}, "
            f"restarts {ls.get('restarts', 0)}"
        )
    else:
        last = f", last exit: {ls['last_exit']}" if ls.get("last_exit") else ""
        lines.append(f"lightningstream: not running{last}")
    lines.append(f"config: {ls.get('config')}")
    versions = ", ".join(
        f"{name}={info.get('schema_version')}" for name, info in sorted((doc.get("lmdbs") or {}).items())
    )
    target = doc.get("target_version")
    lines.append(
        f"schema: rendered for version {doc.get('schema_version')}, "
        f"target {'newest migration' if target is None else target}"
        + (f"; markers {versions}" if versions else "")
    )
    backups = doc.get("backups")
    if isinstance(backups, Mapping) and backups.get("count"):
        newest: Mapping[str, Any] = backups.get("last") or {}
        lines.append(
            f"backups: {backups['count']}, newest {newest.get('id')} (schema version "
            f"{newest.get('version')}, {newest.get('size_bytes')} bytes, {newest.get('created_at')}); "
            "`lssupervisor backups` lists them"
        )
    return "\n".join(lines) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    from lssupervisor import lock
    from lssupervisor.config import load_config

    cfg = load_config(args.config)
    doc = read_state(cfg.state_file)
    held = lock.holder(cfg)
    running = (
        held is not None and doc is not None and held.purpose == "daemon" and held.pid == doc.get("pid")
    )
    other = None
    if held is not None and not running:
        other = f"pid {held.pid} ({held.purpose})"
    if args.json:
        out: dict[str, Any] = dict(doc or {})
        out["daemon"] = {
            "running": running,
            "stale": doc is not None and not running,
            "lock_holder": None if held is None else {"pid": held.pid, "purpose": held.purpose},
            "state_file": str(cfg.state_file),
        }
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=True) + "\n")
    elif doc is None:
        extra = f"; state dir locked by {other}" if other else ""
        sys.stdout.write(f"lssupervisor is not running (no {cfg.state_file}){extra}\n")
    else:
        sys.stdout.write(format_human(doc, running=running, holder=other))
    return int(ExitCode.OK) if running else int(NOT_RUNNING_EXIT)

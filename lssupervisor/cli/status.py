"""``lssupervisor status``: the daemon's state, from ``state.json`` and the lock holder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from lssupervisor.daemon.statefile import NOT_RUNNING_EXIT, read_state
from lssupervisor.errors import ExitCode


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
    from lssupervisor.config import load_config
    from lssupervisor.daemon import lock

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

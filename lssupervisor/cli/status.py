"""``lssupervisor status``: the daemon's state, from ``state.json`` and the lock holder.

It must answer when the config is broken, because that is when an operator asks: a daemon that loaded
its config before keeps running on it, and its ``state.json`` says what it does. So the config is
only needed to find the state directory, in this order:

1. ``--state-dir DIR``;
2. the config, loaded as the daemon loads it;
3. when it cannot be loaded: its ``state_dir:`` read leniently (any YAML that parses, else the line
   ``state_dir: ...``), resolved against the config's directory as the loader does;
4. else the default, ``state`` next to the config file.

The output then says that the config could not be read, why, and where the state came from
(``daemon.config_error`` and ``daemon.state_dir_from`` in ``--json``). Exit status: 0 when the
daemon runs, 3 when it does not (LSB), 78 when the config cannot be read and no state file is found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lssupervisor.daemon.statefile import NOT_RUNNING_EXIT, iso_to_epoch, read_state
from lssupervisor.errors import ConfigError, ExitCode, SupervisorError

DEFAULT_STATE_DIR = "state"  # Config.state_dir's default, relative to the config file's directory
# `state_dir: /var/lib/x`, quoted or not, with an optional comment: for a file YAML cannot parse at all.
_STATE_DIR_LINE = re.compile(
    r"""^state_dir:[ \t]*(?:"([^"\n]+)"|'([^'\n]+)'|([^\s#'"][^#\n]*?))[ \t]*(?:#.*)?$""", re.M
)


# ---------------------------------------------------------------------------------------------------
# how people read times and durations


def span(seconds: float) -> str:
    """A duration for people, rounded to what matters: ``35ms``, ``4.2s``, ``42s``, ``5m12s``,
    ``2h5m``, ``3d4h``."""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600}h"


def when(value: object, now: float) -> str | None:
    """``2025-01-02T03:04:05Z (5m12s ago)`` (or ``in 3s``), None when there is no time."""
    epoch = iso_to_epoch(value)
    if epoch is None:
        return None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    delta = now - epoch
    relative = f"{span(delta)} ago" if delta >= 0 else f"in {span(delta)}"
    return f"{stamp} ({relative})"


def _known(value: object, unknown: str = "unknown") -> str:
    return unknown if value is None or value == "" else str(value)


# ---------------------------------------------------------------------------------------------------
# the human output


def format_human(
    doc: Mapping[str, Any],
    *,
    running: bool,
    holder: str | None = None,
    now: float | None = None,
    config_error: str | None = None,
    state_from: str | None = None,
) -> str:
    """A few lines for people: no ``None``, times with their age, durations rounded."""
    now = time.time() if now is None else now
    ls = doc.get("lightningstream") or {}
    lines = []
    state = doc.get("state", "?")
    sub = f" ({doc['substate']})" if doc.get("substate") else ""
    pid = f" pid {doc['pid']}" if doc.get("pid") else ""
    if running:
        since = when(doc.get("since"), now)
        lines.append(f"lssupervisor{pid}: {state}{sub}" + (f" since {since}" if since else ""))
    else:
        updated = when(doc.get("updated_at"), now)
        lines.append(
            f"lssupervisor is not running; state.json is stale (last: {state}{sub}"
            + (f" at {updated}" if updated else "")
            + (f",{pid}" if pid else "")
            + ")"
        )
    if config_error:
        lines.append(f"config: cannot be read: {config_error}")
        if state_from:
            lines.append(f"(this status comes from {state_from})")
    if holder:
        lines.append(f"state dir locked by {holder}")
    if doc.get("reason"):
        lines.append(f"reason: {doc['reason']}")
    if doc.get("paused"):
        lines.append("paused: yes (run `lssupervisor resume` to start LS again)")
    if ls.get("pid"):
        ready = "ready" if ls.get("ready") else "not ready"
        started = when(ls.get("started_at"), now)
        lines.append(
            f"lightningstream: pid {ls['pid']}, {ready}"
            + (f", started {started}" if started else "")
            + f", restarts {ls.get('restarts') or 0}"
        )
    else:
        last = f", last exit: {ls['last_exit']}" if ls.get("last_exit") else ""
        retry = when(ls.get("retry_at"), now)
        lines.append(f"lightningstream: not running{last}" + (f"; restart at {retry}" if retry else ""))
    if ls.get("config"):
        lines.append(f"rendered LS config: {ls['config']}")
    versions = ", ".join(
        f"{name}={_known((info or {}).get('schema_version'), 'not read yet')}"
        for name, info in sorted((doc.get("lmdbs") or {}).items())
    )
    target = doc.get("target_version")
    rendered = doc.get("schema_version")
    lines.append(
        "schema: "
        + ("version not known yet" if rendered is None else f"rendered for version {rendered}")
        + f", target {'newest migration' if target is None else target}"
        + (f"; markers {versions}" if versions else "")
    )
    lines.extend(_migration_lines(doc.get("migration"), str(doc.get("reason") or ""), now))
    backups = doc.get("backups")
    if isinstance(backups, Mapping) and backups.get("count"):
        newest: Mapping[str, Any] = backups.get("last") or {}
        details = []
        if newest.get("version") is not None:
            details.append(f"schema version {newest['version']}")
        if newest.get("size_bytes") is not None:
            details.append(f"{newest['size_bytes']} bytes")
        taken = when(newest.get("created_at"), now)
        lines.append(
            f"backups: {backups['count']}"
            + (f", newest {newest['id']}" if newest.get("id") else "")
            + (f" ({', '.join(details)})" if details else "")
            + (f", taken {taken}" if taken else "")
            + "; `lssupervisor backups` lists them"
        )
    return "\n".join(lines) + "\n"


def _migration_lines(mig: object, reason: str, now: float) -> list[str]:
    if not isinstance(mig, Mapping):
        return []
    lines = []
    if mig.get("progress"):
        limit = mig.get("time_limit")
        until = when(mig.get("time_limit_at"), now)
        extra = f" (time limit {limit}" + (f", until {until}" if until else "") + ")" if limit else ""
        lines.append(f"migration: {mig['progress']}{extra}")
    result = mig.get("last_result")
    if result:
        duration = mig.get("last_duration_s")
        took = f" after {span(duration)}" if isinstance(duration, int | float) else ""
        lines.append(f"last migration: {result}{took}")
        if result != "ok" and mig.get("last_error") and str(mig["last_error"]) not in reason:
            lines.append(f"last migration error: {mig['last_error']}")
    succeeded = when(mig.get("last_success_at"), now)
    if succeeded and result != "ok":
        lines.append(f"last successful migration: {succeeded}")
    elif succeeded:
        lines[-1] += f", {succeeded}"
    return lines


# ---------------------------------------------------------------------------------------------------
# finding the state when the config is broken


def lenient_state_dir(config_path: Path) -> tuple[Path, str]:
    """The state dir a config that does not load names, best effort, and how it was found."""
    base = Path(os.path.abspath(config_path)).parent
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    value: str | None = None
    try:
        data = yaml.safe_load(text)
        if isinstance(data, dict) and isinstance(data.get("state_dir"), str):
            value = data["state_dir"]
    except (yaml.YAMLError, ValueError, RecursionError):  # fall back to the line: a best effort
        value = None
    if value is None:
        m = _STATE_DIR_LINE.search(text)
        if m is not None:
            value = next(g for g in m.groups() if g)
    if value:
        return Path(os.path.normpath(base / os.path.expanduser(value.strip()))), (
            f"state_dir read leniently from {config_path}"
        )
    return base / DEFAULT_STATE_DIR, f"the default state_dir ({DEFAULT_STATE_DIR} next to {config_path.name})"


def cmd_status(args: argparse.Namespace) -> int:
    from lssupervisor.config import Config, PathOpt, load_config
    from lssupervisor.daemon import lock

    config_error: str | None = None
    state_dir_arg: str | None = getattr(args, "state_dir", None)
    try:
        cfg = load_config(args.config)
        state_from = f"state_dir of {args.config}"
    except SupervisorError as exc:
        config_error = str(exc)
        state_dir, state_from = lenient_state_dir(Path(args.config))
        # Only the state-dir paths of this Config are used (state.json, lock).
        cfg = Config(state_dir=PathOpt(str(state_dir)))
    if state_dir_arg:
        cfg = Config(state_dir=PathOpt(os.path.abspath(state_dir_arg)))
        state_from = "--state-dir"
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
            "state_dir_from": state_from,
            "config_error": config_error,
        }
        sys.stdout.write(json.dumps(out, indent=2, sort_keys=True) + "\n")
    elif doc is None:
        extra = f"; state dir locked by {other}" if other else ""
        if config_error and held is None:
            # Nothing to show: the one-line error of every command, and where the state was looked for.
            raise ConfigError(
                f"{config_error}; no state file at {cfg.state_file} either ({state_from}); pass "
                "--state-dir DIR if the daemon keeps its state elsewhere"
            )
        if config_error:
            sys.stdout.write(f"config: cannot be read: {config_error}\n")
        sys.stdout.write(f"lssupervisor is not running (no {cfg.state_file}){extra}\n")
    else:
        sys.stdout.write(
            format_human(
                doc,
                running=running,
                holder=other,
                config_error=config_error,
                state_from=f"{cfg.state_file}, {state_from}" if config_error else None,
            )
        )
    if doc is None and config_error and held is None:
        return int(ExitCode.CONFIG)
    return int(ExitCode.OK) if running else int(NOT_RUNNING_EXIT)

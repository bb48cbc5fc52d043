"""``<state_dir>/state.json``: the daemon's state, rewritten atomically on every transition, and
``lssupervisor status``.

The document is the same one ``/status`` serves (see :mod:`lssupervisor.daemon.http`)::

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

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lssupervisor.errors import ExitCode
from lssupervisor.fsutil import ensure_private_dir, write_atomic

NOT_RUNNING_EXIT = ExitCode.NOT_RUNNING  # `status` when no daemon runs (LSB: 3 = not running)


def write_state(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``doc`` as JSON, atomically and durably. OSError propagates."""
    text = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    ensure_private_dir(path.parent)
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


def iso_to_epoch(value: object) -> float | None:
    """An ISO-8601 time of the state document as Unix seconds; None when absent or unreadable.

    A time without a zone is taken as UTC (the daemon writes UTC).
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()

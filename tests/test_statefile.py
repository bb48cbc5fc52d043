"""state.json: atomic rewrite, reading, the human and JSON `status` output, stale detection."""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.cli.status import cmd_status, format_human
from lssupervisor.daemon import lock
from lssupervisor.daemon.statefile import read_state, write_state
from lssupervisor.errors import ExitCode

DOC: dict[str, Any] = {
    "state": "RUNNING",
    "substate": None,
    "reason": "LS ready",
    "pid": 0,  # replaced per test
    "since": "2025-01-02T03:04:05.000Z",
    "paused": False,
    "target_version": None,
    "schema_version": 1,
    "lightningstream": {
        "pid": 4242, "ready": True, "restarts": 2, "config": "/x/state/lightningstream.yaml",
        "started_at": "2025-01-02T03:04:00.000Z", "last_exit": None,
    },
    "lmdbs": {"main": {"path": "/x/db", "schema_version": None}},
    "migration": {"progress": None, "last_result": None, "last_duration_s": None, "last_success_at": None},
    "updated_at": "2025-01-02T03:04:05.000Z",
}


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "state" / "state.json"
    write_state(path, DOC)
    assert read_state(path) == DOC
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    # Readers racing with many rewrites only ever see a whole document.
    stop = threading.Event()
    seen: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(read_state(path))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            write_state(path, {**DOC, "reason": f"r{i}" * 50})
    finally:
        stop.set()
        t.join()
    assert seen and all(isinstance(d, dict) and d["state"] == "RUNNING" for d in seen)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_read_state_tolerates_missing_and_garbage(tmp_path: Path) -> None:
    assert read_state(tmp_path / "nope.json") is None
    (tmp_path / "bad.json").write_text("{half")
    assert read_state(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert read_state(tmp_path / "list.json") is None


def test_format_human() -> None:
    text = format_human({**DOC, "pid": 7}, running=True)
    assert text.splitlines()[0] == "lssupervisor pid 7: RUNNING since 2025-01-02T03:04:05.000Z"
    assert "lightningstream: pid 4242, ready, started 2025-01-02T03:04:00.000Z, restarts 2" in text
    assert "markers main=None" in text and "target newest migration" in text
    assert "backups" not in text  # none (or an older daemon's state.json without the key)
    last = {"id": "20250102T030400.000000Z-v1", "created_at": "2025-01-02T03:04:00.000000Z",
            "size_bytes": 12288, "version": 1}
    text = format_human({**DOC, "pid": 7, "backups": {"count": 3, "last": last}}, running=True)
    assert (
        "backups: 3, newest 20250102T030400.000000Z-v1 (schema version 1, 12288 bytes, "
        "2025-01-02T03:04:00.000000Z); `lssupervisor backups` lists them"
    ) in text
    parked = {**DOC, "state": "PARKED", "lightningstream": {"last_exit": "exit 1"}}
    stale = format_human(parked, running=False)
    assert stale.startswith("lssupervisor is not running; state.json is stale (last: PARKED")
    assert "lightningstream: not running, last exit: exit 1" in stale


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "lssupervisor.yaml"
    config.write_text("state_dir: state\nhttp:\n  address: ''\n")
    return config


def status(config: Path, as_json: bool) -> int:
    return cmd_status(argparse.Namespace(config=str(config), json=as_json))


def test_status_running_vs_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lssupervisor.config import load_config

    config = write_config(tmp_path)
    cfg = load_config(config)
    assert status(config, False) == ExitCode.NOT_RUNNING
    assert "lssupervisor is not running (no " in capsys.readouterr().out
    write_state(cfg.state_file, {**DOC, "pid": os.getpid()})
    # Written, but nobody holds the lock: stale.
    assert status(config, True) == ExitCode.NOT_RUNNING
    out = json.loads(capsys.readouterr().out)
    assert out["daemon"]["stale"] is True and out["daemon"]["running"] is False
    with lock.acquire(cfg, [], "daemon"):
        assert status(config, True) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["daemon"] == {
            "running": True, "stale": False, "lock_holder": {"pid": os.getpid(), "purpose": "daemon"},
            "state_file": str(cfg.state_file),
        }
        assert out["state"] == "RUNNING" and out["lightningstream"]["pid"] == 4242
    # An offline command holding the lock is not the daemon.
    with lock.acquire(cfg, [], "migrate"):
        assert status(config, False) == ExitCode.NOT_RUNNING
        text = capsys.readouterr().out
        assert "stale" in text and f"state dir locked by pid {os.getpid()} (migrate)" in text

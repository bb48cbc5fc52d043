"""state.json: atomic rewrite, reading, the human and JSON `status` output, stale detection."""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.cli.status import cmd_status, format_human, span
from lssupervisor.daemon import lock
from lssupervisor.daemon.statefile import read_state, write_state
from lssupervisor.errors import ConfigError, ExitCode

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


NOW = 1735787045.0 + 312  # 5m12s after DOC's since (2025-01-02T03:04:05Z)


def test_format_human() -> None:
    text = format_human({**DOC, "pid": 7}, running=True, now=NOW)
    assert text.splitlines()[0] == "lssupervisor pid 7: RUNNING since 2025-01-02T03:04:05Z (5m12s ago)"
    assert "lightningstream: pid 4242, ready, started 2025-01-02T03:04:00Z (5m17s ago), restarts 2" in text
    assert "markers main=not read yet" in text and "target newest migration" in text
    assert "backups" not in text  # none (or an older daemon's state.json without the key)
    last = {"id": "20250102T030400.000000Z-v1", "created_at": "2025-01-02T03:04:00.000000Z",
            "size_bytes": 12288, "version": 1}
    text = format_human({**DOC, "pid": 7, "backups": {"count": 3, "last": last}}, running=True, now=NOW)
    assert (
        "backups: 3, newest 20250102T030400.000000Z-v1 (schema version 1, 12288 bytes), taken "
        "2025-01-02T03:04:00Z (5m17s ago); `lssupervisor backups` lists them"
    ) in text
    parked = {**DOC, "state": "PARKED", "lightningstream": {"last_exit": "exit 1"}}
    stale = format_human(parked, running=False, now=NOW)
    assert stale.startswith("lssupervisor is not running; state.json is stale (last: PARKED")
    assert "lightningstream: not running, last exit: exit 1" in stale


def test_format_human_prints_no_none_and_rounds_seconds() -> None:
    # What a daemon publishes before it read a marker, with LS down and a retry pending, mid-migration.
    sparse = {
        "state": "BACKOFF", "substate": None, "reason": None, "pid": None, "since": None, "paused": False,
        "target_version": None, "schema_version": None,
        "lightningstream": {"pid": None, "ready": False, "restarts": None, "config": None,
                            "started_at": None, "last_exit": None, "retry_at": "2025-01-02T03:09:20.123Z"},
        "lmdbs": {"main": {"path": "/x/db", "schema_version": None}},
        "migration": {"progress": "main: 0003_x 1200/5000 keys", "time_limit": "step 0003_x (1h)",
                      "time_limit_at": "2025-01-02T03:59:17.4Z", "last_result": "failed",
                      "last_duration_s": 12.3456789, "last_error": "boom", "last_success_at": None},
        "backups": {
            "count": 1, "last": {"id": "b1", "created_at": None, "size_bytes": None, "version": None}
        },
        "updated_at": None,
    }
    for running in (True, False):
        text = format_human(sparse, running=running, now=NOW)
        assert "None" not in text and "null" not in text, text
        assert not re.search(r"\d\.\d{2,}", text), text  # no 12.3456789s
    text = format_human(sparse, running=True, now=NOW)
    assert text.splitlines()[0] == "lssupervisor: BACKOFF"
    assert "lightningstream: not running; restart at 2025-01-02T03:09:20Z (in 3.1s)" in text
    assert "schema: version not known yet, target newest migration; markers main=not read yet" in text
    assert (
        "migration: main: 0003_x 1200/5000 keys (time limit step 0003_x (1h), until 2025-01-02T03:59:17Z "
        "(in 50m00s))"
    ) in text
    assert "last migration: failed after 12s" in text and "last migration error: boom" in text
    assert "backups: 1, newest b1; `lssupervisor backups` lists them" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0351, "35ms"), (4.2345, "4.2s"), (42.4, "42s"), (312, "5m12s"), (7500.2, "2h05m"), (273600, "3d4h")],
)
def test_span_rounds_to_what_matters(seconds: float, text: str) -> None:
    assert span(seconds) == text


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "lssupervisor.yaml"
    config.write_text("state_dir: state\nhttp:\n  address: ''\n")
    return config


def status(config: Path, as_json: bool, state_dir: str | None = None) -> int:
    return cmd_status(argparse.Namespace(config=str(config), json=as_json, state_dir=state_dir))


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
            "state_file": str(cfg.state_file), "state_dir_from": f"state_dir of {config}",
            "config_error": None,
        }
        assert out["state"] == "RUNNING" and out["lightningstream"]["pid"] == 4242
    # An offline command holding the lock is not the daemon.
    with lock.acquire(cfg, [], "migrate"):
        assert status(config, False) == ExitCode.NOT_RUNNING
        text = capsys.readouterr().out
        assert "stale" in text and f"state dir locked by pid {os.getpid()} (migrate)" in text


@pytest.mark.parametrize(
    ("broken", "how"),
    [
        ("state_dir: /STATE\nbogus_key: 1\n", "leniently"),  # valid YAML, invalid config
        ("state_dir: '/STATE'  # ours\nlightningstream: [\n", "leniently"),  # YAML that does not parse
        ("lightningstream: {binary: ''}\n", "default"),  # no state_dir: the default, next to the file
    ],
)
def test_status_answers_from_state_json_when_the_config_is_broken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, how: str
) -> None:
    from lssupervisor.config import Config, PathOpt

    state_dir = tmp_path / "var" if how == "leniently" else tmp_path / "state"
    config = tmp_path / "lssupervisor.yaml"
    config.write_text(broken.replace("/STATE", str(state_dir)))
    write_state(state_dir / "state.json", {**DOC, "state": "PARKED", "pid": os.getpid()})
    with lock.acquire(Config(state_dir=PathOpt(str(state_dir))), [], "daemon"):
        assert status(config, False) == 0  # the daemon runs: the broken file is not its config yet
        text = capsys.readouterr().out
        assert text.splitlines()[0].startswith(f"lssupervisor pid {os.getpid()}: PARKED since")
        assert text.splitlines()[1].startswith(f"config: cannot be read: {config}")
        assert f"(this status comes from {state_dir / 'state.json'}" in text
        assert status(config, True) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["state"] == "PARKED" and out["daemon"]["running"] is True
        assert out["daemon"]["config_error"].startswith(str(config))
        assert out["daemon"]["state_file"] == str(state_dir / "state.json")
        assert how in out["daemon"]["state_dir_from"]


def test_status_with_a_broken_config_and_no_state_says_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lssupervisor.yaml"
    config.write_text("bogus_key: 1\n")
    with pytest.raises(ConfigError) as info:
        status(config, False)
    assert str(info.value).startswith(f"{config}: bogus_key: unknown option")
    assert f"no state file at {tmp_path / 'state' / 'state.json'} either" in str(info.value)
    assert "--state-dir DIR" in str(info.value)
    assert status(config, True) == ExitCode.CONFIG  # --json still prints what it knows
    assert json.loads(capsys.readouterr().out)["daemon"]["config_error"].startswith(str(config))
    # --state-dir finds it wherever it is.
    elsewhere = tmp_path / "elsewhere"
    write_state(elsewhere / "state.json", {**DOC, "pid": os.getpid()})
    assert status(config, True, state_dir=str(elsewhere)) == ExitCode.NOT_RUNNING
    doc = json.loads(capsys.readouterr().out)
    assert doc["daemon"]["stale"] is True and doc["daemon"]["state_dir_from"] == "--state-dir"

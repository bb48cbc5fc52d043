"""reload / reconcile / pause / resume: finding the daemon by its lock, the persisted pause flag, and
the real daemon pausing and resuming LS."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lssupervisor.cli import control
from lssupervisor.config import load_config
from lssupervisor.daemon import lock
from tests.harness.e2e import ConfigSet, Daemon, pid_alive, run_cli


def ns(config: Path) -> argparse.Namespace:
    return argparse.Namespace(config=str(config))


def test_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lssupervisor.yaml"
    config.write_text("state_dir: state\n")
    cfg = load_config(config)
    with pytest.raises(control.NotRunning, match="no lssupervisor daemon runs for state dir"):
        control.cmd_reload(ns(config))
    with pytest.raises(control.NotRunning):
        control.cmd_reconcile(ns(config))
    # pause/resume work offline: the flag is the desired state for the next start.
    assert control.cmd_pause(ns(config)) == 0
    assert cfg.paused_file.exists() and "LS will stay stopped" in capsys.readouterr().out
    assert control.cmd_resume(ns(config)) == 0
    assert not cfg.paused_file.exists()
    # An offline command holding the lock is not signalled.
    with lock.acquire(cfg, [], "migrate"), pytest.raises(control.NotRunning, match="running `migrate`"):
        control.daemon_pid(cfg)


def test_pause_and_resume_the_real_daemon(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    d = Daemon(cs)
    try:
        ls_pid = d.running_ls_pid()
        out = run_cli(cs, "pause")
        assert out.returncode == 0, out.stderr
        assert f"paused: LS stopped (lssupervisor pid {d.pid})" in out.stdout
        assert not pid_alive(ls_pid)
        doc = cs.state_doc()
        assert doc is not None and doc["state"] == "PAUSED" and doc["paused"] is True
        assert doc["lightningstream"]["failures"] == 0  # a pause is an intended stop (I5)
        # A reload while paused keeps LS down.
        assert run_cli(cs, "reload").returncode == 0
        d.wait_log(r'state RECONCILING -> PAUSED"')
        assert cs.start_pids() == [ls_pid]
        out = run_cli(cs, "resume")
        assert out.returncode == 0, out.stderr
        assert f"resumed: lssupervisor pid {d.pid} is" in out.stdout
        new = d.running_ls_pid()  # also waits for its start record (RUNNING comes after settle_time)
        assert new != ls_pid and cs.start_pids() == [ls_pid, new]
        assert run_cli(cs, "reconcile").returncode == 0
        d.wait_log(r'reason="reconcile \(SIGUSR1\)"')
        assert d.running_ls_pid() == new
    finally:
        d.close()


def test_paused_flag_holds_across_a_restart(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    assert run_cli(cs, "pause").returncode == 0  # no daemon yet: only the flag
    d = Daemon(cs)
    try:
        d.wait_state("PAUSED")
        assert cs.starts() == []
        d.send(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.close()


# A "daemon" that holds the lock but never answers: SIGUSR1 is ignored, state.json never says PAUSED.
DEAF_DAEMON = """
import signal, sys
from lssupervisor.config import load_config
from lssupervisor.daemon.lock import acquire
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
lock = acquire(load_config(sys.argv[1]), [], "daemon")
print("ready", flush=True)
sys.stdin.read()
"""


def test_pause_unconfirmed_is_its_own_exit_code_not_a_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lssupervisor.cli.main import main
    from lssupervisor.errors import ExitCode

    config = tmp_path / "lssupervisor.yaml"
    config.write_text("state_dir: state\nlightningstream:\n  stop_timeout: 0.5s\n")
    monkeypatch.setattr(control, "WAIT_EXTRA_S", 0.2)
    deaf = subprocess.Popen(
        [sys.executable, "-c", DEAF_DAEMON, str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert deaf.stdout is not None and deaf.stdout.readline().strip() == "ready"
        capsys.readouterr()
        code = main(["pause", "-c", str(config)])
        err = capsys.readouterr().err
    finally:
        assert deaf.stdin is not None
        deaf.stdin.close()
        deaf.wait(10)
    assert code == int(ExitCode.UNCONFIRMED) == 69 and code != int(ExitCode.SOFTWARE)
    assert err.count("\n") == 1
    assert err.startswith(f"lssupervisor: error: lssupervisor pid {deaf.pid} did not report PAUSED")
    assert "did not report PAUSED within 0.7s" in err and "state.json says nothing" in err
    assert "check `lssupervisor status`" in err
    assert load_config(config).paused_file.exists()  # the request itself stands

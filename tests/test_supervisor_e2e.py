"""End to end: the real daemon process (``python -m lssupervisor run``) against the LS stand-in.

Every test waits on conditions (the daemon's log, state.json, the stand-in's start record) with a
deadline, and kills what it started by pid in ``finally``. Timeouts in the config set are short so the
whole file runs in seconds; no test measures how long something took with its own clock: durations
come from the daemon's log lines or the stand-in's start records.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lssupervisor.config import LogFormat
from lssupervisor.daemon.logs import fields, logfmt_value, setup_logging
from lssupervisor.errors import ExitCode
from tests.harness import free_port, wait_for
from tests.harness.e2e import ConfigSet, Daemon, pid_alive


@pytest.fixture
def cs(tmp_path: Path) -> ConfigSet:
    return ConfigSet(tmp_path)


@pytest.fixture
def daemon(cs: ConfigSet) -> Iterator[Daemon]:
    d = Daemon(cs)
    try:
        yield d
    finally:
        d.close()


# ---------------------------------------------------------------------------------------------------
# Stopping


def test_sigterm_stops_ls_group_and_exits_zero(daemon: Daemon, cs: ConfigSet) -> None:
    ls_pid = daemon.running_ls_pid()
    line = daemon.lines(r"state RECONCILING -> STARTING")[0]
    assert f"pid={ls_pid}" in line
    daemon.send(signal.SIGTERM)
    assert daemon.wait() == 0
    assert not pid_alive(ls_pid)
    assert not daemon.lines(r"SIGKILL")  # LS obeyed SIGTERM: no escalation
    daemon.wait_log(r'msg="state RUNNING -> STOPPING" reason="shutdown \(SIGTERM\)"')
    daemon.wait_log(r'msg="state STOPPING -> STOPPED"')
    doc = cs.state_doc()
    assert doc is not None and doc["state"] == "STOPPED" and doc["lightningstream"]["pid"] is None
    assert doc["lightningstream"]["record"] is None  # nothing for the next run to sweep


def log_time(line: str) -> float:
    """The daemon's own timestamp of a log line (``time=...Z``, millisecond resolution), in seconds."""
    m = re.match(r"time=(\S+)Z ", line)
    assert m, line
    return datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp()


def test_ls_ignoring_sigterm_is_killed_at_stop_timeout(cs: ConfigSet) -> None:
    cs.write(stop_timeout="1s", ls_env={"LSSTANDIN_IGNORE_SIGTERM": "1"})
    d = Daemon(cs)
    try:
        # running_ls_pid also waits for the stand-in's start record: RUNNING alone only means
        # settle_time passed, and on a busy machine the stand-in was still starting, had not yet set
        # SIGTERM to ignored, died of it at once, and the daemon was gone 0.70 s after the stop, which
        # looked like an early SIGKILL.
        ls_pid = d.running_ls_pid()
        d.send(signal.SIGTERM)
        assert d.wait() == 0
        assert not pid_alive(ls_pid)
        (received,) = d.lines(r'msg="received SIGTERM"')
        assert d.lines(rf'msg="stopping lightningstream" pid={ls_pid} signal=SIGTERM')
        (kill,) = d.wait_log(r"still running 1s after SIGTERM: SIGKILL")
        d.wait_log(r'lightningstream exited.*status="killed by SIGKILL"')
        # SIGKILL no earlier than stop_timeout after the stop began, by the daemon's own clock (its log
        # lines, 1 ms resolution); that the SIGTERM to LS goes out first thing is a pure-core test
        # (test_lifecycle.py::test_sigterm_goes_out_before_the_announcement_...).
        assert log_time(kill) - log_time(received) >= 1.0 - 0.001, (received, kill)
    finally:
        d.close()


def test_second_sigterm_kills_ls_now(cs: ConfigSet) -> None:
    # stop_timeout far beyond any test's wait: only the second signal can end this LS in time.
    cs.write(stop_timeout="1h", ls_env={"LSSTANDIN_IGNORE_SIGTERM": "1"})
    d = Daemon(cs)
    try:
        ls_pid = d.running_ls_pid()  # recorded: it ignores SIGTERM from here on
        d.send(signal.SIGTERM)
        d.wait_log(r"state RUNNING -> STOPPING")
        d.send(signal.SIGINT)
        assert d.wait() == 0
        assert not pid_alive(ls_pid)
        d.wait_log(r"second SIGINT: SIGKILL to LS now")
        assert not d.lines(r"after SIGTERM: SIGKILL")  # not the stop_timeout's SIGKILL
    finally:
        d.close()


def test_kill9_of_the_supervisor_takes_ls_down(daemon: Daemon) -> None:
    ls_pid = daemon.running_ls_pid()
    daemon.proc.kill()
    daemon.wait()
    wait_for(lambda: not pid_alive(ls_pid), what="LS gone after kill -9 of the supervisor")


def test_orphan_of_an_earlier_run_is_swept_before_the_new_ls_starts(cs: ConfigSet) -> None:
    # Without pdeathsig, a SIGKILLed supervisor leaves its LS behind: the orphan of the next test run.
    cs.write(pdeathsig=False)
    first = Daemon(cs, "first")
    try:
        orphan = first.running_ls_pid()
        first.proc.kill()
        first.wait()
        assert pid_alive(orphan)
        cs.write(pdeathsig=True)
        second = Daemon(cs, "second")
        try:
            new = second.running_ls_pid()
            assert new != orphan and not pid_alive(orphan)
            second.wait_log(rf"orphaned lightningstream pid={orphan}")
            text = second.text()
            assert text.index(f"orphaned lightningstream pid={orphan}") < text.index(
                f"lightningstream started pid={new}"
            )
            # The orphan ended before the new LS started: never two LS on one LMDB.
            assert [s["pid"] for s in cs.starts()] == [orphan, new]
        finally:
            second.close()
    finally:
        first.close()


# ---------------------------------------------------------------------------------------------------
# Restart policy


def test_crash_is_restarted_after_the_backoff(cs: ConfigSet) -> None:
    cs.write(
        ls_env={"LSSTANDIN_CRASH_AFTER_MS": "700"}, restart={"burst_limit": "20", "initial_delay": "500ms"}
    )
    d = Daemon(cs)
    try:
        d.wait_log(r"state (STARTING|RUNNING) -> BACKOFF", count=1)
        wait_for(lambda: len(cs.starts()) >= 2, what="a second LS start")
        exited = d.lines(r"lightningstream exited")[0]
        assert 'status="exited with status 2"' in exited
        backoff = d.lines(r"-> BACKOFF")[0]
        assert 'reason="LS exited with status 2; restart 1 in 500ms"' in backoff
        first, second = cs.starts()[:2]
        # By the stand-ins' own clocks: a crash 0.7 s after the first start, then the 0.5 s initial delay.
        gap = (second["time_ns"] - first["time_ns"]) / 1e9
        assert gap >= 0.7 + 0.5, gap
        wait_for(
            lambda: (cs.state_doc() or {}).get("lightningstream", {}).get("restarts", 0) >= 1,
            what="the restart counted in state.json",
        )
    finally:
        d.close()


def test_crash_burst_parks_and_says_why(cs: ConfigSet) -> None:
    cs.write(
        ls_env={"LSSTANDIN_CRASH_AFTER_MS": "50", "LSSTANDIN_EXIT_CODE": "1"},
        restart={"burst_limit": "3", "burst_window": "60s", "initial_delay": "100ms"},
    )
    d = Daemon(cs)
    try:
        doc = d.wait_state("PARKED")
        assert len(cs.starts()) == 3
        reason = doc["reason"]
        assert "LS exited 1 within 5s of starting: a fatal start-up error" in reason
        assert "LS's last line" not in reason  # output: inherit: the daemon does not see LS's lines
        assert "3 failures within 1m" in reason and "lssupervisor resume" in reason
        # The same grep-able line as every other park.
        (line,) = d.wait_log(r'level=error msg="parked: ')
        assert "3 failures within 1m" in line
        assert doc["lightningstream"]["pid"] is None
        assert doc["lightningstream"]["retry_at"] is None  # no restart is scheduled: LS stays down
        d.send(signal.SIGTERM)
        assert d.wait() == 66  # ExitCode.PARKED: fail closed
        assert len(cs.starts()) == 3  # nothing started while parked (the daemon is gone: final)
    finally:
        d.close()


def test_ls_http_port_in_use_is_named_by_ls_last_line_with_output_prefix(cs: ConfigSet) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cs.write_template(ls_http=f"127.0.0.1:{port}")
        cs.write(ls_extra="  output: prefix\n", restart={"burst_limit": "2", "initial_delay": "100ms"})
        d = Daemon(cs)
        try:
            doc = d.wait_state("PARKED")
            reason = doc["reason"]
            # Not "LS rejected its config": LS exits 1 for its HTTP port too, and its last line says so.
            assert "a fatal start-up error (config, LMDB open, storage init or its HTTP port in use)" in (
                reason
            )
            fatal = f'LS\'s last line: level=fatal msg="HTTP server error: listen tcp 127.0.0.1:{port}'
            assert fatal in reason, reason
            assert "address already in use" in reason and "time=" not in reason
            assert "lssupervisor resume" in reason
            assert d.lines(r"lightningstream: .*level=fatal")  # LS's own lines are still logged
        finally:
            d.close()
    finally:
        busy.close()


# ---------------------------------------------------------------------------------------------------
# Reload


def test_hup_with_unchanged_config_keeps_the_ls_pid(daemon: Daemon, cs: ConfigSet) -> None:
    ls_pid = daemon.running_ls_pid()
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r'state RECONCILING -> RUNNING" reason="LS config unchanged"')
    assert daemon.running_ls_pid() == ls_pid
    assert len(cs.starts()) == 1 and pid_alive(ls_pid)


def test_hup_with_a_changed_template_restarts_ls_once(daemon: Daemon, cs: ConfigSet) -> None:
    old = daemon.running_ls_pid()
    cs.write_template(poll="200ms")
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r'state STOPPING -> STARTING" reason="LS config changed"')
    new = daemon.running_ls_pid()
    assert new != old and not pid_alive(old)
    assert [s["pid"] for s in cs.starts()] == [old, new]
    assert "200ms" in (cs.state / "lightningstream.yaml").read_text()
    assert "100ms" in (cs.state / "lightningstream.yaml.prev").read_text()
    doc = cs.state_doc()
    assert doc is not None and doc["lightningstream"]["restarts"] == 1
    assert doc["lightningstream"]["failures"] == 0  # an intended restart is not a failure (I5)


def test_bad_config_on_hup_keeps_running(daemon: Daemon, cs: ConfigSet) -> None:
    ls_pid = daemon.running_ls_pid()
    cs.config.write_text(cs.config.read_text().replace("jitter: 0", "jitter: lots"))
    daemon.send(signal.SIGHUP)
    # The status says why, not only the log.
    daemon.wait_log(r'state RECONCILING -> RUNNING" reason="reload failed, previous config kept: [^"]*jitter')
    errors = daemon.lines(r"level=error")
    assert len(errors) == 1, errors
    assert "reload failed, keeping the previous config" in errors[0] and "restart.jitter" in errors[0]
    assert daemon.running_ls_pid() == ls_pid and pid_alive(ls_pid)


# ---------------------------------------------------------------------------------------------------
# Lock, status


def test_second_supervisor_is_refused_naming_the_holder(daemon: Daemon, cs: ConfigSet) -> None:
    daemon.running_ls_pid()
    second = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "run", "-c", str(cs.config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert second.returncode == 75  # ExitCode.LOCKED: refused at once, not queued behind the holder
    assert f"lssupervisor pid {daemon.pid}" in second.stderr


def test_second_supervisor_with_another_state_dir_on_the_same_lmdb_is_refused(
    daemon: Daemon, cs: ConfigSet, tmp_path: Path
) -> None:
    daemon.running_ls_pid()
    other = tmp_path / "other.yaml"
    other.write_text(cs.config.read_text().replace("state_dir: state", "state_dir: state2"))
    second = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "run", "-c", str(other)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert second.returncode == 75
    assert f"LMDB {cs.lmdb} is locked by lssupervisor pid {daemon.pid}" in second.stderr


def test_our_http_address_in_use_is_one_error_line_exit_78_and_nothing_started(cs: ConfigSet) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        cs.write(http=f"127.0.0.1:{port}")
        d = Daemon(cs)
        try:
            assert d.wait() == 78  # ExitCode.CONFIG
            text = d.text()
            (line,) = [x for x in text.splitlines() if x.strip()]  # one line, nothing else
            assert "level=error" in line and f"http.address 127.0.0.1:{port}: cannot listen" in line, line
            assert "lssupervisor.yaml: " in line and "nothing was started" in line
            assert "Traceback" not in text and "main loop failed" not in text
            assert cs.starts() == [] and cs.records() == []  # no LS, not even `LS -c` validation
            assert cs.state_doc() is None  # never booted
        finally:
            d.close()
    finally:
        busy.close()


def test_usr2_logs_one_status_line(daemon: Daemon) -> None:
    ls_pid = daemon.running_ls_pid()
    daemon.send(signal.SIGUSR2)
    (line,) = daemon.wait_log(r"msg=status ")
    assert f"pid={ls_pid}" in line and "state=RUNNING" in line and "ready=true" in line


def test_status_json_fields_and_stale_detection(daemon: Daemon, cs: ConfigSet) -> None:
    ls_pid = daemon.running_ls_pid()

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lssupervisor", "status", "-c", str(cs.config), *extra],
            capture_output=True, text=True, timeout=60, check=False,
        )

    out = status("--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for key in ("state", "substate", "reason", "pid", "since", "target_version", "paused", "updated_at"):
        assert key in doc, key
    assert doc["state"] == "RUNNING" and doc["pid"] == daemon.pid and doc["paused"] is False
    ls = doc["lightningstream"]
    assert ls["pid"] == ls_pid and ls["ready"] is True and ls["restarts"] == 0
    assert ls["config"] == str(cs.state / "lightningstream.yaml") and ls["started_at"].endswith("Z")
    # The marker a worker read (the empty LMDB was stamped with the newest migration at boot).
    assert doc["lmdbs"] == {"main": {"path": str(cs.lmdb), "schema_version": 1}}
    assert set(doc["migration"]) >= {"progress", "last_result", "last_duration_s", "last_success_at"}
    assert doc["daemon"] == {
        "running": True, "stale": False, "lock_holder": {"pid": daemon.pid, "purpose": "daemon"},
        "state_file": str(cs.state / "state.json"), "state_dir_from": f"state_dir of {cs.config}",
        "config_error": None,
    }
    human = status()
    assert human.returncode == 0 and f"lssupervisor pid {daemon.pid}: RUNNING" in human.stdout
    daemon.send(signal.SIGTERM)
    assert daemon.wait() == 0
    stale = status()
    assert stale.returncode == ExitCode.NOT_RUNNING and "not running; state.json is stale" in stale.stdout
    stale_json = json.loads(status("--json").stdout)
    assert stale_json["daemon"]["stale"] is True and stale_json["state"] == "STOPPED"


def test_json_log_format(cs: ConfigSet) -> None:
    d = Daemon(cs, extra=("--log-format", "json"))
    try:
        d.running_ls_pid()
        d.send(signal.SIGTERM)
        assert d.wait() == 0
        ours = [json.loads(line) for line in d.text().splitlines() if line.startswith("{")]
        transitions = [o for o in ours if o["msg"].startswith("state ")]
        # Boot on an empty LMDB: the cycle stamps it (no LS runs yet), then renders for its marker.
        assert [t["msg"] for t in transitions] == [
            "state STOPPED -> RECONCILING",
            "state RECONCILING step PROVING",
            "state RECONCILING step MIGRATING",
            "state RECONCILING step VERIFYING",
            "state RECONCILING step RENDERING",
            "state RECONCILING -> STARTING",
            "state STARTING -> RUNNING",
            "state RUNNING -> STOPPING",
            "state STOPPING -> STOPPED",
        ]
        assert transitions[0]["substate"] == "PLANNING"
        assert transitions[-2]["reason"] == "shutdown (SIGTERM)" and isinstance(transitions[-2]["pid"], int)
    finally:
        d.close()


def test_readiness_from_ls_healthz_and_our_http_status(cs: ConfigSet) -> None:
    ls_port, our_port = free_port(), free_port()
    cs.write_template(ls_http=f"127.0.0.1:{ls_port}")
    cs.write(http=f"127.0.0.1:{our_port}", settle_time="60s", ls_env={"LSSTANDIN_HEALTH_INTERVAL_MS": "100"})
    d = Daemon(cs)
    try:
        ls_pid = d.running_ls_pid()  # settle_time is 60 s: only /healthz can make LS ready this soon
        (line,) = d.lines(r"state STARTING -> RUNNING")
        assert 'reason="LS ready"' in line
        with urllib.request.urlopen(f"http://127.0.0.1:{our_port}/status", timeout=30) as resp:
            doc = json.loads(resp.read())
        assert doc["state"] == "RUNNING" and doc["lightningstream"]["pid"] == ls_pid
        with urllib.request.urlopen(f"http://127.0.0.1:{our_port}/readyz", timeout=30) as resp:
            assert resp.status == 200
        d.send(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.close()


def test_readiness_survives_ls_wedging_its_healthz(cs: ConfigSet) -> None:
    """LS v1.0.0 can deadlock its health checker on the evaluation that completes the startup (a
    /healthz request at that moment): /healthz then never answers. The daemon still reaches RUNNING."""
    ls_port = free_port()
    cs.write_template(ls_http=f"127.0.0.1:{ls_port}")
    cs.write(settle_time="1h", ls_env={"LSSTANDIN_HEALTH_INTERVAL_MS": "100", "LSSTANDIN_HEALTHZ_WEDGE": "1"})
    d = Daemon(cs)
    try:
        d.running_ls_pid()  # settle_time is 1 h: only readiness can make it RUNNING
        (line,) = d.lines(r"state STARTING -> RUNNING")
        assert 'reason="LS ready"' in line
        (warning,) = d.lines(r"level=warning .*deadlocked on the evaluation that completes the startup")
        assert "startup of main; taking LS as ready" in warning
        d.send(signal.SIGTERM)
        assert d.wait() == 0
    finally:
        d.close()


# ---------------------------------------------------------------------------------------------------
# Log formatting (no processes)


def test_text_log_lines_are_stable_logfmt() -> None:
    buf = io.StringIO()
    setup_logging(LogFormat.TEXT, "info", stream=buf)
    try:
        logging.getLogger("lssupervisor.daemon.supervisor").info(
            "state %s -> %s", "RUNNING", "STOPPING", extra=fields(reason="LS config changed", pid=12)
        )
        logging.getLogger("lssupervisor.x").debug("hidden")
    finally:
        logging.getLogger().handlers.clear()
    line = buf.getvalue().strip()
    assert re.fullmatch(
        r'time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info msg="state RUNNING -> STOPPING" '
        r'reason="LS config changed" pid=12',
        line,
    ), line
    assert logfmt_value('a "b"\nc') == '"a \\"b\\"\\nc"'
    assert logfmt_value("") == '""' and logfmt_value(None) == "null" and logfmt_value(True) == "true"


def test_reload_naming_an_lmdb_that_cannot_be_locked_keeps_running(daemon: Daemon, cs: ConfigSet) -> None:
    # The new LMDB's lock file cannot be created (its parent is a regular file): an OSError from the
    # lock, not a SupervisorError. It must be one "reload failed" line, not a crash that takes LS down.
    ls_pid = daemon.running_ls_pid()
    blocker = cs.root / "not-a-dir"
    blocker.write_text("")
    cs.template.write_text(cs.template.read_text().replace(str(cs.lmdb), str(blocker / "db")))
    daemon.send(signal.SIGHUP)
    daemon.wait_log(r'RECONCILING -> RUNNING" reason="reload failed, previous config kept: [^"]*not-a-dir')
    errors = daemon.lines(r"level=error")
    assert len(errors) == 1, errors
    assert "cannot lock the LMDBs" in errors[0] and str(blocker) in errors[0]
    assert daemon.proc.poll() is None
    assert daemon.running_ls_pid() == ls_pid and pid_alive(ls_pid)

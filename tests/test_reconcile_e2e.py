"""End to end: the reconcile cycle of the real daemon against the LS stand-in.

Migrations are shipped as an application's package manager would (temp file + rename into the
watched directory). The never-overlap proof uses the two test knobs: the stand-in holds a shared
``flock`` on ``<record>.lock`` for its whole life (``LSSTANDIN_RECORD``) and the worker takes
``LOCK_EX|LOCK_NB`` on it around every LMDB write, recording ``write_txn_begin``/``end`` (or
``overlap`` when it cannot: LS was running). Every wait is a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from lssupervisor.errors import ExitCode
from lssupervisor.testing.fixtures import build_lmdb
from lssupervisor.worker.protocol import OVERLAP_ENV
from tests.harness import wait_for
from tests.harness.e2e import (
    STANDIN,
    WATCH,
    ConfigSet,
    Daemon,
    Daemons,
    doc_of,
    dump,
    markers,
    own_workers,
    pid_alive,
    rendered_root,
    ship,
    step_migration,
    wait_running_on,
)

FAILING = '''"""Step 2: writes, then fails (the step must roll back)."""

VERSION = 2


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"half", b"written")
    raise RuntimeError("boom in step 2")
'''

SLOW = '''"""Step 2: writes, then waits for a file that never comes (the test cancels it)."""

import time
from pathlib import Path

VERSION = 2


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"half", b"written")
    deadline = time.monotonic() + 60
    while not Path("{flag}").exists() and time.monotonic() < deadline:
        m.progress(0, 1)
        time.sleep(0.02)
'''


@pytest.fixture
def cs(tmp_path: Path) -> ConfigSet:
    return ConfigSet(tmp_path)


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    started = Daemons()
    try:
        yield started
    finally:
        started.close_all()


def start(daemons: Daemons, cs: ConfigSet, name: str = "daemon") -> Daemon:
    return daemons.start(cs, name)


# ---------------------------------------------------------------------------------------------------


def test_ls_never_runs_during_a_write_across_repeated_cycles(
    cs: ConfigSet, daemons: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OVERLAP_ENV, str(cs.record))  # the daemon's workers inherit it
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    wait_running_on(d, 1)
    pids = [doc_of(d)["lightningstream"]["pid"]]
    for version in (2, 3, 4):
        ship(cs, f"{version:04d}_step.py", step_migration(version))
        doc = wait_running_on(d, version)
        pids.append(doc["lightningstream"]["pid"])
        assert rendered_root(cs) == f"{cs.storage}/v{version}"  # I2: the prefix follows the marker
        assert not pid_alive(pids[-2])  # the previous LS is gone for good
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    records = cs.records()
    events = [r["event"] for r in records]
    assert "overlap" not in events, records
    assert not any(r.get("lock_conflict") for r in records), records
    # One stamp at boot plus one write per migration, each bracketed; no LS start inside any of them.
    begins = [r for r in records if r["event"] == "write_txn_begin"]
    ends = [r for r in records if r["event"] == "write_txn_end"]
    assert len(begins) == len(ends) == 4, events
    starts = [r["time_ns"] for r in records if r["event"] == "start"]
    for b, e in zip(begins, ends, strict=True):
        assert b["time_ns"] <= e["time_ns"]
        assert not [t for t in starts if b["time_ns"] <= t <= e["time_ns"]]
    # Each cycle restarted LS once, on the new version (validation runs of `LS -c` left out).
    assert [s["pid"] for s in cs.starts()] == pids
    assert len(set(pids)) == 4
    assert d.lines(r"reason=\"reconcile \(watched file changed\)\"")
    assert markers(cs) == {"main": 4}


def test_noop_reconcile_keeps_the_ls_pid(cs: ConfigSet, daemons: Daemons) -> None:
    d = start(daemons, cs)
    pid = wait_running_on(d, 1)["lightningstream"]["pid"]
    d.send(signal.SIGUSR1)
    d.wait_log(r"state RECONCILING step RENDERING.*nothing to migrate")  # boot stamped instead
    doc = wait_running_on(d, 1)
    assert doc["lightningstream"]["pid"] == pid and pid_alive(pid)
    assert len(cs.starts()) == 1
    assert not d.lines("step PROVING.*reconcile")  # no stop, no proof: nothing was to be written


def test_a_template_change_restarts_ls_once(cs: ConfigSet, daemons: Daemons) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    old = wait_running_on(d, 1)["lightningstream"]["pid"]
    cs.write_template(poll="150ms")  # the watcher sees it
    new = wait_for(
        lambda: (p := doc_of(d).get("lightningstream", {}).get("pid")) not in (None, old)
        and doc_of(d).get("state") == "RUNNING" and p,
        timeout=30, what="LS restarted on the new template",
    )
    # A reconcile after it acts as a barrier: any second restart would have happened before it ends.
    d.send(signal.SIGUSR1)
    d.wait_log(r"nothing to migrate", count=2)
    assert wait_running_on(d, 1)["lightningstream"]["pid"] == new
    assert [s["pid"] for s in cs.starts()] == [old, new]
    assert "lmdb_poll_interval: 150ms" in (cs.state / "lightningstream.yaml").read_text()


def test_a_bad_template_keeps_the_old_config_and_ls_running(cs: ConfigSet, daemons: Daemons) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    pid = wait_running_on(d, 1)["lightningstream"]["pid"]
    before = (cs.state / "lightningstream.yaml").read_text()
    cs.template.write_text(cs.template.read_text() + "no_such_ls_key: 1\n")
    line = d.wait_log(r"reload failed, keeping the previous config")[0]
    assert "no_such_ls_key" in line
    assert len(d.lines(r"level=error")) == 1  # one error line, nothing else
    doc = wait_running_on(d, 1)
    assert doc["lightningstream"]["pid"] == pid and pid_alive(pid)
    assert (cs.state / "lightningstream.yaml").read_text() == before


# What a reader-table proof must catch: an LS the daemon did not start (by hand, with another config,
# so neither our process group nor our config names it) reading the LMDB. Named like the configured LS
# binary, it holds a read transaction open until told to stop.
LS_LOOKALIKE = """\
import sys
import lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=64)
txn = env.begin()
print("reading", flush=True)
sys.stdin.readline()
"""


def test_an_ls_among_the_lmdb_readers_keeps_the_migration_off_the_lmdb(
    cs: ConfigSet, daemons: Daemons, tmp_path: Path
) -> None:
    """I1, the reader-table half of "LS is proven gone": the daemon stops its own LS, finds another LS
    among the LMDB's readers, and parks without touching the LMDB."""
    d = start(daemons, cs)
    wait_running_on(d, 1)
    script = tmp_path / "bin" / Path(STANDIN).name  # the same name as the configured LS binary
    script.parent.mkdir()
    script.write_text(LS_LOOKALIKE)
    stranger = subprocess.Popen(
        [sys.executable, str(script), str(cs.lmdb)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert stranger.stdout is not None and stranger.stdout.readline().strip() == "reading"
        ship(cs, "0002_step.py", step_migration(2))
        d.send(signal.SIGUSR1)
        doc = d.wait_state("PARKED")
        reason = doc["reason"]
        assert f"LS still runs after the stop: pid {stranger.pid}" in reason, reason
        assert "LMDB main reader" in reason and "the LMDB is not touched (I1)" in reason
        cycle = d.text().split('msg="received SIGUSR1', 1)[1]
        assert "proving it gone" in cycle and "BACKING_UP" not in cycle and "MIGRATING" not in cycle
        assert markers(cs) == {"main": 1}
        assert not (cs.state / "backups").exists() or not list((cs.state / "backups").iterdir())
    finally:
        assert stranger.stdin is not None
        stranger.stdin.close()
        stranger.wait(30)
    d.send(signal.SIGTERM)
    assert d.wait() == int(ExitCode.LS_RUNNING)


def test_a_failing_migration_parks_with_ls_down_and_the_lmdb_unchanged(
    cs: ConfigSet, daemons: Daemons
) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    pid = wait_running_on(d, 1)["lightningstream"]["pid"]
    ship(cs, "0002_fails.py", FAILING)
    doc = d.wait_state("PARKED")
    reason = doc["reason"]
    assert "boom in step 2" in reason and "consistently at version 1" in reason, reason
    assert "lssupervisor resume" in reason and "lssupervisor rollback" in reason
    assert doc["lightningstream"]["pid"] is None and not pid_alive(pid)
    assert doc["migration"]["last_result"] == "failed"
    assert doc["lmdbs"]["main"]["schema_version"] == 1
    # Unchanged: the same last txn id and entries as the backup taken just before the failed step.
    backup_id = doc["migration"]["last_backup"]
    assert backup_id and backup_id in reason
    assert doc["backups"]["count"] == 1 and doc["backups"]["last"]["id"] == backup_id  # failed: listed too
    live = dump(cs.lmdb)
    copy = dump(cs.state / "backups" / backup_id / "main")
    assert live == copy
    assert b"half" not in dict(live[1].get(b"users", []))
    assert len(cs.starts()) == 1  # LS was not started again
    d.send(signal.SIGTERM)
    assert d.wait() == 65  # ExitCode.MIGRATION: parked after a failed migration


def test_status_json_and_metrics_show_the_backups_after_a_migration(
    cs: ConfigSet, daemons: Daemons
) -> None:
    from prometheus_client import generate_latest

    from lssupervisor.daemon.metrics import build_registry
    from lssupervisor.daemon.statefile import iso_to_epoch

    def status_json() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "lssupervisor", "status", "--json", "-c", str(cs.config)],
            capture_output=True, text=True, timeout=10, check=False,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert isinstance(doc, dict)
        return doc

    cs.write(extra=WATCH)
    d = start(daemons, cs)
    wait_running_on(d, 1)
    assert status_json()["backups"] == {"count": 0, "last": None}  # a stamp takes no backup
    ship(cs, "0002_step.py", step_migration(2))
    wait_running_on(d, 2)
    doc = status_json()
    backups = doc["backups"]
    assert backups["count"] == 1, backups
    last = backups["last"]
    assert last["id"] == doc["migration"]["last_backup"] and (cs.state / "backups" / last["id"]).is_dir()
    assert last["version"] == 1  # taken before the step, at the version the LMDB had
    assert last["size_bytes"] > 0 and iso_to_epoch(last["created_at"]) is not None
    # What /metrics serves from the same document.
    text = generate_latest(build_registry(lambda: doc, process_metrics=False)).decode()
    assert "lssupervisor_backups 1.0" in text
    assert f"lssupervisor_last_backup_size_bytes {float(last['size_bytes'])}" in text
    assert "lssupervisor_last_backup_timestamp_seconds " in text


def test_on_failure_resume_restarts_ls_on_the_old_version(cs: ConfigSet, daemons: Daemons) -> None:
    # One reconcile, by SIGUSR1: with the watcher on, a second event of the file's arrival could land
    # while the first cycle runs and, under `resume`, retry the failing step with one more LS restart.
    cs.write(extra="schema:\n  on_failure: resume\n")
    d = start(daemons, cs)
    old = wait_running_on(d, 1)["lightningstream"]["pid"]
    ship(cs, "0002_fails.py", FAILING)
    d.send(signal.SIGUSR1)
    d.wait_log(r"on_failure resume: LS restarts on version 1")
    new = wait_for(
        lambda: (p := wait_running_on(d, 1)["lightningstream"]["pid"]) != old and p,
        timeout=30, what="a new LS on version 1",
    )
    assert rendered_root(cs) == f"{cs.storage}/v1"
    assert [s["pid"] for s in cs.starts()] == [old, new]
    assert markers(cs) == {"main": 1}


def test_a_second_sigterm_cancels_a_slow_migration_and_exits_zero_without_ls(
    cs: ConfigSet, daemons: Daemons, tmp_path: Path
) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    pid = wait_running_on(d, 1)["lightningstream"]["pid"]
    ship(cs, "0002_slow.py", SLOW.replace("{flag}", str(tmp_path / "never")))
    wait_for(lambda: doc_of(d).get("substate") == "MIGRATING", timeout=30, what="MIGRATING")
    assert not pid_alive(pid)
    assert len(own_workers(cs)) == 1  # the filter below sees this daemon's worker
    d.send(signal.SIGTERM)
    d.wait_log(r"send SIGTERM again to cancel it")
    assert d.proc.poll() is None and doc_of(d).get("substate") == "MIGRATING"  # still migrating
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    assert d.lines(r"second SIGTERM: cancelling the migration")
    assert len(cs.starts()) == 1  # LS was not started again
    assert doc_of(d)["state"] == "STOPPED"
    assert markers(cs) == {"main": 1}  # the open step rolled back
    assert own_workers(cs) == []


def test_schema_too_new_parks_naming_the_backup_to_restore(cs: ConfigSet, daemons: Daemons) -> None:
    cs.write(extra=WATCH)
    ship(cs, "0002_step.py", step_migration(2))
    d = start(daemons, cs)
    wait_running_on(d, 2)  # an empty LMDB is stamped with the newest version directly
    cs.write(extra=WATCH)  # keep the file set; a backup comes from a real step:
    ship(cs, "0003_step.py", step_migration(3))
    wait_running_on(d, 3)
    backups = sorted(p.name for p in (cs.state / "backups").iterdir())
    assert backups
    # An older application: the newest migration disappears.
    (cs.migrations / "0003_step.py").unlink()
    doc = d.wait_state("PARKED")
    assert "newer than the newest migration 2" in doc["reason"], doc["reason"]
    assert f"stop lssupervisor and restore the newest backup: `lssupervisor rollback {backups[-1]}`" in (
        doc["reason"]
    )
    assert doc["lightningstream"]["pid"] is None
    d.send(signal.SIGTERM)
    assert d.wait() == 67  # ExitCode.TOO_NEW


def test_startup_migration_extends_the_systemd_start_timeout(
    cs: ConfigSet, daemons: Daemons, tmp_path: Path
) -> None:
    import socket

    first = start(daemons, cs, "first")
    wait_running_on(first, 1)
    first.send(signal.SIGTERM)
    assert first.wait() == 0
    ship(cs, "0002_step.py", step_migration(2))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    got: list[str] = []
    try:
        os.environ["NOTIFY_SOCKET"] = str(sock_path)
        try:
            d = start(daemons, cs, "second")
        finally:
            del os.environ["NOTIFY_SOCKET"]

        def ready() -> bool:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
            return any("READY=1" in m for m in got)

        wait_for(ready, timeout=20, interval=0, what="READY=1")
    finally:
        sock.close()
    text = "\n".join(got)
    before_ready = text[: text.index("READY=1")]
    assert "EXTEND_TIMEOUT_USEC=" in before_ready
    assert "STATUS=migrating main 1→2 (0002_step): 100%" in before_ready
    assert "STATUS=RECONCILING/MIGRATING" in before_ready or "STATUS=RECONCILING/BACKING_UP" in before_ready
    wait_running_on(d, 2)
    history = [json.loads(line) for line in (cs.state / "history.jsonl").read_text().splitlines()]
    assert [h["kind"] for h in history if h.get("result") == "ok"][-1] == "migrate"


def test_drain_and_hooks_run_in_order_with_ls_stopped(
    cs: ConfigSet, daemons: Daemons, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    hook = f'echo "$LSSUPERVISOR_HOOK $LSSUPERVISOR_FROM_VERSION $LSSUPERVISOR_TO_VERSION" >> {trace}'
    cs.write(
        ls_extra="  drain: true\n  drain_timeout: 10s\n",
        extra=WATCH + f"hooks:\n  pre_migrate: [[sh, -c, '{hook}']]\n  post_migrate: [[sh, -c, '{hook}']]\n",
    )
    d = start(daemons, cs)
    old = wait_running_on(d, 1)["lightningstream"]["pid"]
    assert not trace.exists()  # stamping the empty LMDB at boot migrates nothing: no hooks
    ship(cs, "0002_step.py", step_migration(2))
    new = wait_running_on(d, 2)["lightningstream"]["pid"]
    assert new != old
    assert trace.read_text().splitlines() == ["pre_migrate 1 2", "post_migrate 1 2"]
    subs = [m.group(1) for line in d.lines(r"msg=\"state ") if (m := re.search(r"substate=(\w+)", line))]
    last = len(subs) - 1 - subs[::-1].index("PLANNING")
    assert subs[last:] == [
        "PLANNING", "IMPORTING", "PROVING", "DRAINING", "PROVING", "PRE_HOOKS", "BACKING_UP", "MIGRATING",
        "VERIFYING", "POST_HOOKS", "RENDERING",
    ]
    assert d.lines("drain finished")
    # The drain ran on the OLD config (v1 prefix) as an LS of its own, after LS stopped.
    drains = [s for s in cs.starts() if "--only-once" in s.get("argv", [])]
    assert len(drains) == 1 and "--timeout" in drains[0]["argv"]


def test_a_hook_over_its_time_limit_is_named_with_the_setting_and_parks(
    cs: ConfigSet, daemons: Daemons
) -> None:
    cs.write(extra=WATCH + "hooks:\n  timeout: 300ms\n  pre_migrate: [[sleep, '30']]\n")
    d = start(daemons, cs)
    wait_running_on(d, 1)
    ship(cs, "0002_step.py", step_migration(2))
    doc = d.wait_state("PARKED")
    assert doc["reason"].startswith("pre_migrate hook 1 failed: timed out after 300ms; nothing was written")
    (line,) = d.lines(r"ran over")
    assert "pre_migrate hook 1 ran over hooks.timeout (300ms): SIGKILL to its process group" in line
    assert markers(cs) == {"main": 1}


def test_a_bad_migration_file_keeps_ls_running(cs: ConfigSet, daemons: Daemons) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    pid = wait_running_on(d, 1)["lightningstream"]["pid"]
    ship(cs, "2_misnamed.py", step_migration(2))
    line = d.wait_log(r"reload failed, keeping the previous config")[0]
    assert "cannot load the migrations: " in line and "2_misnamed.py: bad migration file name" in line
    assert wait_running_on(d, 1)["lightningstream"]["pid"] == pid and pid_alive(pid)


def test_a_bad_migration_file_at_boot_is_named_as_such_and_exits_migration(
    cs: ConfigSet, daemons: Daemons
) -> None:
    ship(cs, "2_misnamed.py", step_migration(2))
    d = start(daemons, cs)
    assert d.wait() == 65  # ExitCode.MIGRATION, as `lssupervisor plan` exits on the same file
    (line,) = d.lines(r"level=error")
    assert 'msg="cannot load the migrations: ' in line and "2_misnamed.py: bad migration file name" in line
    assert "render" not in line and "Traceback" not in d.text()
    assert cs.starts() == []  # LS never started


def test_the_target_file_pins_the_version_and_is_watched(
    cs: ConfigSet, daemons: Daemons, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.write_text("1\n")
    cs.write(extra=WATCH + f"schema:\n  target_file: {target}\n")
    ship(cs, "0002_step.py", step_migration(2))
    d = start(daemons, cs)
    wait_running_on(d, 1)  # pinned below the newest migration
    assert doc_of(d)["target_version"] == 1
    target.write_text("2\n")
    doc = wait_running_on(d, 2)
    assert doc["target_version"] == 2 and rendered_root(cs) == f"{cs.storage}/v2"


def test_kill9_of_the_daemon_mid_migration_takes_the_worker_down_and_rolls_back(
    cs: ConfigSet, daemons: Daemons, tmp_path: Path
) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    wait_running_on(d, 1)
    ship(cs, "0002_slow.py", SLOW.replace("{flag}", str(tmp_path / "never")))
    wait_for(lambda: doc_of(d).get("substate") == "MIGRATING", timeout=30, what="MIGRATING")
    workers = [p for p in psutil.Process(d.pid).children() if "lssupervisor.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1
    d.proc.kill()
    d.wait()
    # PR_SET_PDEATHSIG: the worker dies with the daemon; LMDB aborts its open transaction (I3).
    wait_for(lambda: not pid_alive(workers[0].pid), timeout=10, what="the worker to die with the daemon")
    assert markers(cs) == {"main": 1}
    assert len(cs.starts()) == 1


def test_an_unmarked_lmdb_parks_and_the_advice_in_the_reason_works(
    cs: ConfigSet, daemons: Daemons
) -> None:
    build_lmdb(cs.lmdb, {"users": {"alice": ("x", 1_700_000_000_000_000_000)}})  # data, no marker
    d = start(daemons, cs)
    doc = d.wait_state("PARKED")
    reason = doc["reason"]
    assert "has data but no schema marker" in reason, reason
    # `stamp` would refuse while the daemon holds the lock (75): the reason names what works.
    assert "set schema.baseline: N and run `lssupervisor reload`" in reason, reason
    assert "stop lssupervisor, run `lssupervisor stamp N`, then start it" in reason
    d.wait_log(r'level=error msg="parked: LMDB \'main\'')
    cs.write(extra="schema:\n  baseline: 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "reload", "-c", str(cs.config)],
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert out.returncode == 0, out.stderr
    wait_running_on(d, 1)
    assert markers(cs) == {"main": 1}


# -- a reload never kills a daemon, in any state (issue: a PARKED daemon exited 78) ---------------------

def break_config(cs: ConfigSet) -> str:
    """One bad value (the error line must name its key); returns the good text."""
    text = cs.config.read_text()
    assert "  stop_timeout: 3s\n" in text
    cs.config.write_text(text.replace("  stop_timeout: 3s\n", "  stop_timeout: ten\n"))
    return text


BROKEN = r"reload failed, keeping the previous config: .*lightningstream\.stop_timeout: expected a duration"


def reload_with_a_broken_config(d: Daemon, cs: ConfigSet) -> None:
    good = break_config(cs)
    d.send(signal.SIGHUP)
    d.wait_log(BROKEN)
    cs.config.write_text(good)


def test_a_bad_config_on_hup_keeps_a_daemon_parked_at_boot_parked(
    cs: ConfigSet, daemons: Daemons
) -> None:
    build_lmdb(cs.lmdb, {"users": {"alice": ("x", 1_700_000_000_000_000_000)}})  # data, no marker
    d = start(daemons, cs)
    reason = d.wait_state("PARKED")["reason"]
    reload_with_a_broken_config(d, cs)
    doc = d.wait_state("PARKED")
    assert doc["reason"] == reason and d.proc.poll() is None
    assert not d.lines("state PARKED -> STOPPED")


def test_a_bad_config_on_hup_keeps_a_paused_daemon_paused(cs: ConfigSet, daemons: Daemons) -> None:
    d = start(daemons, cs)
    wait_running_on(d, 1)
    out = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "pause", "-c", str(cs.config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode == 0, out.stderr
    d.wait_state("PAUSED")
    reload_with_a_broken_config(d, cs)
    assert d.wait_state("PAUSED") and d.proc.poll() is None


def test_a_bad_config_on_hup_keeps_a_daemon_in_backoff(cs: ConfigSet, daemons: Daemons) -> None:
    # LS crashes 1 s after each start; a long backoff keeps the daemon in BACKOFF for the reload.
    cs.write(
        ls_env={"LSSTANDIN_CRASH_AFTER_MS": "1000"},
        restart={"initial_delay": "60s", "max_delay": "60s", "burst_limit": "10"},
    )
    d = start(daemons, cs)
    d.wait_state("BACKOFF")
    reload_with_a_broken_config(d, cs)
    doc = d.wait_state("BACKOFF")
    assert doc["lightningstream"]["retry_at"] and d.proc.poll() is None


def test_a_bad_config_saved_mid_cycle_is_refused_after_the_cycle(
    cs: ConfigSet, daemons: Daemons
) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    wait_running_on(d, 1)
    flag = cs.root / "go"
    ship(cs, "0002_slow.py", SLOW.replace("{flag}", str(flag)))
    wait_for(lambda: doc_of(d).get("substate") == "MIGRATING", timeout=30, what="MIGRATING")
    break_config(cs)  # the watcher sees it while the migration runs
    flag.touch()
    d.wait_log(BROKEN)
    wait_running_on(d, 2)
    assert d.proc.poll() is None


# -- nothing keeps LS down without a deadline (I10) ------------------------------------------------------

HANGS_AT_IMPORT = '''"""Step 2: its module-level code never returns."""

import time

time.sleep(3600)

VERSION = 2


def upgrade(m):
    pass
'''

HANGS_IN_STEP = '''"""Step 2: its upgrade never returns (and never checks cancellation)."""

import time

VERSION = 2


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"half", b"written")
    time.sleep(3600)
'''


def limit(cs: ConfigSet, line: str) -> None:
    """Add ``line`` to the config's ``migrations:`` block."""
    block = "migrations:\n  path: migrations\n"
    cs.config.write_text(cs.config.read_text().replace(block, f"{block}  {line}\n"))


def test_an_import_that_hangs_is_cut_off_and_ls_keeps_running(cs: ConfigSet, daemons: Daemons) -> None:
    cs.write(extra=WATCH)
    limit(cs, "import_timeout: 1s")
    d = start(daemons, cs)
    pid = wait_running_on(d, 1)["lightningstream"]["pid"]
    ship(cs, "0002_hangs.py", HANGS_AT_IMPORT)
    wait_for(lambda: doc_of(d).get("substate") == "IMPORTING", timeout=30, what="IMPORTING in status")
    d.wait_log(
        r"reconcile failed, LS keeps running: cannot import the migrations: "
        r"migrations\.import_timeout \(1s\) expired"
    )
    doc = d.wait_state("RUNNING")
    assert doc["lightningstream"]["pid"] == pid  # LS was never stopped
    assert markers(cs) == {"main": 1}
    wait_for(lambda: not own_workers(cs), timeout=10, what="the hung worker to be gone")


def test_a_step_that_hangs_is_cut_off_rolled_back_and_parks_naming_the_limit(
    cs: ConfigSet, daemons: Daemons
) -> None:
    cs.write(extra=WATCH)
    limit(cs, "step_timeout: 1s")
    d = start(daemons, cs)
    wait_running_on(d, 1)
    ship(cs, "0002_hangs.py", HANGS_IN_STEP)
    doc = d.wait_state("PARKED", timeout=40)
    assert "migrations.step_timeout (1s) expired" in doc["reason"], doc["reason"]
    assert "consistently at version 1" in doc["reason"]
    assert markers(cs) == {"main": 1} and not own_workers(cs)
    assert doc["lightningstream"]["pid"] is None


LEAVES_A_STRAY = '''"""Step 2: double-forks a sleeper that would hold the worker's pipes forever."""

import os
import time

VERSION = 2


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"step-2", b"done")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open("{pidfile}", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600)
        os._exit(0)
    os.wait()
'''


def test_a_stray_left_by_a_migration_is_killed_and_named_after_the_cycle(
    cs: ConfigSet, daemons: Daemons
) -> None:
    cs.write(extra=WATCH)
    d = start(daemons, cs)
    wait_running_on(d, 1)
    pidfile = cs.root / "stray.pid"
    ship(cs, "0002_stray.py", LEAVES_A_STRAY.replace("{pidfile}", str(pidfile)))
    wait_running_on(d, 2)
    stray = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the stray's pid"))
    d.wait_log(rf"killing a process the worker left behind.*pid={stray}")
    wait_for(lambda: not pid_alive(stray), timeout=10, what="the stray to be gone")


QUIET_SLOW = '''"""Step 2: rewrites every record slowly and never calls m.progress."""

import time

VERSION = 2


def upgrade(m):
    m.db("users", create=True)
    for i in range(400):
        m.put("users", b"k%05d" % i, b"v")
        time.sleep(0.01)
'''


def test_a_step_that_never_reports_shows_a_heartbeat_in_status_log_and_metrics(
    cs: ConfigSet, daemons: Daemons
) -> None:
    from prometheus_client import generate_latest

    from lssupervisor.daemon.metrics import build_registry

    cs.write(extra=WATCH)
    d = start(daemons, cs)
    wait_running_on(d, 1)
    ship(cs, "0002_quiet.py", QUIET_SLOW)

    def beating() -> dict[str, Any]:
        doc = doc_of(d)
        step = (doc.get("migration") or {}).get("step") or {}
        return doc if doc.get("substate") == "MIGRATING" and step.get("written", 0) > 0 else {}

    doc = wait_for(beating, timeout=30, interval=0.05, what="a heartbeat with written records in status")
    step = doc["migration"]["step"]
    assert step["migration"] == "0002_quiet" and step["index"] == 0 and step["elapsed_s"] > 0
    assert "written" in doc["migration"]["progress"]
    text = generate_latest(build_registry(lambda: doc, process_metrics=False)).decode()
    assert "lssupervisor_migration_step_records_written " in text
    d.wait_log(r"progress: migrating main 1→2 \(0002_quiet\).*written")
    wait_running_on(d, 2)
    assert doc_of(d)["migration"]["step"] is None

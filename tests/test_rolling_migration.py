"""Acceptance: a rolling migration of two instances with live writes on both sides.

alpha and beta sync under ``storage/v1``; migration 0002 (text records -> JSON) is shipped to alpha
(beta keeps writing v1 and syncing under ``v1/``), then to beta. At the end both LMDBs hold identical
data, all JSON, every write present or superseded by a later one, the later write won on keys both
wrote, no ``v2/`` snapshot ever held a text record, and each instance synced under ``v2/`` only after
its own migration (see ``lssupervisor.testing.scenario.final_checks``).

The daemon-driven run is the acceptance test of the reconcile cycle. ``lssupervisor demo`` is the same
scenario as a user sees it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from lssupervisor.testing.lsbinary import standin_binary
from lssupervisor.testing.scenario import (
    Cluster,
    RollingResult,
    Timeline,
    iter_lines,
    rolling_migration,
)
from tests.harness import wait_for
from tests.harness.real_ls import real_ls_binary
from tests.harness.s3 import Bucket


def _run(
    workdir: Path, ls_binary: str | None = None, bucket: Bucket | None = None
) -> tuple[RollingResult, Timeline]:
    timeline = Timeline()
    storage = None if bucket is None else f"s3://{bucket.name}/fleet?endpoint={bucket.endpoint}"
    env = None if bucket is None else bucket.environ()
    with Cluster(workdir, ls_binary, storage=storage, storage_env=env, drain=bucket is not None) as cluster:
        result = rolling_migration(cluster, timeline.say)
        logs = {n: cluster.instances[n].log_path.read_text(errors="replace") for n in cluster.instances}
    timeline.lines.extend(f"[log {n}] {line}" for n, text in logs.items() for line in text.splitlines()
                          if "DRAINING" in line)
    return result, timeline


def _assert_passed(result: RollingResult, timeline: Timeline) -> None:
    report = "\n".join([*timeline.lines, *iter_lines(result.summary)])
    assert result.summary.ok, report
    assert result.facts["pid_changed"], report  # LS was restarted for the new config
    assert result.facts["b_v1_snapshots_while_a_v2"] > 0, report
    assert result.summary.equal and result.summary.keys > 0, report
    for formats in result.summary.formats.values():
        assert set(formats) == {2}, report


def test_rolling_migration_driven_by_the_daemon(tmp_path: Path) -> None:
    # Always the stand-in here; the real LS (when installed) has its own test below.
    result, timeline = _run(tmp_path / "work", standin_binary(tmp_path))
    _assert_passed(result, timeline)


def test_rolling_migration_over_s3(tmp_path: Path, s3_bucket: Bucket) -> None:
    """The same acceptance run with the instances syncing through an S3 bucket (``lssupervisor init
    s3://...``, credentials only in the daemons' environment)."""
    result, timeline = _run(tmp_path / "work", bucket=s3_bucket)
    _assert_passed(result, timeline)
    # Each migration drained first: `sync --only-once` on the old config, over S3 too.
    drained = [line for line in timeline.lines if line.startswith("[log ") and "DRAINING" in line]
    assert {line.split("]")[0] for line in drained} == {"[log alpha", "[log beta"}, timeline.lines
    keys = s3_bucket.keys()
    assert any(k.startswith("fleet/v1/main__") for k in keys)
    assert any(k.startswith("fleet/v2/main__") for k in keys)


@pytest.mark.real_ls
def test_rolling_migration_with_real_lightning_stream(tmp_path: Path) -> None:
    result, timeline = _run(tmp_path / "work", real_ls_binary())
    _assert_passed(result, timeline)


def test_demo_command_exits_0_and_tells_the_story(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "demo", "--dir", str(workdir)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    # The story, in order.
    milestones = [
        "Lightning Stream: ",
        "alpha  lssupervisor init alpha/",
        "alpha  supervising LS pid",
        "sync   v1 syncing both ways",
        "alpha  shipping 0002_users_json.py",
        "alpha  migrated main 1→2 with 0002_users_json",
        "beta   still on v1 and syncing",
        "beta   shipping 0002_users_json.py",
        "beta   migrated main 1→2 with 0002_users_json",
        "sync   settled",
        "equal: yes",
        "all checks passed",
        f"files kept in {workdir}",
    ]
    pos = 0
    for m in milestones:
        found = out.find(m, pos)
        assert found >= 0, f"missing or out of order: {m!r}\n{out}"
        pos = found
    assert "[FAIL]" not in out
    # --dir keeps the files for inspection: both configs, both LMDBs, both storage prefixes.
    for path in ("alpha/lssupervisor.yaml", "beta/lmdb/data.mdb", "storage/v1", "storage/v2"):
        assert (workdir / path).exists(), path


def test_demo_over_s3(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "demo", "--storage", "s3", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for line in ("S3-API server (moto) on http://127.0.0.1:", "prefix now s3://lssupervisor-demo/app/v2/",
                 "fleet --storage (s3 bucket lssupervisor-demo", "stragglers: none", "all checks passed"):
        assert line in out, out
    assert not (tmp_path / "demo" / "storage" / "v1").exists()  # nothing went to the fs


def test_demo_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "lssupervisor", "demo", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 64, done.stderr
    assert "not an empty directory" in done.stderr


def _processes_naming(path: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmdline and proc.pid != os.getpid():
            found.append(f"{proc.pid} {cmdline[:120]}")
    return found


def test_demo_interrupted_leaves_no_process_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lssupervisor", "demo", "--dir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at EOF if the demo died early
            if "writers started" in line:
                break
        # Both instances run LS now (and the writers write); Ctrl-C.
        assert _processes_naming(workdir), "expected LS processes before the interrupt"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    wait_for(lambda: not _processes_naming(workdir), what=f"no process naming {workdir}")

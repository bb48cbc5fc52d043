"""pidfloor.py: the next PID after raise_pid_floor(N) is >= N, in a real PID namespace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lssupervisor import proc as pidfloor
from lssupervisor.errors import ConfigError
from lssupervisor.proc import raise_pid_floor

REPO = Path(__file__).resolve().parent.parent

# Runs as PID 1 of a fresh PID namespace (fresh counter: the next PID is tiny). Prints what it saw.
IN_NAMESPACE = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from pathlib import Path
    from lssupervisor.proc import raise_pid_floor
    floor, write, preset = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    ns_last_pid = Path("/proc/sys/kernel/ns_last_pid")
    if preset < 0:  # relative to this namespace's pid_max (per namespace since Linux 6.14)
        preset += int(Path("/proc/sys/kernel/pid_max").read_text())
    if preset:
        ns_last_pid.write_text(str(preset))
    before = int(ns_last_pid.read_text())
    t0 = time.monotonic()
    raise_pid_floor(floor, write_ns_last_pid=write)
    elapsed = time.monotonic() - t0
    child = subprocess.Popen(["true"])
    child.wait()
    print(json.dumps({"before": before, "pid": child.pid, "elapsed": elapsed}))
    """
)


def run_in_pid_namespace(tmp_path: Path, floor: int, write: bool, preset: int = 0) -> dict[str, float]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) not installed")
    script = tmp_path / "in_ns.py"
    script.write_text(IN_NAMESPACE)
    argv = [unshare, "--pid", "--fork", "--mount-proc", sys.executable, str(script)]
    proc = subprocess.run(
        [*argv, str(floor), "1" if write else "0", str(preset)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    if proc.returncode != 0 and "unshare" in proc.stderr and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot create a PID namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def test_floor_by_writing_ns_last_pid(tmp_path: Path) -> None:
    seen = run_in_pid_namespace(tmp_path, 5000, write=True)
    assert seen["before"] < 100  # really a fresh namespace
    assert seen["pid"] >= 5000
    assert seen["pid"] < 5010  # set directly, not by burning thousands of pids


def test_floor_by_spawning(tmp_path: Path) -> None:
    seen = run_in_pid_namespace(tmp_path, 800, write=False)
    assert seen["before"] < 100
    assert 800 <= seen["pid"] < 810
    # Measured cost of the fallback, reported in the test log for the record.
    print(f"spawn fallback: {800 - seen['before']:.0f} pids in {seen['elapsed']:.3f}s")


def test_floor_across_pid_wrap(tmp_path: Path) -> None:
    # The counter sits at pid_max - 1: the next pid would wrap to a low number, below the floor.
    seen = run_in_pid_namespace(tmp_path, 5000, write=True, preset=-1)
    assert seen["before"] > 5000
    assert 5000 <= seen["pid"] < 5010


def test_floor_on_this_host_by_spawning() -> None:
    last = int(pidfloor.NS_LAST_PID.read_text())
    floor = last + 40
    if floor >= int(pidfloor.PID_MAX.read_text()) - 100:
        pytest.skip("pid counter too close to pid_max")
    raise_pid_floor(floor, write_ns_last_pid=False)
    child = subprocess.Popen(["true"])
    assert child.wait() == 0
    assert child.pid >= floor


def test_without_ns_last_pid_spawned_pids_are_the_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel without CONFIG_CHECKPOINT_RESTORE has no ns_last_pid: neither readable nor writable.
    floor = int(pidfloor.NS_LAST_PID.read_text()) + 40
    if floor >= int(pidfloor.PID_MAX.read_text()) - 100:
        pytest.skip("pid counter too close to pid_max")
    monkeypatch.setattr(pidfloor, "NS_LAST_PID", Path("/nonexistent/ns_last_pid"))
    raise_pid_floor(floor)
    child = subprocess.Popen(["true"])
    assert child.wait() == 0
    assert child.pid >= floor


def test_nothing_to_do_spawns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(_: str | None) -> None:
        raise AssertionError("spawned although the floor was met")

    monkeypatch.setattr(pidfloor, "_burn_one_pid", forbidden)
    raise_pid_floor(0)
    raise_pid_floor(1)
    raise_pid_floor(int(pidfloor.NS_LAST_PID.read_text()) - 10)


def test_floor_above_pid_max_is_a_config_error() -> None:
    pid_max = int(pidfloor.PID_MAX.read_text())
    with pytest.raises(
        ConfigError, match=rf"lightningstream\.min_pid: {pid_max} is not below kernel\.pid_max"
    ):
        raise_pid_floor(pid_max)


def test_spawn_bound_gives_a_clear_error() -> None:
    floor = int(pidfloor.NS_LAST_PID.read_text()) + 1000
    if floor >= int(pidfloor.PID_MAX.read_text()) - 100:
        pytest.skip("pid counter too close to pid_max")
    with pytest.raises(RuntimeError, match=r"lightningstream\.min_pid: could not raise the next pid"):
        raise_pid_floor(floor, write_ns_last_pid=False, max_spawns=3)


@pytest.mark.parametrize(
    ("last", "floor", "pid_max", "ok"),
    [
        (4999, 5000, 32768, True),
        (4998, 5000, 32768, False),
        (30000, 5000, 32768, True),
        (32767, 5000, 32768, False),  # next pid wraps to 300
        (32766, 5000, 32768, True),
    ],
)
def test_next_pid_ok(last: int, floor: int, pid_max: int, ok: bool) -> None:
    assert pidfloor._next_pid_ok(last, floor, pid_max) is ok

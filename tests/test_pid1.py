"""The real daemon as PID 1 of a real PID namespace (``unshare --pid --fork --mount-proc``), the way a
container runs it, against the LS stand-in with a config set written by ``lssupervisor init``.

Seen from the host, ``unshare`` is our child and the daemon (PID 1 inside) is ``unshare``'s only
child; signals go to that host pid and zombies are read from the host's /proc through psutil.
``unshare --fork`` exits with its child's status, so the daemon's exit code is ``unshare``'s.
``--kill-child`` plus a SIGKILL to ``unshare``'s process group in ``finally`` end the namespace (the
kernel kills every process in it when its PID 1 dies). No init is ever booted: PID 1 is our daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lssupervisor.cli.main import main
from lssupervisor.errors import ExitCode
from tests.harness import free_port, wait_for

STANDIN = Path(sys.executable).with_name("lightningstream-standin")
STOP_TIMEOUT_S = 1.0
# Reaping takes one loop wake-up (SIGCHLD), milliseconds; the deadline is for a busy machine.
ZOMBIE_DEADLINE_S = 30.0

def _unshare_problem() -> str | None:
    """Why a PID namespace cannot be made here, or None."""
    if sys.platform != "linux":
        return "PID namespaces are Linux only"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not on PATH"
    if not STANDIN.exists():
        return f"the LS stand-in console script is not installed ({STANDIN})"
    try:
        probe = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", "sh", "-c", "echo $$"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --pid --fork --mount-proc failed: {exc}"
    if probe.returncode != 0 or probe.stdout.strip() != "1":
        err = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return (
            f"unshare --pid --fork --mount-proc did not give a PID namespace (exit {probe.returncode}: "
            f"{err}); needs root or unprivileged user namespaces"
        )
    return None


_PROBLEM = _unshare_problem()
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


class ConfigSet:
    """``lssupervisor init`` output in tmp_path, with test-sized timeouts and LS's own /healthz."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "set"
        self.config = self.dir / "lssupervisor.yaml"
        self.state_file = self.dir / "state" / "state.json"
        (root / "db").mkdir()
        rc = main([
            "init", str(self.dir),
            "--lmdb", str(root / "db"),
            "--storage", f"fs://{root}/snapshots",
            "--instance", "pid1",
            "--lightningstream", str(STANDIN),
            "--ls-http", f"127.0.0.1:{free_port()}",
            "--http", "",
        ])
        assert rc == 0
        text = self.config.read_text()
        assert "  args: [sync]\n" in text
        # Test-sized timeouts; everything else is init's.
        self.config.write_text(
            text.replace(
                "  args: [sync]\n",
                f"  args: [sync]\n  stop_timeout: {STOP_TIMEOUT_S:g}s\n  health_poll_interval: 100ms\n",
            )
            + "\nrestart:\n  initial_delay: 200ms\n  jitter: 0\n"
        )


class NamespacedDaemon:
    """``unshare --pid --fork --mount-proc -- python -m lssupervisor run`` with its log in a file."""

    def __init__(self, cs: ConfigSet, *, ls_env: dict[str, str] | None = None) -> None:
        self.cs = cs
        self.logfile = cs.root / "daemon.log"
        self._log = self.logfile.open("wb")
        program = ["-m", "lssupervisor"]
        env = {**os.environ, "LSSTANDIN_HEALTH_INTERVAL_MS": "100", **(ls_env or {})}
        self.proc = subprocess.Popen(
            [
                "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
                sys.executable, *program, "run", "-c", str(cs.config), "--log-level", "debug",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cs.dir,
            env=env,
            start_new_session=True,  # one process group to SIGKILL in close()
        )
        self.pid = self._find_pid1()

    def _find_pid1(self) -> int:
        """The daemon's host pid; 0 when it already exited (e.g. a config error)."""

        def child() -> tuple[int] | None:
            try:
                kids = psutil.Process(self.proc.pid).children()
            except psutil.Error:
                kids = []
            if kids:
                return (kids[0].pid,)
            return (0,) if self.proc.poll() is not None else None

        found = wait_for(child, what="the daemon (unshare's child)")
        assert found is not None
        return found[0]

    def namespace_pid(self, host_pid: int) -> int:
        """The pid ``host_pid`` has inside the namespace (last NSpid field)."""
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise AssertionError(f"no NSpid line for {host_pid}")

    def text(self) -> str:
        return self.logfile.read_text(errors="replace")

    def lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.text().splitlines() if rx.search(line)]

    def wait_log(self, pattern: str, timeout: float = 60.0) -> str:
        try:
            return wait_for(lambda: next(iter(self.lines(pattern)), ""), timeout=timeout, what=repr(pattern))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.text()}") from None

    def wait_running(self) -> None:
        self.wait_log(r'msg="state STARTING -> RUNNING" reason="LS ready"')

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.Error:
            return []

    def zombies(self) -> list[int]:
        """Zombie children of the daemon: exited, never reaped by PID 1."""
        out = []
        for p in self.children():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.Error:
                continue
        return out

    def ls_leader(self) -> psutil.Process:
        """The running LS the daemon started (the child leading its own session)."""

        def find() -> psutil.Process | None:
            for p in self.children():
                try:
                    if os.getsid(p.pid) == p.pid and p.status() != psutil.STATUS_ZOMBIE:
                        return p
                except (OSError, psutil.Error):
                    continue
            return None

        leader = wait_for(find, what="LS as a child of the daemon")
        assert leader is not None
        return leader

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # unshare; --kill-child takes PID 1 with it
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        # PID 1 gone means the kernel killed and reaped the whole namespace.
        if self.pid:
            wait_for(lambda: not psutil.pid_exists(self.pid), what="the namespace to end")
        self._log.close()


@pytest.fixture
def cs(tmp_path: Path) -> ConfigSet:
    return ConfigSet(tmp_path)


@pytest.fixture
def started() -> Iterator[list[NamespacedDaemon]]:
    daemons: list[NamespacedDaemon] = []
    try:
        yield daemons
    finally:
        for d in daemons:
            d.close()


def _start(cs: ConfigSet, started: list[NamespacedDaemon], **kwargs: object) -> NamespacedDaemon:
    d = NamespacedDaemon(cs, **kwargs)  # type: ignore[arg-type]
    started.append(d)
    return d


# ---------------------------------------------------------------------------------------------------
# (a) SIGTERM to PID 1


@pytest.mark.parametrize("ls_ignores_term", [False, True], ids=["ls-obeys-term", "ls-ignores-term"])
def test_sigterm_to_pid_1_stops_ls_and_exits_0(
    cs: ConfigSet, started: list[NamespacedDaemon], ls_ignores_term: bool
) -> None:
    env = {"LSSTANDIN_IGNORE_SIGTERM": "1"} if ls_ignores_term else {}
    d = _start(cs, started, ls_env=env)
    assert d.namespace_pid(d.pid) == 1, "the daemon is not PID 1 of its namespace"
    d.wait_running()  # ready from LS's /healthz: the stand-in serves it after its knobs are in place
    ls = d.ls_leader()
    ls_ns_pid = d.namespace_pid(ls.pid)

    os.kill(d.pid, signal.SIGTERM)  # what `docker stop` sends; kernel drops it unless PID 1 handles it
    assert d.proc.wait(60) == 0
    # The daemon stopped LS itself (the kernel's kill of the namespace at PID 1's exit would leave no
    # "lightningstream exited" line) and only then exited.
    how = "killed by SIGKILL" if ls_ignores_term else "terminated by SIGTERM"
    log = d.text()
    stopped = log.index(f'msg="lightningstream exited" pid={ls_ns_pid} status="{how}"')
    assert log.index('msg="received SIGTERM"') < stopped < log.index('msg="lssupervisor exiting" code=0')
    assert not psutil.pid_exists(ls.pid)


# ---------------------------------------------------------------------------------------------------
# (b) orphans reparented to PID 1 are reaped


def _orphans_are_reaped(d: NamespacedDaemon) -> None:
    """Two realistic orphans, then zero zombies under PID 1 after a deadline.

    1. LS's re-exec'd child (what ``--minimum-pid`` does) after the LS leader is SIGKILLed: it is
       reparented to PID 1, the daemon kills the rest of the LS group, and the child's corpse is PID 1's.
    2. What a ``docker exec``/``kubectl exec`` shell leaves behind: a background job whose shell has
       exited (the exec'd shell's parent is outside the namespace, so its orphans go to PID 1).
    """
    d.wait_running()
    leader = d.ls_leader()
    reexec = wait_for(leader.children, what="LS's re-exec'd child")[0]
    ns_reexec = d.namespace_pid(reexec.pid)
    leader.kill()
    # The daemon reports the exit once nothing of the LS group lives: by then it has SIGKILLed the
    # re-exec'd child, which the kernel had reparented to PID 1. The daemon's own LS status is intact
    # (not taken by the reaper): SIGKILL, not "status 0".
    d.wait_log(r'msg="lightningstream exited" pid=\d+ status="killed by SIGKILL"')

    shell = subprocess.run(
        ["nsenter", "--target", str(d.pid), "--pid", "--", "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ns_sleep = int(shell.stdout.split()[0])

    def adopted_sleep() -> psutil.Process | None:
        for p in d.children():
            try:
                if p.cmdline()[:2] == ["sleep", "60"] and d.namespace_pid(p.pid) == ns_sleep:
                    return p
            except (psutil.Error, OSError):
                continue
        return None

    sleeper = wait_for(adopted_sleep, what="the exec shell's background job adopted by PID 1")
    assert sleeper is not None
    sleeper.terminate()

    # Orphan 1's and 2's corpses must not stay behind (one loop wake-up; SIGCHLD wakes the loop).
    def clean() -> bool:
        return not d.zombies() and not psutil.pid_exists(reexec.pid) and not psutil.pid_exists(sleeper.pid)

    try:
        wait_for(clean, timeout=ZOMBIE_DEADLINE_S, what="no zombie children of PID 1")
    except AssertionError:
        raise AssertionError(f"zombies under PID 1: {d.zombies()}\n--- daemon log ---\n{d.text()}") from None
    assert d.proc.poll() is None  # still supervising
    # Collected by the reaper (one debug line each, written just after the reap: wait for it), with the
    # status each orphan really had.
    d.wait_log(rf'msg="reaped orphan" pid={ns_reexec} status="killed by SIGKILL"')
    d.wait_log(rf'msg="reaped orphan" pid={ns_sleep} status="terminated by SIGTERM"')


def test_orphans_are_reaped_by_pid_1(cs: ConfigSet, started: list[NamespacedDaemon]) -> None:
    _orphans_are_reaped(_start(cs, started, ls_env={"LSSTANDIN_REEXEC": "1"}))


# ---------------------------------------------------------------------------------------------------
# (c) exit codes as PID 1


def test_config_error_exits_78_as_pid_1(cs: ConfigSet, started: list[NamespacedDaemon]) -> None:
    text = cs.config.read_text()
    cs.config.write_text(text.replace(f"stop_timeout: {STOP_TIMEOUT_S:g}s", "stop_timeout: ten"))
    d = _start(cs, started)
    assert d.proc.wait(60) == int(ExitCode.CONFIG) == 78
    errors = [line for line in d.text().splitlines() if line.startswith("lssupervisor: error:")]
    assert len(errors) == 1 and "lightningstream.stop_timeout" in errors[0], d.text()

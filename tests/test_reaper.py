"""Reaper, in-process: this test process becomes a child subreaper, adopts double-forked grandchildren
and must collect them, while its own ``Popen`` children keep their statuses.

Every test that sets the subreaper flag clears it again (``subreaper`` fixture) and collects what it
adopted, so the rest of the suite runs in an ordinary process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import psutil
import pytest

from lssupervisor.daemon import reaper
from lssupervisor.daemon.reaper import Reaper
from tests.harness import wait_for

# Forks a grandchild that blocks reading fd R until the test closes the other end of the pipe, then
# exits with CODE; the middle process prints the grandchild's pid and exits, orphaning it.
DOUBLE_FORK = r"""
import os, sys
r, code = int(sys.argv[1]), int(sys.argv[2])
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # let the parent's captured stdout reach EOF
    os.read(r, 1)
    os._exit(code)
print(pid, flush=True)
"""


def _set_subreaper(on: bool) -> None:
    reaper._prctl(reaper.PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1 if on else 0))


def _status(pid: int) -> str | None:
    try:
        return str(psutil.Process(pid).status())
    except psutil.Error:
        return None


def _is_zombie(pid: int) -> bool:
    return _status(pid) == psutil.STATUS_ZOMBIE


class Orphan:
    """A grandchild adopted by this (subreaper) process; exits with ``code`` on :meth:`release`."""

    def __init__(self, code: int) -> None:
        self._r, self._w = os.pipe()
        try:
            out = subprocess.run(
                [sys.executable, "-c", DOUBLE_FORK, str(self._r), str(code)],
                pass_fds=(self._r,),
                capture_output=True,
                check=True,
                timeout=10,
            ).stdout
        finally:
            os.close(self._r)
        self.pid = int(out.split()[0])

    def release(self) -> None:
        if self._w >= 0:
            os.close(self._w)
            self._w = -1


_adopted: dict[int, Orphan] = {}


@pytest.fixture
def subreaper() -> Iterator[None]:
    if reaper.is_subreaper():
        pytest.skip("this test process already is a child subreaper; cannot isolate the test")
    _set_subreaper(True)
    try:
        yield
    finally:
        # Let every adopted grandchild exit and collect it (those a test reaped are gone already).
        for pid, orphan in _adopted.items():
            orphan.release()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        _adopted.clear()
        _set_subreaper(False)


def adopt(code: int) -> Orphan:
    orphan = Orphan(code)
    _adopted[orphan.pid] = orphan
    return orphan


def test_subreaper_prctl_sets_and_reports_the_flag(subreaper: None) -> None:
    r = Reaper(lambda: ())
    assert r.enabled  # the fixture set the flag before the Reaper looked
    assert r.become_subreaper() is True
    assert reaper.is_subreaper()


def test_not_enabled_without_subreaper_or_pid_1(monkeypatch: pytest.MonkeyPatch) -> None:
    if reaper.is_subreaper() or os.getpid() == 1:
        pytest.skip("this test process is PID 1 or a subreaper")
    r = Reaper(lambda: ())
    assert not r.enabled
    # A zombie child that is not in own_pids is still not ours to reap: no PID-1 duty, no reaping.
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    try:
        wait_for(lambda: _is_zombie(pid), what="the child to exit")
        assert r.reap() == []
        assert _is_zombie(pid)
    finally:
        os.waitpid(pid, 0)


def test_double_forked_grandchild_is_adopted_and_reaped(
    subreaper: None, caplog: pytest.LogCaptureFixture
) -> None:
    r = Reaper(lambda: ())
    assert r.enabled
    orphan = adopt(5)
    try:
        # Its parent exited: the kernel reparented it to us, the nearest subreaper.
        assert psutil.Process(orphan.pid).ppid() == os.getpid()
        assert r.reap() == []  # alive: nothing to collect, and reap() does not block
    finally:
        orphan.release()
    wait_for(lambda: _is_zombie(orphan.pid), what="the orphan to exit")
    with caplog.at_level(logging.DEBUG, logger="lssupervisor.daemon.reaper"):
        got = r.reap()
    assert [(pid, os.waitstatus_to_exitcode(status)) for pid, status in got] == [(orphan.pid, 5)]
    assert _status(orphan.pid) is None  # collected: no zombie left
    lines = [rec for rec in caplog.records if rec.getMessage() == "reaped orphan"]
    assert len(lines) == 1
    assert lines[0].fields == {"pid": orphan.pid, "status": "exited with status 5"}  # type: ignore[attr-defined]
    assert r.reap() == []


def test_own_popen_is_never_reaped(subreaper: None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    r = Reaper(lambda: {proc.pid})
    try:
        wait_for(lambda: _is_zombie(proc.pid), what="the own child to exit")
        assert r.reap() == []
        assert r.reap() == []
        assert _is_zombie(proc.pid)  # still there for its Popen
    finally:
        # 7, not the 0 CPython reports after ECHILD when someone stole the status.
        assert proc.wait(timeout=10) == 7


def test_an_unreaped_own_child_does_not_hide_a_stranger(subreaper: None) -> None:
    # The own child is forked first, so it comes first in the kernel's list of our children: the
    # WNOWAIT peek returns it again and again; the stranger behind it must still be collected.
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(7)"],
                            stdin=subprocess.PIPE)
    r = Reaper(lambda: {proc.pid})
    orphan = adopt(3)
    try:
        assert proc.stdin is not None
        proc.stdin.close()
        orphan.release()
        wait_for(lambda: _is_zombie(proc.pid) and _is_zombie(orphan.pid), what="both children to exit")
        peeked = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        assert peeked is not None and peeked.si_pid == proc.pid  # the situation this test is about
        got = r.reap()
        assert [(pid, os.waitstatus_to_exitcode(status)) for pid, status in got] == [(orphan.pid, 3)]
        assert _is_zombie(proc.pid)
    finally:
        orphan.release()
        assert proc.wait(timeout=10) == 7


def test_own_child_waited_by_another_thread_keeps_its_status(subreaper: None) -> None:
    """The worker pattern: a reader thread blocks in Popen.wait() while the main loop reaps."""
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    r = Reaper(lambda: {proc.pid})
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(proc.wait()))
    waiter.start()
    orphan = adopt(4)
    orphan.release()
    collected: list[tuple[int, int]] = []
    try:
        def done() -> bool:
            collected.extend(r.reap())
            return bool(result) and orphan.pid in {pid for pid, _ in collected}

        wait_for(done, what="the waiter's status and the orphan's")
    finally:
        orphan.release()
        waiter.join(10)
    assert result == [-signal.SIGKILL]
    assert proc.pid not in {pid for pid, _ in collected}


def test_many_orphans_are_collected_in_bounded_batches(
    subreaper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reaper, "MAX_REAPS_PER_CALL", 2)
    orphans = [adopt(i) for i in (1, 2, 3)]
    for o in orphans:
        o.release()
    wait_for(lambda: all(_is_zombie(o.pid) for o in orphans), what="the orphans to exit")
    r = Reaper(lambda: ())
    first = r.reap()
    second = r.reap()
    assert len(first) == 2 and len(second) == 1
    codes = {pid: os.waitstatus_to_exitcode(status) for pid, status in first + second}
    assert codes == {o.pid: code for o, code in zip(orphans, (1, 2, 3), strict=True)}
    assert r.reap() == []


def test_nothing_to_reap_is_one_cheap_peek(subreaper: None, monkeypatch: pytest.MonkeyPatch) -> None:
    orphan = adopt(0)  # a live child: the peek must say "none exited" without a /proc scan
    try:

        def no_scan(parent: int) -> list[int]:
            raise AssertionError("reap() scanned /proc although no own child was in the way")

        monkeypatch.setattr(reaper, "_zombie_children", no_scan)
        calls: list[int] = []

        def own() -> tuple[int, ...]:
            calls.append(1)
            return ()

        r = Reaper(own)
        for _ in range(1000):
            assert r.reap() == []
        assert calls == []  # own_pids is not even asked when nothing exited: one waitid() per call
    finally:
        orphan.release()
        monkeypatch.undo()
        wait_for(lambda: _is_zombie(orphan.pid), what="the orphan to exit")


def test_zombie_scan_reads_comm_with_parentheses_and_spaces() -> None:
    # comm is at most 15 bytes and may look like more stat fields; parsing must use the last ')'.
    code = (
        "import ctypes; ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b'x) Z 1 (y'), 0, 0, 0)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for(lambda: _is_zombie(proc.pid), what="the child to exit")
        assert psutil.Process(proc.pid).name() == "x) Z 1 (y"
        assert proc.pid in reaper._zombie_children(os.getpid())
        assert proc.pid not in reaper._zombie_children(1)
    finally:
        assert proc.wait(timeout=10) == 0


def test_reap_only_from_the_main_thread(subreaper: None) -> None:
    r = Reaper(lambda: ())
    errors: list[BaseException] = []

    def call() -> None:
        try:
            r.reap()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    t.join(10)
    assert len(errors) == 1 and "main loop thread" in str(errors[0])


def test_become_subreaper_failure_warns_and_stays_disabled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if reaper.is_subreaper() or os.getpid() == 1:
        pytest.skip("this test process is PID 1 or a subreaper")

    def refuse(option: int, arg: object) -> int:
        raise OSError(22, "Invalid argument")

    r = Reaper(lambda: ())
    monkeypatch.setattr(reaper, "_prctl", refuse)
    with caplog.at_level(logging.WARNING, logger="lssupervisor.daemon.reaper"):
        assert r.become_subreaper() is False
    assert not r.enabled
    assert any("cannot become a child subreaper (Invalid argument)" in m for m in caplog.messages)


def test_stealing_a_popen_status_would_report_success() -> None:
    """Why own_pids matters: CPython turns ECHILD into returncode 0, so a stolen status is a lie."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(9)"])
    wait_for(lambda: _is_zombie(proc.pid), what="the child to exit")
    os.waitpid(proc.pid, 0)  # what a careless waitpid(-1) or an own_pids without this pid would do
    assert proc.wait(timeout=10) == 0


def test_describe_status() -> None:
    assert reaper.describe_status(3 << 8) == "exited with status 3"
    assert reaper.describe_status(signal.SIGKILL) == "killed by SIGKILL"
    assert reaper.describe_status(signal.SIGTERM) == "terminated by SIGTERM"

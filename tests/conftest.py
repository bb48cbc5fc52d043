"""Suite-wide guards: no test may leave a child process or a thread behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

LEAK_GRACE_S = 5.0


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        # Zombies are not leaks (they are gone, just not reaped yet by their parent).
        procs = [
            p
            for p in _children()
            if p.pid not in children_before and _status(p) not in (psutil.STATUS_ZOMBIE, None)
        ]
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not t.name.startswith("pytest_timeout")
        ]
        if not procs and not threads:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling a condition with a deadline, not synchronising on time
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    pytest.fail(
        f"{request.node.nodeid} leaked processes {[(p.pid, _cmd(p)) for p in procs]} "
        f"and threads {[t.name for t in threads]}",
        pytrace=False,
    )


def _status(p: psutil.Process) -> str | None:
    try:
        return str(p.status())
    except psutil.Error:
        return None


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"

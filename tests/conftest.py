"""Suite-wide guards: no test may leave a child process or a thread behind; the header names the
Lightning Stream binary the real-LS tests use (or why they skip)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

from lssupervisor.testing.lsbinary import find_real_ls
from lssupervisor.testing.s3server import S3Server
from tests.harness.s3 import Bucket

LEAK_GRACE_S = 30.0  # a deadline for a busy machine: exiting processes are usually gone in ms


def _which_ls() -> str:
    found = find_real_ls()
    if found.path is None:
        return f"Lightning Stream: none ({found.how}): the real_ls tests skip, the stand-in stands in"
    return f"Lightning Stream: {found.path} ({found.how}): the real_ls tests run against it"


def pytest_report_header(config: pytest.Config) -> str:
    return _which_ls()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # Again at the end: `make test` runs pytest -q, which hides the header.
    terminalreporter.write_line(_which_ls())


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


# --- a real S3-API server (moto's server mode) on loopback, one per test session (xdist worker) ---
# Started before any test's leak snapshot is taken (session fixtures set up first), stopped at the end.


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Bucket:
    name = f"t-{uuid.uuid4().hex[:20]}"
    s3_server.create_bucket(name)
    return Bucket(s3_server, name)

"""sd_notify against real AF_UNIX datagram sockets (a path in tmp_path and an abstract name)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lssupervisor.daemon.sdnotify import Notifier, monotonic_usec, watchdog_interval
from lssupervisor.proc import child_env


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    try:
        yield s, str(path)
    finally:
        s.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"lssupervisor-test-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    try:
        yield s, "@" + name
    finally:
        s.close()


def fields(sock: socket.socket) -> list[str]:
    data = sock.recv(4096)
    return data.decode().split("\n")


def test_path_socket_ready_and_status(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        assert n.enabled
        assert n.ready("running, LS pid 42")
        assert fields(sock) == ["READY=1", "STATUS=running, LS pid 42"]
        assert n.status("reconciling")
        assert fields(sock) == ["STATUS=reconciling"]
        assert n.stopping()
        assert fields(sock) == ["STOPPING=1"]
        assert n.watchdog()
        assert fields(sock) == ["WATCHDOG=1"]
        assert n.extend_timeout(90_000_000)
        assert fields(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
        assert n.mainpid(1234)
        assert fields(sock) == ["MAINPID=1234"]
    finally:
        n.close()


def test_abstract_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, name = abstract_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": name})
    try:
        assert n.ready()
        assert fields(sock) == ["READY=1"]
    finally:
        n.close()


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    try:
        before = monotonic_usec()
        assert n.reloading("reloading config")
        after = monotonic_usec()
        got = fields(sock)
        assert got[0] == "RELOADING=1"
        key, _, value = got[1].partition("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(value) <= after
        assert got[2] == "STATUS=reloading config"
    finally:
        n.close()


def test_status_newline_cannot_inject_fields(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    try:
        n.status("bad\nREADY=1")
        assert fields(sock) == ["STATUS=bad READY=1"]
    finally:
        n.close()


def test_unset_is_noop() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready()
    assert not n.watchdog()
    n.close()


def test_unusable_address_is_disabled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lssupervisor.daemon.sdnotify")
    n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert not n.ready()
    assert "not a path or @abstract name" in caplog.text


def test_send_failure_never_raises_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lssupervisor.daemon.sdnotify")
    n = Notifier(str(tmp_path / "nobody-listens.sock"))
    try:
        assert not n.ready()
        assert not n.status("x")
        assert not n.watchdog()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
        assert len(warnings) == 1
        assert len(debugs) == 2
    finally:
        n.close()


def test_recovers_after_listener_appears(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lssupervisor.daemon.sdnotify")
    path = tmp_path / "late.sock"
    n = Notifier(str(path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert not n.watchdog()
        s.bind(str(path))
        s.settimeout(5)
        assert n.watchdog()
        assert fields(s) == ["WATCHDOG=1"]
        assert "works again" in caplog.text
    finally:
        s.close()
        n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "junk"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_our_pid() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0


def test_child_env_strips_systemd_variables() -> None:
    env = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "http",
        "AWS_SECRET_ACCESS_KEY": "kept-for-ls",
    }
    out = child_env(env)
    assert out == {"PATH": "/usr/bin", "AWS_SECRET_ACCESS_KEY": "kept-for-ls"}
    assert "NOTIFY_SOCKET" in env  # the input is not modified


def test_a_receiver_that_does_not_read_never_blocks_the_caller(tmp_path: Path) -> None:
    """A datagram socket blocks the sender once the receiver's queue is full; the main loop must not."""

    from lssupervisor.daemon.sdnotify import Notifier

    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        n = Notifier(str(path))
        results = []
        for _ in range(40):  # far past the kernel's queue length (net.unix.max_dgram_qlen, 10)
            results.append(n.watchdog())  # a blocking send would hang here (pytest-timeout)
        assert results[0] is True and results[-1] is False  # later sends give up and fail (logged)
        receiver.recv(4096)  # the receiver reads again: sends work again
        assert n.watchdog() is True
        n.close()
    finally:
        receiver.close()

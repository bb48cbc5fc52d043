"""The status HTTP server under abuse (issue 13 rows 9, 10, 13), with real sockets and a real daemon.

- 150 slow clients (one header line every 3 s) cost no thread: /livez stays fast, and SIGTERM ends
  the daemon within its ``stop_timeout`` (it took 27 s when ``server_close()`` joined request threads);
- one overall deadline per request: a client that keeps sending header lines is cut off all the same;
- 20 clients resetting their connection mid-/metrics are one debug line each in the configured (JSON)
  log format, never a raw traceback on stderr;
- ``check`` warns about an ``http.address`` beyond loopback.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lssupervisor.cli.check import Level, run_checks
from lssupervisor.daemon.http import StatusServer
from tests.harness import free_port, wait_for
from tests.harness.e2e import ConfigSet, Daemon

SLOW_CLIENTS = 150
HEADER_EVERY_S = 3.0


class SlowClients:
    """``n`` connections that send a request head one header line every ``every`` seconds, forever
    (until closed): the slowloris pattern."""

    def __init__(self, host: str, port: int, n: int, every: float = HEADER_EVERY_S) -> None:
        self.socks = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
        for s in self.socks:
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        self.sent_lines = 0
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._drip, name="slow-clients", daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.wait(self._every):
            for s in self.socks:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass  # the server closed it (deadline): that is the point
            self.sent_lines += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()


def livez_answers(port: int) -> bool:
    """/livez answers 200. A server the slow clients starve never answers; the deadline is generous
    so that a busy machine is not mistaken for that."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=30) as resp:
        return resp.status == 200


@pytest.fixture
def slow_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    cs = ConfigSet(tmp_path)
    port = free_port()
    cs.write(http=f"127.0.0.1:{port}", stop_timeout="5s")
    d = Daemon(cs)
    try:
        yield d, port
    finally:
        d.close()


def test_row9_sigterm_with_150_slow_clients_exits_within_stop_timeout(
    slow_daemon: tuple[Daemon, int],
) -> None:
    d, port = slow_daemon
    d.running_ls_pid()
    clients = SlowClients("127.0.0.1", port, SLOW_CLIENTS)
    try:
        # Every slow client is connected and holding; the probes still get answers.
        assert all(livez_answers(port) for _ in range(5))
        wait_for(lambda: clients.sent_lines >= 1, what="a header line dripped to every client")
        assert livez_answers(port)
        d.send(signal.SIGTERM)
        # A shutdown that waited for each slow client in turn would take minutes: the deadline on the
        # exit is generous for a busy machine and far below that.
        code = d.wait(60)
    finally:
        clients.close()
    assert code == 0, d.text()
    assert "Traceback" not in d.text()


def test_a_request_has_one_overall_deadline() -> None:
    """A client that sends a header line more often than any per-read timeout is still cut off."""
    server = StatusServer("127.0.0.1", 0, request_timeout=1.0, process_metrics=False)
    server.start()
    try:
        host, port = server.address
        sock = socket.create_connection((host, port), timeout=5)
        try:
            sock.sendall(b"GET /livez HTTP/1.1\r\n")

            def dripped_until_closed() -> bool:
                # One header line every 0.2 s, more often than any per-read timeout: only a deadline
                # for the whole request ends it.
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                    sock.settimeout(0.2)
                    return sock.recv(1) == b""
                except TimeoutError:
                    return False
                except OSError:
                    return True

            wait_for(dripped_until_closed, interval=0, what="the server to close the dripping request")
        finally:
            sock.close()
        # And the server still answers everyone else.
        with urllib.request.urlopen(f"http://{host}:{port}/livez", timeout=30) as resp:
            assert resp.status == 200
    finally:
        server.stop()


def test_stalled_clients_cost_no_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    server = StatusServer("127.0.0.1", 0, process_metrics=False)
    server.start()
    socks: list[socket.socket] = []
    try:
        running = {t.name for t in threading.enumerate()} - before
        host, port = server.address
        socks = [socket.create_connection((host, port), timeout=5) for _ in range(100)]
        for s in socks:
            s.sendall(b"GET /status HTTP/1.0\r\n")  # never finished
        with urllib.request.urlopen(f"http://{host}:{port}/livez", timeout=30) as resp:
            assert resp.status == 200
        assert {t.name for t in threading.enumerate()} - before == running  # 1 serving + the workers
        assert len(running) == 5
    finally:
        for s in socks:
            s.close()
        server.stop()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a client that crashes or gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_row10_client_resets_are_one_debug_line_each_in_json_never_a_traceback(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    port = free_port()
    cs.write(http=f"127.0.0.1:{port}", extra="log:\n  format: json\n  level: debug\n")
    d = Daemon(cs)
    try:
        d.running_ls_pid()
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.0\r\nAccept: text/plain\r\n\r\n")
            _reset(sock)
        # The server is fine afterwards, and has logged what happened.
        assert livez_answers(port)
        d.send(signal.SIGTERM)
        assert d.wait(30) == 0
    finally:
        d.close()
    lines = d.text().splitlines()
    assert "Traceback" not in d.text()
    # Every line of ours is one JSON object: nothing bypassed the configured format. (LS, inheriting our
    # stderr, writes its own logfmt lines.)
    docs = [json.loads(line) for line in lines if not line.startswith('time="')]
    gone = [doc for doc in docs if "went away" in doc["msg"] or "client closed" in doc["msg"]]
    assert 1 <= len(gone) <= 20, gone
    assert all(doc["level"] == "debug" for doc in gone)


@pytest.mark.parametrize(
    ("address", "warned"),
    [
        ("0.0.0.0:8265", True),
        ("[::]:8265", True),
        (":8265", True),
        ("10.1.2.3:8265", True),
        ("127.0.0.1:8265", False),
        ("[::1]:8265", False),
        ("localhost:8265", False),
        ("", False),
    ],
)
def test_row13_check_warns_about_a_listener_beyond_loopback(
    tmp_path: Path, address: str, warned: bool
) -> None:
    cs = ConfigSet(tmp_path)
    cs.write(http=address)
    report = run_checks(str(cs.config))
    warnings = [
        f.message for f in report.findings if f.level is Level.WARNING and "http.address" in f.message
    ]
    assert bool(warnings) is warned, warnings
    if warned:
        assert "listens beyond loopback: /status and /metrics" in warnings[0]

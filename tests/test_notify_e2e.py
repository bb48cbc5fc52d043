"""End to end: what the real daemon tells systemd, read from a real AF_UNIX datagram socket.

The unit is ``Type=notify`` with ``WatchdogSec=``: systemd waits for READY=1, shows STATUS=, restarts
us when WATCHDOG=1 stops, and expects RELOADING=1 + MONOTONIC_USEC on reload (then READY=1 again) and
STOPPING=1 on stop. This test runs the daemon with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd
would, against the LS stand-in.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import wait_for
from tests.harness.e2e import ConfigSet, Daemon, wait_running_on


class NotifySocket:
    """systemd's side of the notify protocol: a reader thread keeps the queue drained (as systemd
    does; a full queue would make the daemon's sends fail) and keeps every message in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            with self._lock:
                self.messages.append(fields)

    def seen(self, key: str, value: str | None = None) -> list[int]:
        """Indexes of the messages carrying ``key`` (with ``value``)."""
        with self._lock:
            return [
                i for i, m in enumerate(self.messages) if key in m and (value is None or m[key] == value)
            ]

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()


def test_the_daemon_speaks_the_notify_protocol(
    tmp_path: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    cs = ConfigSet(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # 0.4 s: the daemon must ping every 0.2 s
    d = Daemon(cs)
    try:
        doc = wait_running_on(d, 1)
        # LS must not get systemd's variables: it would talk to the socket itself, and the service's
        # watchdog would be fed (or tripped) by the wrong process.
        environ = Path(f"/proc/{doc['lightningstream']['pid']}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0] for entry in environ}
        assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID"}
        assert b"APP_SCHEMA_VERSION=1" in environ  # the version variable does reach LS
        # READY=1 exactly once the LS child is ready, and STATUS= on the way there.
        ready = wait_for(lambda: notify.seen("READY", "1"), timeout=10, what="READY=1")
        messages = notify.snapshot()
        statuses = [m["STATUS"] for m in messages[: ready[0] + 1] if "STATUS" in m]
        assert any("RECONCILING" in s for s in statuses), statuses
        assert messages[ready[0]].get("MAINPID", str(d.pid)) == str(d.pid)

        # The watchdog is fed from the main loop, at least twice per WatchdogSec.
        # (The interval itself, half of WATCHDOG_USEC, is unit-tested in test_sdnotify.py.)
        first = len(notify.seen("WATCHDOG", "1"))
        wait_for(lambda: len(notify.seen("WATCHDOG", "1")) >= first + 4, timeout=10, what="WATCHDOG=1 pings")

        # Reload: RELOADING=1 with the CLOCK_MONOTONIC time, then READY=1 when done.
        before = len(notify.snapshot())
        d.send(signal.SIGHUP)
        reloading = wait_for(
            lambda: [i for i in notify.seen("RELOADING", "1") if i >= before], timeout=10, what="RELOADING=1"
        )
        msg = notify.snapshot()[reloading[0]]
        assert "MONOTONIC_USEC" in msg
        assert abs(int(msg["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 30_000_000
        wait_for(
            lambda: [i for i in notify.seen("READY", "1") if i > reloading[0]],
            timeout=10,
            what="READY=1 after the reload",
        )

        # Stop: STOPPING=1, then the daemon exits 0.
        d.send(signal.SIGTERM)
        assert d.wait() == 0
        assert notify.seen("STOPPING", "1")
        # Nothing the daemon sent may carry a newline-injected extra assignment.
        assert all(set(m) <= {"READY", "STATUS", "WATCHDOG", "RELOADING", "MONOTONIC_USEC", "STOPPING",
                              "EXTEND_TIMEOUT_USEC", "MAINPID", "ERRNO"} for m in notify.snapshot())
    finally:
        d.close()

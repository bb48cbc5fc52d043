"""The systemd notification protocol (``sd_notify``), without libsystemd.

systemd (``Type=notify``) passes ``NOTIFY_SOCKET``: a filesystem path, or ``@name`` for a socket in the
abstract namespace. A notification is one datagram of ``KEY=VALUE`` lines on an ``AF_UNIX``
``SOCK_DGRAM`` socket. When the variable is unset (run by hand, in a container) every call is a no-op.

Threading: a :class:`Notifier` is called only from the main loop thread (the one that owns all state).
It has no lock; a second thread would interleave its warning-once bookkeeping. Other threads enqueue an
event and let the loop notify.

Failure policy: a send never raises into the main loop. systemd going away (shutdown, re-exec) must
not take the supervisor down with it; the first failure is logged as a warning, repeats at debug until
a send succeeds again.

``RELOADING=1`` carries ``MONOTONIC_USEC`` (``CLOCK_MONOTONIC`` in microseconds) because systemd 253+
(``Type=notify-reload``) uses it to tell a reload that started after its request from an older one;
older systemd ignores the extra field. After a reload the daemon sends :meth:`Notifier.ready` again.

Children (LS, workers, hooks) get :func:`lssupervisor.proc.child_env`: the notification and socket-
activation variables removed, so nothing but the supervisor speaks to systemd (``NotifyAccess=main``
would reject them anyway, with a log line per message).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Longest a notification may hold up the main loop when the receiver does not read.
SEND_TIMEOUT_S = 0.05

def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd asked for no watchdog.

    Half of ``WATCHDOG_USEC`` (what sd_watchdog_enabled(3) recommends), and only when WATCHDOG_PID is
    absent or names us: the variables may have been inherited from a parent that was the watched one.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2_000_000


def _address(value: str) -> str | bytes | None:
    """The sendto() address for a NOTIFY_SOCKET value; None for forms we cannot use."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL instead of '@'; bytes so Python keeps the exact name.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd 254+ also allows vsock:CID:PORT (VMs); not a case for this daemon.
    return None


def _clean(text: str) -> str:
    # A newline would start a new KEY=VALUE line: a status text containing "\nREADY=1" must not be
    # able to signal readiness.
    return text.replace("\r", " ").replace("\n", " ")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to systemd; a no-op when built without an address.

    Each method returns True when the datagram was sent, False when disabled or the send failed.
    """

    def __init__(self, address: str | None) -> None:
        self._raw = address
        self._addr = _address(address) if address else None
        self._sock: socket.socket | None = None
        self._failing = False
        if address and self._addr is None:
            log.warning("sd_notify disabled: NOTIFY_SOCKET=%r is not a path or @abstract name", address)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET`` (from ``env``, default ``os.environ``)."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (each ``KEY=VALUE``) as one datagram. Never raises."""
        if self._addr is None:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A datagram socket blocks while the receiver's queue is full (10 datagrams by default).
                # The main loop must never hang on systemd (or whatever listens): wait a moment, then
                # count the send as failed.
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(payload, self._addr)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "sd_notify to %s failed: %s (further failures logged at debug)", self._raw, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %s works again", self._raw)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload) finished."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={_clean(status)}")
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_clean(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: an orderly shutdown began."""
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={_clean(status)}")
        return self.notify(*fields)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC; send :meth:`ready` when the reload is done."""
        fields = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status is not None:
            fields.append(f"STATUS={_clean(status)}")
        return self.notify(*fields)

    def extend_timeout(self, usec: int) -> bool:
        """EXTEND_TIMEOUT_USEC: the current start/stop timeout ends no earlier than ``usec`` from now."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive. Call every :func:`watchdog_interval` seconds."""
        return self.notify("WATCHDOG=1")

    def mainpid(self, pid: int) -> bool:
        """MAINPID=: another process became the main process (not used by the daemon itself)."""
        return self.notify(f"MAINPID={int(pid)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

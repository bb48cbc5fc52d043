"""Is Lightning Stream ready? Probe its ``/healthz`` for the per-LMDB startup flags.

LS serves ``/healthz`` (wojas/go-healthz) when ``http.address`` is set. The JSON body looks like::

    {"ok": true, "has_warnings": false, "status": "OK", "time": "...", "since": "...",
     "runtime": {...}, "failures": {}, "warnings": {},
     "metadata": {"startup_main": true, "version": "v1.0.0", "hostname": "...", ...}}

The HTTP status is 200, or 503 when a registered check fails; the body is JSON either way.
``metadata.startup_<db>`` (LS ``status/starttracker``, one per LMDB name under ``lmdbs``) is set to
false when the syncer starts and flips to true once the initial listing, the initial store and the
first receive-and-load pass are done, evaluated at most once a second. That flag, for every db, is
our readiness signal; the overall ``ok`` is not (storage failures later on are LS's business, and
by default a slow startup is not reported as a failure at all).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lssupervisor.errors import ConfigError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HealthResult:
    ready: bool
    detail: str  # one line for logs and status: why (not) ready
    answered: bool = False  # LS answered with its JSON body (200 or 503)
    pending: tuple[str, ...] = ()  # when answered: the LMDBs whose startup_<db> is not yet true
    timed_out: bool = False  # connected, but no answer within the probe's timeout


def parse_address(address: str) -> tuple[str, int]:
    """Where to connect for an LS ``http.address`` (a Go listen address).

    ``:8500`` / ``0.0.0.0:8500`` (all IPv4+IPv6 interfaces) -> 127.0.0.1; ``[::]:8500`` -> ::1;
    ``[::1]:8500`` -> ::1; ``host:port`` as is.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text:
        raise ConfigError(f"http.address in the LS config: expected host:port or :port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"http.address in the LS config: put an IPv6 host in brackets, got {address!r}")
    try:
        port = int(port_text)
    except ValueError:
        try:
            port = socket.getservbyname(port_text, "tcp")  # Go accepts service names too
        except OSError:
            raise ConfigError(
                f"http.address in the LS config: bad port {port_text!r} in {address!r}"
            ) from None
    if not 0 < port < 65536:
        raise ConfigError(f"http.address in the LS config: port out of range in {address!r}")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def readiness(doc: Any, dbs: Sequence[str]) -> HealthResult:
    """Decide readiness from a parsed ``/healthz`` body."""
    if not isinstance(doc, dict):
        return HealthResult(False, "healthz: expected a JSON object")
    metadata = doc.get("metadata")
    if metadata is None:
        metadata = {}  # go-healthz omits an empty metadata map
    if not isinstance(metadata, dict):
        return HealthResult(False, "healthz: metadata is not an object")
    pending = tuple(db for db in dbs if metadata.get(f"startup_{db}") is not True)
    if pending:
        detail = "startup pending for " + ", ".join(pending)
        return HealthResult(False, detail, answered=True, pending=pending)
    if not dbs:
        return HealthResult(True, "healthz answered (no lmdbs to wait for)", answered=True)
    return HealthResult(True, "startup complete for " + ", ".join(dbs), answered=True)


class HealthProbe:
    """One-shot GETs of LS's ``/healthz`` on ``address`` (an LS ``http.address``)."""

    def __init__(self, address: str, dbs: Sequence[str], timeout: float = 1.0) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.dbs: tuple[str, ...] = tuple(dbs)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"HealthProbe({self.address!r}, dbs={list(self.dbs)})"

    def check(self) -> HealthResult:
        """Ask LS once. Never raises: every failure is a not-ready result with the reason."""
        where = f"{self.host}:{self.port}"
        # http.client, not urllib: urllib honours http_proxy, and a proxy must never answer for LS.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/healthz", headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read(MAX_BODY_BYTES + 1)
            status = resp.status
        except ConnectionRefusedError:
            return HealthResult(False, f"healthz: connection refused on {where}")
        except TimeoutError:
            return HealthResult(
                False, f"healthz: no answer from {where} within {self.timeout:g}s", timed_out=True
            )
        except (OSError, http.client.HTTPException) as exc:
            return HealthResult(False, f"healthz: {where}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()
        if status not in (200, 503):  # 503 still carries the JSON body with the metadata
            return HealthResult(False, f"healthz: HTTP {status} from {where}")
        if len(body) > MAX_BODY_BYTES:
            return HealthResult(False, f"healthz: body from {where} larger than {MAX_BODY_BYTES} bytes")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return HealthResult(False, f"healthz: invalid JSON from {where}: {exc}")
        return readiness(doc, self.dbs)


# Readiness is probed every FAST_S for the first FAST_FOR_S after LS starts, then ever less often, up to
# lightningstream.health_poll_interval. A /healthz probe on loopback costs well under a millisecond.
FAST_S = 0.02
FAST_FOR_S = 2.0

# LS v1.0.0's health checker can deadlock, for good, on the one evaluation that completes the startup:
# go-healthz runs a check holding the check's mutex, and LS's startup check then takes the checker's
# mutex (SetMeta, Deregister); a /healthz request takes them in the other order (Status). A request
# that meets that evaluation wedges both: from then on /healthz accepts connections and never answers,
# while LS syncs on. Since only the completing evaluation takes the checker's mutex, a /healthz that
# answered and then stays silent this long means that startup completed for the LMDB that was still
# pending (docs/decisions.md, "Readiness when LS's /healthz wedges").
WEDGE_AFTER_S = 3.0


class HealthPoller:
    """A daemon thread polling a probe every ``interval`` until LS is ready or :meth:`stop` is called.

    ``on_ready(pid)`` is called exactly once, from the poller thread, when the probe first says
    ready; the daemon passes a function that only ``put_nowait()``s an event on its queue. Nothing is
    raised into the caller; a failing callback is logged. ``last`` holds the latest result (status).
    """

    def __init__(
        self,
        probe: HealthProbe,
        pid: int,
        on_ready: Callable[[int], None],
        interval: float = 0.5,
        *,
        start: bool = True,
    ) -> None:
        self.probe = probe
        self.pid = pid
        self.interval = interval
        self._on_ready = on_ready
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last: HealthResult | None = None
        self._thread = threading.Thread(target=self._run, name=f"ls-health-{pid}", daemon=True)
        if start:
            self.start()

    @property
    def last(self) -> HealthResult | None:
        with self._lock:
            return self._last

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop polling and join the thread (safe to call more than once, and from on_ready)."""
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def delay(self, elapsed: float) -> float:
        """The wait before the next probe, ``elapsed`` seconds after polling began: FAST_S while LS is
        likely to become ready any moment (readiness seen within milliseconds), then growing to
        ``interval`` (a slow start, e.g. a big initial download, is not probed 50 times a second)."""
        if elapsed < FAST_FOR_S:
            return min(FAST_S, self.interval)
        return min(self.interval, FAST_S * 2 ** ((elapsed - FAST_FOR_S) / FAST_FOR_S))

    def _run(self) -> None:
        started = time.monotonic()
        wedge = _WedgeWatch(self.pid)
        while not self._stop.is_set():
            try:
                result = self.probe.check()
            except Exception as exc:  # check() does not raise; this is a guard against bugs
                log.exception("healthz probe failed unexpectedly")
                result = HealthResult(False, f"healthz: probe error {exc!r}")
            result = wedge.see(result, time.monotonic())
            with self._lock:
                changed = self._last is None or self._last.detail != result.detail
                self._last = result
            if changed:
                log.debug("lightningstream pid=%d health: %s", self.pid, result.detail)
            if result.ready:
                if not self._stop.is_set():
                    try:
                        self._on_ready(self.pid)
                    except Exception:
                        log.exception("health on_ready callback failed (pid=%d)", self.pid)
                return
            # Event.wait is the poll interval, and stop() cuts it short.
            self._stop.wait(self.delay(time.monotonic() - started))


class _WedgeWatch:
    """Turns a /healthz that answered and then went silent into readiness when that silence can only
    be LS's wedged checker after the last pending LMDB completed its startup (see WEDGE_AFTER_S)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pending: tuple[str, ...] | None = None  # at LS's last answer; None: never answered
        self.silent_since: float | None = None
        self.warned = False

    def see(self, result: HealthResult, now: float) -> HealthResult:
        if result.answered or not result.timed_out:
            if result.answered:
                self.pending = result.pending
            self.silent_since = None
            return result
        if self.pending is None:
            return result  # never answered: a slow start, not the wedge
        if self.silent_since is None:
            self.silent_since = now
        if now - self.silent_since < WEDGE_AFTER_S:
            return result
        if len(self.pending) <= 1:
            if not self.warned:
                self.warned = True
                log.warning(
                    "lightningstream pid=%d: /healthz answered, then stopped answering for %gs: LS's "
                    "health checker deadlocked on the evaluation that completes the startup of %s; "
                    "taking LS as ready",
                    self.pid, WEDGE_AFTER_S, ", ".join(self.pending),
                )
            return HealthResult(True, f"startup complete ({result.detail}: LS's /healthz is wedged)")
        if not self.warned:
            self.warned = True
            log.warning(
                "lightningstream pid=%d: /healthz stopped answering while startup was pending for %s; LS's "
                "health checker may be deadlocked and cannot say which LMDB completed: readiness waits "
                "for lightningstream.ready_timeout",
                self.pid, ", ".join(self.pending),
            )
        return result

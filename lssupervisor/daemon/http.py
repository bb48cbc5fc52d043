"""The read-only status HTTP server: ``/livez``, ``/readyz``, ``/status``, ``/metrics``.

Theory of operation
-------------------
The main loop owns all state; this server never touches it. The loop hands over what the world may see
in two ways, both plain reference stores that are atomic under the GIL (no locks):

- :meth:`StatusServer.publish` with a status snapshot (a mapping, see below) whenever something changed.
  The server keeps a redacted deep copy and its JSON encoding, swapped in as one tuple, so a request
  sees either the old or the new document, never a mix, and later mutation by the caller cannot leak in.
- :meth:`StatusServer.heartbeat` on every loop iteration (or a ``loop_tick`` callable returning the
  last tick's monotonic time). ``/livez`` fails when the loop has not ticked for ``liveness_timeout``
  seconds. Long work (migrations) runs in worker processes, so a healthy loop keeps ticking.

Requests are served by :class:`http.server.ThreadingHTTPServer` from one serving thread plus one short
thread per request; :meth:`StatusServer.stop` shuts the loop down and joins every thread. Each
connection has a socket timeout so a stalled client cannot hold a thread (or ``stop()``) for long.

Endpoints (GET and HEAD; anything else is 405)
----------------------------------------------
``/livez``   200 while the main loop ticks, else 503. Body: JSON with the tick age.
``/readyz``  200 only when state is RUNNING, not paused, no sub-step, and LS reported ready; else 503
             with the reason (reconciling, paused, parked, starting, LS not ready...).
``/status``  The published snapshot as JSON: byte-for-byte what :func:`encode_status` returns, which is
             also what ``lssupervisor status --json`` prints. 503 before the first publish.
``/metrics`` Prometheus text (or OpenMetrics when asked), see :mod:`lssupervisor.daemon.metrics`.
``/fleet``   The fleet as the shared storage shows it (:mod:`lssupervisor.daemon.fleetwatch`): the
             document ``lssupervisor fleet --storage --json`` prints; 503 before the first listing,
             404 when no fleet view is attached.

Status snapshot keys read here (all optional; missing keys are tolerated)::

    state: str, substate: str|None, reason: str|None, paused: bool,
    lightningstream: {pid: int|None, restarts: int, ready: bool, started_at: iso|None, ...},
    lmdbs: {<name>: {path: str, schema_version: int|None}}, target_version: int|None,
    migration: {progress, last_result: "ok"|"failed"|"cancelled"|None, last_duration_s,
                last_success_at: iso|None},
    backups: {count: int, last: {created_at: iso, size_bytes: int, ...}|None}, updated_at: iso

Secrets never leave: everything served goes through :func:`redact`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from lssupervisor.daemon.metrics import Snapshot, build_registry
from lssupervisor.errors import ConfigError
from lssupervisor.redaction import REDACTED, SECRET_KEY_RE, redact

__all__ = ["REDACTED", "SECRET_KEY_RE", "StatusServer", "encode_status", "readiness", "redact"]

log = logging.getLogger(__name__)

DEFAULT_LIVENESS_TIMEOUT = 30.0


class FleetSource(Protocol):
    def http_document(self) -> tuple[int, bytes]: ...


DEFAULT_REQUEST_TIMEOUT = 5.0


def encode_status(snapshot: Snapshot) -> bytes:
    """The status document as served on /status and printed by ``lssupervisor status --json``."""
    return _encode_redacted(redact(snapshot))


def _encode_redacted(doc: Mapping[str, Any]) -> bytes:
    """JSON of ``doc``, which must already be the output of :func:`redact` (the only callers are
    :func:`encode_status` and :meth:`StatusServer.publish`, which redacts once for both its copy and
    its encoding)."""
    return (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()


def readiness(snapshot: Snapshot | None) -> tuple[bool, str | None]:
    """(ready, reason-when-not). Ready means: RUNNING, no sub-step, not paused, LS ready."""
    if snapshot is None:
        return False, "no status published yet"
    state = snapshot.get("state")
    substate = snapshot.get("substate")
    reason = snapshot.get("reason")
    if state != "RUNNING" or substate:
        text = f"state {state or 'unknown'}"
        if substate:
            text += f" ({substate})"
        if reason:
            text += f": {reason}"
        return False, text
    if snapshot.get("paused") is True:
        return False, "paused by an operator"
    ls = snapshot.get("lightningstream")
    if not isinstance(ls, Mapping) or ls.get("ready") is not True:
        return False, "Lightning Stream not ready"
    return True, None


class _Server(ThreadingHTTPServer):
    # Request threads are non-daemon and tracked so server_close() joins them (socketserver only
    # tracks non-daemon threads); the per-connection timeout bounds how long that can take.
    daemon_threads = False
    block_on_close = True
    owner: StatusServer


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "lssupervisor"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers in keep-alive
    timeout: ClassVar[float] = DEFAULT_REQUEST_TIMEOUT

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, _json({"error": "read-only: GET or HEAD"}), True,
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _route(self, send_body: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        match path:
            case "/livez":
                age = owner.loop_tick_age()
                alive = age <= owner.liveness_timeout
                live = {"alive": alive, "loop_tick_age_s": round(age, 3), "limit_s": owner.liveness_timeout}
                self._send(HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE, _json(live), send_body)
            case "/readyz":
                ready, why = readiness(owner.snapshot)
                code = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(code, _json({"ready": ready, "reason": why}), send_body)
            case "/status":
                published = owner.published_json
                if published is None:
                    none_yet = _json({"error": "no status published yet"})
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, none_yet, send_body)
                else:
                    self._send(HTTPStatus.OK, published, send_body)
            case "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                body = encoder(owner.registry)
                self._send(HTTPStatus.OK, body, send_body, content_type=content_type)
            case "/fleet" if owner.fleet is not None:
                fleet_code, fleet_doc = owner.fleet.http_document()
                self._send(HTTPStatus(fleet_code), fleet_doc, send_body)
            case _:
                self._send(HTTPStatus.NOT_FOUND, _json({"error": f"no such endpoint {path}"}), send_body)

    def _send(
        self,
        code: HTTPStatus,
        body: bytes,
        send_body: bool,
        *,
        content_type: str = "application/json",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit us every few seconds: request lines belong at debug, not on stderr.
        log.debug("http %s %s", self.address_string(), format % args)


def _json(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


class StatusServer:
    """The status HTTP server. Construct, :meth:`start`, :meth:`publish` / :meth:`heartbeat` from the
    main loop, :meth:`stop` at shutdown. Not restartable after stop (make a new one)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT,
        loop_tick: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        process_metrics: bool = True,
    ) -> None:
        """``host`` "" listens on all IPv4 interfaces; an IPv6 literal (``::1``) selects IPv6.
        ``loop_tick`` returns the monotonic time (same clock as ``clock``) of the loop's last
        iteration; without it, :meth:`heartbeat` records ticks."""
        self._host = host
        self._port = port
        self.liveness_timeout = liveness_timeout
        self._loop_tick = loop_tick
        self._clock = clock
        self._request_timeout = request_timeout
        self._last_tick = clock()
        # (redacted snapshot, its JSON) swapped as one reference: readers never see a torn pair.
        self._published: tuple[dict[str, Any], bytes] | None = None
        self.registry: CollectorRegistry = build_registry(
            lambda: self.snapshot, self.loop_tick_age, process_metrics=process_metrics
        )
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.fleet: FleetSource | None = None

    def attach_fleet(self, source: FleetSource, collector: Collector | None = None) -> None:
        """Serve ``source`` at ``/fleet`` (and its metrics, when given)."""
        self.fleet = source
        if collector is not None:
            self.registry.register(collector)

    # -- called by the main loop -------------------------------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the document served from now on (redacted, copied)."""
        doc: dict[str, Any] = redact(snapshot)  # one pass: the served copy and its JSON share it
        self._published = (doc, _encode_redacted(doc))

    def heartbeat(self, now: float | None = None) -> None:
        """Record a main-loop tick (``now`` from the loop's monotonic clock, default ``clock()``)."""
        self._last_tick = self._clock() if now is None else now

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound (host, port).

        Raises ConfigError when the address cannot be bound (in use, not local, no permission).
        """
        if self._httpd is not None:
            raise RuntimeError("StatusServer already started")
        cls = _IPv6Server if ":" in self._host else _Server
        handler = type("Handler", (_Handler,), {"timeout": self._request_timeout})
        try:
            httpd = cls((self._host, self._port), handler)
        except OSError as exc:
            raise ConfigError(
                f"http.address {self._host}:{self._port}: cannot listen: {exc.strerror or exc}; "
                "choose another address or set http.address to '' to disable the status server"
            ) from None
        httpd.owner = self
        self._httpd = httpd
        # Liveness counts from when we started serving, so a slow first iteration is not "stalled".
        self._last_tick = self._clock()
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="lssupervisor-http", daemon=True
        )
        self._thread.start()
        host, port = self.address
        log.info("http listening on %s:%d (/livez /readyz /status /metrics)", host, port)
        return host, port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close the socket, join the serving thread and every request thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.shutdown()  # returns once serve_forever has left its loop
        httpd.server_close()  # joins in-flight request threads (bounded by request_timeout)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("http serving thread did not stop within %.1fs", timeout)

    # -- read by request threads ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); port 0 at construction becomes the real port after start()."""
        if self._httpd is None:
            return self._host, self._port
        addr = self._httpd.server_address
        return str(addr[0]), int(addr[1])

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The last published (redacted) snapshot; treat as read-only."""
        published = self._published
        return None if published is None else published[0]

    @property
    def published_json(self) -> bytes | None:
        published = self._published
        return None if published is None else published[1]

    def loop_tick_age(self) -> float:
        last = self._loop_tick() if self._loop_tick is not None else self._last_tick
        return max(0.0, self._clock() - last)

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

Serving is built for abuse (any process that reaches the port is a client): one serving thread
accepts (backlog :data:`BACKLOG`) and reads request heads without blocking, so a slow or stalled
client costs no thread; a complete request goes to one of :data:`WORKERS` threads, which answer it
with Python's ``BaseHTTPRequestHandler``. Each request has one overall deadline for reading and
answering. A client that resets or stalls is one debug line in the configured log format, never a
traceback. :meth:`StatusServer.stop` closes every connection and never waits for a client, so a
SIGTERM ends the daemon within its ``stop_timeout`` with hundreds of slow clients connected.

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

import contextlib
import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from lssupervisor.daemon.metrics import Snapshot, build_registry
from lssupervisor.errors import ConfigError
from lssupervisor.redaction import REDACTED, SECRET_KEY_RE, redact

__all__ = ["REDACTED", "SECRET_KEY_RE", "StatusServer", "encode_status", "readiness", "redact"]

log = logging.getLogger(__name__)

DEFAULT_LIVENESS_TIMEOUT = 30.0
# One overall deadline per request: reading its head and writing the answer (not per recv/send: a
# client sending one header line every few seconds is cut off all the same).
DEFAULT_REQUEST_TIMEOUT = 5.0
WORKERS = 4  # threads answering complete requests (each answer is prepared bytes or a metrics scrape)
MAX_READING = 512  # connections whose request head is still arriving (they cost no thread)
MAX_QUEUED = 64  # complete requests waiting for a worker
MAX_HEAD_BYTES = 64 * 1024
BACKLOG = 1024  # accept queue (the kernel caps it at net.core.somaxconn)
SERVE_POLL_S = 0.5  # backstop of the serving loop; stop() wakes it at once


class FleetSource(Protocol):
    def http_document(self) -> tuple[int, bytes]: ...


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


class _DeadlineWriter:
    """The response side of one connection: every write must finish before the request's deadline
    (a client that reads slowly cannot hold a worker longer than that)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self.closed = False

    def write(self, data: bytes) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(remaining)  # since 3.5: the whole sendall, not each send
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class _Handler(BaseHTTPRequestHandler):
    """One complete request (its head already read by the serving thread), answered by a worker."""

    server_version = "lssupervisor"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers in keep-alive

    def __init__(
        self, sock: socket.socket, head: bytes, client: tuple[Any, ...], owner: StatusServer, deadline: float
    ) -> None:
        self.owner = owner
        self._head = head
        self._deadline = deadline
        super().__init__(sock, client, None)  # type: ignore[arg-type]  # runs setup, handle, finish

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._head)
        self.wfile = _DeadlineWriter(self.connection, self._deadline)  # type: ignore[assignment]

    def finish(self) -> None:
        self.wfile.close()
        self.rfile.close()

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, _json({"error": "read-only: GET or HEAD"}), True,
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _route(self, send_body: bool) -> None:
        owner = self.owner
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


def _head_complete(buf: bytearray) -> bool:
    return b"\r\n\r\n" in buf or b"\n\n" in buf


@dataclass(slots=True)
class _Reading:
    """A connection whose request head is still arriving (held by the serving thread, not a thread)."""

    address: tuple[Any, ...]
    deadline: float
    buf: bytearray = field(default_factory=bytearray)


class StatusServer:
    """The status HTTP server. Construct, :meth:`start`, :meth:`publish` / :meth:`heartbeat` from the
    main loop, :meth:`stop` at shutdown. Not restartable after stop (make a new one).

    Under abuse (see the module docstring): a connection costs no thread until its request head is
    complete; every request has one overall deadline (``request_timeout``) for reading and answering;
    :data:`WORKERS` threads answer complete requests; at most :data:`MAX_READING` connections are
    held while their head arrives and :data:`MAX_QUEUED` complete ones wait for a worker (more are
    closed at once); the accept backlog is :data:`BACKLOG`. :meth:`stop` never waits for a client."""

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
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._ready: queue.Queue[tuple[socket.socket, bytes, tuple[Any, ...], float] | None] = queue.Queue(
            MAX_QUEUED
        )
        self._answering: set[socket.socket] = set()  # sockets a worker is answering (shut at stop)
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None  # stop() wakes the serving thread through it
        self._wake_w: socket.socket | None = None
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
        """Bind and serve in background threads; returns the bound (host, port).

        Raises ConfigError when the address cannot be bound (in use, not local, no permission).
        """
        if self._listener is not None:
            raise RuntimeError("StatusServer already started")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self._host, self._port))
            listener.listen(BACKLOG)
        except OSError as exc:
            listener.close()
            raise ConfigError(
                f"http.address {self._host}:{self._port}: cannot listen: {exc.strerror or exc}; "
                "choose another address or set http.address to '' to disable the status server"
            ) from None
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        # Liveness counts from when we started serving, so a slow first iteration is not "stalled".
        self._last_tick = self._clock()
        self._thread = threading.Thread(target=self._serve, name="lssupervisor-http", daemon=True)
        self._thread.start()
        for i in range(WORKERS):
            worker = threading.Thread(target=self._work, name=f"lssupervisor-http-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        host, port = self.address
        log.info("http listening on %s:%d (/livez /readyz /status /metrics)", host, port)
        return host, port

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving and close every connection. Never waits for a client: connections still
        being read are closed, those being answered are shut down (their worker's write fails at
        once), so the threads end within ``timeout`` whatever the clients do."""
        listener, thread = self._listener, self._thread
        if listener is None or thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        assert self._wake_w is not None and self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        deadline = time.monotonic() + timeout
        thread.join(timeout)  # it never blocks for long: select() with a short timeout, woken now
        for sock in list(self._answering):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a worker blocked writing to a slow client returns
        while True:  # requests nobody will answer now
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].close()
        for _ in self._workers:
            self._ready.put_nowait(None)
        for t in (thread, *self._workers):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("http thread %s did not stop within %.1fs", t.name, timeout)
        self._wake_r.close()
        self._wake_w.close()

    # -- the serving thread: accept, read request heads, hand complete requests to the workers --

    def _serve(self) -> None:
        listener = self._listener
        assert listener is not None
        sel = selectors.DefaultSelector()
        reading: dict[socket.socket, _Reading] = {}
        wake = self._wake_r
        assert wake is not None
        sel.register(listener, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)

        def drop(sock: socket.socket, why: str) -> None:
            pending = reading.pop(sock, None)
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            who = pending.address[0] if pending is not None else "?"
            log.debug("http %s: %s; connection closed", who, why)
            sock.close()

        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                wait = min([r.deadline - now for r in reading.values()] + [SERVE_POLL_S])
                for key, _ in sel.select(max(0.0, wait)):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is listener:
                        self._accept(listener, sel, reading)
                    elif sock is wake:
                        with contextlib.suppress(OSError):
                            sock.recv(64)
                    else:
                        self._read(sock, sel, reading, drop)
                now = time.monotonic()
                for sock, pending in list(reading.items()):
                    if now >= pending.deadline:
                        drop(sock, f"request not complete within {self._request_timeout:g}s")
        finally:
            for sock in list(reading):
                sock.close()
            sel.close()
            listener.close()

    def _accept(
        self, listener: socket.socket, sel: selectors.BaseSelector, reading: dict[socket.socket, _Reading]
    ) -> None:
        while True:
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: say so, keep serving the others
                log.warning("http: cannot accept a connection: %s", exc.strerror or exc)
                return
            if len(reading) >= MAX_READING:
                log.debug("http %s: %d connections already waiting; closed", address[0], MAX_READING)
                sock.close()
                continue
            sock.setblocking(False)
            reading[sock] = _Reading(address, time.monotonic() + self._request_timeout)
            sel.register(sock, selectors.EVENT_READ)

    def _read(
        self,
        sock: socket.socket,
        sel: selectors.BaseSelector,
        reading: dict[socket.socket, _Reading],
        drop: Callable[[socket.socket, str], None],
    ) -> None:
        pending = reading[sock]
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            drop(sock, f"client went away ({type(exc).__name__})")
            return
        if not data:
            drop(sock, "client closed before its request was complete")
            return
        pending.buf += data
        if _head_complete(pending.buf):
            sel.unregister(sock)
            del reading[sock]
            try:
                self._ready.put_nowait((sock, bytes(pending.buf), pending.address, pending.deadline))
            except queue.Full:
                log.debug("http %s: every worker busy and %d requests waiting; closed", pending.address[0],
                          MAX_QUEUED)
                sock.close()
        elif len(pending.buf) > MAX_HEAD_BYTES:
            drop(sock, f"request head larger than {MAX_HEAD_BYTES} bytes")

    # -- workers: answer complete requests ---------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None or self._stopping.is_set():
                if item is not None:
                    item[0].close()
                return
            sock, head, address, deadline = item
            self._answering.add(sock)
            try:
                sock.setblocking(True)
                _Handler(sock, head, address, self, deadline)
            except OSError as exc:
                # A reset, a broken pipe, the deadline: the client's doing, one debug line (never a
                # traceback on stderr, which would bypass the configured log format).
                log.debug("http %s: client went away while answered (%s)", address[0], type(exc).__name__)
            except Exception:
                log.exception("http %s: error answering a request", address[0])
            finally:
                self._answering.discard(sock)
                with contextlib.suppress(OSError):
                    sock.close()

    # -- read by request threads ---------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); port 0 at construction becomes the real port after start()."""
        if self._listener is None:
            return self._host, self._port
        addr = self._listener.getsockname()
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

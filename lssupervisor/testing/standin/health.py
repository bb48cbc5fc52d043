"""/healthz state and the HTTP server of the stand-in (LS ``status/``, ``wojas/go-healthz``).

``/healthz`` returns go-healthz's JSON (``ok``, ``has_warnings``, ``status``, ``time``, ``since``,
``runtime``, ``failures``, ``warnings``, ``metadata``), 200 unless a check fails (503).
Checks are evaluated periodically like go-healthz (each at its interval, at least 1 s):
``<db>_storage_{list,load,store}_failed_duration`` (healthtracker) and
``<db>_startup_in_progress`` (starttracker), which sets ``metadata.startup_<db>`` true at its first
evaluation after the initial listing, initial store and first full pass, then deregisters itself.
So ``startup_<db>`` turns true up to ``health.start.interval`` (≥1 s) after the work is done, as in
LS; ``LSSTANDIN_HEALTH_INTERVAL_MS`` sets the evaluation interval for fast tests.
"""

from __future__ import annotations

import html
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from lssupervisor.testing.standin.log import log

S = 1_000_000_000


def _interval_ns(configured: int) -> int:
    """go-healthz period: the configured interval, at least 1 s (LS ``Validated``); the knob
    LSSTANDIN_HEALTH_INTERVAL_MS replaces it so tests need not wait a second for readiness."""
    v = os.environ.get("LSSTANDIN_HEALTH_INTERVAL_MS")
    if v:
        try:
            return max(1, int(v)) * 1_000_000
        except ValueError:
            pass
    return max(configured, S)


def _rfc3339nano(t_ns: int) -> str:
    secs, nanos = divmod(t_ns, 1_000_000_000)
    lt = time.localtime(secs)
    off = lt.tm_gmtoff or 0
    zone = "Z" if off == 0 else f"{'+' if off > 0 else '-'}{abs(off) // 3600:02d}:{abs(off) % 3600 // 60:02d}"
    frac = f".{nanos:09d}".rstrip("0").rstrip(".")
    return time.strftime("%Y-%m-%dT%H:%M:%S", lt) + frac + zone


class Warning_(Exception):
    """go-healthz ``Warnf``: reported under ``warnings`` and does not make ``ok`` false."""


CheckFn = Callable[[], "str | Warning_ | None"]


class _Check:
    __slots__ = ("err", "fn", "next_ns", "period_ns")

    def __init__(self, fn: CheckFn, period_ns: int) -> None:
        self.fn = fn
        self.period_ns = period_ns
        self.next_ns = 0
        self.err: str | Warning_ | None = "pending"


class HealthTracker:
    """LS ``healthtracker``: failing longer than error/warn duration → failure/warning."""

    def __init__(self, health: Health, prefix: str, activity: str, conf: dict[str, Any]) -> None:
        self.activity = activity
        self.error_ns = max(0, conf["error_duration"])
        self.warn_ns = max(0, conf["warn_duration"])
        self.fails = 0
        self.since = 0
        self.last_err = ""
        self._lock = threading.Lock()
        health.register(f"{prefix}_failed_duration", _interval_ns(conf["interval"]), self._check)
        log.info("registered tracker for failure duration", healthtracker=prefix)

    def _check(self) -> str | Warning_ | None:
        with self._lock:
            if self.fails == 0:
                return None
            failing = time.monotonic_ns() - self.since
            secs = round(failing / S)
            if failing >= self.error_ns:
                return f"failed to {self.activity} for {secs}s - last error: '{self.last_err}'"
            if failing >= self.warn_ns:
                return Warning_(f"failed to {self.activity} for {secs}s - last error: '{self.last_err}'")
            return None

    def add_failure(self, err: str) -> None:
        with self._lock:
            self.last_err = err
            if self.fails == 0:
                self.since = time.monotonic_ns()
            self.fails += 1

    def add_success(self) -> None:
        with self._lock:
            self.fails = 0
            self.last_err = ""


class StartTracker:
    """LS ``starttracker``: ``startup_<db>`` metadata false until listing + store + first pass."""

    def __init__(self, health: Health, db: str, conf: dict[str, Any]) -> None:
        self.health = health
        self.db = db
        self.conf = conf
        self.flags = {"listing": False, "store": False, "pass": False}
        self.since = time.monotonic_ns()
        self.name = f"{db}_startup_in_progress"
        if conf["report_metadata"]:
            health.set_meta(f"startup_{db}", False)
        health.register(self.name, _interval_ns(conf["interval"]), self._check)
        log.info("registered tracker for startup phase", starttracker=db)

    def set(self, what: str) -> None:
        self.flags[what] = True

    def _check(self) -> str | Warning_ | None:
        wedge = os.environ.get("LSSTANDIN_HEALTHZ_WEDGE") == "1"
        # With the wedge knob, completion waits for a first answered /healthz: a poller then always
        # saw "pending" before the wedge, as it does with LS (whose evaluations are a second apart).
        if not all(self.flags.values()) or (wedge and not self.health.answered.is_set()):
            if self.conf["report_healthz"]:
                failing = time.monotonic_ns() - self.since
                secs = round(failing / S)
                if failing >= self.conf["error_duration"]:
                    return f"successful startup pending after {secs}s"
                if failing >= self.conf["warn_duration"]:
                    return Warning_(f"successful startup pending after {secs}s")
            return None
        if self.conf["report_metadata"]:
            self.health.set_meta(f"startup_{self.db}", True)
        log.info("startup phase completed successfully", starttracker=self.db)
        if wedge:
            # LS v1.0.0 when a /healthz request meets this evaluation: go-healthz runs the check
            # holding the check's mutex, Deregister wants the checker's, the request's Status() holds
            # the checker's and wants the check's. Both wait forever; LS syncs on.
            self.health.wedged.set()
        self.health.deregister(self.name)
        return None


class Health:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wedged = threading.Event()  # LSSTANDIN_HEALTHZ_WEDGE: /healthz never answers again
        self.answered = threading.Event()  # a /healthz request got its answer
        self.checks: dict[str, _Check] = {}
        self.meta: dict[str, Any] = {}
        self.since_ns = time.time_ns()
        self.counters: dict[tuple[str, str], int] = {}
        self._thread: threading.Thread | None = None

    def tracker(self, prefix: str, activity: str, conf: dict[str, Any]) -> HealthTracker:
        return HealthTracker(self, prefix, activity, conf)

    def start_tracker(self, db: str, conf: dict[str, Any]) -> StartTracker:
        return StartTracker(self, db, conf)

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self.meta[key] = value

    def register(self, name: str, period_ns: int, fn: CheckFn) -> None:
        with self._lock:
            self.checks[name] = _Check(fn, period_ns)
        self._ensure_thread()

    def deregister(self, name: str) -> None:
        with self._lock:
            self.checks.pop(name, None)

    def count(self, db: str, what: str) -> None:
        with self._lock:
            self.counters[(db, what)] = self.counters.get((db, what), 0) + 1

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._evaluate_forever, name="healthz", daemon=True)
            self._thread.start()

    def _evaluate_forever(self) -> None:
        while True:
            now = time.monotonic_ns()
            with self._lock:
                due = [c for c in self.checks.values() if c.next_ns <= now]
            for c in due:
                err = c.fn()
                c.err = err
                c.next_ns = now + c.period_ns
            time.sleep(0.02)

    def status(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            checks = dict(self.checks)
            meta = dict(self.meta)
        failures: dict[str, str] = {}
        warnings: dict[str, str] = {}
        for name, c in checks.items():
            if isinstance(c.err, Warning_):
                warnings[name] = str(c.err)
            elif c.err is not None:
                failures[name] = c.err
        status = "Unavailable" if failures else "Warning" if warnings else "OK"
        body = {
            "ok": not failures,
            "has_warnings": bool(warnings),
            "status": status,
            "time": _rfc3339nano(time.time_ns()),
            "since": _rfc3339nano(self.since_ns),
            "runtime": {
                "arch": platform.machine(),
                "os": "linux",
                "version": "lightningstream-standin/python" + platform.python_version(),
                "goroutines_count": threading.active_count(),
                "heap_objects_count": 0,
                "alloc_bytes": 0,
                "total_alloc_bytes": 0,
            },
            "failures": failures,
            "warnings": warnings,
            "metadata": meta,
        }
        return (200 if not failures else 503), body

    def metrics_text(self) -> str:
        names = {
            "generated": "lightningstream_syncer_snapshots_generated_total",
            "loaded": "lightningstream_syncer_snapshots_loaded_total",
            "store_calls": "lightningstream_syncer_snapshots_store_calls_total",
            "list_calls": "lightningstream_syncer_snapshots_list_calls_total",
            "list_failed": "lightningstream_syncer_snapshots_list_failed_total",
            "load_calls": "lightningstream_syncer_snapshots_load_calls_total",
            "load_failed": "lightningstream_syncer_snapshots_load_failed_total",
        }
        with self._lock:
            counters = dict(self.counters)
        lines = []
        for what, metric in names.items():
            lines.append(f"# TYPE {metric} counter")
            for (db, w), n in sorted(counters.items()):
                if w == what:
                    lines.append(f'{metric}{{lmdb="{db}"}} {n}')
        return "\n".join(lines) + "\n"


def start_http_server(
    address: str, health: Health, list_blobs: Callable[[], list[tuple[str, int]]], db_names: list[str]
) -> None:
    """LS ``status.StartHTTPServer``: bind, then serve in a daemon thread; bind failure is fatal."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # LS logs no access lines

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                if health.wedged.is_set():
                    threading.Event().wait()  # a request that never gets its answer (daemon thread)
                code, body = health.status()
                self._send(code, "application/json", json.dumps(body).encode())
                health.answered.set()
            elif path == "/metrics":
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", health.metrics_text().encode())
            elif path == "/storage":
                try:
                    blobs = list_blobs()
                except OSError as exc:
                    self._send(500, "text/plain", f"ERROR LISTING STORAGE: {exc}\n".encode())
                    return
                text = "Name\tSize\n" + "".join(f"{n}\t{sz}\n" for n, sz in blobs)
                self._send(200, "text/plain", text.encode())
            elif path == "/":
                rows = "".join(f"<tr><td>{html.escape(n)}</td></tr>" for n in db_names)
                page = (
                    '<!DOCTYPE html><html><head><meta charset="UTF-8"><title>Lightning Stream Status'
                    '</title></head><body><h1>Lightning Stream Status (stand-in)</h1><p><a href="/metrics">'
                    'Prometheus metrics</a> | <a href="/healthz">healthz</a></p><h2>LMDBs</h2><table>'
                    f'<tr><th>DB Name</th></tr>{rows}</table><h2>Storage</h2><p><a href="storage">'
                    "Storage snapshot listing (text)</a></p></body></html>"
                )
                self._send(200, "text/html; charset=utf-8", page.encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"404 page not found\n")

        do_HEAD = do_GET

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    log.info("HTTP stats server enabled", address=address)
    try:
        port_num = int(port) if port else 0
        ThreadingHTTPServer.daemon_threads = True
        if ":" in host:
            import socket

            class V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server: ThreadingHTTPServer = V6((host, port_num), Handler)
        else:
            server = ThreadingHTTPServer((host, port_num), Handler)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        log.fatal(f"HTTP server error: listen tcp {address}: bind: {reason.lower()}")
        return
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()

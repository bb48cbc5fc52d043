"""The daemon's view of the fleet: the shared storage listed in the background, served at ``/fleet``
and as ``lssupervisor_fleet_*`` metrics.

Theory of operation
-------------------
One thread, owned by the daemon (started at the first successful load, joined at shutdown), lists the
storage every ``fleet.interval`` (never more often than LS's ``storage_poll_interval``) with LS's own
options and credentials, and swaps in the result as one reference (a :class:`fleet.FleetReport` and
its JSON). The main loop only calls :meth:`FleetWatch.configure` after each load, which stores the
new config and template (one reference) and wakes the thread: it never waits for the storage. The
HTTP server's request threads and the metrics collector read the last result.

A listing that fails keeps the last good report (``/fleet`` serves it; the refresh timestamp metric
stops moving) and logs the error once per distinct message. A template whose storage location does
not carry the schema version (or is not s3/fs) turns the view off until the next load, with one log
line. Each storage request is bounded by ``fleet.timeout``.

Metrics (gauges)::

    lssupervisor_fleet_instances{version="N"}        instances whose newest snapshot is under N
    lssupervisor_fleet_stragglers                    instances on a version below the highest in use
    lssupervisor_fleet_stale                         instances silent for longer than fleet.stale_after
    lssupervisor_fleet_last_refresh_timestamp_seconds  end of the last successful listing (epoch)
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lssupervisor.daemon.logs import fields
from lssupervisor.errors import ConfigError, SupervisorError
from lssupervisor.lsconfig import render as lsconfig
from lssupervisor.storage import fleet, location

if TYPE_CHECKING:
    from lssupervisor.config import Config
    from lssupervisor.storage.backend import Backend

log = logging.getLogger("lssupervisor.fleet")


class FleetWatch:
    def __init__(self, environ: Mapping[str, str], wall: Callable[[], float] = time.time) -> None:
        self._environ = dict(environ)
        self._wall = wall
        self._source: tuple[Config, lsconfig.Template] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # (report, its JSON, end of that listing): swapped as one reference.
        self._result: tuple[fleet.FleetReport, bytes, float] | None = None
        self._error: str | None = None
        self._backend: tuple[location.Layout, Backend] | None = None

    # -- the main loop's side: never blocks ---------------------------------------------------------

    def configure(self, cfg: Config, template: lsconfig.Template) -> None:
        """The config and template of the latest successful load; starts the thread the first time."""
        if not cfg.fleet.watch:
            self._source = None
            return
        self._source = (cfg, template)
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lssupervisor-fleetwatch", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        """Stop the thread (a listing in flight ends within ``fleet.timeout``) and join it."""
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("fleet view thread did not stop within %.0fs", timeout)
        self._close_backend()

    # -- readers (HTTP threads, the metrics collector) ----------------------------------------------

    def http_document(self) -> tuple[int, bytes]:
        result = self._result
        if result is not None:
            return 200, result[1]
        if self._source is None:
            why = "the fleet view is off (fleet.watch: false, or no config loaded yet)"
        else:
            why = self._error or "the storage has not been listed yet"
        return 503, (json.dumps({"error": why}) + "\n").encode()

    @property
    def report(self) -> fleet.FleetReport | None:
        result = self._result
        return None if result is None else result[0]

    def collector(self) -> Collector:
        return _FleetCollector(self)

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            source = self._source
            wait: float | None = None  # None: until configure() or close()
            if source is not None:
                wait = self._refresh(*source)
            self._wake.wait(wait)

    def _refresh(self, cfg: Config, template: lsconfig.Template) -> float | None:
        """One listing; returns the seconds until the next one (None: wait for a new config)."""
        try:
            layout = location.layout_of(template, lsconfig.ls_environment(cfg, 0, self._environ))
        except ConfigError as exc:
            self._note_error(f"fleet view off until the next reload: {exc}", level=logging.INFO)
            return None
        except SupervisorError as exc:
            self._note_error(f"fleet view: {exc}")
            return float(cfg.fleet.interval)
        interval = max(float(cfg.fleet.interval), layout.poll_interval_s)
        try:
            backend = self._backend_for(layout, float(cfg.fleet.timeout))
            listing = backend.list_versions()
        except SupervisorError as exc:
            self._note_error(f"fleet view: {exc}")
            return interval
        now = self._wall()
        rep = fleet.report(listing, now, float(cfg.fleet.stale_after))
        body = (json.dumps(rep.document(), indent=2, sort_keys=True) + "\n").encode()
        self._result = (rep, body, now)
        if self._error is not None:
            log.info("fleet view: storage listed again", extra=fields(versions=len(rep.versions)))
        self._error = None
        return interval

    def _backend_for(self, layout: location.Layout, timeout: float) -> Backend:
        held = self._backend
        if held is not None and held[0] == layout:
            return held[1]
        self._close_backend()
        backend = location.open_backend(layout, timeout=timeout)
        self._backend = (layout, backend)
        return backend

    def _close_backend(self) -> None:
        held, self._backend = self._backend, None
        if held is not None:
            with contextlib.suppress(Exception):
                held[1].close()

    def _note_error(self, message: str, level: int = logging.WARNING) -> None:
        if message != self._error:
            log.log(level, "%s", message)
        self._error = message


class _FleetCollector(Collector):
    def __init__(self, watch: FleetWatch) -> None:
        self._watch = watch

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        result = self._watch._result
        if result is None:
            return
        rep, _, refreshed = result
        g = GaugeMetricFamily(
            "lssupervisor_fleet_instances",
            "Instances whose newest snapshot in the shared storage is under schema version N.",
            labels=["version"],
        )
        for version, count in sorted(rep.counts().items()):
            g.add_metric([str(version)], float(count))
        yield g
        yield GaugeMetricFamily(
            "lssupervisor_fleet_stragglers",
            "Instances whose newest snapshot is under a lower version than the highest in use.",
            value=float(len(rep.stragglers)),
        )
        yield GaugeMetricFamily(
            "lssupervisor_fleet_stale",
            "Instances with no snapshot for longer than fleet.stale_after.",
            value=float(len(rep.stale)),
        )
        yield GaugeMetricFamily(
            "lssupervisor_fleet_last_refresh_timestamp_seconds",
            "When the daemon last listed the shared storage successfully (Unix time).",
            value=refreshed,
        )

"""What the daemon shows: the status document (``state.json``, ``/status``, ``/metrics``), state
transitions in the log, systemd notifications (``READY=1``, ``STATUS=``, ``WATCHDOG=1``,
``EXTEND_TIMEOUT_USEC``) and the migration's progress and results.

The loop calls :meth:`StatusPublisher.publish` with the facts it holds (:class:`Facts`) whenever
something visible changed; nothing here decides anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from lssupervisor import __version__
from lssupervisor.config import Config
from lssupervisor.core.actions import AnnounceState, NotifyKind
from lssupervisor.core.states import Goal, State, SupervisorState
from lssupervisor.daemon import http, sdnotify
from lssupervisor.daemon.child import ChildRecord
from lssupervisor.daemon.logs import fields
from lssupervisor.daemon.prepare import Loaded, Prepared
from lssupervisor.daemon.statefile import write_state
from lssupervisor.errors import ConfigError, SupervisorError
from lssupervisor.worker import backupdir
from lssupervisor.worker import protocol as p

log = logging.getLogger("lssupervisor.supervisor")

# A start-up migration (before READY=1): systemd's start timeout is extended by this much, re-sent every
# EXTEND_RESEND_S while a job runs, so a long migration is not killed as a hung start.
EXTEND_TIMEOUT_S = 30.0
EXTEND_RESEND_S = 10.0
PROGRESS_LOG_S = 2.0  # a migration's progress reaches the log at most this often (a new step at once)


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


@dataclass(frozen=True, slots=True)
class Facts:
    """What the loop knows beyond the core's state, for the status document."""

    st: SupervisorState
    cfg: Config
    loaded: Loaded | None
    prepared: Prepared | None
    markers: Mapping[str, int | None]
    ls_record: ChildRecord | None


@dataclass
class StatusPublisher:
    clock: Callable[[], float]
    wall: Callable[[], float]
    notifier: sdnotify.Notifier | None = None
    http: http.StatusServer | None = None
    ready_sent: bool = False
    next_extend: float = 0.0
    watchdog_interval: float | None = None
    next_watchdog: float = 0.0
    migration: dict[str, Any] = field(
        default_factory=lambda: {
            "progress": None,
            "last_result": None,
            "last_error": None,
            "last_duration_s": None,
            "last_success_at": None,
            "last_backup": None,
        }
    )
    step: dict[str, Any] | None = None  # the running step's counters (the heartbeat), for /status and metrics
    next_progress_log: float = 0.0
    logged_step: tuple[Any, ...] | None = None
    # `backups` in the status document (metrics read it): listed from the manifests at start and after
    # each migrate result, never per loop iteration and never by opening an LMDB.
    backups: dict[str, Any] = field(default_factory=lambda: {"count": 0, "last": None})

    # -- set-up ------------------------------------------------------------------------------------

    def start_notifier(self, environ: Mapping[str, str]) -> None:
        self.notifier = sdnotify.Notifier.from_env(environ)
        self.watchdog_interval = sdnotify.watchdog_interval(environ)
        self.next_watchdog = self.clock()

    def start_http(self, cfg: Config, host: str, port: int) -> None:
        """Bind the status server (ConfigError naming http.address when it cannot be bound)."""
        server = http.StatusServer(host, port, clock=self.clock)
        try:
            server.start()
        except ConfigError as exc:
            raise ConfigError(f"{cfg.name}: {exc}") from None
        self.http = server

    def close(self) -> None:
        if self.http is not None:
            with contextlib.suppress(Exception):
                self.http.stop()
            self.http = None
        if self.notifier is not None:
            with contextlib.suppress(Exception):
                self.notifier.close()

    # -- transitions and notifications -------------------------------------------------------------

    def announce(self, a: AnnounceState, facts: Facts) -> None:
        extra: dict[str, Any] = {"reason": a.reason}
        if a.pid is not None:
            extra["pid"] = a.pid
        if a.substep is not None:
            extra["substate"] = a.substep.value
        if a.old is a.new and a.substep is not None:
            log.info("state %s step %s", a.new.value, a.substep.value, extra={"fields": extra})
        else:
            log.info("state %s -> %s", a.old.value, a.new.value, extra={"fields": extra})
        if a.new is not State.RECONCILING:
            self.migration["progress"] = None
        self.publish(facts)
        if self.notifier is not None:
            shown = a.new.value if a.substep is None else f"{a.new.value}/{a.substep.value}"
            text = shown if not a.reason else f"{shown}: {a.reason}"
            self.notifier.status(text[:200])

    def notify(self, kind: NotifyKind) -> None:
        n = self.notifier
        match kind:
            case NotifyKind.READY:
                self.ready_sent = True
                if n is not None:
                    n.ready()
            case NotifyKind.STOPPING:
                if n is not None:
                    n.stopping()
            case NotifyKind.RELOADING:
                if n is not None:
                    n.reloading()
            case _:
                assert_never(kind)

    def step_progress(self, pr: p.Progress) -> None:
        """Keep the numbers of a migration progress report (the text reaches us through the core)."""
        if pr.phase in (p.Phase.MIGRATE, p.Phase.DRY_RUN):
            self.step = {
                "lmdb": pr.lmdb,
                "migration": pr.migration,
                "from_version": pr.from_version,
                "to_version": pr.to_version,
                "index": pr.index,
                "steps": pr.steps,
                "read": pr.read,
                "written": pr.written,
                "rate": round(pr.rate, 1) if pr.rate is not None else None,
                "elapsed_s": pr.elapsed_s,
                "percent": pr.percent,
            }
        elif pr.phase is p.Phase.STEP_COMMITTED:
            self.step = None

    def progress(self, text: str, startup: bool, facts: Facts) -> None:
        self.migration["progress"] = text
        now = self.clock()
        key = None if self.step is None else (self.step["lmdb"], self.step["index"])
        if now >= self.next_progress_log or key != self.logged_step:
            # A heartbeat in the log too, every few seconds, whether the migration reports or not.
            log.info("progress: %s", text)
            self.next_progress_log = now + PROGRESS_LOG_S
            self.logged_step = key
        self.publish(facts)
        if self.notifier is not None:
            self.notifier.status(text[:200])
            if startup and not self.ready_sent:
                self.extend_timeout(force=True)

    def extend_timeout(self, *, force: bool = False) -> None:
        """A start-up migration: ask systemd for more time, ahead of its start timeout."""
        now = self.clock()
        if self.notifier is None or (not force and now < self.next_extend):
            return
        if force and now < self.next_extend - EXTEND_RESEND_S + 1.0:
            return  # throttle progress-driven extensions to one a second
        self.notifier.extend_timeout(int(EXTEND_TIMEOUT_S * 1_000_000))
        self.next_extend = now + EXTEND_RESEND_S

    def heartbeat(self, st: SupervisorState) -> None:
        """Once per loop iteration: the HTTP liveness stamp, the systemd watchdog, start-up extension."""
        now = self.clock()
        if self.http is not None:
            self.http.heartbeat(now)
        if self.watchdog_interval is not None and self.notifier is not None and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval
        cycle = st.cycle
        if cycle is not None and cycle.startup and not self.ready_sent and st.task is not None:
            self.extend_timeout()

    # -- the migration's results -------------------------------------------------------------------

    def migrated(self, duration: float, backup_id: str | None) -> None:
        self.migration.update(
            progress=None,
            last_result="ok",
            last_error=None,
            last_duration_s=round(duration, 3),
            last_success_at=iso(self.wall()),
            last_backup=backup_id or self.migration["last_backup"],
        )
        self.step = None

    def migration_failed(self, cancelled: bool, message: str, duration: float, backup_id: str | None) -> None:
        self.migration.update(
            progress=None,
            last_result="cancelled" if cancelled else "failed",
            last_error=message,
            last_duration_s=round(duration, 3),
            last_backup=backup_id or self.migration["last_backup"],
        )
        self.step = None

    def refresh_backups(self, cfg: Config) -> None:
        """``backups: {count, last: {id, created_at, size_bytes, version}}`` from the backup dir's
        manifests (backupdir.list_backups reads manifests only; the daemon never opens an LMDB)."""
        try:
            found = backupdir.list_backups(cfg.backup_dir)
        except OSError as exc:
            # Status only: keep the last listing, say why once per attempt.
            log.warning("cannot list the backups in %s: %s", cfg.backup_dir, exc.strerror or exc)
            return
        last = found[-1].manifest if found else None
        self.backups = {
            "count": len(found),
            "last": None
            if last is None
            else {
                "id": last.id,
                "created_at": last.time,
                "size_bytes": last.size,
                "version": last.schema_version,
            },
        }

    @staticmethod
    def restore_hint(cfg: Config) -> str:
        try:
            newest = backupdir.find_backup(cfg.backup_dir, None)
        except SupervisorError:
            return f"no backup found in {cfg.backup_dir} to restore"
        return f"or stop lssupervisor and restore the newest backup: `lssupervisor rollback {newest.id}`"

    # -- the document ------------------------------------------------------------------------------

    def document(self, facts: Facts) -> dict[str, Any]:
        st, cfg = facts.st, facts.cfg
        now_mono, now_wall = self.clock(), self.wall()

        def wall_of(mono: float | None) -> str | None:
            return None if mono is None else iso(now_wall - (now_mono - mono))

        lmdbs: dict[str, Any] = {}
        if facts.loaded is not None:
            for spec in facts.loaded.view.lmdbs:
                lmdbs[spec.name] = {"path": spec.path, "schema_version": facts.markers.get(spec.name)}
        cycle = st.cycle
        return {
            "state": st.state.value,
            "substate": st.substep.value if st.substep is not None else None,
            "reason": st.reason,
            "pid": os.getpid(),
            "since": wall_of(st.since),
            "desired": st.desired.goal.value,
            "paused": st.desired.goal is Goal.PAUSE,
            "target_version": st.desired.target_version,
            "schema_version": st.version,
            "park_reason": st.park_reason if st.state is State.PARKED else None,
            "lightningstream": {
                "pid": st.pid,
                "ready": st.ready,
                "restarts": st.restarts,
                "starts": st.starts,
                "config": str(cfg.rendered_config),
                "started_at": wall_of(st.child.started_at) if st.child is not None else None,
                "last_exit": st.last_exit,
                "failures": st.backoff.consecutive,
                "failures_total": st.failures_total,
                "retry_at": wall_of(st.retry_at),
                "record": facts.ls_record.to_json() if facts.ls_record is not None else None,
                "argv": list(facts.prepared.argv) if facts.prepared is not None else None,
            },
            "lmdbs": lmdbs,
            "migration": {
                **self.migration,
                "progress": st.progress,
                "task": st.task.value if st.task is not None else None,
                "step": self.step if st.task is not None else None,
                "time_limit": st.task_limit,
                "time_limit_at": wall_of(st.task_deadline),
                "plan": list(cycle.steps) if cycle is not None else None,
                "from_version": cycle.from_version if cycle is not None else None,
                "to_version": cycle.target if cycle is not None else None,
            },
            "backups": self.backups,
            "version": __version__,
            "updated_at": iso(now_wall),
        }

    def publish(self, facts: Facts) -> None:
        """Rewrite state.json and hand the document to the HTTP server."""
        doc = self.document(facts)
        try:
            write_state(facts.cfg.state_file, doc)
        except OSError as exc:
            # Status is for people; LS supervision goes on. One line per failed write.
            log.error("cannot write %s: %s", facts.cfg.state_file, exc.strerror)
        if self.http is not None:
            self.http.publish(doc)

    def log_status(self, st: SupervisorState) -> None:
        log.info(
            "status",
            extra=fields(
                state=st.state.value,
                substate=st.substep.value if st.substep is not None else None,
                reason=st.reason,
                pid=st.pid,
                ready=st.ready,
                restarts=st.restarts,
                failures=st.backoff.consecutive,
                desired=st.desired.goal.value,
                version=st.version,
            ),
        )

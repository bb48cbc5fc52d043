"""The imperative shell: the daemon's main loop around the pure core (:mod:`lssupervisor.lifecycle`).

Theory of operation
-------------------
One thread (the main thread) owns all state. Everything that happens elsewhere arrives as an item on
one ``queue.SimpleQueue``: signal handlers put ``SignalReceived`` (nothing else: no logging, no I/O),
the health poller thread puts ``ChildReady``. The loop::

    wait on the queue, at most until the core's next deadline (capped at MAX_WAIT_S as a backstop)
    -> translate each item into a core event (HUP/USR1 read the pause flag here, not in the handler)
    -> poll our own LS Popen (SIGCHLD only woke us; never waitpid(-1))
    -> Tick (the core checks its deadlines against the monotonic clock)

Each event goes through ``Lifecycle.handle(state, event, now)``; the shell executes the returned
actions in order, and results of actions (``ConfigPrepared``, ``ChildSpawned``...) are fed back at
once, before the next wait. LS is spawned from this (main) thread because its parent-death signal
fires when the spawning *thread* exits (I6).

An LS exit becomes ``ChildExited`` only once its whole process group is gone: a leader that died
leaving group members behind (a re-exec'd LS) gets them SIGKILLed first, so "exited" always means
"nothing of that LS is left" (the precondition of a restart, a migration, I1/I4).

The version seam (I2): :class:`VersionSource` says which schema version the LS config is rendered for.
Today :class:`ConfiguredVersion` (``schema.target``, else 1). The reconcile cycle replaces it with the
worker's marker read (``worker.read_schema_version``), moved off the loop into a worker run whose
result comes back as an event.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import queue
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, assert_never

from lssupervisor import __version__, child, lock
from lssupervisor import signals as sigs
from lssupervisor.actions import (
    Action,
    AnnounceState,
    Exit,
    KillGroup,
    Level,
    LogLine,
    LogStatus,
    Notify,
    NotifyKind,
    PrepareConfig,
    SignalGroup,
    SpawnChild,
    SweepOrphans,
    WriteState,
)
from lssupervisor.config import Config, load_config, parse_address
from lssupervisor.errors import ConfigError, ExitCode, SupervisorError
from lssupervisor.events import (
    Booted,
    ChildExited,
    ChildReady,
    ChildSpawned,
    ConfigFailed,
    ConfigPrepared,
    Event,
    ReconcileRequested,
    ReloadRequested,
    ShutdownRequested,
    SignalReceived,
    SpawnFailed,
    StatusRequested,
    Tick,
)
from lssupervisor.lifecycle import Lifecycle
from lssupervisor.logs import fields, setup_logging
from lssupervisor.lsmodel import LsView
from lssupervisor.statefile import read_state, write_state
from lssupervisor.states import Goal, SupervisorState

log = logging.getLogger("lssupervisor.supervisor")

MAX_WAIT_S = 1.0  # backstop: the loop ticks at least this often whatever the deadlines say
OUTPUT_JOIN_S = 1.0


# ---------------------------------------------------------------------------------------------------
# The version seam


@dataclass(frozen=True, slots=True)
class VersionReading:
    render_version: int  # the version whose prefix the LS config gets: the LMDB's marker (I2)
    markers: Mapping[str, int | None]  # per LMDB name; None = not known (unmarked, or not read)


class VersionSource(Protocol):
    def read(self, cfg: Config, view: LsView) -> VersionReading: ...


class ConfiguredVersion:
    """Until markers are read by a worker: ``schema.target`` if set, else 1. Markers unknown."""

    def read(self, cfg: Config, view: LsView) -> VersionReading:
        return VersionReading(cfg.schema.target or 1, {spec.name: None for spec in view.lmdbs})


# ---------------------------------------------------------------------------------------------------
# What a reconcile prepared


@dataclass(frozen=True, slots=True)
class Prepared:
    cfg: Config
    text: str
    view: LsView
    argv: tuple[str, ...]
    env: Mapping[str, str]
    reading: VersionReading
    digest: str


def _digest(cfg: Config, text: str, argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Identity of "how LS would run": rendered text, argv, environment and the spawn options."""
    ls = cfg.lightningstream
    doc = {
        "text": text,
        "argv": list(argv),
        "env": sorted(env.items()),
        "pdeathsig": ls.pdeathsig,
        "output": ls.output.value,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: Config, source: VersionSource, base_env: Mapping[str, str]) -> Prepared:
    """Load the template, ask ``source`` for the version, render in memory. Raises SupervisorError."""
    from lssupervisor import lsconfig

    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, base_env))
    reading = source.read(cfg, view)
    env = lsconfig.ls_environment(cfg, reading.render_version, base_env)
    rendered = lsconfig.render(template, reading.render_version, env)
    for warning in rendered.warnings:
        log.warning("%s", warning)
    ls = cfg.lightningstream
    argv = (ls.binary, "--config", str(cfg.rendered_config), *ls.args)
    return Prepared(
        cfg=cfg,
        text=rendered.text,
        view=rendered.view,
        argv=argv,
        env=env,
        reading=reading,
        digest=_digest(cfg, rendered.text, argv, env),
    )


# ---------------------------------------------------------------------------------------------------
# The shell


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


class Supervisor:
    """Owns the LS child, the state file, the optional HTTP server and systemd notifier."""

    def __init__(
        self,
        cfg: Config,
        *,
        held: lock.Lock | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        version_source: VersionSource | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.held = held
        self.clock = clock
        self.wall = wall
        self.rng = rng
        self.versions = version_source or ConfiguredVersion()
        self.environ = dict(os.environ if environ is None else environ)
        self.core = Lifecycle.from_config(cfg, rng)
        self.st = SupervisorState()
        self.queue: queue.SimpleQueue[Event | SignalReceived] = queue.SimpleQueue()
        self.prepared: Prepared | None = None
        self.child: child.LsChild | None = None
        self.leader_exited = False
        self.poller: Any = None  # health.HealthPoller while LS starts
        self.exit_code: ExitCode | None = None
        self.notifier: Any = None
        self.http: Any = None
        self.watchdog_interval: float | None = None
        self.next_watchdog = 0.0
        # The record of an LS started by an earlier run (read before we overwrite state.json).
        self.previous_record: child.ChildRecord | None = None

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until shut down; returns the exit code. Call from the main thread."""
        self.previous_record = self._read_previous_record()
        self._start_notifier()
        try:
            self._start_http()
            with sigs.installed(self.queue):
                where = fields(
                    pid=os.getpid(), config=str(self.cfg.source), state_dir=str(self.cfg.state_dir)
                )
                log.info("lssupervisor %s starting", __version__, extra=where)
                self._feed(
                    Booted(paused=self.cfg.paused_file.exists(), target_version=self.cfg.schema.target)
                )
                while self.exit_code is None:
                    self._iterate()
        except BaseException:
            log.exception("lssupervisor main loop failed; stopping LS")
            self._emergency_stop()
            raise
        finally:
            self._cleanup()
        log.info("lssupervisor exiting", extra=fields(code=int(self.exit_code)))
        return int(self.exit_code)

    def _iterate(self) -> None:
        now = self.clock()
        deadline = self.core.next_deadline(self.st)
        timeout = MAX_WAIT_S if deadline is None else min(MAX_WAIT_S, max(0.0, deadline - now))
        if self.watchdog_interval is not None:
            timeout = min(timeout, max(0.0, self.next_watchdog - now))
        if self.leader_exited:
            timeout = min(timeout, 0.02)  # group stragglers being killed: look again soon
        items: list[Event | SignalReceived] = []
        with contextlib.suppress(queue.Empty):
            items.append(self.queue.get(timeout=timeout))
            while True:
                items.append(self.queue.get_nowait())
        for item in items:
            if self.exit_code is not None:
                break
            event = self._translate(item)
            if event is not None:
                self._feed(event)
        if self.exit_code is None:
            self._poll_child()
        if self.exit_code is None:
            self._feed(Tick())
        self._heartbeat()

    def _translate(self, item: Event | SignalReceived) -> Event | None:
        if not isinstance(item, SignalReceived):
            return item
        signum = item.signum
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("received %s", sigs.name(signum))
            return ShutdownRequested(sigs.name(signum))
        if signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading config")
            return ReloadRequested(paused=self.cfg.paused_file.exists())
        if signum == signal.SIGUSR1:
            log.info("received SIGUSR1: reconciling")
            return ReconcileRequested(paused=self.cfg.paused_file.exists(), source="SIGUSR1")
        if signum == signal.SIGUSR2:
            return StatusRequested()
        return None  # SIGCHLD: the poll after the queue drain does the work

    def _feed(self, first: Event) -> None:
        pending: deque[Event] = deque([first])
        while pending:
            event = pending.popleft()
            self.st, actions = self.core.handle(self.st, event, self.clock())
            for action in actions:
                pending.extend(self._execute(action))

    # -- actions -----------------------------------------------------------------------------------

    def _execute(self, action: Action) -> list[Event]:
        match action:
            case SweepOrphans():
                self._sweep_orphans()
            case PrepareConfig(reload=reload):
                return [self._prepare(reload)]
            case SpawnChild():
                return [self._spawn(action)]
            case SignalGroup(pid=pid):
                if self.child is not None and self.child.pid == pid:
                    log.info("stopping lightningstream", extra=fields(pid=pid, signal="SIGTERM"))
                    self.child.terminate_group()
            case KillGroup(pid=pid):
                if self.child is not None and self.child.pid == pid:
                    self.child.kill_group()
            case AnnounceState():
                self._announce(action)
            case WriteState():
                self._write_state()
            case Notify(kind=kind):
                self._notify(kind)
            case LogLine(level=level, msg=msg):
                log.log(_LOG_LEVELS[level], "%s", msg)
            case LogStatus():
                self._log_status()
            case Exit(code=code):
                self.exit_code = code
            case _:
                assert_never(action)
        return []

    def _sweep_orphans(self) -> None:
        try:
            ended = child.sweep_orphans(
                self.cfg.rendered_config,
                self.previous_record,
                timeout=float(self.cfg.lightningstream.stop_timeout),
            )
        except Exception:  # the sweep is a backstop; a failure must not keep us from running
            log.exception("orphan sweep failed")
            return
        if ended:
            log.warning("ended lightningstream orphans of an earlier run", extra=fields(pids=ended))

    def _prepare(self, reload: bool) -> Event:
        cfg = self.cfg
        try:
            if reload:
                if cfg.source is None:
                    raise ConfigError("cannot reload: the config was not loaded from a file")
                cfg = load_config(cfg.source)
                self._check_reloadable(cfg)
            prepared = prepare(cfg, self.versions, self.environ)
            if self.held is not None:
                # A reload may name another LMDB: lock it too before LS can touch it (I4).
                self.held.add_lmdbs(prepared.view.lmdbs)
        except SupervisorError as exc:
            return ConfigFailed(str(exc))
        if reload:
            self.cfg = cfg
            self.core = Lifecycle.from_config(cfg, self.rng)
        self.prepared = prepared
        return ConfigPrepared(
            digest=prepared.digest,
            version=prepared.reading.render_version,
            wait_for_health=bool(prepared.view.http_address),
            target_version=cfg.schema.target,
        )

    def _check_reloadable(self, new: Config) -> None:
        if Path(new.state_dir).resolve() != Path(self.cfg.state_dir).resolve():
            raise ConfigError(
                f"{new.name}: state_dir: cannot change while running ({self.cfg.state_dir} -> "
                f"{new.state_dir}); restart lssupervisor to move it"
            )
        if new.http.address != self.cfg.http.address:
            log.warning("http.address changed; the status server keeps its address until a restart")

    def _spawn(self, action: SpawnChild) -> Event:
        from lssupervisor import lsconfig

        prepared = self.prepared
        assert prepared is not None and prepared.digest == action.digest, "spawn of an unprepared config"
        assert self.child is None or self.child.poll() is not None, "second LS (I4)"
        cfg = prepared.cfg
        ls = cfg.lightningstream
        try:
            target = cfg.rendered_config
            target.parent.mkdir(parents=True, exist_ok=True)
            if lsconfig.write_atomic(target, prepared.text):
                version = prepared.reading.render_version
                log.info("wrote LS config", extra=fields(path=str(target), version=version))
            new = child.spawn_ls(
                prepared.argv,
                prepared.env,
                pdeathsig=ls.pdeathsig,
                min_pid=ls.min_pid,
                output=ls.output,
            )
        except (SupervisorError, OSError, RuntimeError) as exc:
            return SpawnFailed(str(exc))
        self.child = new
        self.leader_exited = False
        if prepared.view.http_address:
            self._start_poller(new.pid, prepared)
        return ChildSpawned(new.pid)

    def _start_poller(self, pid: int, prepared: Prepared) -> None:
        from lssupervisor import health

        q = self.queue

        def on_ready(ready_pid: int) -> None:
            q.put_nowait(ChildReady(ready_pid))  # from the poller thread: enqueue only

        self.poller = health.HealthPoller(
            health.HealthProbe(prepared.view.http_address, [s.name for s in prepared.view.lmdbs]),
            pid,
            on_ready,
            interval=float(prepared.cfg.lightningstream.health_poll_interval),
        )

    def _stop_poller(self) -> None:
        if self.poller is not None:
            self.poller.stop()
            self.poller = None

    def _poll_child(self) -> None:
        c = self.child
        if c is None:
            return
        if not self.leader_exited:
            if c.poll() is None:
                return
            self.leader_exited = True
            self._stop_poller()
        # The leader is gone; only report once nothing of its group is left (kill stragglers).
        if c.group_alive():
            c.kill_group()
            return
        rc = c.returncode
        assert rc is not None
        c.join_output(OUTPUT_JOIN_S)
        self.child = None
        self.leader_exited = False
        description = child.describe_exit(rc)
        log.info("lightningstream exited", extra=fields(pid=c.pid, status=description))
        self._feed(ChildExited(pid=c.pid, returncode=rc, description=description))

    # -- visibility --------------------------------------------------------------------------------

    def _announce(self, a: AnnounceState) -> None:
        extra: dict[str, Any] = {"reason": a.reason}
        if a.pid is not None:
            extra["pid"] = a.pid
        if a.substep is not None:
            extra["substate"] = a.substep.value
        log.info("state %s -> %s", a.old.value, a.new.value, extra={"fields": extra})
        self._write_state()
        if self.notifier is not None:
            text = a.new.value if not a.reason else f"{a.new.value}: {a.reason}"
            self.notifier.status(text[:200])

    def _notify(self, kind: NotifyKind) -> None:
        n = self.notifier
        if n is None:
            return
        match kind:
            case NotifyKind.READY:
                n.ready()
            case NotifyKind.STOPPING:
                n.stopping()
            case NotifyKind.RELOADING:
                n.reloading()
            case _:
                assert_never(kind)

    def status_document(self) -> dict[str, Any]:
        st, cfg = self.st, self.cfg
        now_mono, now_wall = self.clock(), self.wall()

        def wall_of(mono: float | None) -> str | None:
            return None if mono is None else _iso(now_wall - (now_mono - mono))

        prepared = self.prepared
        c = self.child if st.child is not None else None
        lmdbs: dict[str, Any] = {}
        if prepared is not None:
            for spec in prepared.view.lmdbs:
                lmdbs[spec.name] = {
                    "path": spec.path,
                    "schema_version": prepared.reading.markers.get(spec.name),
                }
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
            "lightningstream": {
                "pid": st.pid,
                "ready": st.ready,
                "restarts": st.restarts,
                "starts": st.starts,
                "config": str(cfg.rendered_config),
                "started_at": wall_of(st.child.started_at) if st.child is not None else None,
                "last_exit": st.last_exit,
                "failures": st.backoff.consecutive,
                "retry_at": wall_of(st.retry_at),
                "record": c.record().to_json() if c is not None else None,
                "argv": list(prepared.argv) if prepared is not None else None,
            },
            "lmdbs": lmdbs,
            "migration": {
                "progress": None,
                "last_result": None,
                "last_duration_s": None,
                "last_success_at": None,
            },
            "version": __version__,
            "updated_at": _iso(now_wall),
        }

    def _write_state(self) -> None:
        doc = self.status_document()
        try:
            write_state(self.cfg.state_file, doc)
        except OSError as exc:
            # Status is for people; LS supervision goes on. One line per failed write.
            log.error("cannot write %s: %s", self.cfg.state_file, exc.strerror)
        if self.http is not None:
            self.http.publish(doc)

    def _log_status(self) -> None:
        st = self.st
        log.info(
            "status",
            extra=fields(
                state=st.state.value,
                reason=st.reason,
                pid=st.pid,
                ready=st.ready,
                restarts=st.restarts,
                failures=st.backoff.consecutive,
                desired=st.desired.goal.value,
                version=st.version,
            ),
        )

    def _read_previous_record(self) -> child.ChildRecord | None:
        doc = read_state(self.cfg.state_file)
        record = ((doc or {}).get("lightningstream") or {}).get("record")
        if not record:
            return None
        try:
            return child.ChildRecord.from_json(record)
        except ValueError:
            return None

    # -- collaborators (optional) ------------------------------------------------------------------

    def _start_notifier(self) -> None:
        try:
            from lssupervisor import sdnotify
        except ImportError:
            return
        self.notifier = sdnotify.Notifier.from_env(self.environ)
        self.watchdog_interval = sdnotify.watchdog_interval(self.environ)
        self.next_watchdog = self.clock()

    def _start_http(self) -> None:
        address = self.cfg.http.address
        if not address:
            return
        try:
            from lssupervisor import http
        except ImportError:
            log.warning("http.address is set but this build has no status server")
            return
        host, port = parse_address(address, f"{self.cfg.name}: http.address")
        self.http = http.StatusServer(host, port, clock=self.clock)
        self.http.start()  # ConfigError when the address cannot be bound: fail at start, loudly

    def _heartbeat(self) -> None:
        now = self.clock()
        if self.http is not None:
            self.http.heartbeat(now)
        if self.watchdog_interval is not None and self.notifier is not None and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval

    def _emergency_stop(self) -> None:
        """The loop died (a bug): never leave LS behind (I6), even before pdeathsig would act."""
        c = self.child
        if c is None:
            return
        with contextlib.suppress(Exception):
            child.stop_ls(c, float(self.cfg.lightningstream.stop_timeout))

    def _cleanup(self) -> None:
        self._stop_poller()
        if self.http is not None:
            with contextlib.suppress(Exception):
                self.http.stop()
            self.http = None
        if self.notifier is not None:
            with contextlib.suppress(Exception):
                self.notifier.close()


_LOG_LEVELS = {Level.INFO: logging.INFO, Level.WARNING: logging.WARNING, Level.ERROR: logging.ERROR}


# ---------------------------------------------------------------------------------------------------
# lssupervisor run


def cmd_run(args: argparse.Namespace) -> int:
    from lssupervisor import lsconfig

    cfg = load_config(args.config)
    if getattr(args, "log_format", None) or getattr(args, "log_level", None):
        log_cfg = dataclasses.replace(
            cfg.log,
            **{k: v for k, v in (("format", args.log_format), ("level", args.log_level)) if v},
        )
    else:
        log_cfg = cfg.log
    setup_logging(log_cfg.format, log_cfg.level)
    # The LMDBs to lock come from the template (their paths must not depend on the version).
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, os.environ))
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    with lock.acquire(cfg, view.lmdbs, "daemon") as held:
        return Supervisor(cfg, held=held).run()

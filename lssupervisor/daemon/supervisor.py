"""The imperative shell: the daemon's main loop around the pure core (:mod:`lssupervisor.core.lifecycle`).

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

The reconcile cycle (docs/reconcile.md): the core names one asynchronous job at a time (``state.task``)
and the shell runs it: a worker process (``plan``, ``readers``, ``migrate``, ``markers``) whose reader
thread enqueues ``WorkerMessage`` items, translated here into the core's events; or the drain LS and
the hooks, polled like LS. The version LS's config is rendered for always comes from the markers a
worker read (I2); the daemon never opens an LMDB. Jobs die with the daemon (``PR_SET_PDEATHSIG`` in the
worker, ``setpriv --pdeathsig`` for the drain LS and hooks) and are cancelled and collected at exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, assert_never

from lssupervisor import __version__, fsutil
from lssupervisor.config import (
    Config,
    OutputMode,
    format_duration,
    load_config,
    parse_address,
    resolve_target,
)
from lssupervisor.core.actions import (
    Action,
    AnnounceState,
    CancelTask,
    Exit,
    KillGroup,
    Level,
    LogLine,
    LogStatus,
    Notify,
    NotifyKind,
    PrepareConfig,
    ProveGone,
    ReadMarkers,
    RenderConfig,
    RunHook,
    ShowProgress,
    SignalGroup,
    SpawnChild,
    StartDrain,
    StartMigration,
    SweepOrphans,
    WriteState,
)
from lssupervisor.core.events import (
    Booted,
    ChildExited,
    ChildReady,
    ChildSpawned,
    ConfigFailed,
    ConfigPrepared,
    DrainFinished,
    Event,
    FileChanged,
    GoneProven,
    HookFinished,
    MarkersRead,
    Migrated,
    MigrationProgress,
    Planned,
    ReconcileRequested,
    ReloadRequested,
    ShutdownRequested,
    SignalReceived,
    SpawnFailed,
    StatusRequested,
    TaskFailed,
    Tick,
)
from lssupervisor.core.states import Goal, State, SupervisorState, Task
from lssupervisor.daemon import child, http, lock, policy, reaper, sdnotify, watch
from lssupervisor.daemon import signals as sigs
from lssupervisor.daemon.logs import fields
from lssupervisor.daemon.statefile import read_state, write_state
from lssupervisor.errors import ConfigError, ExitCode, MigrationError, SupervisorError
from lssupervisor.lsconfig import binary as lsbinary
from lssupervisor.lsconfig import render as lsconfig
from lssupervisor.lsmodel import LsView
from lssupervisor.proc import child_env
from lssupervisor.worker import backupdir, migrations
from lssupervisor.worker import client as worker_mod

log = logging.getLogger("lssupervisor.daemon.supervisor")

MAX_WAIT_S = 1.0  # backstop: the loop ticks at least this often whatever the deadlines say
# Backstop while LS's group stragglers are being killed or a drain/hook runs. SIGCHLD already wakes the
# loop when our own child (leader, drain, hook) exits; this only catches what sends us no SIGCHLD (a
# straggler that is not our child leaving the group). 0.1 s costs 10 /proc scans a second, not 50.
BUSY_WAIT_S = 0.1
OUTPUT_JOIN_S = 1.0
# A start-up migration (before READY=1): systemd's start timeout is extended by this much, re-sent every
# EXTEND_RESEND_S while a job runs, so a long migration is not killed as a hung start.
EXTEND_TIMEOUT_S = 30.0
EXTEND_RESEND_S = 10.0
JOB_WAIT_S = 5.0  # at exit: how long a cancelled job may take to be collected


# ---------------------------------------------------------------------------------------------------
# What a reconcile loaded and rendered

@dataclass(frozen=True, slots=True)
class Loaded:
    """Our config, the LS template, the migrations (discovered, never imported here) and the target,
    loaded and checked together at the start of a reconcile. A failed load keeps the previous one."""

    cfg: Config
    template: lsconfig.Template
    view: LsView
    target: int | None  # pinned (schema.target / target_file); None: the newest migration
    newest: int | None  # the newest migration's version (None: no migration source configured)


@dataclass(frozen=True, slots=True)
class Prepared:
    cfg: Config
    text: str
    view: LsView
    argv: tuple[str, ...]
    env: Mapping[str, str]
    version: int
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


def load(cfg: Config, base_env: Mapping[str, str]) -> Loaded:
    """Load and check the template, the migrations (discovery: names, gaps, literals, ownership; no
    code runs in the daemon) and the target. Raises SupervisorError with a one-line message."""
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = lsconfig.inspect_template(template, lsconfig.ls_environment(cfg, 0, base_env))
    source = cfg.migrations.path if cfg.migrations.path is not None else cfg.migrations.package
    newest: int | None = None
    if source is not None:
        found = migrations.discover(source, [spec.name for spec in view.lmdbs])
        newest = found.newest
        if any(m.strategy is migrations.Strategy.PREFIX for m in found.migrations):
            lsconfig.check_prefix_safety(template, lsconfig.ls_environment(cfg, 0, base_env))
    target = resolve_target(cfg)
    if target is not None and newest is not None and target > newest:
        where = cfg.schema.target_file or f"{cfg.name}: schema.target"
        raise ConfigError(f"{where}: target version {target} is unknown: the migrations go up to {newest}")
    return Loaded(cfg=cfg, template=template, view=view, target=target, newest=newest)


def load_failed(exc: SupervisorError) -> ConfigFailed:
    """A failed :func:`load` as the core's event, naming what failed: a bad migration file is not a
    render problem. The exit code (at boot) is the error's own, as offline."""
    migration = isinstance(exc, MigrationError)
    what = "cannot load the migrations" if migration else "cannot load the configuration"
    return ConfigFailed(str(exc), what=what, exit_code=exc.exit_code)


def render_for(loaded: Loaded, version: int, base_env: Mapping[str, str]) -> Prepared:
    """Render the LS config for ``version`` (the LMDB's marker, I2) in memory. Raises SupervisorError."""
    cfg = loaded.cfg
    env = lsconfig.ls_environment(cfg, version, base_env)
    rendered = lsconfig.render(loaded.template, version, env)
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
        version=version,
        digest=_digest(cfg, rendered.text, argv, env),
    )


# ---------------------------------------------------------------------------------------------------
# Jobs of the cycle (one at a time; a cancelled one is kept until it is gone)


@dataclass(frozen=True, slots=True)
class WorkerMessage:
    """Put on the queue by a worker's reader thread (enqueue only); ``job`` says whose it is."""

    job: int
    msg: Mapping[str, Any]


@dataclass(eq=False)
class Job:
    id: int
    task: Task
    started: float  # monotonic
    started_wall: float
    worker: worker_mod.WorkerRun | None = None
    drain: child.LsChild | None = None
    hook: subprocess.Popen[bytes] | None = None
    hook_phase: str = ""
    hook_index: int = 0
    deadline: float | None = None  # hook time limit, drain backstop
    cancelled: bool = False
    timed_out: bool = False
    backup_id: str | None = None

    def pids(self) -> list[int]:
        """Pids whose status a Popen of ours still has to collect (kept from the reaper)."""
        out = []
        if self.worker is not None and not self.worker.done:
            out.append(self.worker.pid)
        if self.drain is not None and self.drain.returncode is None:
            out.append(self.drain.pid)
        if self.hook is not None and self.hook.returncode is None:
            out.append(self.hook.pid)
        return out

    def cancel(self, reason: str) -> None:
        self.cancelled = True
        if self.worker is not None:
            self.worker.cancel(reason)
        if self.drain is not None:
            self.drain.kill_group()
        if self.hook is not None and self.hook.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.hook.pid, signal.SIGKILL)

    def finished(self) -> bool:
        if self.worker is not None:
            return self.worker.done
        if self.drain is not None:
            return self.drain.poll() is not None and not self.drain.group_alive()
        if self.hook is not None:
            return self.hook.poll() is not None
        return True


_LOGRUS_TIME = re.compile(r'^time="[^"]*"\s+')
LAST_LINE_MAX = 300


class LastLine:
    """``on_line`` for ``output: prefix``: logs each LS line (``lightningstream: <line>``, as the
    default does) and keeps the last non-empty one, so a failed start can quote LS's fatal line.
    Called on the reader thread; the loop reads ``line`` after ``join_output`` (a str assignment is
    atomic)."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __call__(self, line: str) -> None:
        child.log_ls_line(line)
        text = _LOGRUS_TIME.sub("", line.strip())  # logrus's time= is noise in a reason
        if text:
            self.line = text[:LAST_LINE_MAX]


def _progress_text(msg: Mapping[str, Any]) -> tuple[str, str]:
    """A migrate worker progress message as (phase, text for people)."""
    phase = str(msg.get("phase") or "")
    lmdb = msg.get("lmdb") or ""
    arrow = f"{msg.get('from')}→{msg.get('to')}"
    match phase:
        case "backup":
            if "percent" in msg:
                return phase, f"backing up {lmdb}: {msg.get('percent'):g}%"
            return phase, "backing up"
        case "step_committed":
            step = f" ({msg['step']})" if msg.get("step") else ""
            return phase, f"committed {lmdb} {arrow}{step}, step {msg.get('index')}/{msg.get('steps')}"
        case _:
            percent = msg.get("percent")
            shown = f"{percent:g}%" if isinstance(percent, int | float) else "?"
            return "migrate", f"migrating {lmdb} {arrow}: {shown}"


def _step_line(step: Mapping[str, Any]) -> str:
    name = f" ({step['migration']})" if step.get("migration") else " (marker only)"
    return f"{step.get('lmdb')} {step.get('from')}→{step.get('to')}{name}"


def planned_event(result: Mapping[str, Any]) -> Planned:
    """A ``plan`` worker result as the core's ``Planned``."""
    lmdbs = list(result.get("lmdbs") or [])
    markers = tuple((str(e["lmdb"]), e.get("marker_version")) for e in lmdbs)
    versions = {v for _, v in markers}
    render = next(iter(versions)) if len(versions) == 1 and None not in versions else None
    writes = any(e.get("action") != "none" for e in lmdbs)
    steps = tuple(_step_line(s) for s in result.get("steps") or [])
    return Planned(
        render_version=render, target=int(result["target"]), writes=writes, steps=steps, markers=markers
    )


# ---------------------------------------------------------------------------------------------------
# The shell


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


class Supervisor:
    """Owns the LS child, the cycle's jobs, the state file, the watcher, HTTP server and notifier."""

    def __init__(
        self,
        cfg: Config,
        *,
        held: lock.Lock | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.held = held
        self.clock = clock
        self.wall = wall
        self.rng = rng
        self.environ = dict(os.environ if environ is None else environ)
        self.core = policy.lifecycle_for(cfg, rng)
        self.st = SupervisorState()
        self.queue: queue.SimpleQueue[Event | SignalReceived | WorkerMessage] = queue.SimpleQueue()
        self.loaded: Loaded | None = None
        self.prepared: Prepared | None = None
        self.validated: set[str] = set()  # digests LS itself accepted (`LS -c candidate`)
        self.markers: dict[str, int | None] = {}
        self.child: child.LsChild | None = None
        self.child_output: LastLine | None = None  # output: prefix: LS's lines pass through it
        self.last_ls: child.LsChild | None = None
        self.leader_exited = False
        self.poller: Any = None  # health.HealthPoller while LS starts
        self.retired_pollers: list[Any] = []  # stopped, maybe still finishing a request; joined at exit
        self.job: Job | None = None
        self.cancelled: list[Job] = []  # cancelled jobs not gone yet
        self.job_ids = 0
        self.migration: dict[str, Any] = {
            "progress": None,
            "last_result": None,
            "last_error": None,
            "last_duration_s": None,
            "last_success_at": None,
            "last_backup": None,
        }
        # `backups` in the status document (metrics read it): listed from the manifests at start and
        # after each migrate job result, never per loop iteration and never by opening an LMDB.
        self.backups: dict[str, Any] = {"count": 0, "last": None}
        self.exit_code: ExitCode | None = None
        self.notifier: Any = None
        self.ready_sent = False
        self.next_extend = 0.0
        self.http: Any = None
        self.watcher: Any = None
        self.watched: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.reaper: Any = None
        self.watchdog_interval: float | None = None
        self.next_watchdog = 0.0
        # The record of an LS started by an earlier run (read before we overwrite state.json).
        self.previous_record: child.ChildRecord | None = None

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until shut down; returns the exit code. Call from the main thread."""
        self.previous_record = self._read_previous_record()
        try:
            try:
                # First, before anything is started (no LS, no worker, no orphan sweep, no READY=1):
                # an address in use is an operator error, one line and EX_CONFIG, not a crash.
                self._start_http()
            except SupervisorError as exc:
                log.error("%s; nothing was started", exc)
                return int(exc.exit_code)
            self._start_notifier()
            self._start_reaper()
            with sigs.installed(self.queue):
                where = fields(
                    pid=os.getpid(), config=str(self.cfg.source), state_dir=str(self.cfg.state_dir)
                )
                log.info("lssupervisor %s starting", __version__, extra=where)
                self._refresh_backups()
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
        if self.leader_exited or (self.job is not None and self.job.worker is None):
            timeout = min(timeout, BUSY_WAIT_S)  # stragglers being killed, a drain/hook running
        items: list[Event | SignalReceived | WorkerMessage] = []
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
            self._poll_job()
        self._reap()
        if self.exit_code is None:
            self._feed(Tick())
        self._heartbeat()

    def _translate(self, item: Event | SignalReceived | WorkerMessage) -> Event | None:
        if isinstance(item, WorkerMessage):
            return self._worker_message(item)
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
        return None  # SIGCHLD: the polls after the queue drain do the work

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
                return self._prepare(reload)
            case RenderConfig(version=version):
                return [self._render(version)]
            case ProveGone():
                return self._start_worker(Task.PROVE, "readers")
            case StartDrain(version=version):
                return self._start_drain(version)
            case RunHook():
                return self._run_hook(action)
            case StartMigration(target=target):
                return self._start_worker(Task.MIGRATE, "migrate", target=target)
            case ReadMarkers():
                return self._start_worker(Task.VERIFY, "markers")
            case CancelTask(reason=reason):
                self._cancel_job(reason)
            case ShowProgress(text=text, startup=startup):
                self._show_progress(text, startup)
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

    # -- PLANNING ----------------------------------------------------------------------------------

    def _prepare(self, reload: bool) -> list[Event]:
        """Load config, template, migrations and target; start the plan worker. On a load failure the
        previous ones stay (ConfigFailed: one error line, LS keeps running)."""
        cfg = self.cfg
        try:
            if reload:
                if cfg.source is None:
                    raise ConfigError("cannot reload: the config was not loaded from a file")
                cfg = load_config(cfg.source)
                self._check_reloadable(cfg)
            loaded = load(cfg, self.environ)
        except SupervisorError as exc:
            return [load_failed(exc)]
        if self.held is not None:
            try:
                # A reload may name another LMDB: lock it too before LS can touch it (I4).
                self.held.add_lmdbs(loaded.view.lmdbs)
            except SupervisorError as exc:
                return [ConfigFailed(str(exc), what="cannot lock the LMDBs", exit_code=exc.exit_code)]
        if reload:
            self.cfg = cfg
            self.core = policy.lifecycle_for(cfg, self.rng)
        self.loaded = loaded
        self._update_watcher()
        if loaded.newest is None:
            # No migration source: nothing can be planned; the version is the marker (a worker read).
            return [
                ConfigFailed(
                    f"{cfg.name}: migrations: neither path nor package is set",
                    what="cannot load the migrations",
                )
            ]
        return self._start_worker(Task.PLAN, "plan", target=loaded.target)

    def _check_reloadable(self, new: Config) -> None:
        if Path(new.state_dir).resolve() != Path(self.cfg.state_dir).resolve():
            raise ConfigError(
                f"{new.name}: state_dir: cannot change while running ({self.cfg.state_dir} -> "
                f"{new.state_dir}); restart lssupervisor to move it"
            )
        if new.http.address != self.cfg.http.address:
            log.warning(
                "%s: http.address changed (%r -> %r); the status server keeps %r until lssupervisor "
                "restarts", new.name, self.cfg.http.address, new.http.address, self.cfg.http.address,
            )

    # -- workers -----------------------------------------------------------------------------------

    def _start_worker(self, task: Task, op: str, **fields_: Any) -> list[Event]:
        loaded = self.loaded
        assert loaded is not None, "worker before a successful load"
        assert self.job is None, f"second job {task} while {self.job.task if self.job else None} runs"
        self.job_ids += 1
        job = Job(id=self.job_ids, task=task, started=self.clock(), started_wall=self.wall())
        request = worker_mod.build_request(op, loaded.cfg, loaded.view, **fields_)
        q, job_id = self.queue, job.id

        def on_message(msg: dict[str, Any]) -> None:
            q.put_nowait(WorkerMessage(job_id, msg))  # reader thread: enqueue only

        pass_fds = (self.held.fileno(),) if self.held is not None else ()
        try:
            job.worker = worker_mod.WorkerRun.start(
                request,
                on_message,
                min_pid=loaded.cfg.lightningstream.min_pid,
                pass_fds=pass_fds,
                env=child_env(self.environ),  # only the daemon speaks to systemd
            )
        except (OSError, SupervisorError, RuntimeError) as exc:
            return [TaskFailed(task.value, type(exc).__name__, f"cannot start the {op} worker: {exc}")]
        log.debug("worker started", extra=fields(op=op, pid=job.worker.pid))
        self.job = job
        return []

    def _worker_message(self, item: WorkerMessage) -> Event | None:
        job = self.job if self.job is not None and self.job.id == item.job else None
        if job is None:
            job = next((j for j in self.cancelled if j.id == item.job), None)
        msg = item.msg
        kind = msg.get("type")
        if job is None or (job.cancelled and kind not in {"result", "error"}):
            return None
        if job.cancelled and (self.job is not None or self.st.task is not job.task):
            return None  # nobody waits for it (a read-only job cancelled at shutdown)
        # A cancelled migration's final message is awaited: the core stays in MIGRATING until it
        # arrives (the worker is gone then, its open transaction aborted).
        if kind == "log":
            level = {"warning": logging.WARNING, "error": logging.ERROR, "debug": logging.DEBUG}
            log.log(level.get(str(msg.get("level")), logging.INFO), "worker: %s", msg.get("msg"))
            return None
        if kind == "progress":
            if job.task is not Task.MIGRATE:
                return None
            phase, text = _progress_text(msg)
            return MigrationProgress(phase=phase, text=text)
        if kind not in ("result", "error"):
            return None
        if self.job is job:
            self.job = None
        if kind == "error":
            return self._worker_failed(job, msg)
        try:
            return self._worker_result(job, msg)
        except (KeyError, TypeError, ValueError) as exc:
            return TaskFailed(job.task.value, "WorkerError", f"unexpected {job.task.value} result: {exc!r}")

    def _worker_result(self, job: Job, msg: Mapping[str, Any]) -> Event:
        match job.task:
            case Task.PLAN:
                event = planned_event(msg)
                self.markers = dict(event.markers)
                return event
            case Task.PROVE:
                return self._proof(msg)
            case Task.MIGRATE:
                self._refresh_backups()
                duration = float(msg.get("duration_s") or 0.0)
                backup_id = msg.get("backup_id")
                self.migration.update(
                    progress=None,
                    last_result="ok",
                    last_error=None,
                    last_duration_s=round(duration, 3),
                    last_success_at=_iso(self.wall()),
                    last_backup=backup_id or self.migration["last_backup"],
                )
                return Migrated(
                    backup_id=str(backup_id) if backup_id else None,
                    steps=int(msg.get("steps") or 0),
                    duration_s=duration,
                )
            case Task.VERIFY:
                markers = tuple((str(e["lmdb"]), e.get("version")) for e in msg["lmdbs"])
                self.markers = dict(markers)
                return MarkersRead(markers)
            case Task.DRAIN | Task.HOOK | Task.RENDER:
                raise ValueError(f"{job.task.value} is not a worker job")
            case _:
                assert_never(job.task)

    def _worker_failed(self, job: Job, msg: Mapping[str, Any]) -> Event:
        error = str(msg.get("error") or "WorkerError")
        message = str(msg.get("message") or "worker failed")
        if job.task is Task.PLAN and error == "SchemaTooNew":
            message += "; " + self._restore_hint()
        if job.task is Task.MIGRATE:
            self._refresh_backups()  # a failed migration may have taken its backup first
            backup_id = self._backup_since(job.started_wall)
            self.migration.update(
                progress=None,
                last_result="cancelled" if error == "MigrationCancelled" else "failed",
                last_error=message,
                last_duration_s=round(self.clock() - job.started, 3),
                last_backup=backup_id or self.migration["last_backup"],
            )
            return TaskFailed(job.task.value, error, message, backup_id=backup_id)
        return TaskFailed(job.task.value, error, message)

    def _refresh_backups(self) -> None:
        """``backups: {count, last: {id, created_at, size_bytes, version}}`` from the backup dir's
        manifests (backupdir.list_backups reads manifests only; the daemon never opens an LMDB)."""
        try:
            found = backupdir.list_backups(self.cfg.backup_dir)
        except OSError as exc:
            # Status only: keep the last listing, say why once per attempt.
            log.warning("cannot list the backups in %s: %s", self.cfg.backup_dir, exc.strerror or exc)
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

    def _restore_hint(self) -> str:
        try:
            newest = backupdir.find_backup(self.cfg.backup_dir, None)
        except SupervisorError:
            return f"no backup found in {self.cfg.backup_dir} to restore"
        return f"or stop lssupervisor and restore the newest backup: `lssupervisor rollback {newest.id}`"

    def _backup_since(self, wall: float) -> str | None:
        """The backup a failed migrate worker took (the newest one made since it started)."""
        found = None
        for info in backupdir.list_backups(self.cfg.backup_dir):
            with contextlib.suppress(OSError):
                if info.path.stat().st_mtime >= wall - 1.0:
                    found = info.id
        return found

    def _proof(self, msg: Mapping[str, Any]) -> GoneProven:
        """PROVING: no process of our last LS's group, none naming our config, and no LS among the
        LMDB readers (a reader is LS when it is our last LS pid or runs the LS binary)."""
        binary = os.path.basename(self.cfg.lightningstream.binary)
        ours = {self.last_ls.pid} if self.last_ls is not None else set()
        suspects: dict[int, str] = {}
        for entry in msg.get("lmdbs") or []:
            for reader in entry.get("readers") or []:
                pid = int(reader["pid"])
                cmd = [str(c) for c in reader.get("cmdline") or []]
                names_ls = any(os.path.basename(c) == binary for c in cmd[:2])
                if reader.get("alive") and (pid in ours or names_ls):
                    suspects[pid] = f"LMDB {entry.get('lmdb')} reader: {' '.join(cmd)[:120]}"
            holder = entry.get("open_by_pid")
            if isinstance(holder, int) and holder in ours:
                suspects[holder] = f"holds LMDB {entry.get('lmdb')} open"
        remaining = child.prove_gone(self.last_ls, self.cfg.rendered_config, extra_pids=suspects)
        detail = "; ".join(suspects.get(p, "names our LS config") for p in remaining)
        if not remaining:
            log.info("LS proven gone: no process of its group, no LS among the LMDB readers")
        return GoneProven(remaining=tuple(remaining), detail=detail)

    # -- DRAINING, hooks ---------------------------------------------------------------------------

    def _start_drain(self, version: int) -> list[Event]:
        loaded = self.loaded
        assert loaded is not None
        cfg = loaded.cfg
        ls = cfg.lightningstream
        try:
            old = render_for(loaded, version, self.environ)
            target = cfg.rendered_config
            target.parent.mkdir(parents=True, exist_ok=True)
            fsutil.write_atomic(target, old.text)  # the OLD version's config (I2 holds: not migrated yet)
            timeout = lsconfig_duration(float(ls.drain_timeout))
            argv = (ls.binary, "--config", str(target), "--timeout", timeout, "sync", "--only-once")
            drain = child.spawn_ls(
                argv, old.env, pdeathsig=ls.pdeathsig, min_pid=ls.min_pid, output=ls.output
            )
        except (SupervisorError, OSError, RuntimeError) as exc:
            return [TaskFailed(Task.DRAIN.value, type(exc).__name__, str(exc))]
        log.info("drain started", extra=fields(pid=drain.pid, version=version, timeout=timeout))
        self.job_ids += 1
        self.job = Job(
            id=self.job_ids,
            task=Task.DRAIN,
            started=self.clock(),
            started_wall=self.wall(),
            drain=drain,
            deadline=self.clock() + float(ls.drain_timeout) + float(ls.stop_timeout),
        )
        return []

    def _run_hook(self, action: RunHook) -> list[Event]:
        loaded = self.loaded
        assert loaded is not None
        cfg = loaded.cfg
        hooks = cfg.hooks.pre_migrate if action.phase == "pre" else cfg.hooks.post_migrate
        argv = list(hooks[action.index])
        env = child_env(self.environ)  # only the daemon speaks to systemd
        env.update(
            LSSUPERVISOR_HOOK=f"{action.phase}_migrate",
            LSSUPERVISOR_FROM_VERSION="" if action.from_version is None else str(action.from_version),
            LSSUPERVISOR_TO_VERSION=str(action.to_version),
            LSSUPERVISOR_CONFIG=str(cfg.source or ""),
            LSSUPERVISOR_INSTANCE=loaded.view.instance,
        )
        wrapper = child.setpriv_path() if cfg.lightningstream.pdeathsig else None
        full = [wrapper, "--pdeathsig", "KILL", "--", *argv] if wrapper else argv
        try:
            proc = subprocess.Popen(full, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            message = f"cannot run {argv[0]}: {exc.strerror}"
            return [HookFinished(action.phase, action.index, ok=False, message=message)]
        log.info("hook started", extra=fields(hook=f"{action.phase}_migrate", argv=argv, pid=proc.pid))
        self.job_ids += 1
        self.job = Job(
            id=self.job_ids,
            task=Task.HOOK,
            started=self.clock(),
            started_wall=self.wall(),
            hook=proc,
            hook_phase=action.phase,
            hook_index=action.index,
            deadline=self.clock() + float(cfg.hooks.timeout),
        )
        return []

    def _poll_job(self) -> None:
        """Drain and hook processes are polled (SIGCHLD wakes us); workers report through the queue."""
        self.cancelled = [j for j in self.cancelled if not j.finished()]
        job = self.job
        if job is None or job.worker is not None:
            return
        now = self.clock()
        if job.deadline is not None and now >= job.deadline and not job.timed_out and not job.finished():
            job.timed_out = True
            if job.hook is not None:
                limit = f"hooks.timeout ({format_duration(float(self.cfg.hooks.timeout))})"
                what = f"{job.hook_phase}_migrate hook {job.hook_index + 1}"
            else:
                limit = "lightningstream.drain_timeout + stop_timeout"
                what = job.task.value
            log.warning("%s ran over %s: SIGKILL to its process group", what, limit)
            job.cancel("time limit")
        if job.drain is not None:
            d = job.drain
            if d.poll() is None:
                return
            if d.group_alive():
                d.kill_group()
                return
            rc = d.returncode
            assert rc is not None
            d.join_output(OUTPUT_JOIN_S)
            self.job = None
            description = child.describe_exit(rc)
            log.info("drain ended", extra=fields(pid=d.pid, status=description))
            self._feed(DrainFinished(rc, description))
        elif job.hook is not None:
            rc = job.hook.poll()
            if rc is None:
                return
            self.job = None
            ok = rc == 0 and not job.timed_out
            if job.timed_out:
                message = f"timed out after {format_duration(float(self.cfg.hooks.timeout))}"
            else:
                message = child.describe_exit(rc)
            log.log(logging.INFO if ok else logging.ERROR, "hook ended",
                    extra=fields(hook=f"{job.hook_phase}_migrate", status=message))
            self._feed(HookFinished(job.hook_phase, job.hook_index, ok=ok, message=message))

    def _cancel_job(self, reason: str) -> None:
        job = self.job
        if job is None:
            return
        log.warning("cancelling %s", job.task.value, extra=fields(reason=reason))
        job.cancel(reason)
        self.job = None
        self.cancelled.append(job)

    def _show_progress(self, text: str, startup: bool) -> None:
        self.migration["progress"] = text
        self._write_state()
        if self.notifier is not None:
            self.notifier.status(text[:200])
            if startup and not self.ready_sent:
                self._extend_timeout(force=True)

    def _extend_timeout(self, *, force: bool = False) -> None:
        """A start-up migration: ask systemd for more time, ahead of its start timeout."""
        now = self.clock()
        if self.notifier is None or (not force and now < self.next_extend):
            return
        if force and now < self.next_extend - EXTEND_RESEND_S + 1.0:
            return  # throttle progress-driven extensions to one a second
        self.notifier.extend_timeout(int(EXTEND_TIMEOUT_S * 1_000_000))
        self.next_extend = now + EXTEND_RESEND_S

    # -- RENDERING, spawning -----------------------------------------------------------------------

    def _render(self, version: int) -> Event:
        loaded = self.loaded
        assert loaded is not None
        try:
            prepared = render_for(loaded, version, self.environ)
            if prepared.digest not in self.validated and (
                self.child is None or self.st.child is None or self.st.child.digest != prepared.digest
            ):
                self._validate_with_ls(prepared)
        except SupervisorError as exc:
            return ConfigFailed(str(exc), what="cannot render the LS config", exit_code=ExitCode.CONFIG)
        self.prepared = prepared
        return ConfigPrepared(
            digest=prepared.digest,
            version=version,
            wait_for_health=bool(prepared.view.http_address),
            target_version=loaded.target,
        )

    def _validate_with_ls(self, prepared: Prepared) -> None:
        """Ask LS itself (``LS -c candidate``, exits 0 or 1 at once) before the swap."""
        target = prepared.cfg.rendered_config
        target.parent.mkdir(parents=True, exist_ok=True)
        candidate = target.with_name(f".{target.name}.candidate")
        try:
            fsutil.write_atomic(candidate, prepared.text, keep_previous=False)
            lsbinary.validate_with_binary(prepared.cfg.lightningstream.binary, candidate, prepared.env)
        except OSError as exc:
            raise ConfigError(f"{candidate}: cannot write the candidate LS config: {exc.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                candidate.unlink()
        self.validated.add(prepared.digest)

    def _spawn(self, action: SpawnChild) -> Event:
        prepared = self.prepared
        assert prepared is not None and prepared.digest == action.digest, "spawn of an unprepared config"
        assert self.child is None or self.child.poll() is not None, "second LS (I4)"
        assert self.job is None, "LS start while a job of the cycle runs (I1)"
        cfg = prepared.cfg
        ls = cfg.lightningstream
        try:
            target = cfg.rendered_config
            target.parent.mkdir(parents=True, exist_ok=True)
            if fsutil.write_atomic(target, prepared.text):
                log.info("wrote LS config", extra=fields(path=str(target), version=prepared.version))
            output = LastLine() if ls.output is OutputMode.PREFIX else None
            new = child.spawn_ls(
                prepared.argv,
                prepared.env,
                pdeathsig=ls.pdeathsig,
                min_pid=ls.min_pid,
                output=ls.output,
                on_line=output,
            )
        except (SupervisorError, OSError, RuntimeError) as exc:
            return SpawnFailed(str(exc))
        self.child = new
        self.child_output = output
        self.leader_exited = False
        if prepared.view.http_address:
            self._start_poller(new.pid, prepared)
        return ChildSpawned(new.pid)

    def _start_poller(self, pid: int, prepared: Prepared) -> None:
        from lssupervisor.daemon import health

        q = self.queue

        def on_ready(ready_pid: int) -> None:
            q.put_nowait(ChildReady(ready_pid))  # from the poller thread: enqueue only

        self.poller = health.HealthPoller(
            health.HealthProbe(prepared.view.http_address, [s.name for s in prepared.view.lmdbs]),
            pid,
            on_ready,
            interval=float(prepared.cfg.lightningstream.health_poll_interval),
        )

    def _stop_poller(self, join: bool = False) -> None:
        """Tell the health poller to stop. Joining it could hold up the main loop for a whole /healthz
        request (up to its timeout), so it is only joined at exit; a stopped poller's late
        ChildReady is ignored by the core (stale pid)."""
        if self.poller is not None:
            self.poller.stop(timeout=None if join else 0)
            self.retired_pollers.append(self.poller)
            self.poller = None
        if join:
            for poller in self.retired_pollers:
                poller.stop(timeout=5.0)
            self.retired_pollers.clear()
        else:
            self.retired_pollers = [p for p in self.retired_pollers if p.running]

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
        last_line = self.child_output.line if self.child_output is not None else None
        self.child = None
        self.child_output = None
        self.last_ls = c
        self.leader_exited = False
        description = child.describe_exit(rc)
        log.info("lightningstream exited", extra=fields(pid=c.pid, status=description))
        self._feed(ChildExited(pid=c.pid, returncode=rc, description=description, last_line=last_line))

    # -- reaping, watching -------------------------------------------------------------------------

    def _own_pids(self) -> set[int]:
        pids: set[int] = set()
        if self.child is not None and self.child.returncode is None:
            pids.add(self.child.pid)
        for job in [self.job, *self.cancelled]:
            if job is not None:
                pids.update(job.pids())
        return pids

    def _start_reaper(self) -> None:
        self.reaper = reaper.Reaper(self._own_pids)
        self.reaper.become_subreaper()

    def _reap(self) -> None:
        if self.reaper is None:
            return
        try:
            self.reaper.reap()
        except OSError as exc:
            log.warning("reaping exited orphans failed: %s", exc)

    def _update_watcher(self) -> None:
        """(Re)start the watcher when the set of watched paths changed (a reload may move them)."""
        cfg = self.cfg
        if not cfg.watch.enabled:
            self._stop_watcher()
            return
        files = [str(Path(cfg.lightningstream.template).absolute())]
        if cfg.source is not None:
            files.append(str(Path(cfg.source).absolute()))
        if cfg.schema.target_file is not None:
            files.append(str(Path(cfg.schema.target_file).absolute()))
        dirs = [str(Path(cfg.migrations.path).absolute())] if cfg.migrations.path is not None else []
        wanted = (tuple(sorted(files)), tuple(sorted(dirs)))
        if wanted == self.watched and self.watcher is not None:
            return
        self._stop_watcher()
        q = self.queue
        ours = str(Path(cfg.source).absolute()) if cfg.source is not None else None

        def on_change(path: str) -> None:
            q.put_nowait(FileChanged(path, ours=path == ours))  # observer thread: enqueue only

        watcher = watch.Watcher([Path(f) for f in files], [Path(d) for d in dirs], on_change)
        try:
            watcher.start()
        except OSError as exc:
            log.warning("cannot watch files; reconcile with SIGHUP/SIGUSR1: %s", exc)
            return
        self.watcher = watcher
        self.watched = wanted

    def _stop_watcher(self) -> None:
        if self.watcher is not None:
            with contextlib.suppress(Exception):
                self.watcher.stop()
            self.watcher = None
            self.watched = ((), ())

    # -- visibility --------------------------------------------------------------------------------

    def _announce(self, a: AnnounceState) -> None:
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
        self._write_state()
        if self.notifier is not None:
            shown = a.new.value if a.substep is None else f"{a.new.value}/{a.substep.value}"
            text = shown if not a.reason else f"{shown}: {a.reason}"
            self.notifier.status(text[:200])

    def _notify(self, kind: NotifyKind) -> None:
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

    def status_document(self) -> dict[str, Any]:
        st, cfg = self.st, self.cfg
        now_mono, now_wall = self.clock(), self.wall()

        def wall_of(mono: float | None) -> str | None:
            return None if mono is None else _iso(now_wall - (now_mono - mono))

        prepared = self.prepared
        loaded = self.loaded
        c = self.child if st.child is not None else None
        lmdbs: dict[str, Any] = {}
        if loaded is not None:
            for spec in loaded.view.lmdbs:
                lmdbs[spec.name] = {"path": spec.path, "schema_version": self.markers.get(spec.name)}
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
                "record": c.record().to_json() if c is not None else None,
                "argv": list(prepared.argv) if prepared is not None else None,
            },
            "lmdbs": lmdbs,
            "migration": {
                **self.migration,
                "progress": st.progress,
                "task": st.task.value if st.task is not None else None,
                "plan": list(cycle.steps) if cycle is not None else None,
                "from_version": cycle.from_version if cycle is not None else None,
                "to_version": cycle.target if cycle is not None else None,
            },
            "backups": self.backups,
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
        self.notifier = sdnotify.Notifier.from_env(self.environ)
        self.watchdog_interval = sdnotify.watchdog_interval(self.environ)
        self.next_watchdog = self.clock()

    def _start_http(self) -> None:
        address = self.cfg.http.address
        if not address:
            return
        host, port = parse_address(address, f"{self.cfg.name}: http.address")
        server = http.StatusServer(host, port, clock=self.clock)
        try:
            server.start()  # ConfigError naming http.address when it cannot be bound
        except ConfigError as exc:
            raise ConfigError(f"{self.cfg.name}: {exc}") from None
        self.http = server

    def _heartbeat(self) -> None:
        now = self.clock()
        if self.http is not None:
            self.http.heartbeat(now)
        if self.watchdog_interval is not None and self.notifier is not None and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_interval
        cycle = self.st.cycle
        if cycle is not None and cycle.startup and not self.ready_sent and self.st.task is not None:
            self._extend_timeout()

    def _emergency_stop(self) -> None:
        """The loop died (a bug): never leave LS behind (I6), even before pdeathsig would act."""
        self._cancel_job("the main loop failed")
        c = self.child
        if c is None:
            return
        with contextlib.suppress(Exception):
            child.stop_ls(c, float(self.cfg.lightningstream.stop_timeout))

    def _cleanup(self) -> None:
        self._stop_poller(join=True)
        self._stop_watcher()
        # Jobs die with us anyway (pdeathsig); end and collect them so nothing is left half-done.
        self._cancel_job("lssupervisor exits")
        for job in self.cancelled:
            with contextlib.suppress(Exception):
                if job.worker is not None:
                    job.worker.wait(JOB_WAIT_S)
                elif job.drain is not None:
                    job.drain.wait(JOB_WAIT_S)
                elif job.hook is not None:
                    job.hook.wait(JOB_WAIT_S)
        self.cancelled.clear()
        if self.http is not None:
            with contextlib.suppress(Exception):
                self.http.stop()
            self.http = None
        if self.notifier is not None:
            with contextlib.suppress(Exception):
                self.notifier.close()


def lsconfig_duration(seconds: float) -> str:
    """A Go duration string for LS flags (``60s``, ``1.5s``): LS reads a bare number as nanoseconds."""
    return f"{seconds:g}s"


_LOG_LEVELS = {Level.INFO: logging.INFO, Level.WARNING: logging.WARNING, Level.ERROR: logging.ERROR}

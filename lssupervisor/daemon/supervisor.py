"""The imperative shell: the daemon's main loop around the pure core (:mod:`lssupervisor.core`).

Theory of operation
-------------------
One thread (the main thread) owns all state. Everything that happens elsewhere arrives as an item on
one ``queue.SimpleQueue``: signal handlers put ``SignalReceived`` (nothing else: no logging, no I/O),
the readiness poller puts ``ChildReady``, the watcher ``FileChanged``, worker reader threads
``WorkerReply``. The loop::

    wait on the queue, at most until the core's next deadline (capped at MAX_WAIT_S as a backstop)
    -> translate each item into a core event (HUP/USR1 read the pause flag here, not in the handler)
    -> poll our own LS Popen (SIGCHLD only woke us; never waitpid(-1)), the drain and hooks
    -> Tick (the core checks its deadlines against the monotonic clock)

Each event goes through ``Lifecycle.handle(state, event, now)``; the shell executes the returned
actions in order, and results of actions (``ConfigPrepared``, ``ChildSpawned``...) are fed back at
once, before the next wait.

The shell is split along its seams: :class:`~lssupervisor.daemon.lsprocess.LsProcess` (the LS child,
readiness, the proof that it is gone), :class:`~lssupervisor.daemon.jobs.JobRunner` (the cycle's
worker, drain and hooks), :class:`~lssupervisor.daemon.publisher.StatusPublisher` (state.json, HTTP,
systemd, logs of transitions). This module wires them to the core, and loads and renders the configs.
The version LS's config is rendered for always comes from the markers a worker read (I2); the daemon
never opens an LMDB. Jobs die with the daemon (``PR_SET_PDEATHSIG`` in the worker, ``setpriv
--pdeathsig`` for the drain LS and hooks) and are cancelled and collected at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, assert_never

from lssupervisor import __version__, durations, fsutil
from lssupervisor.config import Config, load_config, parse_address
from lssupervisor.core.actions import (
    Action,
    AnnounceState,
    CancelTask,
    Exit,
    ImportMigrations,
    KillGroup,
    Level,
    LogLine,
    LogStatus,
    Notify,
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
    ConfigFailed,
    ConfigPrepared,
    Event,
    FileChanged,
    Imported,
    MarkersRead,
    Migrated,
    MigrationProgress,
    Planned,
    ReconcileRequested,
    ReloadRequested,
    ShutdownRequested,
    SignalReceived,
    Stage,
    StatusRequested,
    TaskFailed,
    Tick,
)
from lssupervisor.core.states import State, SupervisorState, Task
from lssupervisor.daemon import child, fleetwatch, lock, policy, reaper, watch
from lssupervisor.daemon import signals as sigs
from lssupervisor.daemon.jobs import Job, JobRunner, WorkerReply
from lssupervisor.daemon.logs import fields
from lssupervisor.daemon.lsprocess import LsProcess
from lssupervisor.daemon.prepare import Loaded, Prepared, load, load_failed, render_for
from lssupervisor.daemon.publisher import Facts, StatusPublisher
from lssupervisor.daemon.statefile import read_state
from lssupervisor.errors import ConfigError, ErrorCode, ExitCode, SupervisorError
from lssupervisor.lsconfig import binary as lsbinary
from lssupervisor.worker import client
from lssupervisor.worker import protocol as p

log = logging.getLogger("lssupervisor.supervisor")

MAX_WAIT_S = 1.0  # backstop: the loop ticks at least this often whatever the deadlines say
# Backstop while LS's group stragglers are being killed or a drain/hook runs. SIGCHLD already wakes the
# loop when our own child (leader, drain, hook) exits; this only catches what sends us no SIGCHLD (a
# straggler that is not our child leaving the group). 0.1 s costs 10 /proc scans a second, not 50.
BUSY_WAIT_S = 0.1

_LOG_LEVELS = {Level.INFO: logging.INFO, Level.WARNING: logging.WARNING, Level.ERROR: logging.ERROR}

QueueItem = Event | SignalReceived | WorkerReply


_WORKER_TASKS = frozenset({Task.PLAN, Task.IMPORT, Task.PROVE, Task.MIGRATE, Task.VERIFY})


def needs_worker(st: SupervisorState) -> bool:
    """Does the cycle still need its worker? From PLANNING until the markers were read back (also
    while LS stops, drains or hooks run in between); not when nothing is to be written."""
    if st.task in _WORKER_TASKS:
        return True
    return (
        st.state in (State.RECONCILING, State.STOPPING) and st.cycle is not None and st.cycle.version is None
    )


def planned_event(result: p.PlanResult) -> Planned:
    """A ``plan`` result as the core's ``Planned``."""
    versions = {v for _, v in result.markers}
    render = next(iter(versions)) if len(versions) == 1 and None not in versions else None
    return Planned(
        render_version=render,
        target=result.target,
        writes=result.writes,
        steps=tuple(s.line() for s in result.steps),
        markers=result.markers,
    )


def progress_event(pr: p.Progress) -> MigrationProgress:
    match pr.phase:
        case p.Phase.BACKUP | p.Phase.BACKUP_DONE:
            stage = Stage.BACKUP
        case p.Phase.STEP_COMMITTED:
            stage = Stage.COMMITTED
        case _:
            stage = Stage.MIGRATE
    return MigrationProgress(stage=stage, text=p.describe(pr), step=pr.index)


class Supervisor:
    """The daemon: the core's state, and the parts of the shell that act on it."""

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
        self.queue: queue.SimpleQueue[QueueItem] = queue.SimpleQueue()
        self.loaded: Loaded | None = None
        self.prepared: Prepared | None = None
        self.validated: set[str] = set()  # digests LS itself accepted (`LS -c candidate`)
        self.markers: dict[str, int | None] = {}
        self.ls = LsProcess(self.queue)
        pass_fds = (held.fileno(),) if held is not None else ()
        self.jobs = JobRunner(self.queue, clock, wall, self.environ, pass_fds, ours=self._own_pids)
        self.publisher = StatusPublisher(clock, wall)
        self.fleet = fleetwatch.FleetWatch(self.environ, wall)  # the storage, listed off the main loop
        self.exit_code: ExitCode | None = None
        self.watcher: watch.Watcher | None = None
        self.watched: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self.reaper: reaper.Reaper | None = None
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
            self.publisher.start_notifier(self.environ)
            self.reaper = reaper.Reaper(self._own_pids)
            self.reaper.become_subreaper()
            with sigs.installed(self.queue):
                where = fields(
                    pid=os.getpid(), config=str(self.cfg.source), state_dir=str(self.cfg.state_dir)
                )
                log.info("lssupervisor %s starting", __version__, extra=where)
                self.publisher.refresh_backups(self.cfg)
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
        pub = self.publisher
        if pub.watchdog_interval is not None:
            timeout = min(timeout, max(0.0, pub.next_watchdog - now))
        if self.ls.leader_exited or self.jobs.runs_process:
            timeout = min(timeout, BUSY_WAIT_S)  # stragglers being killed, a drain/hook running
        items: list[QueueItem] = []
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
            exited = self.ls.poll()
            if exited is not None:
                self._feed(exited)
        if self.exit_code is None:
            for event in self.jobs.poll():
                self._feed(event)
        self._reap()
        if self.exit_code is None:
            self._feed(Tick())
        pub.heartbeat(self.st)

    def _translate(self, item: QueueItem) -> Event | None:
        if isinstance(item, WorkerReply):
            outcome = self.jobs.on_reply(item, self.st.task if self.st.state is State.RECONCILING else None)
            return None if outcome is None else self._outcome(*outcome)
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
        if not needs_worker(self.st):
            self.jobs.end_session()  # the cycle needs no more LMDB work: the worker exits once idle

    # -- actions -----------------------------------------------------------------------------------

    # Kept whole: a flat match, one case per Action type.
    def _execute(self, action: Action) -> list[Event]:  # noqa: PLR0911, PLR0912
        match action:
            case SweepOrphans():
                self.ls.sweep_orphans(self.cfg, self.previous_record)
            case PrepareConfig(reload=reload):
                return self._prepare(reload)
            case RenderConfig(version=version):
                return [self._render(version)]
            case ImportMigrations(target=target):
                self._prevalidate(target)  # LS -c for the target config, while the worker imports
                return self._request(Task.IMPORT, lambda s: p.ImportRequest(s, target))
            case ProveGone():
                return self._request(Task.PROVE, p.ReadersRequest)
            case StartDrain(version=version):
                return self._start_drain(version)
            case RunHook():
                assert self.loaded is not None
                return self.jobs.run_hook(self.loaded, action)
            case StartMigration(target=target):
                return self._request(Task.MIGRATE, lambda s: p.MigrateRequest(s, target))
            case ReadMarkers():
                return self._request(Task.VERIFY, p.MarkersRequest)
            case CancelTask(reason=reason):
                self.jobs.cancel(reason)
            case ShowProgress(text=text, startup=startup):
                self.publisher.progress(text, startup, self._facts())
            case SpawnChild():
                return [self._spawn(action)]
            case SignalGroup(pid=pid):
                self.ls.terminate(pid)
            case KillGroup(pid=pid):
                self.ls.kill(pid)
            case AnnounceState():
                self.publisher.announce(action, self._facts())
            case WriteState():
                self.publisher.publish(self._facts())
            case Notify(kind=kind):
                self.publisher.notify(kind)
            case LogLine(level=level, msg=msg):
                log.log(_LOG_LEVELS[level], "%s", msg)
            case LogStatus():
                self.publisher.log_status(self.st)
            case Exit(code=code):
                self.exit_code = code
            case _:
                assert_never(action)
        return []

    # -- PLANNING ----------------------------------------------------------------------------------

    def _prepare(self, reload: bool) -> list[Event]:
        """Load config, template, migrations and target; ask the cycle's worker for the plan (it is
        started now, while LS still runs). On a load failure the previous ones stay (ConfigFailed: one
        error line, the daemon keeps its state)."""
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
        self.fleet.configure(loaded.cfg, loaded.template)
        if loaded.newest is None:
            # No migration source: nothing can be planned; the version is the marker (a worker read).
            return [
                ConfigFailed(
                    f"{cfg.name}: migrations: neither path nor package is set",
                    what="cannot load the migrations",
                )
            ]
        return self._request(Task.PLAN, lambda s: p.PlanRequest(s, loaded.target))

    def _check_reloadable(self, new: Config) -> None:
        if Path(new.state_dir).resolve() != Path(self.cfg.state_dir).resolve():
            raise ConfigError(
                f"{new.name}: state_dir: cannot change while running ({self.cfg.state_dir} -> "
                f"{new.state_dir}); restart lssupervisor to move it"
            )
        if new.http.address != self.cfg.http.address:
            log.warning(
                "%s: http.address changed (%r -> %r); the status server keeps %r until lssupervisor restarts",
                new.name,
                self.cfg.http.address,
                new.http.address,
                self.cfg.http.address,
            )

    # -- the cycle's worker ------------------------------------------------------------------------

    def _request(self, task: Task, build: Callable[[p.Settings], p.Request]) -> list[Event]:
        loaded = self.loaded
        assert loaded is not None, "worker request before a successful load"
        return self.jobs.request(task, loaded, build(client.settings(loaded.cfg, loaded.view)))

    def _outcome(self, job: Job, body: p.Progress | p.Result | p.Failure) -> Event | None:
        """A worker's reply for the job in flight as the core's event."""
        if isinstance(body, p.Progress):
            if job.task is not Task.MIGRATE:
                return None
            self.publisher.step_progress(body)
            return progress_event(body)
        if isinstance(body, p.Failure):
            return self._failed(job, body)
        try:
            return self._result(job, body)
        except (KeyError, TypeError, ValueError) as exc:
            return TaskFailed(job.task, ErrorCode.WORKER, f"unexpected {job.task.value} result: {exc!r}")

    def _result(self, job: Job, body: p.Result) -> Event:
        match body:
            case p.PlanResult():
                event = planned_event(body)
                self.markers = dict(event.markers)
                return event
            case p.ImportResult():
                return Imported(duration_s=body.duration_s)
            case p.ReadersResult():
                return self.ls.prove_gone(self.cfg, body)
            case p.MigrateDone():
                self.publisher.refresh_backups(self.cfg)
                self.publisher.migrated(body.duration_s, body.backup_id)
                return Migrated(backup_id=body.backup_id, steps=body.steps, duration_s=body.duration_s)
            case p.MarkersResult():
                markers = tuple((m.lmdb, m.version) for m in body.lmdbs)
                self.markers = dict(markers)
                return MarkersRead(markers)
            case _:
                raise ValueError(f"{type(body).__name__} answers no job of the cycle")

    def _failed(self, job: Job, body: p.Failure) -> Event:
        message = body.message
        if job.task is Task.PLAN and body.code is ErrorCode.TOO_NEW:
            message += "; " + self.publisher.restore_hint(self.cfg)
        if job.task is Task.MIGRATE:
            self.publisher.refresh_backups(self.cfg)  # a failed migration may have taken its backup first
            cancelled = body.code is ErrorCode.CANCELLED
            self.publisher.migration_failed(cancelled, message, self.clock() - job.started, body.backup_id)
        return TaskFailed(job.task, body.code, message, backup_id=body.backup_id, remedy=body.remedy)

    # -- DRAINING ----------------------------------------------------------------------------------

    def _start_drain(self, version: int) -> list[Event]:
        loaded = self.loaded
        assert loaded is not None
        try:
            old = render_for(loaded, version, self.environ)
        except SupervisorError as exc:
            return [TaskFailed(Task.DRAIN, exc.code, str(exc))]
        return self.jobs.start_drain(
            loaded, old, durations.for_go(float(loaded.cfg.lightningstream.drain_timeout))
        )

    # -- RENDERING, spawning -----------------------------------------------------------------------

    def _render(self, version: int) -> Event:
        loaded = self.loaded
        assert loaded is not None
        try:
            prepared = render_for(loaded, version, self.environ)
            # The running LS's own config needs no second opinion; anything else LS checks first.
            running = (
                self.st.child.digest if self.ls.child is not None and self.st.child is not None else None
            )
            if prepared.digest != running:
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

    def _prevalidate(self, version: int) -> None:
        """Render and validate the config for ``version`` early (while LS still runs): RENDERING then
        finds it validated. Only a cache: RENDERING renders again for the version the markers have (I2),
        and a failure here is reported there, where it decides."""
        loaded = self.loaded
        assert loaded is not None
        with contextlib.suppress(SupervisorError):
            self._validate_with_ls(render_for(loaded, version, self.environ))

    def _validate_with_ls(self, prepared: Prepared) -> None:
        """Ask LS itself (``LS -c candidate``, exits 0 or 1 at once) before the swap."""
        if prepared.digest in self.validated:
            return
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
        assert self.jobs.job is None, "LS start while a job of the cycle runs (I1)"
        return self.ls.spawn(prepared)

    # -- reaping, watching -------------------------------------------------------------------------

    def _own_pids(self) -> set[int]:
        return self.ls.own_pids() | self.jobs.own_pids()

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

    def _facts(self) -> Facts:
        c = self.ls.child if self.st.child is not None else None
        return Facts(
            st=self.st,
            cfg=self.cfg,
            loaded=self.loaded,
            prepared=self.prepared,
            markers=self.markers,
            ls_record=c.record() if c is not None else None,
        )

    def status_document(self) -> dict[str, Any]:
        return self.publisher.document(self._facts())

    def _read_previous_record(self) -> child.ChildRecord | None:
        doc = read_state(self.cfg.state_file)
        record = ((doc or {}).get("lightningstream") or {}).get("record")
        if not record:
            return None
        try:
            return child.ChildRecord.from_json(record)
        except ValueError:
            return None

    def _start_http(self) -> None:
        address = self.cfg.http.address
        if not address:
            return
        host, port = parse_address(address, f"{self.cfg.name}: http.address")
        self.publisher.start_http(self.cfg, host, port)
        if self.publisher.http is not None:
            self.publisher.http.attach_fleet(self.fleet, self.fleet.collector())

    # -- leaving -----------------------------------------------------------------------------------

    def _emergency_stop(self) -> None:
        """The loop died (a bug): never leave LS behind (I6), even before pdeathsig would act."""
        with contextlib.suppress(Exception):
            self.jobs.cancel("the main loop failed")
        with contextlib.suppress(Exception):
            self.ls.emergency_stop(float(self.cfg.lightningstream.stop_timeout))

    def _cleanup(self) -> None:
        self.ls.stop_poller(join=True)
        self._stop_watcher()
        self.fleet.close()
        # Jobs die with us anyway (pdeathsig); end and collect them so nothing is left half-done.
        self.jobs.close()
        self.publisher.close()


__all__ = ["Supervisor", "needs_worker", "planned_event"]

"""The reconcile cycle's jobs, run by the daemon: requests to the cycle's worker, the drain LS, hooks.

One worker session serves a whole cycle: it is started at PLANNING, while LS still runs, so that its
Python start and imports are paid before LS goes down; it then plans, imports the migrations, proves LS
gone, backs up and migrates, and reads the markers back. The daemon ends it once the cycle needs no
more LMDB work (or kills it: cancel). One job runs at a time (``Job``); a cancelled one is kept until it
is gone, and its late result is stale unless the core still waits for it (a cancelled migration's
failure is awaited: the core stays in MIGRATING until the worker, and its open transaction, are gone).

Reader threads only ``put_nowait`` a :class:`WorkerReply` on the loop's queue; everything else happens
on the main thread. When a worker exits, processes it left behind (in its process group or session, or
reparented to us as their subreaper) are logged by pid and killed: a migration that double-forks a
sleeper must not keep LS down or hold the daemon's pipes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

from lssupervisor.core.actions import RunHook
from lssupervisor.core.events import DrainFinished, Event, HookFinished, TaskFailed
from lssupervisor.core.states import Task
from lssupervisor.daemon import child
from lssupervisor.daemon.logs import fields
from lssupervisor.daemon.prepare import Loaded, Prepared
from lssupervisor.durations import human as format_duration
from lssupervisor.errors import ErrorCode, SupervisorError
from lssupervisor.fsutil import write_atomic
from lssupervisor.proc import child_env
from lssupervisor.redaction import credential_values, redact_argv
from lssupervisor.worker import protocol as p
from lssupervisor.worker.client import WorkerSession

log = logging.getLogger("lssupervisor.supervisor")

OUTPUT_JOIN_S = 1.0
JOB_WAIT_S = 5.0  # at exit: how long a cancelled job may take to be collected


@dataclass(frozen=True, slots=True)
class WorkerReply:
    """Put on the queue by a worker session's reader thread (enqueue only)."""

    session: int  # the worker's pid: replies of a retired session are told apart
    reply: p.Reply


@dataclass(eq=False)
class Job:
    """The cycle's job in flight: a worker request, the drain LS, or a hook."""

    task: Task
    started: float  # monotonic
    started_wall: float
    session: int | None = None  # worker pid
    request_id: int | None = None
    drain: child.LsChild | None = None
    hook: subprocess.Popen[bytes] | None = None
    hook_phase: str = ""
    hook_index: int = 0
    deadline: float | None = None  # hook time limit, drain backstop (the core times worker jobs)
    cancelled: bool = False
    timed_out: bool = False
    limit: str = ""  # the setting that limits it, for the log line
    limit_s: float = 0.0

    def pids(self) -> list[int]:
        """Pids of processes (drain, hook) whose status our Popen still has to collect."""
        out = []
        if self.drain is not None and self.drain.returncode is None:
            out.append(self.drain.pid)
        if self.hook is not None and self.hook.returncode is None:
            out.append(self.hook.pid)
        return out

    def kill(self) -> None:
        if self.drain is not None:
            self.drain.kill_group()
        if self.hook is not None and self.hook.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.hook.pid, signal.SIGKILL)

    def finished(self) -> bool:
        if self.drain is not None:
            return self.drain.poll() is not None and not self.drain.group_alive()
        if self.hook is not None:
            return self.hook.poll() is not None
        return True


@dataclass
class JobRunner:
    """Runs the cycle's jobs; the Supervisor turns their outcomes into core events."""

    events: queue.SimpleQueue[Any]
    clock: Callable[[], float]
    wall: Callable[[], float]
    environ: Mapping[str, str]
    pass_fds: tuple[int, ...] = ()
    # Every pid the daemon still waits for (LS, jobs, workers): the rest of our children are strays.
    ours: Callable[[], set[int]] = set
    session: WorkerSession | None = None
    job: Job | None = None
    cancelled: list[Job] = field(default_factory=list)
    retired: list[WorkerSession] = field(default_factory=list)  # closed or killed, not yet gone

    # -- worker requests ---------------------------------------------------------------------------

    def request(self, task: Task, loaded: Loaded, request: p.Request) -> list[Event]:
        """Send ``request`` to the cycle's worker (started now if the cycle has none yet)."""
        assert self.job is None, f"second job {task} while {self.job.task if self.job else None} runs"
        session = self.session
        if session is None or session.done:
            try:
                session = self._start_session(loaded)
            except (OSError, SupervisorError, RuntimeError) as exc:
                return [TaskFailed(task, ErrorCode.WORKER, f"cannot start the worker: {exc}")]
        request_id = session.submit(request)
        self.job = Job(task, self.clock(), self.wall(), session=session.pid, request_id=request_id)
        log.debug("worker request", extra=fields(op=p.OP_OF[type(request)].value, pid=session.pid))
        return []

    def _start_session(self, loaded: Loaded) -> WorkerSession:
        events = self.events
        session: WorkerSession | None = None

        def on_reply(reply: p.Reply) -> None:
            assert session is not None
            events.put_nowait(WorkerReply(session.pid, reply))  # reader thread: enqueue only

        session = WorkerSession.start(
            on_reply,
            min_pid=loaded.cfg.lightningstream.min_pid,
            pass_fds=self.pass_fds,
            env=child_env(self.environ),  # only the daemon speaks to systemd
        )
        log.debug("worker started", extra=fields(pid=session.pid))
        self.session = session
        return session

    def end_session(self) -> None:
        """The cycle needs no more LMDB work: the worker exits once idle."""
        if self.session is not None:
            self.session.close()
            self.retired.append(self.session)
            self.session = None

    def on_reply(
        self, item: WorkerReply, waiting: Task | None
    ) -> tuple[Job, p.Progress | p.Result | p.Failure] | None:
        """A reply for the job in flight (or a cancelled job the core still waits for); None when it
        is stale or only a log line."""
        reply = item.reply
        if isinstance(reply.body, p.LogLine):
            level = {"warning": logging.WARNING, "error": logging.ERROR, "debug": logging.DEBUG}
            log.log(level.get(reply.body.level, logging.INFO), "worker: %s", reply.body.msg)
            return None
        job = self.job
        if job is None or job.session != item.session or job.request_id != reply.id:
            job = next(
                (j for j in self.cancelled if j.session == item.session and j.request_id == reply.id), None
            )
            # A cancelled job's final reply is awaited only while nobody else runs and the core still
            # waits for its task (a cancelled migration: the core stays in MIGRATING until then).
            if job is None or not reply.final or self.job is not None or waiting is not job.task:
                return None
        if isinstance(reply.body, p.Progress):
            return (job, reply.body) if not job.cancelled else None
        if self.job is job:
            self.job = None
        with contextlib.suppress(ValueError):
            self.cancelled.remove(job)
        return job, reply.body

    # -- drain and hooks ---------------------------------------------------------------------------

    def start_drain(self, loaded: Loaded, old: Prepared, drain_timeout: str) -> list[Event]:
        """``LS --config OLD --timeout T sync --only-once``: merge peers' last changes, push ours."""
        cfg = loaded.cfg
        ls = cfg.lightningstream
        try:
            target = cfg.rendered_config
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, old.text)  # the OLD version's config (I2 holds: not migrated yet)
            argv = (ls.binary, "--config", str(target), "--timeout", drain_timeout, "sync", "--only-once")
            drain = child.spawn_ls(
                argv, old.env, pdeathsig=ls.pdeathsig, min_pid=ls.min_pid, output=ls.output
            )
        except (SupervisorError, OSError, RuntimeError) as exc:
            return [TaskFailed(Task.DRAIN, ErrorCode.FAILED, str(exc))]
        log.info("drain started", extra=fields(pid=drain.pid, version=old.version, timeout=drain_timeout))
        self.job = Job(
            Task.DRAIN,
            self.clock(),
            self.wall(),
            drain=drain,
            deadline=self.clock() + float(ls.drain_timeout) + float(ls.stop_timeout),
            limit="lightningstream.drain_timeout + stop_timeout",
        )
        return []

    def run_hook(self, loaded: Loaded, action: RunHook) -> list[Event]:
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
        shown = redact_argv(argv, credential_values(env))  # logs never carry a secret
        log.info("hook started", extra=fields(hook=f"{action.phase}_migrate", argv=shown, pid=proc.pid))
        self.job = Job(
            Task.HOOK,
            self.clock(),
            self.wall(),
            hook=proc,
            hook_phase=action.phase,
            hook_index=action.index,
            deadline=self.clock() + float(cfg.hooks.timeout),
            limit=f"hooks.timeout ({format_duration(float(cfg.hooks.timeout))})",
            limit_s=float(cfg.hooks.timeout),
        )
        return []

    def poll(self) -> list[Event]:
        """Drain and hook processes are polled (SIGCHLD wakes us); workers report through the queue.
        Also collects what retired workers left behind."""
        self.cancelled = [j for j in self.cancelled if not (j.session is None and j.finished())]
        self._collect_retired()
        job = self.job
        if job is None or job.session is not None:
            return []
        now = self.clock()
        if job.deadline is not None and now >= job.deadline and not job.timed_out and not job.finished():
            job.timed_out = True
            what = f"{job.hook_phase}_migrate hook {job.hook_index + 1}" if job.hook else job.task.value
            log.warning("%s ran over %s: SIGKILL to its process group", what, job.limit)
            job.kill()
        if job.drain is not None:
            return self._poll_drain(job, job.drain)
        if job.hook is not None:
            return self._poll_hook(job, job.hook)
        return []

    def _poll_drain(self, job: Job, d: child.LsChild) -> list[Event]:
        if d.poll() is None:
            return []
        if d.group_alive():
            d.kill_group()
            return []
        rc = d.returncode
        assert rc is not None
        d.join_output(OUTPUT_JOIN_S)
        self.job = None
        description = child.describe_exit(rc)
        log.info("drain ended", extra=fields(pid=d.pid, status=description))
        return [DrainFinished(rc, description)]

    def _poll_hook(self, job: Job, hook: subprocess.Popen[bytes]) -> list[Event]:
        rc = hook.poll()
        if rc is None:
            return []
        self.job = None
        ok = rc == 0 and not job.timed_out
        message = (
            f"timed out after {format_duration(job.limit_s)}" if job.timed_out else child.describe_exit(rc)
        )
        log.log(
            logging.INFO if ok else logging.ERROR,
            "hook ended",
            extra=fields(hook=f"{job.hook_phase}_migrate", status=message),
        )
        return [HookFinished(job.hook_phase, job.hook_index, ok=ok, message=message)]

    # -- cancelling, collecting --------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """End the job in flight now. A worker job kills the cycle's worker (SIGKILL to its group: LMDB
        aborts the open write transaction); its failure still arrives, and is stale unless awaited."""
        job = self.job
        if job is None:
            return
        log.warning("cancelling %s", job.task.value, extra=fields(reason=reason))
        job.cancelled = True
        if job.session is not None and self.session is not None and self.session.pid == job.session:
            self.session.cancel(reason)
            self.retired.append(self.session)
            self.session = None
        job.kill()
        self.job = None
        self.cancelled.append(job)

    @property
    def runs_process(self) -> bool:
        """A drain or hook runs (polled, not reported through the queue)."""
        return self.job is not None and self.job.session is None

    def own_pids(self) -> set[int]:
        pids: set[int] = set()
        for session in [self.session, *self.retired]:
            if session is not None and not session.done:
                pids.add(session.pid)
        for job in [self.job, *self.cancelled]:
            if job is not None:
                pids.update(job.pids())
        return pids

    def _collect_retired(self) -> None:
        for session in [s for s in self.retired if s.done]:
            self.retired.remove(session)
            kill_strays(session.pid, self.ours())

    def close(self) -> None:
        """At exit: end every job and worker and collect them, so nothing is left half-done (they die
        with us anyway: pdeathsig)."""
        self.cancel("lssupervisor exits")
        self.end_session()
        for session in self.retired:
            if not session.wait(JOB_WAIT_S):
                session.cancel("lssupervisor exits")
                session.wait(JOB_WAIT_S)
            kill_strays(session.pid, self.ours())
        self.retired.clear()
        for job in self.cancelled:
            with contextlib.suppress(Exception):
                if job.drain is not None:
                    job.drain.wait(JOB_WAIT_S)
                elif job.hook is not None:
                    job.hook.wait(JOB_WAIT_S)
        self.cancelled.clear()


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # pid (comm) state ppid pgrp session ...: comm may hold spaces and parentheses.
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None


def kill_strays(worker_pid: int, ours: Collection[int]) -> list[int]:
    """Kill what a finished worker left running: processes in its session (it was the session leader),
    and our children that are none of ``ours`` (reparented to us, their subreaper, after escaping into
    a session of their own). Logged by pid: a migration must not leave processes that outlive it."""
    me = os.getpid()
    strays: list[tuple[int, str]] = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        pid = proc.info["pid"]
        if pid in (me, worker_pid) or pid in ours or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if _session_of(pid) == worker_pid or proc.info["ppid"] == me:
            strays.append((pid, " ".join(proc.info["cmdline"] or [])[:120]))
    for pid, cmd in strays:
        log.warning("killing a process the worker left behind", extra=fields(pid=pid, cmdline=cmd))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return [pid for pid, _ in strays]

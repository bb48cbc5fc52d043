"""The parent side of the worker protocol (:mod:`lssupervisor.worker.protocol`): start a worker
session, submit typed requests, receive typed replies. Imports no ``lmdb``: the daemon uses it.

:class:`WorkerSession` is what the daemon keeps for a reconcile cycle; :func:`run` and :func:`call` are
the blocking one-request forms the offline CLI and the tests use.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lssupervisor import trust
from lssupervisor.config import Config
from lssupervisor.errors import ErrorCode, ExitCode, MigrationError, WorkerError, error_for
from lssupervisor.fsutil import explain_sigbus
from lssupervisor.lsmodel import LsView
from lssupervisor.worker import protocol as p
from lssupervisor.worker.wire import WireError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 200
# How often a reader whose pipe is still held open (by a stray grandchild of the worker) checks
# whether the worker itself has exited: the cycle never waits on a pipe held by a stray.
EXIT_CHECK_S = 0.1

OnReply = Callable[[p.Reply], None]
R = TypeVar("R")


def settings(cfg: Config, view: LsView, *, backup_enabled: bool | None = None) -> p.Settings:
    """The request settings from our config and the LS view (the daemon and the CLI both use it)."""
    source = cfg.migrations.path if cfg.migrations.path is not None else cfg.migrations.package
    return p.Settings(
        ls=view,
        marker_dbi=cfg.schema.marker_dbi,
        migrations=str(source) if source is not None else None,
        baseline=cfg.schema.baseline,
        backup=p.BackupSettings(
            enabled=cfg.backup.enabled if backup_enabled is None else backup_enabled,
            dir=str(cfg.backup_dir),
            keep=cfg.backup.keep,
        ),
        history=str(cfg.history_file),
        grow_map=cfg.migrations.grow_map,
        timeout=float(cfg.migrations.timeout) if cfg.migrations.timeout is not None else None,
        log_level=cfg.log.level,
        trusted_gid=trust.Policy.for_config(cfg).trusted_gid,
    )


def written_paths(request: p.Request) -> list[str]:
    """Where a request may write: its LMDBs and the backup directory."""
    settings = request.settings
    out = [spec.path for spec in settings.ls.lmdbs]
    if settings.backup.dir:
        out.append(settings.backup.dir)
    return out


class WorkerSession:
    """One worker process serving requests in order.

    ``on_reply`` is called for every reply, in order, from one reader thread. Each submitted request
    gets exactly one final reply (result or failure); when the worker dies, the requests it had not
    answered get a synthesised :class:`~lssupervisor.worker.protocol.Failure` (``cancelled`` after
    :meth:`cancel`, else ``worker`` with its last stderr line), delivered only once the process has
    exited, so "final reply seen" means "no LMDB transaction of that request is open any more".
    """

    def __init__(self, proc: subprocess.Popen[bytes], on_reply: OnReply) -> None:
        self._proc = proc
        self._on_reply = on_reply
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[int, p.Op] = collections.OrderedDict()
        self._next_id = 0
        self._cancel_reason: str | None = None
        self._closed = False
        self._done = threading.Event()
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._paths: set[str] = set()  # where the requests write (a SIGBUS is explained by a full one)
        self.returncode: int | None = None
        self._reader = threading.Thread(
            target=self._read, name=f"lssupervisor-worker-{proc.pid}", daemon=True
        )

    @classmethod
    def start(
        cls,
        on_reply: OnReply,
        *,
        min_pid: int = 0,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> WorkerSession:
        """Start a worker. ``min_pid``: raise the next PID above it first (``lightningstream.min_pid``).
        ``pass_fds``: descriptors the worker inherits (the state-dir lock's fd, so the lock outlives us
        until the worker is gone too). The worker dies with the thread that starts it
        (``PR_SET_PDEATHSIG``): start workers from a long-lived thread (the daemon's main thread)."""
        if min_pid > 1:
            from lssupervisor.proc import raise_pid_floor

            raise_pid_floor(min_pid)
        child_env = dict(os.environ if env is None else env)
        child_env[p.PARENT_ENV] = str(os.getpid())
        # The worker must import this very package, even from a source checkout that is not installed.
        root = str(Path(__file__).resolve().parent.parent.parent)
        old = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = root + (os.pathsep + old if old else "")
        proc = subprocess.Popen(
            [sys.executable, "-m", p.WORKER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Own session: a terminal's Ctrl-C reaches the parent only, which decides; cancel() kills
            # the whole group (a tool started by m.run included).
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            env=child_env,
        )
        session = cls(proc, on_reply)
        session._reader.start()
        return session

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def done(self) -> bool:
        """The worker exited and every reply (synthesised ones included) was delivered."""
        return self._done.is_set()

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    def submit(self, request: p.Request) -> int:
        """Send ``request``; returns its id (replies carry it). A dead worker answers with a failure."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._pending[request_id] = p.OP_OF[type(request)]
            self._paths.update(written_paths(request))
            dead = self._closed or self._done.is_set()
        if dead:
            self._fail_pending_soon(request_id)
            return request_id
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(p.encode_request(request_id, request))
            stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the worker died; its reader synthesises the failure once it is reaped
        return request_id

    def close(self) -> None:
        """No more requests: the worker exits once it has answered the ones it has."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()

    def cancel(self, reason: str = "cancelled") -> None:
        """SIGKILL the worker's process group now. LMDB aborts the open write transaction: the step in
        progress leaves nothing behind. The final replies still arrive."""
        self._cancel_reason = self._cancel_reason or reason
        self.close()
        if self._proc.returncode is not None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def terminate(self) -> None:
        """Ask the worker to cancel the request in flight (SIGTERM): it stops at the next cancellation
        check and answers ``cancelled``. Use :meth:`cancel` when it must stop now."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the worker exited and every reply was delivered (then the reader is joined)."""
        if not self._done.wait(timeout):
            return False
        self._reader.join()
        return True

    def stderr_tail(self) -> str:
        return "".join(self._stderr_tail)

    # -- the reader thread --------------------------------------------------------------------------

    def _deliver(self, reply: p.Reply) -> None:
        try:
            self._on_reply(reply)
        except Exception:  # a failing callback must not lose the final replies
            log.exception("worker reply callback failed")

    def _current(self) -> tuple[int, p.Op] | None:
        with self._lock:
            return next(iter(self._pending.items()), None)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            return
        try:
            reply = p.decode_reply(line)
        except WireError as exc:
            current = self._current()
            if current is None:
                log.warning("worker %d wrote a line outside any request: %s", self.pid, line[:200])
                return
            reply = p.Reply(current[0], current[1], p.LogLine("warning", "worker", f"protocol: {exc}"))
        if reply.final:
            with self._lock:
                if self._pending.pop(reply.id, None) is None:
                    log.warning("worker %d answered request %d twice (ignored)", self.pid, reply.id)
                    return
        self._deliver(reply)

    def _read(self) -> None:
        out, err = self._proc.stdout, self._proc.stderr
        assert out is not None and err is not None
        buffers = {out.fileno(): b"", err.fileno(): b""}
        open_fds = set(buffers)
        while open_fds:
            ready, _, _ = select.select(list(open_fds), [], [], EXIT_CHECK_S)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                    continue
                data = buffers[fd] + chunk
                *lines, buffers[fd] = data.split(b"\n")
                for raw in lines:
                    if fd == out.fileno():
                        self._line(raw)
                    else:
                        self._stderr_tail.append(raw.decode("utf-8", errors="replace") + "\n")
            if not ready and self._proc.poll() is not None:
                # The worker is gone but a stray descendant still holds a pipe: do not wait for it.
                break
        for fd, rest in buffers.items():
            if rest and fd == out.fileno():
                self._line(rest)
        self.returncode = self._proc.wait()
        out.close()
        err.close()
        self._fail_pending(self.returncode)
        self._done.set()

    def _fail_pending(self, returncode: int) -> None:
        with self._lock:
            pending = list(self._pending.items())
            self._pending.clear()
        for request_id, op in pending:
            self._deliver(p.Reply(request_id, op, self._death(returncode)))

    def _fail_pending_soon(self, request_id: int) -> None:
        if self._done.is_set():
            with self._lock:
                op = self._pending.pop(request_id, None)
            if op is not None:
                self._deliver(p.Reply(request_id, op, self._death(self.returncode or 0)))

    def _death(self, returncode: int) -> p.Failure:
        if returncode < 0:
            try:
                how = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode} before answering"
        message = f"worker {how}"
        if returncode == -signal.SIGBUS and (full := explain_sigbus(sorted(self._paths))) is not None:
            message = f"{full} (worker {how})"
        tail = [line.strip() for line in self._stderr_tail if line.strip()]
        if self._cancel_reason is not None:
            message += f" ({self._cancel_reason}); the open LMDB transaction was aborted"
            return p.Failure(
                ErrorCode.CANCELLED, message, int(ExitCode.MIGRATION), stderr="\n".join(tail[-20:])
            )
        if tail:
            message += f"; last stderr line: {tail[-1][:300]}"
        return p.Failure(ErrorCode.WORKER, message, int(ExitCode.SOFTWARE), stderr="\n".join(tail[-20:]))


# ---------------------------------------------------------------------------------------------------
# blocking forms


def run(
    requests: Sequence[p.Request],
    on_reply: OnReply | None = None,
    timeout: float | None = None,
    *,
    min_pid: int = 0,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> list[p.Result | p.Failure]:
    """Run ``requests`` in one worker, in order, and return each final reply's body. The worker is
    killed after ``timeout`` seconds (the rest answer ``cancelled``). Later requests still run after
    a failed one: stop early by checking the replies in ``on_reply`` and cancelling, or use
    :func:`call` per request."""
    finals: dict[int, p.Result | p.Failure] = {}

    def collect(reply: p.Reply) -> None:
        if reply.final:
            finals[reply.id] = reply.body  # type: ignore[assignment]
        if on_reply is not None:
            on_reply(reply)

    session = WorkerSession.start(collect, min_pid=min_pid, pass_fds=pass_fds, env=env)
    try:
        ids = [session.submit(r) for r in requests]
        session.close()
        if not session.wait(timeout):
            session.cancel(f"timed out after {timeout:g}s")
            session.wait()
    except BaseException:
        session.cancel("interrupted")
        session.wait()
        raise
    return [finals[i] for i in ids]


class Conversation:
    """A session used one request at a time (the offline CLI): :meth:`ask` sends a request and waits
    for its answer, so the next request can depend on it (check the readers, then migrate)."""

    def __init__(self, on_reply: OnReply | None = None, **start: Any) -> None:
        self._on_reply = on_reply
        self._finals: dict[int, p.Result | p.Failure] = {}
        self._cond = threading.Condition()
        self.session = WorkerSession.start(self._collect, **start)

    def _collect(self, reply: p.Reply) -> None:
        if self._on_reply is not None:
            self._on_reply(reply)
        if reply.final:
            with self._cond:
                self._finals[reply.id] = reply.body  # type: ignore[assignment]
                self._cond.notify_all()

    def ask(self, request: p.Request, expected: type[R], timeout: float | None = None) -> R:
        """``request``'s result; its failure raised as a SupervisorError. After ``timeout`` seconds
        the worker is killed (the request answers ``cancelled``)."""
        request_id = self.session.submit(request)
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._finals, timeout):
                self.session.cancel(f"timed out after {timeout:g}s")
                self._cond.wait_for(lambda: request_id in self._finals)
            body = self._finals.pop(request_id)
        return unwrap(body, expected)

    def close(self) -> None:
        self.session.close()
        self.session.wait()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.session.cancel("interrupted")
        self.close()


def unwrap(body: p.Result | p.Failure, expected: type[R]) -> R:
    """A result of type ``expected``; a failure becomes its SupervisorError."""
    if isinstance(body, p.Failure):
        raise error_for(body.code, body.message, remedy=body.remedy, exit_code=body.exit_code)
    if not isinstance(body, expected):
        raise WorkerError(f"worker answered {type(body).__name__}, expected {expected.__name__}")
    return body


def call(
    request: p.Request,
    expected: type[R],
    on_reply: OnReply | None = None,
    timeout: float | None = None,
    **start: Any,
) -> R:
    """One request in its own worker; its result, or its failure raised as a SupervisorError."""
    with Conversation(on_reply, **start) as conversation:
        return conversation.ask(request, expected, timeout)


def read_schema_version(cfg: Config, view: LsView) -> int | None:
    """The schema version the LMDBs have for our instance (a ``markers`` worker run).

    None when no LMDB is marked. MigrationError when the LMDBs disagree (a partial multi-LMDB
    migration): LS cannot run one prefix over two schema versions.
    """
    result = call(p.MarkersRequest(settings(cfg, view)), p.MarkersResult, min_pid=cfg.lightningstream.min_pid)
    versions = result.versions()
    known = {v for v in versions.values() if v is not None}
    if not known:
        return None
    if len(known) > 1 or None in versions.values():
        shown = ", ".join(f"{name}={v}" for name, v in sorted(versions.items()))
        raise MigrationError(
            f"the LMDBs of instance {view.instance!r} are at different schema versions ({shown}); "
            "run lssupervisor migrate to bring them to one version"
        )
    return known.pop()


__all__ = [
    "Conversation",
    "WorkerSession",
    "call",
    "read_schema_version",
    "run",
    "settings",
    "unwrap",
]

"""The worker process's main loop: requests from stdin, one at a time, replies on a private fd.

``python -m lssupervisor.worker`` (see :mod:`lssupervisor.worker.protocol`). Everything heavy
(``lmdb``, the migrator) is imported before the first request is read, so a session the daemon starts
while LS still runs has paid its start-up cost before LS goes down.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import traceback

from lssupervisor.errors import ErrorCode, ExitCode, SupervisorError
from lssupervisor.worker import ops
from lssupervisor.worker import protocol as p

_PR_SET_PDEATHSIG = 1


class _Channel:
    """Replies on the private protocol fd; one writer at a time (logging may come from threads)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self.request_id = 0
        self.op = p.Op.PLAN

    def send(self, body: p.Progress | p.LogLine | p.Result | p.Failure) -> None:
        data = p.encode_reply(self.request_id, self.op, body)
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]


class _LogHandler(logging.Handler):
    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._channel.send(p.LogLine(record.levelname.lower(), record.name, record.getMessage()))
        except Exception:
            self.handleError(record)


def _die_with_parent() -> None:
    """SIGKILL us when the parent dies (a worker must never outlive the lock holder that started it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get(p.PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(int(ExitCode.SOFTWARE))  # the parent died before prctl took effect


def _failure(exc: BaseException) -> p.Failure:
    if isinstance(exc, SupervisorError):
        return p.Failure(
            code=exc.code,
            message=exc.message,
            exit_code=int(exc.exit_code),
            remedy=exc.remedy,
            backup_id=getattr(exc, "backup_id", None),
        )
    traceback.print_exc(file=sys.stderr)
    return p.Failure(
        code=ErrorCode.INTERNAL,
        message=f"internal error in the worker: {type(exc).__name__}: {exc} (a bug; see stderr)",
        exit_code=int(ExitCode.SOFTWARE),
    )


def main() -> None:
    """Serve requests until stdin ends; exit status: that of the last failed request, else 0."""
    proto_fd = os.dup(1)  # non-inheritable: tools a migration starts never get the protocol
    os.dup2(2, 1)  # print() in a migration goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    channel = _Channel(proto_fd)
    _die_with_parent()
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    root = logging.getLogger()
    root.handlers[:] = [_LogHandler(channel)]
    session = ops.Session(channel.send, cancel)
    code = int(ExitCode.OK)
    for raw in sys.stdin.buffer:
        if not raw.strip():
            continue
        try:
            request_id, request = p.decode_request(raw)
        except SupervisorError as exc:
            # Cannot tell which request this was: say so on stderr and stop (a bug in the parent).
            print(f"lssupervisor worker: {exc}", file=sys.stderr)
            code = int(ExitCode.SOFTWARE)
            break
        channel.request_id, channel.op = request_id, p.OP_OF[type(request)]
        root.setLevel(request.settings.log_level.upper())
        cancel.clear()
        try:
            channel.send(session.serve(request))
        except BaseException as exc:
            failure = _failure(exc)
            code = failure.exit_code
            channel.send(failure)
    sys.stderr.flush()
    # No atexit, no waiting for stray threads a migration may have left: the replies are out.
    os._exit(code)

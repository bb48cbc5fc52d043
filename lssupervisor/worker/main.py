"""The worker process's main: one request on stdin, JSON lines on a private fd, then exit."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lssupervisor.errors import (
    ExitCode,
    SupervisorError,
    WorkerError,
)

if TYPE_CHECKING:
    pass

from lssupervisor.worker.ops import run_op

Message = dict[str, Any]
OnMessage = Callable[[Message], None]

WORKER_MODULE = "lssupervisor.worker"
OVERLAP_ENV = "LSSUPERVISOR_TEST_OVERLAP_LOCK"
PARENT_ENV = "LSSUPERVISOR_WORKER_PARENT"
STDERR_TAIL_LINES = 200
OPS = ("markers", "readers", "plan", "migrate", "dry_run", "stamp", "backup", "backups", "rollback", "fleet")
_PR_SET_PDEATHSIG = 1
_PROGRESS_INTERVAL_S = 0.1


# ===================================================================================================
# Worker side


class _Protocol:
    """JSON lines on the private protocol fd; one writer at a time (logging may come from threads)."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def send(self, msg: Message) -> None:
        line = json.dumps(msg, separators=(",", ":"), default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


class _ProtocolLogHandler(logging.Handler):
    def __init__(self, send: Callable[[Message], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(
                {
                    "type": "log",
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "msg": record.getMessage(),
                }
            )
        except Exception:
            self.handleError(record)


def _die_with_parent() -> None:
    """SIGKILL us when the parent dies (a worker must never outlive the lock holder that started it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(int(ExitCode.SOFTWARE))  # the parent died before prctl took effect


def main() -> None:
    """``python -m lssupervisor.worker``: one request on stdin, JSON lines on stdout, then exit."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # print() in a migration goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    proto = _Protocol(proto_fd)
    _die_with_parent()
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    code = int(ExitCode.OK)
    try:
        try:
            request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
        except ValueError as exc:
            raise WorkerError(f"worker request is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise WorkerError("worker request must be a JSON object")
        handler = _ProtocolLogHandler(proto.send)
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(str(request.get("log_level") or "info").upper())
        result = run_op(request, proto.send, cancel)
        proto.send({"type": "result", "ok": True, "op": request.get("op"), **result})
    except SupervisorError as exc:
        code = int(exc.exit_code)
        proto.send({"type": "error", "error": type(exc).__name__, "message": str(exc), "exit_code": code})
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        code = int(ExitCode.SOFTWARE)
        proto.send(
            {
                "type": "error",
                "error": type(exc).__name__,
                "message": f"internal error in the worker: {type(exc).__name__}: {exc} (a bug; see stderr)",
                "exit_code": code,
            }
        )
    sys.stderr.flush()
    # No atexit, no waiting for stray threads a migration may have left: the result is out.
    os._exit(code)



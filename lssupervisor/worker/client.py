"""The worker process: every LMDB operation runs here, never in the daemon.

Theory of operation
-------------------
The daemon (and the offline CLI) start ``python -m lssupervisor.worker`` in its own session, write ONE
JSON request on its stdin and close it, then read JSON lines from its stdout. Why a process: LMDB's
lock table is keyed by PID (a PID-1 daemon in a container must not open the LMDB), a crash or a leak
stays in the worker, and a hung or cancelled migration is ended by SIGKILL, which makes LMDB abort
the open write transaction (invariant I3 holds at any kill point). One process opens each
environment once.

Messages (worker -> parent, one JSON object per line)::

    {"type": "progress", "phase": "backup"|"migrate"|"step_committed"|"dry_run", "lmdb": ..., ...}
    {"type": "log", "level": "info", "logger": "...", "msg": "..."}
    {"type": "result", "ok": true, "op": "...", ...op fields...}                     (exactly one,
    {"type": "error", "error": "MapFull", "message": "...", "exit_code": 65}          last)

Migrate progress carries ``lmdb``, ``step`` (migration name), ``from``, ``to``, ``done``, ``total``,
``percent`` (this step) and ``index``/``steps`` (position in the plan). The worker's real stdout is
kept private for the protocol; fd 1 is pointed at stderr so that a ``print()`` in a migration cannot
corrupt the protocol. stderr is free text, captured by the parent for crash diagnostics.

Request (parent -> worker), built by :func:`build_request`::

    op            markers | readers | plan | migrate | dry_run | stamp | backup | backups | rollback
                  | fleet
    ls            LsView JSON (instance, lmdbs, storage ...)
    marker_dbi    DBI of the markers (schema.marker_dbi)
    migrations    directory or package of migration files
    target        int | null (null: newest)          baseline   int | null
    backup        {"enabled": bool, "dir": str, "keep": int}
    history       path of history.jsonl
    grow_map      bool        timeout    seconds | null (the worker cancels itself after it)
    dry_run       bool (op migrate + dry_run = op dry_run)
    version, lmdb (stamp)     backup_id (rollback; null: newest)
    log_level     debug | info | warning | error

Results per op (besides ``type``/``ok``/``op``):

- markers:  ``lmdbs``: [{lmdb, path, exists, version, marker, has_user_data, empty, last_txnid,
  map_size, used_bytes}]
- readers:  ``lmdbs``: [{lmdb, exists, open_by_pid, readers: [{pid, thread, txnid, alive, name,
  cmdline}]}] (the worker's own pid is left out; ``open_by_pid`` is a process holding LMDB's
  lock-file lock, i.e. having the environment open, when the kernel names one)
- plan:     ``target``, ``newest``, ``lmdbs`` [{lmdb, current, action}], ``steps`` [...]
- migrate:  ``target``, ``backup_id``, ``lmdbs`` [migrator.MigrateResult JSON], ``steps``,
  ``duration_s``
- dry_run:  ``target``, ``lmdbs`` [{lmdb, steps, keys, bytes, duration_s, live_last_txnid_before,
  live_last_txnid_after, live_file_before, live_file_after}], ``duration_s`` (the live files are
  compared by size, mtime and inode, plus the LMDB's last txn id)
- stamp:    ``lmdbs`` [{lmdb, from, to}]
- backup:   ``backup`` (manifest JSON), ``duration_s``, ``bytes_per_s``
- backups:  ``backups`` [manifest JSON]
- rollback: ``backup_id``, ``schema_version``, ``lmdbs`` [{lmdb, restored, from, to}],
  ``pre_rollback_backup``
- fleet:    ``lmdbs`` [{lmdb, markers: [...]}]

Test knob: with ``LSSUPERVISOR_TEST_OVERLAP_LOCK=/path/record.jsonl`` every LMDB write (migration
steps, stamp, restore) happens while holding ``flock(LOCK_EX|LOCK_NB)`` on ``/path/record.jsonl.lock``
and is bracketed by ``write_txn_begin``/``write_txn_end`` lines in the record; the Lightning Stream
stand-in holds ``LOCK_SH`` on that file for its whole life, so failing to get the lock (recorded as
``overlap``, and the op fails) proves LS ran during a write.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lssupervisor.errors import (
    ExitCode,
    MigrationError,
    SupervisorError,
    UsageError,
    WorkerError,
)
from lssupervisor.lsmodel import LsView

if TYPE_CHECKING:
    from lssupervisor.config import Config

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
# Parent side


def build_request(
    op: str,
    cfg: Config,
    view: LsView,
    *,
    target: int | None = None,
    dry_run: bool = False,
    backup_enabled: bool | None = None,
    **extra: Any,
) -> Message:
    """The request for ``op`` from our config and the LS view (the daemon and the CLI both use it).

    ``target`` None means the newest migration; resolve ``schema.target``/``target_file`` before.
    ``extra`` adds op fields (``version``/``lmdb`` for stamp, ``backup_id`` for rollback).
    """
    if op not in OPS:
        raise UsageError(f"unknown worker op {op!r} (known: {', '.join(OPS)})")
    source = cfg.migrations.path if cfg.migrations.path is not None else cfg.migrations.package
    request: Message = {
        "op": op,
        "ls": view.to_json(),
        "marker_dbi": cfg.schema.marker_dbi,
        "migrations": str(source) if source is not None else None,
        "target": target,
        "baseline": cfg.schema.baseline,
        "backup": {
            "enabled": cfg.backup.enabled if backup_enabled is None else backup_enabled,
            "dir": str(cfg.backup_dir),
            "keep": cfg.backup.keep,
        },
        "history": str(cfg.history_file),
        "grow_map": cfg.migrations.grow_map,
        "timeout": cfg.migrations.timeout,
        "dry_run": dry_run,
        "log_level": cfg.log.level,
    }
    request.update(extra)
    return request


class WorkerRun:
    """One running worker. Create with :meth:`start`.

    ``on_message`` is called for every message, in order, from a reader thread (never concurrently);
    the last call is always the final ``result``/``error`` message, delivered only after the worker
    process has exited (so "final message seen" means "no LMDB is open in the worker any more"). If the
    worker dies without a final message, one is synthesised (``"worker killed by SIGKILL"``).
    Call :meth:`wait` after the final message (it returns at once then) to join the reader threads.
    """

    def __init__(self, proc: subprocess.Popen[bytes], on_message: OnMessage, op: str) -> None:
        self._proc = proc
        self._on_message = on_message
        self.op = op
        self._deliver_lock = threading.Lock()
        self._done = threading.Event()
        self._final: Message | None = None
        self._cancel_reason: str | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name=f"lssupervisor-worker-{proc.pid}-stderr", daemon=True
        )
        self._stdout_thread = threading.Thread(
            target=self._read_stdout, name=f"lssupervisor-worker-{proc.pid}-stdout", daemon=True
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    def start(
        cls,
        request: Mapping[str, Any],
        on_message: OnMessage,
        *,
        min_pid: int = 0,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> WorkerRun:
        """Start a worker for ``request``.

        ``min_pid``: raise the next PID above it first (``lightningstream.min_pid``). ``pass_fds``: file
        descriptors the worker inherits; pass the state-dir lock's fd so the lock outlives the parent
        until the worker is gone too. The worker dies with the thread that starts it
        (``PR_SET_PDEATHSIG``): start workers from a long-lived thread (the daemon's main thread).
        """
        op = str(request.get("op"))
        if min_pid > 1:
            from lssupervisor.proc import raise_pid_floor

            raise_pid_floor(min_pid)
        child_env = dict(os.environ if env is None else env)
        child_env[PARENT_ENV] = str(os.getpid())
        # The worker must import this very package, even from a source checkout that is not installed.
        root = str(Path(__file__).resolve().parent.parent)
        old = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = root + (os.pathsep + old if old else "")
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE],
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
        run = cls(proc, on_message, op)
        run._stderr_thread.start()
        run._stdout_thread.start()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(dict(request)).encode("utf-8"))
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass  # the worker died at once; the synthesised final message says how
        return run

    # -- control --------------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled") -> None:
        """SIGKILL the worker (and its process group). LMDB aborts the open write transaction: the
        step in progress leaves nothing behind. The final message still arrives."""
        if self._proc.returncode is not None:
            return
        self._cancel_reason = self._cancel_reason or reason
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def terminate(self) -> None:
        """Ask the worker to cancel itself (SIGTERM): the migration stops at its next cancellation
        check and reports MigrationCancelled. Use :meth:`cancel` when it must stop now."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> Message | None:
        """The final message, or None when ``timeout`` passed first."""
        if not self._done.wait(timeout):
            return None
        self._stdout_thread.join()
        self._stderr_thread.join(timeout=1.0)
        return self._final

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def final(self) -> Message | None:
        return self._final

    def stderr_tail(self) -> str:
        return "".join(self._stderr_tail)

    # -- reader threads -----------------------------------------------------------------------

    def _deliver(self, msg: Message) -> None:
        with self._deliver_lock:
            try:
                self._on_message(msg)
            except Exception:  # a failing callback must not lose the final message
                logging.getLogger(__name__).exception("worker message callback failed")

    def _read_stderr(self) -> None:
        stream = self._proc.stderr
        assert stream is not None
        for raw in stream:
            self._stderr_tail.append(raw.decode("utf-8", errors="replace"))
        stream.close()

    def _read_stdout(self) -> None:
        stream = self._proc.stdout
        assert stream is not None
        final: Message | None = None
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict) or "type" not in msg:
                    raise ValueError("not a message object")
            except ValueError:
                msg = {
                    "type": "log",
                    "level": "warning",
                    "logger": "worker",
                    "msg": f"worker wrote a non-protocol line: {line[:200]}",
                }
            if msg["type"] in ("result", "error"):
                if final is None:
                    final = msg
                    continue
                msg = {
                    "type": "log",
                    "level": "warning",
                    "logger": "worker",
                    "msg": f"worker sent a second final message (ignored): {line[:200]}",
                }
            self._deliver(msg)
        stream.close()
        returncode = self._proc.wait()
        # stderr reaches EOF when the worker exits, unless a grandchild still holds it.
        self._stderr_thread.join(timeout=2.0)
        if final is None:
            final = self._synthesise(returncode)
        final["returncode"] = returncode
        self._final = final
        self._deliver(final)
        self._done.set()

    def _synthesise(self, returncode: int) -> Message:
        if returncode < 0:
            try:
                how = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"killed by signal {-returncode}"
        else:
            how = f"exited with status {returncode} without a result"
        message = f"worker {how}"
        tail = [line.strip() for line in self._stderr_tail if line.strip()]
        if self._cancel_reason is not None:
            message += f" ({self._cancel_reason}); the open LMDB transaction was aborted"
            error, code = "MigrationCancelled", ExitCode.MIGRATION
        else:
            error, code = "WorkerError", ExitCode.SOFTWARE
            if tail:
                message += f"; last stderr line: {tail[-1][:300]}"
        return {
            "type": "error",
            "error": error,
            "message": message,
            "exit_code": int(code),
            "stderr": "\n".join(tail[-20:]),
        }


def run_worker(
    request: Mapping[str, Any],
    on_message: OnMessage | None = None,
    timeout: float | None = None,
    *,
    min_pid: int = 0,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> Message:
    """Run a worker to the end and return its final message (blocking; for the CLI and tests).
    After ``timeout`` seconds the worker is killed and a MigrationCancelled error returned."""
    run = WorkerRun.start(request, on_message or _ignore, min_pid=min_pid, pass_fds=pass_fds, env=env)
    try:
        final = run.wait(timeout)
        if final is None:
            run.cancel(f"timed out after {timeout:g}s")
            final = run.wait()
    except BaseException:
        run.cancel("interrupted")
        run.wait()
        raise
    assert final is not None
    return final


def describe_progress(msg: Mapping[str, Any]) -> str | None:
    """One human line for a progress message (CLI stderr, the daemon's status and logs)."""
    phase = msg.get("phase")
    if phase == "backup":
        if msg.get("event") == "start":
            return f"backup: copying {', '.join(msg.get('lmdbs', []))}"
        done = f"{msg.get('done')}/{msg.get('total')}"
        return f"backup: {msg.get('lmdb')} done ({done}, {msg.get('bytes')} bytes)"
    if phase in ("migrate", "dry_run"):
        return (
            f"{phase}: {msg.get('lmdb')} {msg.get('from')} -> {msg.get('to')} {msg.get('step') or ''} "
            f"{msg.get('percent')}% ({msg.get('done')}/{msg.get('total')}) "
            f"[step {int(msg.get('index', 0)) + 1}/{msg.get('steps')}]"
        )
    if phase == "step_committed":
        return (
            f"committed: {msg.get('lmdb')} {msg.get('from')} -> {msg.get('to')} {msg.get('step') or ''} "
            f"in {msg.get('duration_s')}s [{msg.get('index')}/{msg.get('steps')}]"
        )
    return None


def _ignore(msg: Message) -> None:
    pass


def _error_classes() -> dict[str, type[SupervisorError]]:
    from lssupervisor import errors

    found: dict[str, type[SupervisorError]] = {}
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, SupervisorError):
            found[name] = obj
    return found


def raise_for_error(final: Message) -> Message:
    """Return a result message; turn an error message into the matching SupervisorError."""
    if final.get("type") == "result":
        return final
    name = str(final.get("error", "WorkerError"))
    message = str(final.get("message", "worker failed"))
    cls = _error_classes().get(name)
    if cls is None:
        exc: SupervisorError = WorkerError(message)
    else:
        exc = cls(message)
    code = final.get("exit_code")
    if isinstance(code, int) and code != int(exc.exit_code):
        with contextlib.suppress(ValueError):
            exc.exit_code = ExitCode(code)
    raise exc


def read_schema_version(cfg: Config, view: LsView) -> int | None:
    """The schema version the LMDBs have for our instance (a ``markers`` worker run).

    None when no LMDB is marked. MigrationError when the LMDBs disagree (a partial multi-LMDB
    migration): LS cannot run one prefix over two schema versions.
    """
    request = build_request("markers", cfg, view)
    final = raise_for_error(run_worker(request, min_pid=cfg.lightningstream.min_pid))
    versions: dict[str, int | None] = {entry["lmdb"]: entry["version"] for entry in final["lmdbs"]}
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



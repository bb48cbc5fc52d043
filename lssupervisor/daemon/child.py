"""Start, watch and stop the Lightning Stream child process; find and end LS orphans.

Theory of operation
-------------------
LS has no signal handler (SIGTERM kills it at once) and its ``--minimum-pid`` mode re-execs itself as
a child without forwarding signals. So every LS we start gets its own session (``setsid``: pgid ==
sid == its pid) and we always signal the whole process group; "LS is gone" means no live, non-zombie
process is left in that group/session.

To keep I6 (no LS outlives the supervisor, even after ``kill -9`` of the supervisor) LS is started
through ``setpriv --pdeathsig KILL --`` (util-linux) as an exec wrapper: setpriv sets the parent-death
signal and execs LS in the same process, so the PID is LS's. We cannot use ``preexec_fn`` for this
(it is unsafe in a process with threads). Caveats, by the kernel's rules:

* the parent-death signal fires when the spawning THREAD exits, not the process: spawn from the
  main thread, which lives as long as the daemon;
* it is not inherited across fork: a re-exec'd grandchild (``--minimum-pid``) is not covered; the
  orphan sweep at the next start is the backstop (and our config refuses ``--minimum-pid``);
* if the supervisor dies between fork and setpriv's prctl, nothing fires: again the sweep covers it.

The blocking :func:`stop_ls` is for the CLI and tests. The daemon performs the same steps
(``terminate_group`` -> deadline -> ``kill_group`` -> wait for ``group_alive()`` to be False)
through its state machine, without blocking its loop.

Processes are identified by PID plus psutil ``create_time`` (PIDs are reused) or by a command line
naming our rendered LS config after ``-c``/``--config``. Nothing else is ever signalled.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, assert_never

import psutil

from lssupervisor.config import OutputMode
from lssupervisor.errors import ConfigError, LightningStreamRunning
from lssupervisor.proc import raise_pid_floor
from lssupervisor.redaction import redact_argv

log = logging.getLogger(__name__)

# A single LS log line longer than this is split: bounds the reader's memory on garbage output.
MAX_LINE_BYTES = 64 * 1024
# psutil derives create_time from boot time + start ticks; the same process always gives the same
# value, so a small tolerance only absorbs float rounding.
CREATE_TIME_TOLERANCE_S = 0.05
POLL_INTERVAL_S = 0.02


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class ChildRecord:
    """What the daemon persists about the running LS (in state.json) to find it after a crash."""

    pid: int
    create_time: float
    pgid: int

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "create_time": self.create_time, "pgid": self.pgid}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChildRecord:
        """Parse what :meth:`to_json` wrote; ValueError on anything else."""
        try:
            pid, create_time, pgid = data["pid"], data["create_time"], data["pgid"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"child record: expected pid, create_time and pgid, got {data!r}") from exc
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
            raise ValueError(f"child record: pid must be a positive integer, got {pid!r}")
        if not (isinstance(pgid, int) and not isinstance(pgid, bool) and pgid > 0):
            raise ValueError(f"child record: pgid must be a positive integer, got {pgid!r}")
        if not (isinstance(create_time, int | float) and not isinstance(create_time, bool)):
            raise ValueError(f"child record: create_time must be a number, got {create_time!r}")
        return cls(pid=pid, create_time=float(create_time), pgid=pgid)


@dataclass(frozen=True, slots=True)
class StopResult:
    """Outcome of :func:`stop_ls`."""

    returncode: int  # Popen convention: -15 = SIGTERM, -9 = SIGKILL
    killed: bool  # SIGKILL had to be sent to the group (the stop timeout expired)
    elapsed: float  # seconds from SIGTERM until the whole group was gone

    @property
    def description(self) -> str:
        return describe_exit(self.returncode)


def describe_exit(returncode: int) -> str:
    """Say how a child ended, from a Popen returncode (negative = signal number)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    verb = "killed" if signum == signal.SIGKILL else "terminated"
    return f"{verb} by {name}"


# --------------------------------------------------------------------------------------------
# Process-table helpers (Linux /proc through psutil and os)


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is gone, merely unreaped)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def _group_members(pgid: int) -> list[int]:
    """Live, non-zombie pids whose process group or session is ``pgid``."""
    members: list[int] = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid and os.getsid(pid) != pgid:
                continue
        except OSError:  # gone meanwhile
            continue
        if _pid_alive(pid):
            members.append(pid)
    return members


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it no longer exists."""
    if pgid <= 1 or pgid == os.getpgrp():
        # Never signal our own group (or "every process"): that would stop the supervisor itself.
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


# --------------------------------------------------------------------------------------------
# The child


class LsChild:
    """A running (or finished) LS process started by :func:`spawn_ls`, leader of its own session."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str], reader: threading.Thread | None):
        self._popen = popen
        self.argv: tuple[str, ...] = tuple(argv)
        self.pid: int = popen.pid
        # setsid() in the child made it leader of a new session and process group.
        self.pgid: int = popen.pid
        self.started_at: float = time.monotonic()
        try:
            self.create_time: float = psutil.Process(popen.pid).create_time()
        except psutil.Error:
            # Not yet reaped, so /proc/<pid> exists even if it already died; this is a safety net.
            self.create_time = time.time()
        self._reader = reader

    def __repr__(self) -> str:
        return f"LsChild(pid={self.pid}, returncode={self._popen.returncode})"

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        """Reap the leader if it exited (non-blocking). Only this pid; never ``waitpid(-1)``."""
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the leader exits (tests, CLI). Raises subprocess.TimeoutExpired."""
        return self._popen.wait(timeout)

    def record(self) -> ChildRecord:
        return ChildRecord(pid=self.pid, create_time=self.create_time, pgid=self.pgid)

    def group_pids(self) -> list[int]:
        """Live, non-zombie processes in LS's process group or session (the leader included)."""
        return _group_members(self.pgid)

    def group_alive(self) -> bool:
        """True while any process of LS's group lives: the leader or an orphaned re-exec child."""
        return bool(self.group_pids())

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the whole group; False if the group is already gone (ESRCH ignored)."""
        if self._popen.returncode is not None and not self.group_alive():
            # Leader reaped and group empty: its PID may be reused; signalling could hit a stranger.
            return False
        return _killpg(self.pgid, sig)

    def terminate_group(self) -> bool:
        return self.signal_group(signal.SIGTERM)

    def kill_group(self) -> bool:
        return self.signal_group(signal.SIGKILL)

    def join_output(self, timeout: float | None = None) -> bool:
        """Wait for the PREFIX reader thread to finish (it ends when every writer closed the pipe,
        grandchildren included). True when no reader thread is left."""
        if self._reader is None:
            return True
        self._reader.join(timeout)
        return not self._reader.is_alive()


def _read_lines(pipe: IO[bytes], on_line: Callable[[str], None], pid: int) -> None:
    try:
        while True:
            raw = pipe.readline(MAX_LINE_BYTES)
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            try:
                on_line(line)
            except Exception:  # a bad callback must not stop draining: LS would block on a full pipe
                log.exception("lightningstream output callback failed (pid=%d)", pid)
    except (OSError, ValueError) as exc:
        log.warning("reading lightningstream output failed (pid=%d): %s", pid, exc)
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


_LS_LOG = logging.getLogger("lssupervisor.lightningstream")


def log_ls_line(line: str) -> None:
    """How one LS output line is logged with ``output: prefix`` (the default ``on_line``; a custom
    ``on_line`` that also logs calls this, so every LS line looks the same in our log)."""
    _LS_LOG.info("lightningstream: %s", line)


@functools.cache
def setpriv_path() -> str | None:
    """Where setpriv lives, or None (warned once per process: LS then will not die with us)."""
    path = shutil.which("setpriv")
    if path is None:
        log.warning(
            "setpriv (util-linux) not found in PATH: LS is started without a parent-death signal and "
            "would outlive a SIGKILLed supervisor until the orphan sweep at the next start"
        )
    return path


def _resolve_binary(binary: str, env: Mapping[str, str]) -> str:
    if os.sep in binary:
        ok = os.path.isfile(binary) and os.access(binary, os.X_OK)
        resolved: str | None = binary if ok else None
    else:
        resolved = shutil.which(binary, path=env.get("PATH", os.defpath))
    if resolved is None:
        raise ConfigError(
            f"lightningstream.binary: {binary!r} not found or not executable; "
            f"install Lightning Stream or set lightningstream.binary to its full path"
        )
    return resolved


def spawn_ls(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    pdeathsig: bool = True,
    min_pid: int = 0,
    output: OutputMode = OutputMode.INHERIT,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> LsChild:
    """Start LS as the leader of a new session and return its handle.

    ``argv`` is the full LS command (``[binary, "--config", rendered, *args]``), never run through a
    shell; ``env`` is its whole environment. MUST be called from the main thread: the parent-death
    signal (``pdeathsig``, via ``setpriv --pdeathsig KILL --``) fires when the spawning *thread* dies.
    Without setpriv in PATH a warning is logged once and LS starts without it.

    ``min_pid`` > 0 first raises the next PID above it (see :mod:`lssupervisor.proc`).
    ``output``: INHERIT lets LS write to our stderr (its stdout goes there too, keeping our stdout
    clean); PREFIX pipes stdout+stderr into a daemon reader thread that calls ``on_line`` for each line
    (default: log ``lightningstream: <line>``); see :meth:`LsChild.join_output`.

    Raises ConfigError when the binary is missing or not executable, RuntimeError when called with
    ``pdeathsig`` from another thread or when the PID floor cannot be reached.
    """
    if not argv:
        raise ValueError("spawn_ls: empty argv")
    if pdeathsig and threading.current_thread() is not threading.main_thread():
        # The kernel would SIGKILL LS when THIS thread exits: a random LS death later. A bug, so loud.
        raise RuntimeError("spawn_ls with pdeathsig must be called from the main thread")
    binary = _resolve_binary(argv[0], env)
    full = [binary, *argv[1:]]
    if pdeathsig:
        wrapper = setpriv_path()
        if wrapper is not None:
            full = [wrapper, "--pdeathsig", "KILL", "--", *full]
    if min_pid > 0:
        raise_pid_floor(min_pid)

    stdout: int | None
    stderr: int | None
    match output:
        case OutputMode.INHERIT:
            stdout, stderr = 2, None
        case OutputMode.PREFIX:
            stdout, stderr = subprocess.PIPE, subprocess.STDOUT
        case _:
            assert_never(output)
    try:
        popen = subprocess.Popen(
            full,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            close_fds=True,
            start_new_session=True,
            shell=False,
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise ConfigError(
            f"lightningstream.binary: cannot execute {binary!r} ({exc.strerror}); "
            f"check lightningstream.binary and its permissions"
        ) from exc

    reader: threading.Thread | None = None
    if output is OutputMode.PREFIX:
        assert popen.stdout is not None
        reader = threading.Thread(
            target=_read_lines,
            args=(popen.stdout, on_line or log_ls_line, popen.pid),
            name=f"ls-output-{popen.pid}",
            daemon=True,
        )
        reader.start()
    child = LsChild(popen, full, reader)
    log.info("lightningstream started pid=%d argv=%s", child.pid, " ".join(redact_argv(full)))
    return child


# --------------------------------------------------------------------------------------------
# Stopping


def _wait_group_gone(child: LsChild, deadline: float, clock: Callable[[], float]) -> bool:
    while True:
        if child.poll() is None:
            # The leader lives: block in waitpid for it (cheaper than scanning /proc).
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.0, min(POLL_INTERVAL_S, deadline - clock())))
        if child.poll() is not None and not child.group_alive():
            return True
        if clock() >= deadline:
            return False
        if child.poll() is not None:
            time.sleep(POLL_INTERVAL_S)  # leader reaped, orphans remain: poll the group


def stop_ls(
    child: LsChild, timeout: float, *, kill_timeout: float = 5.0, clock: Callable[[], float] = time.monotonic
) -> StopResult:
    """Stop LS and its whole group, blocking: SIGTERM to the group, wait ``timeout``, SIGKILL to the
    group, then wait up to ``kill_timeout`` until no group member is left.

    For the CLI and tests only; the daemon does the same steps without blocking. Raises
    LightningStreamRunning if members survive SIGKILL (a process stuck in the kernel).
    """
    start = clock()
    child.terminate_group()
    killed = False
    if not _wait_group_gone(child, start + timeout, clock):
        killed = True
        log.warning(
            "lightningstream pid=%d did not stop within %.1fs of SIGTERM; sending SIGKILL to group %d",
            child.pid,
            timeout,
            child.pgid,
        )
        child.kill_group()
        if not _wait_group_gone(child, clock() + kill_timeout, clock):
            raise LightningStreamRunning(
                f"lightningstream pid={child.pid}: group {child.pgid} still has {child.group_pids()} "
                f"{kill_timeout:.0f}s after SIGKILL; inspect them before starting anything on the LMDB"
            )
    rc = child.poll()
    assert rc is not None
    elapsed = clock() - start
    log.info("lightningstream pid=%d stopped: %s in %.3fs", child.pid, describe_exit(rc), elapsed)
    return StopResult(returncode=rc, killed=killed, elapsed=elapsed)


# --------------------------------------------------------------------------------------------
# Orphans from an earlier run


def config_from_cmdline(cmdline: Sequence[str]) -> list[str]:
    """Every value given to ``-c``/``--config`` in an LS-like command line (pflag syntax:
    ``--config X``, ``--config=X``, ``-c X``, ``-cX``, ``-c=X``)."""
    found: list[str] = []
    args = list(cmdline)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if arg in ("-c", "--config"):
            if i + 1 < len(args):
                found.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            found.append(arg[len("--config=") :])
        elif arg.startswith("-c=") and len(arg) > 3:
            found.append(arg[3:])
        elif arg.startswith("-c") and not arg.startswith("--") and len(arg) > 2:
            found.append(arg[2:])
        i += 1
    return found


def _config_targets(rendered_config: Path) -> set[str]:
    p = os.path.abspath(rendered_config)
    return {os.path.normpath(p), os.path.realpath(p)}


def _cmdline_names_config(proc: psutil.Process, cmdline: Sequence[str], targets: set[str]) -> bool:
    # The exec wrapper's own argv ("setpriv ... -- ls --config X") stops at "--"; look after it too.
    values = config_from_cmdline(cmdline)
    if "--" in cmdline:
        values += config_from_cmdline(cmdline[cmdline.index("--") + 1 :])
    for value in values:
        path = value
        if not os.path.isabs(path):
            try:
                path = os.path.join(proc.cwd(), path)
            except psutil.Error:
                continue  # cannot resolve a relative path safely: do not claim the process
        if os.path.normpath(path) in targets or os.path.realpath(path) in targets:
            return True
    return False


def _record_process(record: ChildRecord) -> psutil.Process | None:
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > CREATE_TIME_TOLERANCE_S:
            return None  # the PID was reused by another process
    except psutil.Error:
        return None
    return proc if _alive(proc) else None


def _config_matches(rendered_config: Path, exclude: set[int]) -> list[psutil.Process]:
    targets = _config_targets(rendered_config)
    matches: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in exclude:
            continue
        cmdline = proc.info.get("cmdline") or []
        if cmdline and _cmdline_names_config(proc, cmdline, targets) and _alive(proc):
            matches.append(proc)
    return matches


def _own_pids() -> set[int]:
    me = psutil.Process()
    pids = {me.pid}
    with contextlib.suppress(psutil.Error):
        pids.update(p.pid for p in me.children(recursive=True))
    return pids


def find_orphans(rendered_config: Path, record: ChildRecord | None) -> list[psutil.Process]:
    """LS processes from an earlier run: the recorded pid when its create_time matches, and any
    process whose command line names ``rendered_config`` after ``-c``/``--config``. Excludes
    ourselves and our own descendants (our live LS is not an orphan)."""
    own = _own_pids()
    found: dict[int, psutil.Process] = {}
    if record is not None:
        proc = _record_process(record)
        if proc is not None and proc.pid not in own:
            found[proc.pid] = proc
    for proc in _config_matches(rendered_config, own):
        found.setdefault(proc.pid, proc)
    return sorted(found.values(), key=lambda p: p.pid)


def _signal_orphan(proc: psutil.Process, sig: int) -> None:
    """Signal the orphan's group when it leads its own group (as every LS we start does), else only
    the process: a group led by someone else may hold processes that are not LS."""
    try:
        pgid = os.getpgid(proc.pid)
    except OSError:
        return
    with contextlib.suppress(ProcessLookupError, psutil.Error):
        if pgid == proc.pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            proc.send_signal(sig)


def _wait_gone(pids: Iterable[int], deadline: float, clock: Callable[[], float]) -> list[int]:
    """Wait until none of ``pids`` is alive or the deadline passes; return those still alive."""
    while True:
        left = [pid for pid in pids if _pid_alive(pid)]
        if not left or clock() >= deadline:
            return left
        time.sleep(POLL_INTERVAL_S)  # not our children: nothing to block on, so poll /proc


def sweep_orphans(
    rendered_config: Path,
    record: ChildRecord | None,
    timeout: float = 5.0,
    *,
    kill_timeout: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[int]:
    """End LS orphans from an earlier run (see :func:`find_orphans`): SIGTERM to their groups, wait up
    to ``timeout``, SIGKILL what is left, wait up to ``kill_timeout``. Returns the pids that ended
    (group members included); logs one line per orphan. Survivors are logged; call
    :func:`prove_gone` before touching the LMDB."""
    orphans = find_orphans(rendered_config, record)
    if not orphans:
        return []
    targets: set[int] = set()
    for proc in orphans:
        try:
            pgid = os.getpgid(proc.pid)
            cmd = " ".join(proc.cmdline())
        except (OSError, psutil.Error):
            continue
        members = set(_group_members(pgid)) if pgid == proc.pid and pgid != os.getpgrp() else set()
        targets |= members | {proc.pid}
        log.warning(
            "orphaned lightningstream pid=%d pgid=%d from an earlier run (%s): sending SIGTERM",
            proc.pid,
            pgid,
            cmd[:200],
        )
        _signal_orphan(proc, signal.SIGTERM)
    left = _wait_gone(targets, clock() + timeout, clock)
    if left:
        log.warning(
            "orphaned lightningstream pids %s ignored SIGTERM for %.1fs: sending SIGKILL", left, timeout
        )
        for pid in left:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if pid in {o.pid for o in orphans}:
                    _signal_orphan(proc, signal.SIGKILL)
                else:
                    proc.send_signal(signal.SIGKILL)  # a member of an orphan's group
        left = _wait_gone(left, clock() + kill_timeout, clock)
        if left:
            log.error("orphaned lightningstream pids %s survived SIGKILL", left)
    return sorted(targets - set(left))


def prove_gone(
    child_or_record: LsChild | ChildRecord | None,
    rendered_config: Path,
    *,
    extra_pids: Iterable[int] = (),
) -> list[int]:
    """Pids of LS processes that still live: members of the child's group, any process naming
    ``rendered_config`` after ``-c``/``--config`` (our own children included), and those of
    ``extra_pids`` (e.g. LS pids found among the LMDB readers) that are alive. Empty = proven gone."""
    remaining: set[int] = set()
    match child_or_record:
        case LsChild() as child:
            remaining.update(child.group_pids())
        case ChildRecord() as record:
            # A live process holding pid == pgid that is not the recorded LS means the pid (and with it
            # the group id) was reused by a stranger: its group is not ours to report.
            stranger_leads = (
                record.pgid == record.pid and _pid_alive(record.pid) and _record_process(record) is None
            )
            if not stranger_leads:
                remaining.update(_group_members(record.pgid))
        case None:
            pass
        case _:
            assert_never(child_or_record)
    remaining.update(p.pid for p in _config_matches(rendered_config, {os.getpid()}))
    remaining.update(pid for pid in extra_pids if _pid_alive(pid))
    remaining.discard(os.getpid())
    return sorted(remaining)

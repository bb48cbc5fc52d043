"""``reload``, ``reconcile``, ``pause``, ``resume``: talk to the running daemon through signals.

The daemon is found through its state-dir lock (:func:`lssupervisor.daemon.lock.holder`): the lock file
names the pid, and the kernel says whether the lock is still held, so a stale pid from a dead daemon is
never signalled. ``reload`` sends SIGHUP, ``reconcile`` SIGUSR1.

``pause`` writes the persisted flag ``<state_dir>/paused`` first (so it also holds across daemon
restarts and when no daemon runs), then sends SIGUSR1: the daemon re-reads the flag on every
HUP/USR1, stops LS in order and reports PAUSED. ``resume`` removes the flag and sends SIGUSR1 (which
also leaves PARKED: an operator acted). Both wait, with a deadline, until state.json shows the result.
A ``pause`` the daemon does not confirm in time exits ``UNCONFIRMED`` (69): the request stands (the
flag is written), only its outcome is unknown, which is neither a bug (1) nor "not running" (3).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from lssupervisor.config import Config, load_config
from lssupervisor.daemon import lock
from lssupervisor.daemon.statefile import read_state
from lssupervisor.errors import NotConfirmed, NotRunning, SupervisorError
from lssupervisor.fsutil import ensure_private_dir

WAIT_EXTRA_S = 5.0  # beyond stop_timeout, how long pause/resume wait for the daemon's answer
POLL_S = 0.05


def daemon_pid(cfg: Config) -> int:
    """The pid of the daemon holding the state-dir lock. NotRunning when none does."""
    held = lock.holder(cfg)
    if held is None or held.pid is None:
        raise NotRunning(
            f"no lssupervisor daemon runs for state dir {cfg.state_dir} (lock {cfg.lock_path} not held); "
            f"start it with `lssupervisor run -c {cfg.source or 'FILE'}`"
        )
    if held.purpose != "daemon":
        raise NotRunning(
            f"state dir {cfg.state_dir} is held by pid {held.pid} running `{held.purpose}`, not the "
            "daemon; wait for it to finish"
        )
    return held.pid


def _signal(cfg: Config, sig: signal.Signals) -> int:
    pid = daemon_pid(cfg)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise NotRunning(f"lssupervisor pid {pid} exited just now; nothing to signal") from None
    except PermissionError:
        raise SupervisorError(
            f"not allowed to signal lssupervisor pid {pid}; run this as the daemon's user (or root)"
        ) from None
    return pid


def _wait_state(
    cfg: Config, done: Callable[[dict[str, Any]], bool], after: str, timeout: float
) -> dict[str, Any] | None:
    """Poll state.json until ``done(doc)`` for a document written after ``after`` (ISO time)."""
    deadline = time.monotonic() + timeout
    while True:
        doc = read_state(cfg.state_file)
        if doc is not None and str(doc.get("updated_at", "")) >= after and done(doc):
            return doc
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def _now_iso() -> str:
    # Same shape as the daemon's updated_at, one millisecond early to absorb rounding.
    wall = time.time() - 0.001
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def cmd_reload(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    pid = _signal(cfg, signal.SIGHUP)
    print(f"sent SIGHUP to lssupervisor pid {pid} (reload config and reconcile)")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    pid = _signal(cfg, signal.SIGUSR1)
    print(f"sent SIGUSR1 to lssupervisor pid {pid} (reconcile)")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    path = cfg.paused_file
    ensure_private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"paused by `lssupervisor pause` (pid {os.getpid()}) at {_now_iso()}\n")
    os.replace(tmp, path)
    try:
        started = _now_iso()
        pid = _signal(cfg, signal.SIGUSR1)
    except NotRunning:
        print(f"paused: {path} written; LS will stay stopped when lssupervisor starts")
        return 0
    timeout = float(cfg.lightningstream.stop_timeout) + WAIT_EXTRA_S
    doc = _wait_state(cfg, lambda d: d.get("state") == "PAUSED", started, timeout)
    if doc is None:
        # Not a bug (exit 1 said so): the request is delivered and persisted; the daemon may still be
        # stopping LS or finishing a migration step. Say what we know and where to look.
        last = read_state(cfg.state_file) or {}
        now = f"{last.get('state')}" + (f" ({last['reason']})" if last.get("reason") else "")
        raise NotConfirmed(
            f"lssupervisor pid {pid} did not report PAUSED within {timeout:g}s (stop_timeout + "
            f"{WAIT_EXTRA_S:g}s; state.json says {now if last else 'nothing'}); the pause flag {path} "
            "is written, so LS stays down once the daemon acts on it (it may be stopping LS or finishing "
            "a migration step): check `lssupervisor status`"
        )
    print(f"paused: LS stopped (lssupervisor pid {pid})")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with contextlib.suppress(FileNotFoundError):
        cfg.paused_file.unlink()
    try:
        started = _now_iso()
        pid = _signal(cfg, signal.SIGUSR1)
    except NotRunning:
        print("resumed: pause flag removed; LS will start when lssupervisor starts")
        return 0
    timeout = float(cfg.lightningstream.stop_timeout) + WAIT_EXTRA_S
    doc = _wait_state(
        cfg, lambda d: d.get("state") not in ("PAUSED", "RECONCILING", "STOPPING"), started, timeout
    )
    if doc is None:
        print(f"resumed: signal sent to lssupervisor pid {pid}; see `lssupervisor status`")
        return 0
    reason = f" ({doc['reason']})" if doc.get("reason") else ""
    print(f"resumed: lssupervisor pid {pid} is {doc.get('state')}{reason}")
    return 0

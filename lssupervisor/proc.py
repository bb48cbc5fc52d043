"""What every plane that starts a process shares: the environment children get, and the PID floor.

Children (LS, workers, hooks) get :func:`child_env`: systemd's notification and socket-activation
variables removed, so that only the daemon speaks to systemd.

Raise the next PID the kernel hands out above a floor, without re-exec.

Why: LMDB's reader table and lock owners are keyed by PID. When LS (or a worker) shares an LMDB with a
process in another PID namespace (a sidecar container next to an application that is PID 1 in its
own), equal PIDs corrupt or hang the locking. LS's ``--minimum-pid N`` fixes that by re-executing
itself as a child until its PID is >= N, but that parent forwards no signals and orphans the real LS on
stop. We do the same step in the supervisor instead, just before spawning: the spawned process then
gets a PID >= the floor directly.

Two ways, best first:

1. Write ``min_pid - 1`` to ``/proc/sys/kernel/ns_last_pid``. Needs CAP_SYS_ADMIN over our PID
   namespace (root in a container usually has it for its own namespace). Instant.
2. Otherwise spawn short-lived ``true`` processes until ``ns_last_pid`` (readable by anyone) reaches
   the floor. Each spawn consumes one PID; cost is about 0.3-1 ms per PID, so raising the floor by
   30,000 costs several seconds, once (later spawns are already above the floor unless PIDs wrap).
   ``os.posix_spawn`` (vfork-like in glibc) is used because the daemon has threads: a full
   ``fork()`` of a threaded Python is only safe if the child does nothing but ``_exit``, which is
   the fallback when no ``true`` binary exists.

The floor holds only for the NEXT PID and only if nothing else in the namespace spawns in between; the
daemon spawns from its main thread right after calling this.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from lssupervisor.errors import ConfigError

log = logging.getLogger(__name__)

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
PID_MAX = Path("/proc/sys/kernel/pid_max")


# Variables systemd hands to the service that must not reach our children: LS is not the main process
# and must neither notify nor believe it was socket-activated.
CHILD_ENV_STRIPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
CHILD_ENV_STRIPPED_PREFIXES = ("LISTEN_",)  # LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` without NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID and LISTEN_*."""
    return {
        k: v
        for k, v in env.items()
        if k not in CHILD_ENV_STRIPPED and not k.startswith(CHILD_ENV_STRIPPED_PREFIXES)
    }


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _next_pid_ok(last: int, min_pid: int, pid_max: int) -> bool:
    # The next PID is last + 1 unless it would reach pid_max, where the allocator wraps to a low PID.
    return min_pid - 1 <= last < pid_max - 1


def _true_path() -> str | None:
    for candidate in ("/bin/true", "/usr/bin/true"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("true")


def _read_last_pid() -> int | None:
    """The last PID handed out in our namespace, or None when the kernel lacks ns_last_pid
    (built without CONFIG_CHECKPOINT_RESTORE)."""
    try:
        return _read_int(NS_LAST_PID)
    except (OSError, ValueError):
        return None


def _burn_one_pid(true_path: str | None) -> int:
    """Create and reap one short-lived process, consuming one PID; return that PID."""
    if true_path is not None:
        pid = os.posix_spawn(true_path, [true_path], {})
    else:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: touch nothing (threads, locks), leave at once
            os._exit(0)
    os.waitpid(pid, 0)  # this exact pid only; never waitpid(-1), it would steal Popen's statuses
    return pid


def raise_pid_floor(min_pid: int, *, write_ns_last_pid: bool = True, max_spawns: int | None = None) -> None:
    """Make the next PID handed out in our PID namespace >= ``min_pid``.

    ``min_pid <= 1`` does nothing. Raises ConfigError when ``min_pid`` is not below the kernel's
    ``pid_max`` (the floor can never be met), and RuntimeError when spawning did not get there
    within ``max_spawns`` spawns (default: ``pid_max`` + 1000, a full PID cycle).
    ``write_ns_last_pid=False`` forces the spawn method (tests).
    """
    if min_pid <= 1:
        return
    pid_max = _read_int(PID_MAX)
    if min_pid >= pid_max:
        raise ConfigError(
            f"lightningstream.min_pid: {min_pid} is not below kernel.pid_max {pid_max}; "
            f"lower min_pid or raise /proc/sys/kernel/pid_max"
        )
    true_path = _true_path()
    spawned = 0
    last = _read_last_pid()
    if last is None:
        last = _burn_one_pid(true_path)  # no ns_last_pid: learn the counter from a spawned pid
        spawned = 1
    if _next_pid_ok(last, min_pid, pid_max):
        return
    if write_ns_last_pid:
        try:
            # Writing is only allowed with CAP_SYS_ADMIN over this PID namespace (and a writable
            # /proc/sys); the kernel starts the next search at the written value + 1.
            with NS_LAST_PID.open("w") as f:
                f.write(str(min_pid - 1))
            written = _read_last_pid()
            if written is not None and _next_pid_ok(written, min_pid, pid_max):
                log.info("pid floor raised to %d via %s", min_pid, NS_LAST_PID)
                return
        except OSError as exc:
            log.info("cannot write %s (%s); raising the pid floor by spawning", NS_LAST_PID, exc)
    limit = max_spawns if max_spawns is not None else pid_max + 1000
    start_last = last
    while not _next_pid_ok(last, min_pid, pid_max):
        if spawned >= limit:
            raise RuntimeError(
                f"lightningstream.min_pid: could not raise the next pid to {min_pid} after {spawned} "
                f"spawns (last pid {last}, pid_max {pid_max}); is something else spawning fast?"
            )
        burned = _burn_one_pid(true_path)
        spawned += 1
        # Prefer the kernel's counter: other processes may take pids between our spawns.
        read = _read_last_pid()
        last = burned if read is None else read
    log.info("pid floor raised to %d by spawning %d processes (from pid %d)", min_pid, spawned, start_last)


def describe_pid(pid: int) -> dict[str, Any]:
    try:
        proc = psutil.Process(pid)
        return {
            "alive": proc.status() != psutil.STATUS_ZOMBIE,
            "name": proc.name(),
            "cmdline": proc.cmdline(),
        }
    except psutil.NoSuchProcess:
        return {"alive": False, "name": "", "cmdline": []}
    except psutil.Error:
        return {"alive": True, "name": "", "cmdline": []}

"""PID-1 and subreaper duties: reap exited processes that are not ours, never steal a Popen's status.

Theory of operation
-------------------
In a container lssupervisor is usually the entrypoint, i.e. PID 1 of its PID namespace. The kernel then
makes it the parent of every orphan in the namespace: LS's re-exec'd child when the LS leader dies
(``--minimum-pid``), a process a hook or an ``m.run`` tool double-forked, what a ``docker exec``/
``kubectl exec`` shell left running in the background. When such a process exits it stays a zombie
until its parent (we) collects it; zombies hold a PID and count against the pod's ``pids.max``, and
enough of them make every later ``fork`` fail (LS could not be restarted). Outside a container the
same applies after :meth:`Reaper.become_subreaper` for the orphans of our own subtree.

The daemon's own children (the LS leader, workers, drain and hook processes) are ``subprocess.Popen``
objects that collect their own status. Reaping one of those here would be a silent lie:
``Popen.wait()`` then gets ECHILD, which CPython turns into ``returncode == 0`` -- a crashed LS or a
SIGKILLed worker would look like a clean exit. Hence never ``waitpid(-1)``, and the rule of
:meth:`Reaper.reap`:

1. Peek with ``waitid(P_ALL, 0, WEXITED | WNOHANG | WNOWAIT)``: "is any child a zombie?", without
   collecting it. ``None`` (the usual answer) costs one system call and ends the call.
2. A peeked pid that is not in ``own_pids()`` is a stranger: collect exactly that pid with
   ``waitpid(pid, WNOHANG)`` and peek again.
3. A peeked pid that IS ours stops the peeking: ``WNOWAIT`` leaves it in place, so every further peek
   would return the same child (the kernel walks its children list in order, and ours may come first)
   and strangers behind it would stay hidden until the owner polls. Instead the process table is
   scanned once (``/proc/<pid>/stat``: state ``Z`` and our pid as parent; the per-task ``children``
   files need ``CONFIG_PROC_CHILDREN``, which many kernels, this one included, lack) and every zombie
   child that is not ours is collected by pid. This path is rare: the main loop polls its own LS
   ``Popen`` before it calls :meth:`reap`, so only a worker whose reader thread has not yet collected
   it can be in the way.

``own_pids()`` is called afresh for every candidate, never cached, and everything runs in the main
loop's thread, the thread that spawns every child of the daemon. Between ``fork`` in ``Popen()`` and
the moment the daemon records the new ``Popen``, :meth:`reap` cannot run, so a freshly spawned child
that exits at once is never mistaken for a stranger. (A child spawned from ANOTHER thread could be: a
``subprocess.run`` in a helper thread would race with :meth:`reap`. Spawn children from the main loop
thread only; LS and workers must be spawned there anyway for their parent-death signal.)

Signals when we are PID 1
-------------------------
The kernel protects a namespace's init: a signal for which PID 1 has no handler is dropped, whatever
its default action, and from inside the namespace even SIGKILL and SIGSTOP are dropped. From the parent
namespace (``docker kill``, ``kill`` on the host, the container runtime) SIGKILL and SIGSTOP still
apply. The daemon installs handlers for SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 and SIGCHLD
(:mod:`lssupervisor.daemon.signals`), so those work as usual -- but only once the main loop runs: a SIGTERM
that arrives while Python starts, the config loads or the locks are taken is silently ignored, and the
runtime SIGKILLs after its grace period. ``docker stop`` sends SIGTERM (the image's ``STOPSIGNAL``)
and SIGKILL after ``-t`` seconds (10 by default); Kubernetes does the same after
``terminationGracePeriodSeconds``. When PID 1 exits, the kernel SIGKILLs every other process of the
namespace: LS cannot outlive us there, but it gets no SIGTERM either -- the daemon stops LS itself
before it exits.

Should the daemon become a subreaper?
-------------------------------------
Yes, once at start, before it spawns anything (``PR_SET_CHILD_SUBREAPER`` is per process, kept across
``execve``, not inherited by children). Then orphans of our subtree come back to us instead of going
to whatever PID 1 is: LS's re-exec'd child after its leader died, a daemonised grandchild of a hook.
That matters when PID 1 reaps badly (``sh -c 'lssupervisor run ...'`` without ``exec`` is the classic
case: dash never waits for adopted children) and costs nothing where PID 1 is a good init (systemd,
tini, the pod's pause container). It changes no other behaviour: our LS group handling already kills
re-exec'd LS children by process group, and the orphan sweep already treats our descendants as ours.
The duty that comes with it: :meth:`Reaper.reap` must run in the main loop (every wake-up; SIGCHLD
wakes the loop), or our adopted zombies pile up. :meth:`become_subreaper` only fails on non-Linux
systems or kernels older than 3.4; the daemon then logs a warning and goes on.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable, Collection

from lssupervisor.daemon.logs import fields

log = logging.getLogger(__name__)

# <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

# A bound on one call, so a fork bomb of orphans cannot starve the main loop; the rest is collected
# at the next wake-up (each exit sends SIGCHLD, and the loop ticks at least once a second anyway).
MAX_REAPS_PER_CALL = 256

OwnPids = Callable[[], Collection[int]]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: ctypes.c_ulong | ctypes.c_void_p) -> int:
    """Call prctl(2); raise OSError with the errno on failure."""
    libc = _libc()
    # prctl is variadic with unsigned long arguments: pass full-width values, not C ints.
    zero = ctypes.c_ulong(0)
    rc = int(libc.prctl(ctypes.c_int(option), arg, zero, zero, zero))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def is_subreaper() -> bool:
    """Whether this process currently is a child subreaper (False where prctl is unavailable)."""
    value = ctypes.c_int(0)
    try:
        _prctl(PR_GET_CHILD_SUBREAPER, ctypes.cast(ctypes.pointer(value), ctypes.c_void_p))
    except (OSError, AttributeError):
        return False
    return value.value != 0


def describe_status(status: int) -> str:
    """A raw wait status as a person reads it ("exited with status 3", "killed by SIGKILL")."""
    from lssupervisor.daemon.child import describe_exit

    return describe_exit(os.waitstatus_to_exitcode(status))


def _zombie_children(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` and whose state is zombie, read from /proc/<pid>/stat.

    The parent field of a thread's child is the process (thread group) id, so children forked or
    adopted by any of our threads are found.
    """
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # gone meanwhile, or not readable
            continue
        # "pid (comm) S ppid ...": comm may hold spaces and parentheses, so split after the LAST ')'.
        rest = raw[raw.rfind(b")") + 2 :].split(b" ", 2)
        if len(rest) >= 2 and rest[0] == b"Z" and rest[1] == str(parent).encode():
            found.append(int(name))
    return found


class Reaper:
    """Collects exited strangers (orphans adopted as PID 1 or subreaper); never one of ``own_pids()``.

    ``own_pids`` returns the pid of every ``Popen`` the daemon holds whose status that ``Popen`` has
    not collected yet (the LS leader, running workers, drain/hook processes). When in doubt include a
    pid: one included too many only delays reaping a stranger that reused it; one missing lets
    :meth:`reap` take the status from its ``Popen`` (which then reports 0).
    """

    def __init__(self, own_pids: OwnPids) -> None:
        self._own_pids = own_pids
        # A subreaper flag set before exec (an init that exec'd us with it) counts too.
        self._subreaper = is_subreaper()

    @property
    def enabled(self) -> bool:
        """True when orphans are reparented to us: we are PID 1 or a child subreaper."""
        return os.getpid() == 1 or self._subreaper

    def become_subreaper(self) -> bool:
        """``prctl(PR_SET_CHILD_SUBREAPER, 1)``: orphans of our subtree come back to us. True on success.

        Call once from the daemon at start, before spawning anything (see the module docstring for
        why that is desirable); :meth:`reap` must then run in the main loop.
        """
        try:
            _prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1))
        except (OSError, AttributeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning(
                "cannot become a child subreaper (%s); orphans of LS and hooks go to PID 1 instead",
                reason,
            )
            return False
        self._subreaper = True
        log.debug("became a child subreaper: orphans of our subtree are reparented to us")
        return True

    def reap(self) -> list[tuple[int, int]]:
        """Collect every exited child that is not ours; return ``(pid, raw wait status)`` for each.

        Non-blocking; one ``waitid`` when nothing exited; nothing at all when not :attr:`enabled`.
        Call from the main loop thread only (the thread that spawns the daemon's children), after the
        loop polled its own ``Popen``s.
        """
        if threading.current_thread() is not threading.main_thread():
            # Another thread could reap a child the main thread just forked and not yet recorded.
            raise RuntimeError("Reaper.reap must be called from the main loop thread")
        if not self.enabled:
            return []
        reaped: list[tuple[int, int]] = []
        while len(reaped) < MAX_REAPS_PER_CALL:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no children at all
                break
            if info is None:  # children, but none exited
                break
            pid = info.si_pid
            if pid in self._own_pids():
                # Ours, not yet collected by its Popen. Peeking again would return it again; look
                # behind it in the process table instead.
                reaped.extend(self._reap_zombie_strangers(MAX_REAPS_PER_CALL - len(reaped)))
                break
            got = self._reap_one(pid)
            if got is None:
                break  # someone collected it meanwhile: do not spin on a racing peek
            reaped.append(got)
        return reaped

    def _reap_zombie_strangers(self, limit: int) -> list[tuple[int, int]]:
        reaped: list[tuple[int, int]] = []
        for pid in _zombie_children(os.getpid()):
            if len(reaped) >= limit:
                break
            if pid in self._own_pids():
                continue
            got = self._reap_one(pid)
            if got is not None:
                reaped.append(got)
        return reaped

    def _reap_one(self, pid: int) -> tuple[int, int] | None:
        """Collect exactly ``pid`` if it exited; None if it did not or is no (longer a) child of ours."""
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        except OSError as exc:  # pragma: no cover - EINTR is retried by Python (PEP 475)
            if exc.errno == errno.EINTR:
                return None
            raise
        if got == 0:
            return None
        log.debug("reaped orphan", extra=fields(pid=got, status=describe_status(status)))
        return got, status

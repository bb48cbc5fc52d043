"""The LS process as the daemon's loop sees it: spawn, poll, signal, readiness polling, the proof that
it is gone, and the sweep of LS orphans an earlier run left.

Everything here runs on the main thread except the readiness poller, whose only act is to
``put_nowait`` a ``ChildReady`` on the loop's queue. LS is spawned from the main thread because its
parent-death signal fires when the spawning *thread* exits (I6).

An LS exit is reported (:meth:`LsProcess.poll`) only once its whole process group is gone: a leader
that died leaving group members behind (a re-exec'd LS) gets them SIGKILLed first, so "exited" always
means "nothing of that LS is left" (the precondition of a restart, a migration, I1/I4).
"""

from __future__ import annotations

import logging
import os
import queue
import re
from typing import Any

from lssupervisor.config import Config, OutputMode
from lssupervisor.core.events import ChildExited, ChildReady, ChildSpawned, Event, GoneProven, SpawnFailed
from lssupervisor.daemon import child, health
from lssupervisor.daemon.logs import fields
from lssupervisor.daemon.prepare import Prepared
from lssupervisor.errors import SupervisorError
from lssupervisor.fsutil import write_atomic
from lssupervisor.worker import protocol as p

log = logging.getLogger("lssupervisor.supervisor")

OUTPUT_JOIN_S = 1.0
_LOGRUS_TIME = re.compile(r'^time="[^"]*"\s+')
LAST_LINE_MAX = 300


class LastLine:
    """``on_line`` for ``output: prefix``: logs each LS line (``lightningstream: <line>``, as the
    default does) and keeps the last non-empty one, so a failed start can quote LS's fatal line.
    Called on the reader thread; the loop reads ``line`` after ``join_output`` (a str assignment is
    atomic)."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __call__(self, line: str) -> None:
        child.log_ls_line(line)
        text = _LOGRUS_TIME.sub("", line.strip())  # logrus's time= is noise in a reason
        if text:
            self.line = text[:LAST_LINE_MAX]


class LsProcess:
    """Our LS child, its output reader and readiness poller, and the last LS that ran."""

    def __init__(self, events: queue.SimpleQueue[Any]) -> None:
        self._events = events
        self.child: child.LsChild | None = None
        self.output: LastLine | None = None  # output: prefix: LS's lines pass through it
        self.last: child.LsChild | None = None  # the last LS that exited (PROVING names its pid)
        self.leader_exited = False  # the leader is gone; its group's stragglers are being killed
        self.poller: health.HealthPoller | None = None
        self.retired_pollers: list[health.HealthPoller] = []

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def own_pids(self) -> set[int]:
        """Pids whose status our Popen still has to collect (kept from the reaper)."""
        return {self.child.pid} if self.child is not None and self.child.returncode is None else set()

    # -- start, stop -----------------------------------------------------------------------------

    def spawn(self, prepared: Prepared) -> Event:
        """Write the prepared config (atomically), start LS and its readiness poller."""
        assert self.child is None or self.child.poll() is not None, "a second LS while ours lives"
        cfg = prepared.cfg
        ls = cfg.lightningstream
        try:
            target = cfg.rendered_config
            target.parent.mkdir(parents=True, exist_ok=True)
            if write_atomic(target, prepared.text):
                log.info("wrote LS config", extra=fields(path=str(target), version=prepared.version))
            output = LastLine() if ls.output is OutputMode.PREFIX else None
            new = child.spawn_ls(
                prepared.argv,
                prepared.env,
                pdeathsig=ls.pdeathsig,
                min_pid=ls.min_pid,
                output=ls.output,
                on_line=output,
            )
        except (SupervisorError, OSError, RuntimeError) as exc:
            return SpawnFailed(str(exc))
        self.child = new
        self.output = output
        self.leader_exited = False
        if prepared.view.http_address:
            self._start_poller(new.pid, prepared)
        return ChildSpawned(new.pid)

    def terminate(self, pid: int) -> None:
        if self.child is not None and self.child.pid == pid:
            log.info("stopping lightningstream", extra=fields(pid=pid, signal="SIGTERM"))
            self.child.terminate_group()

    def kill(self, pid: int) -> None:
        if self.child is not None and self.child.pid == pid:
            self.child.kill_group()

    def emergency_stop(self, timeout: float) -> None:
        """The loop died (a bug): never leave LS behind (I6), even before pdeathsig would act."""
        if self.child is not None:
            child.stop_ls(self.child, timeout)

    def poll(self) -> ChildExited | None:
        """Our LS's exit, once nothing of its group is left (stragglers get SIGKILL first)."""
        c = self.child
        if c is None:
            return None
        if not self.leader_exited:
            if c.poll() is None:
                return None
            self.leader_exited = True
            self.stop_poller()
        if c.group_alive():
            c.kill_group()
            return None
        rc = c.returncode
        assert rc is not None
        c.join_output(OUTPUT_JOIN_S)
        last_line = self.output.line if self.output is not None else None
        self.child = None
        self.output = None
        self.last = c
        self.leader_exited = False
        description = child.describe_exit(rc)
        log.info("lightningstream exited", extra=fields(pid=c.pid, status=description))
        return ChildExited(pid=c.pid, returncode=rc, description=description, last_line=last_line)

    # -- readiness -------------------------------------------------------------------------------

    def _start_poller(self, pid: int, prepared: Prepared) -> None:
        events = self._events

        def on_ready(ready_pid: int) -> None:
            events.put_nowait(ChildReady(ready_pid))  # from the poller thread: enqueue only

        self.poller = health.HealthPoller(
            health.HealthProbe(prepared.view.http_address, [s.name for s in prepared.view.lmdbs]),
            pid,
            on_ready,
            interval=float(prepared.cfg.lightningstream.health_poll_interval),
        )

    def stop_poller(self, join: bool = False) -> None:
        """Tell the readiness poller to stop. Joining it could hold up the main loop for a whole
        /healthz request (up to its timeout), so it is only joined at exit; a stopped poller's late
        ChildReady is ignored by the core (stale pid)."""
        if self.poller is not None:
            self.poller.stop(timeout=None if join else 0)
            self.retired_pollers.append(self.poller)
            self.poller = None
        if join:
            for poller in self.retired_pollers:
                poller.stop(timeout=5.0)
            self.retired_pollers.clear()
        else:
            self.retired_pollers = [x for x in self.retired_pollers if x.running]

    # -- proofs and orphans ------------------------------------------------------------------------

    def prove_gone(self, cfg: Config, readers: p.ReadersResult) -> GoneProven:
        """PROVING: no process of our last LS's group, none naming our config, and no LS among the
        LMDB readers (a reader is LS when it is our last LS pid or runs the LS binary)."""
        binary = os.path.basename(cfg.lightningstream.binary)
        ours = {self.last.pid} if self.last is not None else set()
        suspects: dict[int, str] = {}
        for entry in readers.lmdbs:
            for reader in entry.readers:
                names_ls = any(os.path.basename(c) == binary for c in reader.cmdline[:2])
                if reader.alive and (reader.pid in ours or names_ls):
                    suspects[reader.pid] = f"LMDB {entry.lmdb} reader: {' '.join(reader.cmdline)[:120]}"
            holder = entry.open_by_pid
            if holder is not None and holder in ours:
                suspects[holder] = f"holds LMDB {entry.lmdb} open"
        remaining = child.prove_gone(self.last, cfg.rendered_config, extra_pids=suspects)
        detail = "; ".join(suspects.get(pid, "names our LS config") for pid in remaining)
        if not remaining:
            log.info("LS proven gone: no process of its group, no LS among the LMDB readers")
        return GoneProven(remaining=tuple(remaining), detail=detail)

    def sweep_orphans(self, cfg: Config, previous: child.ChildRecord | None) -> None:
        try:
            ended = child.sweep_orphans(
                cfg.rendered_config, previous, timeout=float(cfg.lightningstream.stop_timeout)
            )
        except Exception:  # the sweep is a backstop; a failure must not keep us from running
            log.exception("orphan sweep failed")
            return
        if ended:
            log.warning("ended lightningstream orphans of an earlier run", extra=fields(pids=ended))

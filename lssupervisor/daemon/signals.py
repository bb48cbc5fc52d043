"""Signal handlers that only enqueue (gunicorn's arbiter, trio's restore-on-exit context manager).

A handler runs between two bytecodes of the main thread, possibly in the middle of anything the loop
does, so it must not log, allocate locks or do I/O (a logging handler lock taken twice deadlocks). It
does one thing: ``SimpleQueue.put_nowait`` (reentrant by design) of a frozen
:class:`~lssupervisor.core.events.SignalReceived`. The loop blocks in ``SimpleQueue.get(timeout=...)``; a
handler's put wakes it at once (PEP 475: the wait resumes after the handler, and finds the item).

SIGCHLD is handled too, only to wake the loop: the loop then polls its own ``Popen``s. Nothing here
ever calls ``waitpid(-1)``, which would steal statuses from ``subprocess``.
"""

from __future__ import annotations

import queue
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from lssupervisor.core.events import SignalReceived

HANDLED: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
)


@contextmanager
def installed(
    q: queue.SimpleQueue[Any], signums: Iterable[signal.Signals] = HANDLED
) -> Iterator[None]:
    """Install enqueue-only handlers for ``signums`` (main thread only); restore the old ones on exit."""

    def handler(signum: int, frame: FrameType | None) -> None:
        q.put_nowait(SignalReceived(signum))  # NO logging, NO I/O here

    previous: dict[signal.Signals, Any] = {}
    try:
        for s in signums:
            previous[s] = signal.signal(s, handler)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"

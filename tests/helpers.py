"""Small shared test helpers: waiting on conditions with a deadline, free ports."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from lssupervisor.testing.ports import free_port

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll ``condition`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


__all__ = ["free_port", "wait_for"]  # free_port: ports outside the ephemeral range, per xdist worker

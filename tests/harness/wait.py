"""The one way a test waits: a condition polled until a generous deadline.

No test sleeps a fixed time or asserts how fast the machine is. A deadline only says how long a
condition may take before the test gives up; it is seconds to tens of seconds, so that a busy 2-core
machine is slow but never red. The polling loop is the demo's own (``scenario.wait_until``); here a
timeout is an ``AssertionError`` naming what was awaited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from lssupervisor.testing.scenario import ScenarioError, wait_until

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0


def wait_for(
    condition: Callable[[], T | None],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value (returned); fail naming ``what`` after
    ``timeout`` seconds."""
    try:
        return wait_until(condition, timeout, what, interval)
    except ScenarioError as exc:
        raise AssertionError(str(exc)) from None

"""The restart policy for a failed LS: capped exponential backoff with jitter, and a burst limit.

Vocabulary after stamina: a delay starts at ``initial_delay``, grows by ``multiplier`` per consecutive
failure, is capped at ``max_delay`` (jitter included, like stamina's ``wait_max``), and gets up to
``jitter`` x delay of random extra so a fleet restarted together does not hammer storage in step.

Pure functions over frozen values. The random draw is passed in (a float in [0, 1)), so the lifecycle
core stays deterministic under test with a fixed RNG.

- A failure inside ``burst_window`` that brings the count of recent failures to ``burst_limit``
  gives up (the core parks LS and waits for an operator).
- LS running healthy (ready) for ``reset_after`` resets both the delay and the burst count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_delay: float = 1.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2
    reset_after: float = 60.0
    burst_limit: int = 5
    burst_window: float = 300.0
    config_error_window: float = 5.0

    def delay(self, failures: int, sample: float) -> float:
        """Delay before the next start after ``failures`` consecutive failures (>= 1)."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be in [0, 1], got {sample}")
        # Grow in a loop capped at max_delay: multiplier ** failures overflows a float after ~1000
        # failures, and a supervisor may run for years.
        base = self.initial_delay
        for _ in range(failures - 1):
            if base >= self.max_delay:
                break
            base *= self.multiplier
        base = min(base, self.max_delay)
        return min(self.max_delay, base * (1.0 + self.jitter * sample))


@dataclass(frozen=True, slots=True)
class BackoffState:
    consecutive: int = 0  # failures since the last healthy period
    recent: tuple[float, ...] = ()  # monotonic times of failures still inside burst_window

    @property
    def clean(self) -> bool:
        return self.consecutive == 0 and not self.recent


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float
    failures: int  # consecutive, including this one


@dataclass(frozen=True, slots=True)
class GiveUp:
    failures: int  # inside the window, including this one
    window: float


Decision = Retry | GiveUp


def record_failure(
    policy: BackoffPolicy, state: BackoffState, now: float, sample: float
) -> tuple[BackoffState, Decision]:
    """Account one failed start or crash at ``now``; say whether to retry (after how long) or give up."""
    recent = (*(t for t in state.recent if now - t < policy.burst_window), now)
    new = BackoffState(consecutive=state.consecutive + 1, recent=recent)
    if len(recent) >= policy.burst_limit:
        return new, GiveUp(failures=len(recent), window=policy.burst_window)
    return new, Retry(delay=policy.delay(new.consecutive, sample), failures=new.consecutive)


def reset_deadline(policy: BackoffPolicy, state: BackoffState, ready_at: float | None) -> float | None:
    """When a healthy LS (ready since ``ready_at``) resets the backoff; None: nothing to reset."""
    if state.clean or ready_at is None:
        return None
    return ready_at + policy.reset_after

"""The restart policy: delays, jitter, cap, burst window and reset, all with literal times."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lssupervisor.config import Duration, RestartConfig
from lssupervisor.core.backoff import (
    BackoffPolicy,
    BackoffState,
    GiveUp,
    Retry,
    record_failure,
    reset_deadline,
)
from lssupervisor.daemon.policy import backoff_policy

POLICY = BackoffPolicy(initial_delay=1.0, max_delay=60.0, multiplier=2.0, jitter=0.2, burst_limit=5,
                       burst_window=300.0, reset_after=60.0)


@pytest.mark.parametrize(
    ("failures", "sample", "expected"),
    [
        (1, 0.0, 1.0),
        (2, 0.0, 2.0),
        (3, 0.0, 4.0),
        (6, 0.0, 32.0),
        (7, 0.0, 60.0),  # 64 capped
        (1, 1.0, 1.2),  # + 20% jitter
        (3, 0.5, 4.4),
        (6, 1.0, 38.4),
        (6, 0.5, 35.2),
        (7, 1.0, 60.0),  # the cap includes the jitter (stamina's wait_max)
        (10_000, 1.0, 60.0),  # no float overflow after years of crashes
    ],
)
def test_delay(failures: int, sample: float, expected: float) -> None:
    assert POLICY.delay(failures, sample) == pytest.approx(expected)


def test_delay_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        POLICY.delay(0, 0.0)
    with pytest.raises(ValueError):
        POLICY.delay(1, 1.5)


def test_failures_grow_the_delay_then_burst_gives_up() -> None:
    s = BackoffState()
    decisions = []
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        s, d = record_failure(POLICY, s, t, 0.0)
        decisions.append(d)
    assert decisions[:4] == [Retry(1.0, 1), Retry(2.0, 2), Retry(4.0, 3), Retry(8.0, 4)]
    assert decisions[4] == GiveUp(failures=5, window=300.0)
    assert s == BackoffState(consecutive=5, recent=(0.0, 10.0, 20.0, 30.0, 40.0))


def test_failures_outside_the_window_are_forgotten() -> None:
    s = BackoffState(consecutive=4, recent=(0.0, 10.0, 20.0, 30.0))
    s, d = record_failure(POLICY, s, 305.0, 0.0)
    # 0.0 is 305 s old: out of the 300 s window; 4 recent failures remain, under the limit of 5.
    assert isinstance(d, Retry) and s.recent == (10.0, 20.0, 30.0, 305.0)
    assert d.delay == 16.0  # consecutive still counts: nothing healthy happened in between


def test_burst_limit_one_parks_at_the_first_failure() -> None:
    _, d = record_failure(BackoffPolicy(burst_limit=1), BackoffState(), 0.0, 0.0)
    assert d == GiveUp(failures=1, window=300.0)


def test_reset_deadline() -> None:
    assert reset_deadline(POLICY, BackoffState(), 10.0) is None
    assert reset_deadline(POLICY, BackoffState(1, (5.0,)), None) is None
    assert reset_deadline(POLICY, BackoffState(1, (5.0,)), 10.0) == 70.0


def test_from_config() -> None:
    r = RestartConfig(initial_delay=Duration(0.1), max_delay=Duration(2), multiplier=3.0, jitter=0.0,
                      reset_after=Duration(5), burst_limit=3, burst_window=Duration(10),
                      config_error_window=Duration(1))
    p = backoff_policy(r)
    assert p == BackoffPolicy(0.1, 2.0, 3.0, 0.0, 5.0, 3, 10.0, 1.0)
    assert [p.delay(n, 0.7) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.3, 0.9, 2.0])


def test_seeded_rng_is_reproducible() -> None:
    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        s, out = BackoffState(), []
        for t in range(4):
            s, d = record_failure(POLICY, s, float(t), rng.random())
            assert isinstance(d, Retry)
            out.append(d.delay)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.01, max_value=10.0),
    st.floats(min_value=1.0, max_value=5.0),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_delay_bounds(failures: int, sample: float, initial: float, mult: float, jitter: float) -> None:
    p = BackoffPolicy(initial_delay=initial, max_delay=max(initial, 30.0), multiplier=mult, jitter=jitter)
    d = p.delay(failures, sample)
    assert p.initial_delay <= d <= p.max_delay
    # Monotone in the failure count for a fixed sample.
    assert p.delay(failures + 1, sample) >= d

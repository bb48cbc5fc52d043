"""The pure core's parameters, read from our config (the core itself never sees a ``Config``)."""

from __future__ import annotations

import random
from collections.abc import Callable

from lssupervisor.config import Config, RestartConfig
from lssupervisor.core.backoff import BackoffPolicy
from lssupervisor.core.cycle import CyclePolicy
from lssupervisor.core.lifecycle import Lifecycle, Timeouts


def backoff_policy(r: RestartConfig) -> BackoffPolicy:
    return BackoffPolicy(
        initial_delay=float(r.initial_delay),
        max_delay=float(r.max_delay),
        multiplier=float(r.multiplier),
        jitter=float(r.jitter),
        reset_after=float(r.reset_after),
        burst_limit=int(r.burst_limit),
        burst_window=float(r.burst_window),
        config_error_window=float(r.config_error_window),
    )


def timeouts(cfg: Config) -> Timeouts:
    ls = cfg.lightningstream
    return Timeouts(
        stop_timeout=float(ls.stop_timeout),
        ready_timeout=float(ls.ready_timeout),
        settle_time=float(ls.settle_time),
    )


def cycle_policy(cfg: Config) -> CyclePolicy:
    return CyclePolicy(
        drain=cfg.lightningstream.drain,
        pre_hooks=len(cfg.hooks.pre_migrate),
        post_hooks=len(cfg.hooks.post_migrate),
        on_failure=cfg.schema.on_failure,
        debounce=float(cfg.watch.debounce),
        import_timeout=float(cfg.migrations.import_timeout),
        step_timeout=float(cfg.migrations.step_timeout),
    )


def lifecycle_for(cfg: Config, rand: Callable[[], float] = random.random) -> Lifecycle:
    """The core configured by ``cfg`` (built again on every reload that changes the config)."""
    return Lifecycle(timeouts(cfg), backoff_policy(cfg.restart), rand, cycle_policy(cfg))

"""Prometheus metrics computed from the daemon's published status snapshot.

Nothing here is updated by the daemon: a custom collector reads the latest snapshot (the same document
``/status`` serves) at scrape time. So metrics can never disagree with the status, the main loop does no
metrics bookkeeping, and there is no module-level registry: each :func:`build_registry` call makes a
private :class:`CollectorRegistry` (tests and two servers in one process do not collide).

Every key is optional: a missing or null value omits the sample rather than inventing a zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lssupervisor.core.states import State, Substep
from lssupervisor.daemon.statefile import iso_to_epoch

# The one-hot gauges always list every state and sub-step (taken from the daemon's own enums, so they
# cannot drift) so a dashboard can rely on every series existing; an unknown value is added.
STATES = tuple(state.value for state in State)
SUBSTATES = tuple(step.value for step in Substep)
MIGRATION_RESULTS = ("ok", "failed", "cancelled")

Snapshot = Mapping[str, Any]


def _section(snapshot: Snapshot, key: str) -> Mapping[str, Any]:
    value = snapshot.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: object) -> float | None:
    # bool is an int in Python; a True where a number belongs is a daemon bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _one_hot(name: str, doc: str, label: str, known: tuple[str, ...], current: object) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=[label])
    values = list(known)
    if isinstance(current, str) and current and current not in values:
        values.append(current)
    for v in values:
        g.add_metric([v], 1.0 if v == current else 0.0)
    return g


class SnapshotCollector(Collector):
    """Turns the latest snapshot into metric families at every scrape.

    ``get_snapshot`` returns the current snapshot or None (nothing published yet);
    ``loop_age`` returns seconds since the main loop last ticked, or None.
    """

    def __init__(
        self,
        get_snapshot: Callable[[], Snapshot | None],
        loop_age: Callable[[], float | None] | None = None,
    ) -> None:
        self._get_snapshot = get_snapshot
        self._loop_age = loop_age

    def describe(self) -> Iterator[Metric]:
        # Registration calls describe(); returning nothing keeps it from calling collect() early
        # (before the first snapshot) and skips the duplicate-name check, which cannot trip here.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        if self._loop_age is not None:
            age = self._loop_age()
            if age is not None:
                yield GaugeMetricFamily(
                    "lssupervisor_main_loop_tick_age_seconds",
                    "Seconds since the supervisor's main loop last ticked (/livez fails above its limit).",
                    value=age,
                )
        snap = self._get_snapshot()
        yield GaugeMetricFamily(
            "lssupervisor_status_published",
            "1 once the daemon has published a status snapshot.",
            value=0.0 if snap is None else 1.0,
        )
        if snap is None:
            return
        yield from self._from_snapshot(snap)

    # Kept whole: one branch per optional status field, each a metric family.
    def _from_snapshot(self, snap: Snapshot) -> Iterator[Metric]:  # noqa: PLR0912
        yield _one_hot(
            "lssupervisor_state", "Current supervisor state (one-hot).", "state", STATES, snap.get("state")
        )
        yield _one_hot(
            "lssupervisor_substate",
            "Current reconcile sub-step (one-hot; all 0 outside RECONCILING).",
            "substate",
            SUBSTATES,
            snap.get("substate"),
        )
        paused = snap.get("paused")
        if isinstance(paused, bool):
            yield GaugeMetricFamily(
                "lssupervisor_paused", "1 when an operator paused the supervisor.", value=float(paused)
            )

        lmdbs = _section(snap, "lmdbs")
        sv = GaugeMetricFamily(
            "lssupervisor_schema_version",
            "Schema version recorded in each LMDB's marker (absent while unknown).",
            labels=["lmdb"],
        )
        for name, info in sorted(lmdbs.items()):
            if isinstance(info, Mapping):
                v = _number(info.get("schema_version"))
                if v is not None:
                    sv.add_metric([str(name)], v)
        yield sv
        target = _number(snap.get("target_version"))
        if target is not None:
            yield GaugeMetricFamily(
                "lssupervisor_target_schema_version",
                "Schema version the application asks for.",
                value=target,
            )

        ls = _section(snap, "lightningstream")
        restarts = _number(ls.get("restarts"))
        if restarts is not None:
            yield CounterMetricFamily(
                "lssupervisor_lightningstream_restarts",
                "Starts of Lightning Stream after the first one, for any reason (crash, config change, "
                "migration), since the supervisor started.",
                value=restarts,
            )
        failures = _number(ls.get("failures_total"))
        if failures is not None:
            yield CounterMetricFamily(
                "lssupervisor_lightningstream_failures",
                "Unintended Lightning Stream exits (crash, failed start, not ready in time) since the "
                "supervisor started; intended stops never count.",
                value=failures,
            )
        if ls:
            yield GaugeMetricFamily(
                "lssupervisor_lightningstream_up",
                "1 while a Lightning Stream process is running.",
                value=1.0 if _number(ls.get("pid")) is not None else 0.0,
            )
            yield GaugeMetricFamily(
                "lssupervisor_lightningstream_ready",
                "1 once Lightning Stream reported ready (startup complete for every LMDB).",
                value=1.0 if ls.get("ready") is True else 0.0,
            )
            started = iso_to_epoch(ls.get("started_at"))
            if started is not None:
                yield GaugeMetricFamily(
                    "lssupervisor_lightningstream_start_timestamp_seconds",
                    "When the current Lightning Stream process started (Unix time).",
                    value=started,
                )

        mig = _section(snap, "migration")
        duration = _number(mig.get("last_duration_s"))
        if duration is not None:
            yield GaugeMetricFamily(
                "lssupervisor_migration_duration_seconds",
                "Duration of the last migration run.",
                value=duration,
            )
        if "last_result" in mig:
            yield _one_hot(
                "lssupervisor_migration_last_result",
                "Result of the last migration run (one-hot; all 0 when none ran).",
                "result",
                MIGRATION_RESULTS,
                mig.get("last_result"),
            )
        step = mig.get("step")
        if isinstance(step, Mapping):
            # The running step's heartbeat: the API's own counters (no code in the migration needed).
            for key, name, doc in (
                ("written", "lssupervisor_migration_step_records_written", "Records the running step wrote."),
                ("read", "lssupervisor_migration_step_records_read", "Records the running step read."),
                (
                    "elapsed_s",
                    "lssupervisor_migration_step_elapsed_seconds",
                    "Seconds the running step has run.",
                ),
                ("index", "lssupervisor_migration_step_index", "0-based position of the running step."),
                ("steps", "lssupervisor_migration_steps", "Steps in the running migration."),
            ):
                value = _number(step.get(key))
                if value is not None:
                    yield GaugeMetricFamily(name, doc, value=value)
            ratio = _number(step.get("percent"))
            if ratio is not None:
                yield GaugeMetricFamily(
                    "lssupervisor_migration_step_progress_ratio",
                    "The running step's own estimate of its progress (m.progress), 0 to 1.",
                    value=ratio / 100.0,
                )
        last_ok = iso_to_epoch(mig.get("last_success_at"))
        if last_ok is not None:
            yield GaugeMetricFamily(
                "lssupervisor_last_successful_migration_timestamp_seconds",
                "When the last successful migration finished (Unix time).",
                value=last_ok,
            )

        backups = _section(snap, "backups")
        count = _number(backups.get("count"))
        if count is not None:
            yield GaugeMetricFamily(
                "lssupervisor_backups", "Backups kept in the backup directory.", value=count
            )
        last = backups.get("last")
        if isinstance(last, Mapping):
            size = _number(last.get("size_bytes"))
            if size is not None:
                yield GaugeMetricFamily(
                    "lssupervisor_last_backup_size_bytes", "Size of the newest backup.", value=size
                )
            created = iso_to_epoch(last.get("created_at"))
            if created is not None:
                yield GaugeMetricFamily(
                    "lssupervisor_last_backup_timestamp_seconds",
                    "When the newest backup was taken (Unix time).",
                    value=created,
                )

        updated = iso_to_epoch(snap.get("updated_at"))
        if updated is not None:
            yield GaugeMetricFamily(
                "lssupervisor_status_age_seconds",
                "Seconds since the daemon last published its status.",
                value=max(0.0, time.time() - updated),
            )


def build_registry(
    get_snapshot: Callable[[], Snapshot | None],
    loop_age: Callable[[], float | None] | None = None,
    *,
    process_metrics: bool = True,
) -> CollectorRegistry:
    """A private registry with the snapshot collector (and the process_* metrics of this process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot, loop_age))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry

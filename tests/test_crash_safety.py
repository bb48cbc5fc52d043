"""Crash safety of the migration worker (invariants I3 and I7), with real SIGKILLs.

The main test kills the worker at many random moments of a 3-step migration over a large LMDB and
checks after every kill that the LMDB is EXACTLY at one version: its full dump (every DBI, every key,
value and LS header, LMDB txn ids aside) equals the dump expected for the version its marker names.
Expected dumps come from running the same migrations step by step in this process first. The next run
must converge to the target.

The moments are drawn from the worker's own progress, never from a clock: a kill inside step k waits
for a progress reply of step k at a random fraction of its records; a kill "anywhere" waits for a
random one of the replies that mark the way (start-up, backup, a step's start, a commit). So the same
seed aims at the same places on a fast and on a busy machine, and the work is bounded by the
iteration count; only the deadline (pytest-timeout for this test) leaves room for a slow machine.

Knobs: ``LSSUPERVISOR_CRASH_ITERATIONS`` (default 30), ``LSSUPERVISOR_CRASH_RECORDS`` (default 100000),
``LSSUPERVISOR_CRASH_SEED`` (default: random, printed on failure).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.testing.fixtures import build_lmdb, read_marker_version, run_migrations
from lssupervisor.worker import backupdir, client, history, marker
from lssupervisor.worker import protocol as p
from lssupervisor.worker.client import WorkerSession
from tests.harness import wait_for
from tests.harness.workers import INSTANCE, Collector, make_settings, make_view, one, write_migrations

ITERATIONS = int(os.environ.get("LSSUPERVISOR_CRASH_ITERATIONS", "30"))
RECORDS = int(os.environ.get("LSSUPERVISOR_CRASH_RECORDS", "100000"))
TARGET = 4

CRASH_MIGRATIONS = {
    "0001_init.py": '''
        """Initial schema."""
        VERSION = 1

        def upgrade(m):
            pass
    ''',
    "0002_upper.py": '''
        """Uppercase every value in place (prefix strategy: timestamps kept)."""
        VERSION = 2

        def upgrade(m):
            total = m.txn.stat(m.db("data"))["entries"]
            done = 0
            for key, value in m.items("data"):
                m.put("data", key, value.upper())
                done += 1
                if not done % 2048:
                    m.progress(done, total)
            m.progress(total, total)
    ''',
    "0003_copy.py": '''
        """Copy data into the new DBI data_v3 with a suffix."""
        VERSION = 3
        STRATEGY = "new-dbi"

        def upgrade(m):
            m.copy_dbi("data", "data_v3", lambda k, v: (k, v + b"|v3"))
    ''',
    "0004_prune.py": '''
        """Tombstone every tenth key of data_v3 and mark every tenth-plus-one."""
        VERSION = 4

        def upgrade(m):
            total = m.txn.stat(m.db("data_v3"))["entries"]
            done = 0
            for key, value in m.items("data_v3"):
                n = int(key[1:])
                if n % 10 == 0:
                    m.delete("data_v3", key)
                elif n % 10 == 1:
                    m.put("data_v3", key, value + b"+")
                done += 1
                if not done % 2048:
                    m.progress(done, total)
            m.progress(total, total)
    ''',
}


def digest(spec: LmdbSpec) -> tuple[int | None, str]:
    """(marker version, sha256 of the full dump without the marker DBI and without header txn ids).

    The marker's own value holds wall-clock times, so it is compared by version; header txn ids are
    local bookkeeping that legitimately differ between two runs reaching the same version."""
    env = lmdb.open(spec.path, max_dbs=spec.max_dbs, readonly=True, lock=False, subdir=True)
    try:
        h = hashlib.sha256()
        with env.begin() as txn:
            found = marker.read_marker(env, txn, INSTANCE, native=True, marker_dbi="lssupervisor")
            for name in marker.dbi_names(env, txn):
                if name == "lssupervisor":
                    continue
                h.update(b"\0dbi\0" + name.encode())
                db = env.open_db(name.encode(), txn=txn, create=False)
                for key, value in txn.cursor(db).iternext():
                    v = bytes(value)
                    h.update(len(key).to_bytes(4, "big") + bytes(key))
                    h.update(len(v).to_bytes(4, "big") + v[:8] + b"\0" * 8 + v[16:])
        return (found.version if found else None), h.hexdigest()
    finally:
        env.close()


def pristine_lmdb(path: Path, records: int) -> LmdbSpec:
    values = {f"k{i:07d}": f"value-{i}-{'x' * (i % 40)}" for i in range(records)}
    # distinct timestamps per key, so that a lost or wrong timestamp changes the digest
    data = {"data": {k: (v, 1_700_000_000_000_000_000 + i) for i, (k, v) in enumerate(values.items())}}
    built = build_lmdb(
        path.with_name(path.name + "-build"), data, marker=1, instance=INSTANCE, map_size=256 << 20
    )
    # Keep the pristine file compact (building with writemap leaves it as long as the map): copying
    # it for every iteration is then cheap.
    env = lmdb.open(built.path, max_dbs=built.max_dbs, readonly=True)
    try:
        path.mkdir()
        env.copy(str(path), compact=True)
    finally:
        env.close()
    shutil.rmtree(built.path)
    return dataclasses.replace(built, path=str(path))


@dataclasses.dataclass
class Scenario:
    root: Path
    migrations: Path
    pristine: LmdbSpec
    expected: dict[int, str]  # version -> digest

    def live_copy(self, path: Path) -> LmdbSpec:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        shutil.copyfile(backupdir.data_file(self.pristine), path / backupdir.DATA_FILE)
        return dataclasses.replace(self.pristine, path=str(path))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("crash")
    migs = write_migrations(root / "migs", CRASH_MIGRATIONS)
    pristine = pristine_lmdb(root / "pristine", RECORDS)
    work = dataclasses.replace(pristine, path=str(root / "expected"))
    shutil.copytree(pristine.path, work.path)
    version, first = digest(work)
    assert version == 1
    expected = {1: first}
    for v in range(2, TARGET + 1):
        run_migrations(work, migs, instance=INSTANCE, target=v)
        got_version, expected[v] = digest(work)
        assert got_version == v
    assert len(set(expected.values())) == TARGET  # every step changes the data
    yield Scenario(root, migs, pristine, expected)


def check_exactly_one_version(s: Scenario, spec: LmdbSpec, context: str) -> int:
    version, got = digest(spec)
    assert version is not None, f"{context}: marker lost"
    assert got == s.expected[version], (
        f"{context}: marker says version {version} but the data matches "
        f"{[v for v, d in s.expected.items() if d == got] or 'no version at all'}"
    )
    return version


def wait_for_progress(
    session: WorkerSession, got: Collector, what: str, phase: p.Phase, **fields: object
) -> None:
    """Until a progress reply of ``phase`` with ``fields`` arrived (or the worker already finished)."""

    def seen() -> bool:
        return any(all(getattr(m, k) == v for k, v in fields.items()) for m in got.progress(phase))

    wait_for(lambda: session.done or seen(), timeout=120, interval=0.002, what=what)


def wait_inside_step(session: WorkerSession, got: Collector, step: int, fraction: float) -> None:
    """Until step ``step`` reported at least ``fraction`` of its records done (its transaction is open),
    or the worker got past it (progress throttling may skip the exact point; the kill then lands later)."""

    def reached() -> bool:
        for m in got.progress(p.Phase.MIGRATE):
            to = m.to_version or 0
            if to > step or (to == step and (m.done or 0) >= fraction * (m.total or 1)):
                return True
        return any((m.to_version or 0) >= step for m in got.progress(p.Phase.STEP_COMMITTED))

    what = f"step {step} at {fraction:.0%}"
    wait_for(lambda: session.done or reached(), timeout=120, interval=0.002, what=what)


def wait_for_milestone(session: WorkerSession, got: Collector, milestone: str) -> None:
    """Until the reply that marks ``milestone`` arrived: ``start`` (any reply: the worker runs),
    ``backup`` (copying), ``backed-up`` (before the first step), ``step-N`` (step N's transaction is
    open), ``committed-N`` (between step N and the next)."""

    def seen() -> bool:
        match milestone.split("-"):
            case ["start"]:
                return bool(got.replies)
            case ["backup"]:
                return bool(got.progress(p.Phase.BACKUP))
            case ["backed", "up"]:
                return bool(got.progress(p.Phase.BACKUP_DONE))
            case ["step", n]:
                return any(m.to_version == int(n) for m in got.progress(p.Phase.MIGRATE))
            case ["committed", n]:
                return any(m.to_version == int(n) for m in got.progress(p.Phase.STEP_COMMITTED))
        raise AssertionError(f"unknown milestone {milestone}")

    wait_for(lambda: session.done or seen(), timeout=120, interval=0.002, what=milestone)


def milestones(before: int) -> list[str]:
    """The observable points of a run that starts at version ``before`` (every run that has a step to
    take copies the LMDB first)."""
    steps = range(before + 1, TARGET + 1)
    return [
        "start", "backup", "backed-up",
        *(f"step-{v}" for v in steps),
        *(f"committed-{v}" for v in steps if v < TARGET),
    ]


def start(request: p.Request, got: Collector) -> WorkerSession:
    session = WorkerSession.start(got)
    session.submit(request)
    session.close()
    return session


def final_body(session: WorkerSession, got: Collector) -> p.Result | p.Failure:
    assert session.wait(120)
    (final,) = got.finals()
    return final.body  # type: ignore[return-value]


@pytest.mark.timeout(900)  # bounded by ITERATIONS, not by time; the deadline is for a busy machine
def test_sigkill_at_random_moments_leaves_exactly_one_version(scenario: Scenario, tmp_path: Path) -> None:
    seed = int(os.environ.get("LSSUPERVISOR_CRASH_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    spec = scenario.live_copy(tmp_path / "live")
    view = make_view(spec)
    backups = p.BackupSettings(enabled=True, dir=str(tmp_path / "backups"), keep=2)
    request = p.MigrateRequest(make_settings(view, tmp_path, scenario.migrations, backup=backups))
    kills_in_step: dict[int, int] = {}  # to-version -> kills while that step's transaction was open
    transitions: list[tuple[int, int]] = []
    before = 1
    for i in range(ITERATIONS):
        context = f"seed {seed} iteration {i}"
        aimed = rng.random() < 0.7
        aim = rng.randrange(2, TARGET + 1)  # the step to kill inside, when aimed
        if before == TARGET or (aimed and aim <= before):
            spec = scenario.live_copy(tmp_path / "live")  # back to version 1 so that aim is ahead
            before = 1
        fraction = rng.random()
        milestone = rng.choice(milestones(before))
        got = Collector()
        run = start(request, got)
        if aimed:
            wait_inside_step(run, got, aim, fraction)  # inside step `aim`, part-way through its records
        else:
            wait_for_milestone(run, got, milestone)  # start-up, backup, a step's start, between steps
        run.cancel()
        final = final_body(run, got)
        after = check_exactly_one_version(scenario, spec, context)
        transitions.append((before, after))
        before = after
        last = got.progress(p.Phase.MIGRATE)
        if last and isinstance(final, p.Failure) and last[-1].to_version == after + 1:
            kills_in_step[after + 1] = kills_in_step.get(after + 1, 0) + 1
    # The kills must really have landed inside write transactions, of more than one step.
    assert sum(kills_in_step.values()) >= ITERATIONS // 3, (seed, kills_in_step, transitions)
    assert len(kills_in_step) >= 2, (seed, kills_in_step)
    # The next run converges, and leaves no .partial behind.
    final = one(request, timeout=120)
    assert isinstance(final, p.MigrateDone), final
    assert check_exactly_one_version(scenario, spec, f"seed {seed} final") == TARGET
    assert not list((tmp_path / "backups").glob("*.partial"))
    print(f"crash test: {ITERATIONS} kills of {RECORDS} records, seed {seed}, kills in steps {kills_in_step}")


def test_kill_during_backup_leaves_only_a_partial_that_the_next_run_cleans(
    scenario: Scenario, tmp_path: Path
) -> None:
    small = build_lmdb(
        tmp_path / "a-small", {"data": {"k0000001": "v"}}, marker=1, instance=INSTANCE, name="a-small"
    )
    big = scenario.live_copy(tmp_path / "b-big")
    big = dataclasses.replace(big, name="b-big")
    migs = write_migrations(
        tmp_path / "migs",
        {
            "0001_init.py": CRASH_MIGRATIONS["0001_init.py"].replace(
                "VERSION = 1", 'VERSION = 1\n        LMDB = "b-big"'
            ),
            "0002_upper.py": CRASH_MIGRATIONS["0002_upper.py"].replace(
                "VERSION = 2", 'VERSION = 2\n        LMDB = "b-big"'
            ),
        },
    )
    backups = tmp_path / "backups"
    settings = make_settings(
        make_view(small, big), tmp_path, migs, backup=p.BackupSettings(enabled=True, dir=str(backups), keep=2)
    )
    request = p.MigrateRequest(settings)
    for _attempt in range(5):
        got = Collector()
        run = start(request, got)
        # The small LMDB is copied first; kill while the big one is being copied.
        wait_for_progress(run, got, "the first LMDB's backup", p.Phase.BACKUP_DONE, lmdb="a-small")
        run.cancel()
        final = final_body(run, got)
        if isinstance(final, p.Failure) and list(backups.glob("*.partial")):
            break
        assert isinstance(final, p.Failure), "the backup finished before the kill; retrying is pointless"
    assert [x.suffix for x in backups.iterdir()] == [".partial"]
    assert backupdir.list_backups(backups) == []
    assert read_marker_version(big, instance=INSTANCE) == 1  # no step before a verified backup (I7)
    done = one(request, timeout=120)
    assert isinstance(done, p.MigrateDone), done
    assert [x.name for x in backups.iterdir()] == [done.backup_id]
    assert read_marker_version(big, instance=INSTANCE) == 2


def test_dry_run_leaves_the_live_lmdb_byte_identical(scenario: Scenario, tmp_path: Path) -> None:
    spec = scenario.live_copy(tmp_path / "live")
    data = backupdir.data_file(spec)
    before_bytes = backupdir.file_digest(data)
    before_mtime = data.stat().st_mtime_ns
    result = one(p.DryRunRequest(make_settings(make_view(spec), tmp_path, scenario.migrations)), timeout=120)
    assert isinstance(result, p.DryRunResult), result
    (entry,) = result.lmdbs
    assert entry.live_last_txnid_before == entry.live_last_txnid_after
    assert entry.live_file_before == entry.live_file_after
    assert backupdir.file_digest(data) == before_bytes and data.stat().st_mtime_ns == before_mtime
    assert [s.to_version for s in entry.steps] == [2, 3, 4]
    assert entry.keys >= 2 * RECORDS and entry.bytes > 0 and entry.duration_s > 0
    assert digest(spec) == (1, scenario.expected[1])
    assert not (tmp_path / "history.jsonl").exists()  # a dry run records nothing
    assert list((tmp_path / "backups").iterdir()) == []  # its working copy is gone


def test_rollback_round_trip(scenario: Scenario, tmp_path: Path) -> None:
    spec = scenario.live_copy(tmp_path / "live")
    view = make_view(spec)
    settings = make_settings(view, tmp_path, scenario.migrations)
    migrated = client.unwrap(one(p.MigrateRequest(settings), timeout=120), p.MigrateDone)
    assert check_exactly_one_version(scenario, spec, "migrated") == TARGET
    back = client.unwrap(one(p.RollbackRequest(settings), timeout=120), p.RollbackResult)
    assert back.backup_id == migrated.backup_id and back.schema_version == 1
    assert back.pre_rollback_backup  # the migrated state was saved before it was replaced
    assert check_exactly_one_version(scenario, spec, "rolled back") == 1
    again = client.unwrap(one(p.RollbackRequest(settings), timeout=120), p.RollbackResult)
    assert [e.restored for e in again.lmdbs] == [False]
    assert again.pre_rollback_backup is None
    kinds = [(e.kind.value, e.result.value) for e in history.read(tmp_path / "history.jsonl").entries]
    assert kinds[-2:] == [("rollback", "ok"), ("rollback", "noop")]
    # migrating again converges (the rollback un-applied the recorded checksums)
    client.unwrap(one(p.MigrateRequest(settings), timeout=120), p.MigrateDone)
    assert check_exactly_one_version(scenario, spec, "re-migrated") == TARGET

"""The worker's operations: each serves one typed request with the LMDBs open in this process.

:class:`Session` lives as long as the worker process and serves requests in order
(:mod:`lssupervisor.worker.main` feeds it). Between requests it keeps only what is safe to keep: the
migrations an ``import`` request loaded (compiled once, executed once), so that a reconcile cycle
imports them while LS still runs and the ``migrate`` request that follows with LS stopped starts
writing at once. LMDB environments are opened per request and closed when it ends: an environment left
open across LS's run would see LS's map resizes and hold reader slots for nothing.

Test knob: with ``LSSUPERVISOR_TEST_OVERLAP_LOCK=/path/record.jsonl`` every LMDB write (migration
steps, stamp, restore) happens while holding ``flock(LOCK_EX|LOCK_NB)`` on ``/path/record.jsonl.lock``
and is bracketed by ``write_txn_begin``/``write_txn_end`` lines in the record; the Lightning Stream
stand-in holds ``LOCK_SH`` on that file for its whole life, so failing to get the lock (recorded as
``overlap``, and the op fails) proves LS ran during a write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import lmdb

from lssupervisor import trust
from lssupervisor.errors import (
    BackupError,
    MigrationCancelled,
    MigrationError,
    SupervisorError,
    UsageError,
    WorkerError,
)
from lssupervisor.fsutil import ensure_private_dir
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.proc import describe_pid
from lssupervisor.worker import backup, backupdir, history, marker, migrations, migrator, retire
from lssupervisor.worker import protocol as p
from lssupervisor.worker.protocol import OVERLAP_ENV

log = logging.getLogger(__name__)

Send = Callable[[p.Progress | p.LogLine | p.Result | p.Failure], None]
# Progress of the same kind goes out at most this often (the first of each step always goes out).
PROGRESS_INTERVAL_S = 0.1
# The API's own counters give a heartbeat at least this often during a step, with no code in the
# migration (m.progress refines it).
HEARTBEAT_S = 2.0


class Session:
    """The worker's state across requests: the reply channel, cancellation, loaded migrations."""

    def __init__(self, send: Send, cancel: threading.Event) -> None:
        self.send = send
        self.cancel = cancel
        self._loaded: dict[tuple[str, tuple[str, ...]], migrations.MigrationSet] = {}

    def migrations(self, settings: p.Settings, *, load: bool) -> migrations.MigrationSet:
        """The migration set: discovered (``load`` False: AST only, no code runs) or loaded (compiled
        and executed once per session; an ``import`` request does it ahead of ``migrate``)."""
        source = settings.migrations
        if not source:
            raise WorkerError(
                "worker request: settings.migrations: the migrations directory or package is not set"
            )
        names = tuple(s.name for s in settings.ls.lmdbs)
        key = (source, names)
        policy = trust.Policy.current(settings.trusted_gid)
        if not load:
            cached = self._loaded.get(key)
            return cached if cached is not None else migrations.discover(source, names, policy)
        found = self._loaded.get(key)
        if found is not None:
            # Loaded earlier in this session: still the same files? (a file changed in between is
            # refused by the checksum check, as a file changed after it was applied is.)
            fresh = migrations.discover(source, names, policy)
            if [m.checksum for m in fresh.migrations] == [m.checksum for m in found.migrations]:
                return found
        # One read per file: discovery hashes the bytes, and exactly those bytes are compiled (I8).
        found = migrations.load(source, names, policy)
        self._loaded[key] = found
        return found

    # Kept whole: a flat match, one case per request type.
    def serve(self, request: p.Request) -> p.Result:  # noqa: PLR0911
        job = Job(self, request.settings)
        try:
            match request:
                case p.PlanRequest():
                    return _op_plan(job, request)
                case p.ImportRequest():
                    return _op_import(job, request)
                case p.MarkersRequest():
                    return _op_markers(job)
                case p.ReadersRequest():
                    return _op_readers(job)
                case p.MigrateRequest():
                    return _op_migrate(job, request)
                case p.DryRunRequest():
                    return _op_dry_run(job, request)
                case p.StampRequest():
                    return _op_stamp(job, request)
                case p.BackupRequest():
                    return _op_backup(job, request)
                case p.BackupsRequest():
                    return _op_backups(job)
                case p.RollbackRequest():
                    return _op_rollback(job, request)
                case p.FleetRequest():
                    return _op_fleet(job)
                case p.RetireRequest():
                    return retire.run(job, request, write_guard)
        finally:
            job.close()
        raise WorkerError(f"worker: no op serves {type(request).__name__}")


class Job:
    """One request being served: its settings, open environments, cancellation, progress."""

    def __init__(self, session: Session, settings: p.Settings) -> None:
        self.session = session
        self.settings = settings
        self.view = settings.ls
        self.marker_dbi = settings.marker_dbi
        self.history_path = Path(settings.history) if settings.history else None
        self.backup_dir = Path(settings.backup.dir) if settings.backup.dir else None
        self.timeout = settings.timeout
        self.deadline = time.monotonic() + settings.timeout if settings.timeout else None
        self.envs: dict[str, lmdb.Environment] = {}
        self._last_progress = 0.0

    @property
    def instance(self) -> str:
        return self.view.instance

    def cancelled(self) -> bool:
        return self.session.cancel.is_set() or (
            self.deadline is not None and time.monotonic() > self.deadline
        )

    def progress(self, event: p.Progress, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.session.send(event)

    def need_backup_dir(self) -> Path:
        if self.backup_dir is None:
            raise WorkerError("worker request: settings.backup.dir is required for this op")
        return self.backup_dir

    def record(self, entry: history.Entry) -> None:
        if self.history_path is not None:
            history.append(self.history_path, entry)

    def applied_checksums(self) -> dict[int, str]:
        if self.history_path is None:
            return {}
        return history.applied_checksums(history.read(self.history_path).entries)

    # -- environments --

    def open(self, spec: LmdbSpec, *, write: bool, create: bool = False) -> lmdb.Environment:
        """Open (once) the LMDB of ``spec``. ``map_size`` 0 keeps the size recorded in the file."""
        env = self.envs.get(spec.name)
        if env is not None:
            return env
        env = open_lmdb(spec, write=write, create=create)
        self.envs[spec.name] = env
        return env

    def close(self, name: str | None = None) -> None:
        names = [name] if name is not None else list(self.envs)
        for n in names:
            env = self.envs.pop(n, None)
            if env is not None:
                env.close()

    def read_marker_version(self, env: lmdb.Environment, spec: LmdbSpec) -> int | None:
        with env.begin(write=False) as txn:
            found = marker.read_marker(
                env, txn, self.instance, native=spec.native, marker_dbi=self.marker_dbi
            )
        return found.version if found else None


def open_lmdb(spec: LmdbSpec, *, write: bool, create: bool = False) -> lmdb.Environment:
    """Open an LMDB as the worker does: :func:`migrator.open_env` (``map_size`` 0 = the file's size,
    writemap for writers), read-only unless ``write``."""
    return migrator.open_env(spec, readonly=not write, create=create)


def _exists(spec: LmdbSpec) -> bool:
    return backupdir.data_file(spec).is_file()


def _names(job: Job) -> list[str]:
    return [s.name for s in job.view.lmdbs]


# ---------------------------------------------------------------------------------------------------
# the overlap test knob


def _overlap_record(record: str, event: str, what: str) -> None:
    line = json.dumps({"pid": os.getpid(), "event": event, "time_ns": time.time_ns(), "what": what})
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def write_guard(what: str) -> Iterator[None]:
    """Bracket an LMDB write for the overlap test knob (a no-op unless OVERLAP_ENV is set)."""
    record = os.environ.get(OVERLAP_ENV)
    if not record:
        yield
        return
    fd = os.open(record + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _overlap_record(record, "overlap", what)
            raise WorkerError(
                f"{record}.lock is held: a Lightning Stream (stand-in) runs during {what}"
            ) from None
        _overlap_record(record, "write_txn_begin", what)
        try:
            yield
        finally:
            _overlap_record(record, "write_txn_end", what)
    finally:
        os.close(fd)


def _history_step(
    job: Job, result: p.StepResult, step: migrations.Step, backup_id: str | None
) -> history.Entry:
    end = history.now_iso()
    return history.Entry(
        kind=history.Kind.MIGRATE,
        result=history.Result.OK,
        start=_iso_before(result.duration_s),
        end=end,
        lmdb=result.lmdb,
        instance=job.instance,
        from_version=result.from_version,
        to_version=result.to_version,
        migration=result.migration or None,
        migration_version=step.migration.version if step.migration else None,
        checksum=result.checksum or None,
        keys=result.puts + result.deletes + result.copied + result.raw_writes,
        bytes=result.bytes_written,
        backup_id=backup_id,
        extra={"duration_s": round(result.duration_s, 6), "txn_id": result.txn_id},
    )


def _iso_before(seconds: float) -> str:
    import datetime as _dt

    t = _dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=seconds)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _failed_step(
    plans: Sequence[_Planned], envs: Mapping[str, lmdb.Environment], job: Job
) -> migrations.Step | None:
    """The step that was running when a migration failed: the first planned step whose target the
    marker has not reached (read back after the abort)."""
    for pl in plans:
        env = envs.get(pl.spec.name)
        if env is None:
            continue
        try:
            version = job.read_marker_version(env, pl.spec)
        except (lmdb.Error, MigrationError):
            version = None
        for step in pl.steps:
            if version is None or version < step.to_version:
                return step
    return None


def _file_identity(path: Path) -> str:
    """Size, mtime and inode of a file: any write through LMDB changes the mtime (hashing a sparse,
    map-sized data file would cost seconds)."""
    st = path.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} ino={st.st_ino}"


def parse_readers(text: str) -> list[tuple[int, str, int | None]]:
    """Parse py-lmdb's ``Environment.readers()`` (mdb_reader_list) text: (pid, thread, txnid|None)."""
    found: list[tuple[int, str, int | None]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit():
            continue  # the header line, or "(no active readers)"
        pid, thread, txnid = parts
        found.append((int(pid), thread, None if txnid == "-" else int(txnid)))
    return found


# ---------------------------------------------------------------------------------------------------
# planning across LMDBs


@dataclasses.dataclass(frozen=True, slots=True)
class _Planned:
    """One LMDB's plan, with the parts the worker needs beyond what goes on the wire."""

    spec: LmdbSpec
    info: p.LmdbPlan
    steps: tuple[migrations.Step, ...]

    @property
    def exists(self) -> bool:
        return self.info.exists


def step_info(step: migrations.Step) -> p.StepInfo:
    mig = step.migration
    return p.StepInfo(
        lmdb=step.lmdb,
        from_version=step.from_version,
        to_version=step.to_version,
        migration=mig.name if mig else None,
        description=mig.description if mig else "marker only",
        strategy=mig.strategy.value if mig else None,
        checksum=mig.checksum if mig else None,
    )


def _plan_all(job: Job, migs: migrations.MigrationSet, target: int | None) -> tuple[int, list[_Planned]]:
    goal = migrations.plan(migs, {}, target).target  # validates the target
    baseline = job.settings.baseline
    migrations.check_checksums(migs, job.applied_checksums())
    plans: list[_Planned] = []
    for spec in job.view.lmdbs:
        if not _exists(spec):
            info = p.LmdbPlan(spec.name, False, None, False, None, p.PlanAction.STAMP)
            plans.append(_Planned(spec, info, ()))
            continue
        env = job.open(spec, write=False)
        state = marker.read_state(env, spec, job.instance, job.marker_dbi)
        found = state.marker
        if found is None and not state.has_user_data:
            plans.append(
                _Planned(spec, p.LmdbPlan(spec.name, True, None, False, None, p.PlanAction.STAMP), ())
            )
            continue
        if found is None:
            if baseline is None:
                raise migrator.unmarked_with_data(spec, job.instance)
            current, action = baseline, p.PlanAction.BASELINE
        else:
            current, action = found.version, p.PlanAction.MIGRATE
            applied = migs.by_name(found.migration) if found.migration else None
            if applied is not None and found.checksum and applied.checksum != found.checksum:
                raise migrator.checksum_mismatch(applied, spec, found.checksum)
        steps = migrations.plan(migs, {spec.name: current}, target).steps
        if not steps and action is p.PlanAction.MIGRATE:
            action = p.PlanAction.NONE
        info = p.LmdbPlan(
            lmdb=spec.name,
            exists=True,
            marker_version=found.version if found else None,
            has_user_data=state.has_user_data,
            current=current,
            action=action,
            steps=tuple(step_info(s) for s in steps),
        )
        plans.append(_Planned(spec, info, steps))
    return goal, plans


# ---------------------------------------------------------------------------------------------------
# ops


def _op_plan(job: Job, request: p.PlanRequest) -> p.PlanResult:
    migs = job.session.migrations(job.settings, load=False)
    goal, plans = _plan_all(job, migs, request.target)
    return p.PlanResult(
        target=goal,
        newest=migs.newest,
        lmdbs=tuple(pl.info for pl in plans),
        steps=tuple(s for pl in plans for s in pl.info.steps),
    )


def _op_import(job: Job, request: p.ImportRequest) -> p.ImportResult:
    """Compile and execute the migration files (module-level code runs; ``upgrade`` does not)."""
    started = time.monotonic()
    job.progress(p.Progress(p.Phase.IMPORT), force=True)
    migs = job.session.migrations(job.settings, load=True)
    return p.ImportResult(
        migrations=tuple(m.name for m in migs.migrations), duration_s=round(time.monotonic() - started, 6)
    )


def _op_markers(job: Job) -> p.MarkersResult:
    out: list[p.LmdbState] = []
    for spec in job.view.lmdbs:
        if not _exists(spec):
            out.append(p.LmdbState(spec.name, spec.path, False, None, None, False, 0, 0, 0))
            continue
        env = job.open(spec, write=False)
        state = marker.read_state(env, spec, job.instance, job.marker_dbi)
        info = env.info()
        out.append(
            p.LmdbState(
                lmdb=spec.name,
                path=spec.path,
                exists=True,
                version=state.marker.version if state.marker else None,
                marker=state.marker,
                has_user_data=state.has_user_data,
                last_txnid=int(info["last_txnid"]),
                map_size=int(info["map_size"]),
                used_bytes=backup.env_used_bytes(env),
            )
        )
    return p.MarkersResult(instance=job.instance, lmdbs=tuple(out))


def _op_readers(job: Job) -> p.ReadersResult:
    out: list[p.LmdbReaders] = []
    me = os.getpid()
    for spec in job.view.lmdbs:
        if not _exists(spec):
            out.append(p.LmdbReaders(spec.name, False, None))
            continue
        # Ask the kernel who holds LMDB's lock-file lock BEFORE we open the environment ourselves:
        # closing a second descriptor of lock.mdb later would drop our own LMDB locks.
        holder = backup.lock_holder(spec)
        env = job.open(spec, write=False)
        with contextlib.suppress(lmdb.Error):
            env.reader_check()  # clear slots of dead processes first
        readers = []
        for pid, thread, txnid in parse_readers(env.readers()):
            if pid == me:
                continue
            who = describe_pid(pid)
            readers.append(
                p.Reader(pid, thread, txnid, bool(who["alive"]), str(who["name"]), tuple(who["cmdline"]))
            )
        out.append(p.LmdbReaders(spec.name, True, holder, tuple(readers)))
    return p.ReadersResult(tuple(out))


class _StepTracker:
    """Maps the migrator's progress and step callbacks onto the global plan for progress replies."""

    def __init__(self, job: Job, steps: Sequence[migrations.Step], phase: p.Phase) -> None:
        self.job = job
        self.steps = list(steps)
        self.phase = phase
        self.index = 0
        self.reported = -1  # index of the last step that reported progress
        self.step_started = time.monotonic()
        # Wall-clock start of each step, for the history entry of a step that fails or is cancelled
        # (a committed step knows its own duration). Steps run back to back: one starts when the
        # previous one committed, the first when the phase starts.
        self._step_starts: dict[tuple[str, int], str] = {}
        self._api: migrator.MigrationApi | None = None
        self._mark_current_started()

    def _mark_current_started(self) -> None:
        self.step_started = time.monotonic()
        step = self.current
        if step is not None:
            self._step_starts[(step.lmdb, step.to_version)] = history.now_iso()

    def start_of(self, step: migrations.Step) -> str | None:
        """When ``step`` started (ISO, UTC), or None when it never became the running step."""
        return self._step_starts.get((step.lmdb, step.to_version))

    @property
    def current(self) -> migrations.Step | None:
        return self.steps[self.index] if self.index < len(self.steps) else None

    def _event(self, lmdb_name: str, migration: str, **fields: int | float | None) -> p.Progress:
        step = self.current
        return p.Progress(
            phase=self.phase,
            lmdb=lmdb_name,
            migration=migration or (step.migration.name if step and step.migration else ""),
            from_version=step.from_version if step else None,
            to_version=step.to_version if step else None,
            index=self.index,
            steps=len(self.steps),
            elapsed_s=round(time.monotonic() - self.step_started, 3),
            **fields,  # type: ignore[arg-type]
        )

    def on_progress(self, pr: migrator.Progress) -> None:
        # The first report of each step always goes out: "step k's transaction is open" is what a
        # watcher (the daemon's status, the crash test) needs to see, throttling or not.
        first = self.reported != self.index
        self.reported = self.index
        event = self._event(
            pr.lmdb, pr.migration, done=pr.done, total=pr.total, read=pr.read, written=pr.written
        )
        self.job.progress(event, force=first or pr.done >= pr.total)

    def on_start(self, api: migrator.MigrationApi) -> None:
        """A step's transaction is open: say so at once (the daemon shows MIGRATING from here)."""
        self._api = api
        self.reported = self.index
        self.job.progress(self._event(api.lmdb, api.migration), force=True)

    def heartbeat(self) -> None:
        """Every HEARTBEAT_S from the heartbeat thread: the API's own counters, no code in the
        migration needed (m.progress refines it with done/total)."""
        api = self._api
        if api is None or self.current is None:
            return
        pr = api.snapshot()
        done = pr.done if pr.total else None
        total = pr.total or None
        self.job.progress(
            self._event(pr.lmdb, pr.migration, read=pr.read, written=pr.written, done=done, total=total),
            force=True,
        )

    @contextlib.contextmanager
    def beating(self) -> Iterator[None]:
        """Run the heartbeat thread while the steps run."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                self.heartbeat()

        thread = threading.Thread(target=beat, name="lssupervisor-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def on_step(self, result: p.StepResult) -> migrations.Step:
        step = self.current
        assert step is not None and step.lmdb == result.lmdb and step.to_version == result.to_version, (
            f"migrator ran {result.lmdb} {result.from_version}->{result.to_version}, "
            f"planned {step.describe() if step else 'nothing'}"
        )
        event = p.Progress(
            phase=p.Phase.STEP_COMMITTED,
            lmdb=result.lmdb,
            migration=result.migration,
            from_version=result.from_version,
            to_version=result.to_version,
            index=self.index,
            steps=len(self.steps),
            elapsed_s=round(result.duration_s, 6),
        )
        self.index += 1
        self._api = None
        self._mark_current_started()
        self.job.progress(event, force=True)
        return step


# Kept whole: the step loop's whole context; a bundle type would only rename it.
def _migrate_envs(  # noqa: PLR0913
    job: Job,
    migs: migrations.MigrationSet,
    plans: Sequence[_Planned],
    envs: Mapping[str, lmdb.Environment],
    specs: Mapping[str, LmdbSpec],
    *,
    target: int | None,
    tracker: _StepTracker,
    on_step: Callable[[p.StepResult, migrations.Step], None],
    guard: bool,
) -> list[p.MigrateResult]:
    def step_done(result: p.StepResult) -> None:
        on_step(result, tracker.on_step(result))

    results: list[p.MigrateResult] = []
    with tracker.beating():
        for pl in plans:
            spec = specs[pl.spec.name]
            guarded = write_guard(f"{tracker.phase.value} of LMDB {spec.name}")
            with guarded if guard else contextlib.nullcontext():
                results.append(
                    migrator.migrate(
                        envs[spec.name],
                        spec,
                        migs,
                        instance=job.instance,
                        target=target,
                        baseline=job.settings.baseline,
                        marker_dbi=job.marker_dbi,
                        cancel=job.cancelled,
                        progress=tracker.on_progress,
                        on_start=tracker.on_start,
                        logger=logging.getLogger("lssupervisor.migration"),
                        grow_map=job.settings.grow_map,
                        on_step=step_done,
                    )
                )
    return results


def _cancel_message(job: Job, exc: MigrationCancelled) -> MigrationCancelled:
    if job.deadline is not None and time.monotonic() > job.deadline and not job.session.cancel.is_set():
        return MigrationCancelled(f"{exc} (migrations.timeout of {job.timeout:g}s expired)")
    return exc


class _Failed(MigrationError):
    """A migrate that failed after taking its backup: the failure carries the backup's id."""

    def __init__(self, exc: SupervisorError, backup_id: str | None) -> None:
        super().__init__(exc.message, remedy=exc.remedy)
        self.code = exc.code
        self.exit_code = exc.exit_code
        self.backup_id = backup_id


def _op_migrate(job: Job, request: p.MigrateRequest) -> p.MigrateDone:
    started = time.monotonic()
    migs = job.session.migrations(job.settings, load=True)
    goal, plans = _plan_all(job, migs, request.target)
    job.close()  # planning opened read-only; reopen for writing
    backup_id: str | None = None
    try:
        if any(pl.steps for pl in plans):
            existing = [pl.spec for pl in plans if pl.exists]
            if job.settings.backup.enabled and existing:
                backup_id = _take_backup(job, existing, reason=f"before migrating to {goal}", reuse=True).id
            elif not job.settings.backup.enabled:
                log.warning("backup disabled: migrating without a backup")
        results = _run_steps(job, migs, plans, request.target, backup_id)
    except SupervisorError as exc:
        if isinstance(exc, MigrationCancelled):
            exc = _cancel_message(job, exc)
        raise _Failed(exc, backup_id) from None
    return p.MigrateDone(
        target=goal,
        backup_id=backup_id,
        lmdbs=tuple(results),
        steps=sum(len(r.steps) for r in results),
        duration_s=round(time.monotonic() - started, 6),
    )


def _run_steps(
    job: Job,
    migs: migrations.MigrationSet,
    plans: Sequence[_Planned],
    target: int | None,
    backup_id: str | None,
) -> list[p.MigrateResult]:
    envs = {pl.spec.name: job.open(pl.spec, write=True, create=not pl.exists) for pl in plans}
    specs = {pl.spec.name: pl.spec for pl in plans}

    def record(result: p.StepResult, step: migrations.Step) -> None:
        job.record(_history_step(job, result, step, backup_id))

    tracker = _StepTracker(job, [s for pl in plans for s in pl.steps], p.Phase.MIGRATE)
    try:
        results = _migrate_envs(
            job, migs, plans, envs, specs, target=target, tracker=tracker, on_step=record, guard=True
        )
    except SupervisorError as exc:
        failed = _failed_step(plans, envs, job)
        if failed is not None:
            ended = history.now_iso()
            job.record(
                history.Entry(
                    kind=history.Kind.MIGRATE,
                    result=history.Result.CANCELLED
                    if isinstance(exc, MigrationCancelled)
                    else history.Result.FAILED,
                    start=tracker.start_of(failed) or ended,
                    end=ended,
                    lmdb=failed.lmdb,
                    instance=job.instance,
                    from_version=failed.from_version,
                    to_version=failed.to_version,
                    migration=failed.migration.name if failed.migration else None,
                    migration_version=failed.migration.version if failed.migration else None,
                    checksum=failed.migration.checksum if failed.migration else None,
                    backup_id=backup_id,
                    message=str(exc),
                )
            )
        raise
    for r in results:
        if r.stamped == "empty" or (r.stamped == "baseline" and not r.steps):
            job.record(
                history.Entry(
                    kind=history.Kind.STAMP,
                    result=history.Result.OK,
                    start=history.now_iso(),
                    end=history.now_iso(),
                    lmdb=r.lmdb,
                    instance=job.instance,
                    from_version=None,
                    to_version=r.after.version if r.after else None,
                    message="empty LMDB stamped with the target"
                    if r.stamped == "empty"
                    else "unmarked LMDB stamped with schema.baseline",
                )
            )
    return results


def _take_backup(
    job: Job, specs: Sequence[LmdbSpec], *, reason: str, protect: Sequence[str] = (), reuse: bool = False
) -> backupdir.Manifest:
    directory = job.need_backup_dir()
    envs = {s.name: job.open(s, write=False) for s in specs}
    started = time.monotonic()
    if reuse:
        # A retry after a failed step: the LMDB is what the newest backup holds (same txn id and
        # digest), so that backup is this attempt's restore point too; another copy would only push
        # older restore points towards rotation (I9).
        same = backup.reusable(directory, envs, specs, job.read_marker_version)
        if same is not None:
            log.info("backup %s already holds the LMDB(s) as they are (unchanged since): reused", same.id)
            names = ", ".join(s.name for s in specs)
            job.progress(p.Progress(p.Phase.BACKUP_DONE, lmdb=names, bytes=0), force=True)
            job.record(
                history.Entry(
                    kind=history.Kind.BACKUP,
                    result=history.Result.NOOP,
                    start=history.now_iso(),
                    end=history.now_iso(),
                    instance=job.instance,
                    to_version=same.schema_version,
                    backup_id=same.id,
                    message=f"{reason}: reused {same.id} (LMDB unchanged since it was taken)",
                )
            )
            for s in specs:
                job.close(s.name)
            return same
    job.progress(p.Progress(p.Phase.BACKUP, lmdb=", ".join(s.name for s in specs)), force=True)
    manifest = backup.create(
        envs,
        specs,
        directory,
        job.instance,
        job.read_marker_version,
        keep=job.settings.backup.keep,
        reason=reason,
        progress=lambda event: job.progress(
            p.Progress(p.Phase.BACKUP_DONE, lmdb=str(event["lmdb"]), bytes=int(event["bytes"])), force=True
        ),
        protect=protect,
    )
    duration = time.monotonic() - started
    job.record(
        history.Entry(
            kind=history.Kind.BACKUP,
            result=history.Result.OK,
            start=_iso_before(duration),
            end=history.now_iso(),
            instance=job.instance,
            to_version=manifest.schema_version,
            bytes=manifest.size,
            backup_id=manifest.id,
            message=reason or None,
            extra={"duration_s": round(duration, 6)},
        )
    )
    for s in specs:
        job.close(s.name)
    return manifest


def _op_dry_run(job: Job, request: p.DryRunRequest) -> p.DryRunResult:
    started = time.monotonic()
    target = request.target
    migs = job.session.migrations(job.settings, load=True)
    goal, plans = _plan_all(job, migs, target)
    directory = job.need_backup_dir()
    ensure_private_dir(directory)
    backupdir.clean_stale_partials(directory, prefix=".dryrun-")
    existing = [pl for pl in plans if pl.exists]
    used = sum(backup.env_used_bytes(job.open(pl.spec, write=False)) for pl in existing)
    backupdir.check_free_space(
        directory,
        backupdir.space_needed(2 * used),
        "a dry run on a copy (twice the LMDBs' used size: the copy and the migration's writes, + margin)",
        "free space, or move backup.dir (the dry run works there)",
    )
    work = directory / f".dryrun-{backupdir.new_backup_id(None)}{backupdir.PARTIAL_SUFFIX}"
    backupdir.make_private_dir(work)  # a copy of the data: ours only
    backupdir.claim(work)
    out: list[p.DryRunLmdb] = []
    copies: dict[str, lmdb.Environment] = {}
    try:
        copy_specs: dict[str, LmdbSpec] = {}
        before: dict[str, tuple[int, str | None]] = {}  # last txn id, file identity
        for pl in plans:
            copy_dir = work / pl.spec.name
            backupdir.make_private_dir(copy_dir)
            if pl.exists:
                live = job.open(pl.spec, write=False)
                info = live.info()
                before[pl.spec.name] = (int(info["last_txnid"]), _file_identity(backupdir.data_file(pl.spec)))
                live.copy(
                    str(copy_dir / backupdir.DATA_FILE if pl.spec.no_subdir else copy_dir), compact=True
                )
                map_size = max(pl.spec.map_size, int(info["map_size"]))
            else:
                before[pl.spec.name] = (0, None)
                map_size = pl.spec.map_size
            copy_specs[pl.spec.name] = dataclasses.replace(
                pl.spec, path=str(copy_dir), no_subdir=False, map_size=map_size
            )
            copies[pl.spec.name] = open_lmdb(copy_specs[pl.spec.name], write=True, create=True)
        per_lmdb: dict[str, list[p.StepResult]] = {pl.spec.name: [] for pl in plans}

        def collect(result: p.StepResult, step: migrations.Step) -> None:
            per_lmdb[result.lmdb].append(result)

        tracker = _StepTracker(job, [s for pl in plans for s in pl.steps], p.Phase.DRY_RUN)
        try:
            _migrate_envs(
                job,
                migs,
                plans,
                copies,
                copy_specs,
                target=target,
                tracker=tracker,
                on_step=collect,
                guard=False,
            )
        except MigrationCancelled as exc:
            raise _cancel_message(job, exc) from None
        for pl in plans:
            name = pl.spec.name
            results = per_lmdb[name]
            after_txnid, after_identity = 0, None
            if pl.exists:
                after_txnid = int(job.envs[name].info()["last_txnid"])
                after_identity = _file_identity(backupdir.data_file(pl.spec))
            out.append(
                p.DryRunLmdb(
                    lmdb=name,
                    steps=tuple(results),
                    keys=sum(r.puts + r.deletes + r.copied + r.raw_writes for r in results),
                    bytes=sum(r.bytes_written for r in results),
                    duration_s=round(sum(r.duration_s for r in results), 6),
                    live_last_txnid_before=before[name][0],
                    live_last_txnid_after=after_txnid,
                    live_file_before=before[name][1],
                    live_file_after=after_identity,
                )
            )
    finally:
        for env in copies.values():
            env.close()
        shutil.rmtree(work, ignore_errors=True)
    changed = tuple(
        o.lmdb
        for o in out
        if (o.live_file_before, o.live_last_txnid_before) != (o.live_file_after, o.live_last_txnid_after)
    )
    if changed:
        # The live envs were opened read-only (MDB_RDONLY): LMDB itself forbids a write by us, so a
        # change here was made by LS or the application while we copied. Say so; it is no failure.
        log.warning(
            "dry run: live LMDB(s) %s changed during the dry run (written by another process: "
            "our environment was read-only)",
            ", ".join(changed),
        )
    return p.DryRunResult(
        target=goal,
        live_changed_by_others=changed,
        plan=tuple(pl.info for pl in plans),
        lmdbs=tuple(out),
        duration_s=round(time.monotonic() - started, 6),
    )


def _op_stamp(job: Job, request: p.StampRequest) -> p.StampResult:
    version, only = request.version, request.lmdb
    migs = job.session.migrations(job.settings, load=False)
    if not 0 <= version <= migs.newest:
        raise MigrationError(
            f"cannot stamp version {version}: the migrations in {migs.directory} know versions "
            f"0..{migs.newest}"
        )
    specs = [s for s in job.view.lmdbs if only is None or s.name == only]
    if not specs:
        raise UsageError(
            f"stamp --lmdb {only}: no such LMDB in the LS config (known: {', '.join(_names(job))})"
        )
    out: list[p.Stamped] = []
    for spec in specs:
        env = job.open(spec, write=True, create=not _exists(spec))
        old = job.read_marker_version(env, spec)
        if old is not None and old > version:
            log.warning(
                "stamping LMDB %s DOWN from %d to %d: the data is not migrated back", spec.name, old, version
            )
        with write_guard(f"stamp of LMDB {spec.name}"):
            new = marker.stamp(env, spec, version, instance=job.instance, marker_dbi=job.marker_dbi)
        job.record(
            history.Entry(
                kind=history.Kind.STAMP,
                result=history.Result.OK,
                start=new.time,
                end=history.now_iso(),
                lmdb=spec.name,
                instance=job.instance,
                from_version=old,
                to_version=version,
                message="lssupervisor stamp",
            )
        )
        out.append(p.Stamped(spec.name, old, version))
    return p.StampResult(tuple(out))


def _op_backup(job: Job, request: p.BackupRequest) -> p.BackupResult:
    specs = [s for s in job.view.lmdbs if _exists(s)]
    if not specs:
        raise BackupError(f"no LMDB of instance {job.instance!r} exists yet; nothing to back up")
    started = time.monotonic()
    manifest = _take_backup(job, specs, reason=request.reason or "manual")
    duration = time.monotonic() - started
    return p.BackupResult(
        backup=manifest,
        duration_s=round(duration, 6),
        bytes_per_s=int(manifest.size / duration) if duration > 0 else None,
    )


def _op_backups(job: Job) -> p.BackupsResult:
    directory = job.need_backup_dir()
    return p.BackupsResult(tuple(b.manifest for b in backupdir.list_backups(directory)))


def _op_rollback(job: Job, request: p.RollbackRequest) -> p.RollbackResult:
    directory = job.need_backup_dir()
    info = backupdir.find_backup(directory, request.backup_id)
    manifest = info.manifest
    by_name = {s.name: s for s in job.view.lmdbs}
    # Versions before the restore, and whether anything would change at all.
    before: dict[str, int | None] = {}
    differs = False
    for entry in manifest.lmdbs:
        spec = by_name.get(entry.name)
        if spec is None:
            continue  # restore() names it
        if _exists(spec):
            env = job.open(spec, write=False)
            before[entry.name] = job.read_marker_version(env, spec)
            differs = differs or not backupdir.holds_copy(backupdir.data_file(spec), entry)
        else:
            before[entry.name] = None
            differs = True
    pre_backup: str | None = None
    if differs and job.settings.backup.enabled:
        live = [by_name[e.name] for e in manifest.lmdbs if e.name in by_name and _exists(by_name[e.name])]
        if live:
            pre_backup = _take_backup(
                job, live, reason=f"{backupdir.PRE_ROLLBACK_REASON}{manifest.id}", protect=(manifest.id,)
            ).id
    # restore() must not run while this process has an environment open (see backup.exclusive_env).
    job.close()
    started = history.now_iso()
    with write_guard(f"rollback to {manifest.id}"):
        manifest, restored = backup.restore(directory, manifest.id, job.view.lmdbs, job.read_marker_version)
    out: list[p.Restored] = []
    for r in restored:
        job.record(
            history.Entry(
                kind=history.Kind.ROLLBACK,
                result=history.Result.OK if r.restored else history.Result.NOOP,
                start=started,
                end=history.now_iso(),
                lmdb=r.name,
                instance=job.instance,
                from_version=before.get(r.name),
                to_version=r.schema_version,
                backup_id=manifest.id,
                message=None if r.restored else "already in place",
            )
        )
        out.append(p.Restored(r.name, r.restored, before.get(r.name), r.schema_version))
    return p.RollbackResult(
        backup_id=manifest.id,
        schema_version=manifest.schema_version,
        lmdbs=tuple(out),
        pre_rollback_backup=pre_backup,
    )


def _op_fleet(job: Job) -> p.FleetResult:
    out: list[p.FleetLmdb] = []
    for spec in job.view.lmdbs:
        if not _exists(spec):
            out.append(p.FleetLmdb(spec.name, False))
            continue
        env = job.open(spec, write=False)
        with env.begin(write=False) as txn:
            found = marker.read_markers(env, txn, native=spec.native, marker_dbi=job.marker_dbi)
        out.append(p.FleetLmdb(spec.name, True, tuple(found)))
    return p.FleetResult(instance=job.instance, lmdbs=tuple(out))

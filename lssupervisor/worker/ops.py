"""The worker's operations: each serves one request with the LMDBs open in this process."""

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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from lssupervisor.errors import (
    BackupError,
    MigrationCancelled,
    MigrationError,
    SupervisorError,
    UsageError,
    WorkerError,
)
from lssupervisor.lsmodel import LmdbSpec, LsView
from lssupervisor.proc import describe_pid
from lssupervisor.worker import backup, backupdir, history, marker, migrations, migrator

if TYPE_CHECKING:
    pass


Message = dict[str, Any]
OnMessage = Callable[[Message], None]

WORKER_MODULE = "lssupervisor.worker"
OVERLAP_ENV = "LSSUPERVISOR_TEST_OVERLAP_LOCK"
PARENT_ENV = "LSSUPERVISOR_WORKER_PARENT"
STDERR_TAIL_LINES = 200
OPS = ("markers", "readers", "plan", "migrate", "dry_run", "stamp", "backup", "backups", "rollback", "fleet")
_PR_SET_PDEATHSIG = 1
_PROGRESS_INTERVAL_S = 0.1


# ---------------------------------------------------------------------------------------------------
# request fields


def _field(request: Mapping[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = request.get(key)
    if value is None and optional:
        return None
    if kind is int and isinstance(value, bool):
        raise WorkerError(f"worker request: {key}: expected an integer, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        raise WorkerError(f"worker request: {key}: expected {kind.__name__}, got {value!r}")
    return value


@dataclasses.dataclass
class Job:
    """One request being served: parsed fields, open environments, cancellation."""

    request: Mapping[str, Any]
    send: Callable[[Message], None]
    cancel: threading.Event
    view: LsView
    marker_dbi: str
    history_path: Path | None
    backup_dir: Path | None
    backup_keep: int
    backup_enabled: bool
    deadline: float | None
    timeout: float | None
    envs: dict[str, lmdb.Environment] = dataclasses.field(default_factory=dict)
    _last_progress: float = 0.0

    @classmethod
    def parse(
        cls, request: Mapping[str, Any], send: Callable[[Message], None], cancel: threading.Event
    ) -> Job:
        ls = request.get("ls")
        if not isinstance(ls, dict):
            raise WorkerError("worker request: ls: expected the LS view object")
        try:
            view = LsView.from_json(ls)
        except (KeyError, TypeError) as exc:
            raise WorkerError(f"worker request: ls: bad LS view ({exc})") from None
        bk = request.get("backup") or {}
        if not isinstance(bk, dict):
            raise WorkerError("worker request: backup: expected an object")
        timeout = _field(request, "timeout", float, optional=True)
        hist = request.get("history")
        bdir = bk.get("dir")
        return cls(
            request=request,
            send=send,
            cancel=cancel,
            view=view,
            marker_dbi=str(request.get("marker_dbi") or marker.DEFAULT_MARKER_DBI),
            history_path=Path(hist) if hist else None,
            backup_dir=Path(bdir) if bdir else None,
            backup_keep=int(bk.get("keep", 5)),
            backup_enabled=bool(bk.get("enabled", True)),
            deadline=time.monotonic() + timeout if timeout else None,
            timeout=timeout,
        )

    @property
    def instance(self) -> str:
        return self.view.instance

    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def progress(self, event: Message, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= _PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.send({"type": "progress", **event})

    def need_backup_dir(self) -> Path:
        if self.backup_dir is None:
            raise WorkerError("worker request: backup.dir is required for this op")
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


# ---------------------------------------------------------------------------------------------------
# planning across LMDBs


@dataclasses.dataclass(frozen=True, slots=True)
class LmdbPlan:
    spec: LmdbSpec
    exists: bool
    marker_version: int | None
    has_user_data: bool
    current: int | None  # the version planning starts from (marker, or baseline); None: will be stamped
    action: str  # none | stamp | migrate | baseline
    steps: tuple[migrations.Step, ...]

    def to_json(self) -> Message:
        return {
            "lmdb": self.spec.name,
            "exists": self.exists,
            "marker_version": self.marker_version,
            "has_user_data": self.has_user_data,
            "current": self.current,
            "action": self.action,
            "steps": [_step_json(s) for s in self.steps],
        }


def _step_json(step: migrations.Step) -> Message:
    mig = step.migration
    return {
        "lmdb": step.lmdb,
        "from": step.from_version,
        "to": step.to_version,
        "migration": mig.name if mig else None,
        "description": mig.description if mig else "marker only",
        "strategy": mig.strategy.value if mig else None,
        "checksum": mig.checksum if mig else None,
    }


def _plan_all(job: Job, migs: migrations.MigrationSet, target: int | None) -> tuple[int, list[LmdbPlan]]:
    goal = migrations.plan(migs, {}, target).target  # validates the target
    baseline = _field(job.request, "baseline", int, optional=True)
    migrations.check_checksums(migs, job.applied_checksums())
    plans: list[LmdbPlan] = []
    for spec in job.view.lmdbs:
        if not _exists(spec):
            plans.append(LmdbPlan(spec, False, None, False, None, "stamp", ()))
            continue
        env = job.open(spec, write=False)
        state = marker.read_state(env, spec, job.instance, job.marker_dbi)
        found = state.marker
        if found is None and not state.has_user_data:
            plans.append(LmdbPlan(spec, True, None, False, None, "stamp", ()))
            continue
        if found is None:
            if baseline is None:
                raise migrator.unmarked_with_data(spec, job.instance)
            current, action = baseline, "baseline"
        else:
            current, action = found.version, "migrate"
            applied = migs.by_name(found.migration) if found.migration else None
            if applied is not None and found.checksum and applied.checksum != found.checksum:
                raise migrator.checksum_mismatch(applied, spec, found.checksum)
        steps = migrations.plan(migs, {spec.name: current}, target).steps
        if not steps and action == "migrate":
            action = "none"
        plans.append(
            LmdbPlan(
                spec, True, found.version if found else None, state.has_user_data, current, action, steps
            )
        )
    return goal, plans


def _source(job: Job) -> str:
    source = job.request.get("migrations")
    if not isinstance(source, str) or not source:
        raise WorkerError("worker request: migrations: expected the migrations directory or package")
    return source


def _names(job: Job) -> list[str]:
    return [s.name for s in job.view.lmdbs]


# ---------------------------------------------------------------------------------------------------
# ops


def run_op(request: Mapping[str, Any], send: Callable[[Message], None], cancel: threading.Event) -> Message:
    """Serve one request in this process (the worker's core; tests may call it directly). Returns the
    result fields; raises SupervisorError for expected failures. Every environment opened is closed."""
    op = request.get("op")
    if request.get("dry_run") and op == "migrate":
        op = "dry_run"
    job = Job.parse(request, send, cancel)
    try:
        match op:
            case "markers":
                return _op_markers(job)
            case "readers":
                return _op_readers(job)
            case "plan":
                return _op_plan(job)
            case "migrate":
                return _op_migrate(job)
            case "dry_run":
                return _op_dry_run(job)
            case "stamp":
                return _op_stamp(job)
            case "backup":
                return _op_backup(job)
            case "backups":
                return _op_backups(job)
            case "rollback":
                return _op_rollback(job)
            case "fleet":
                return _op_fleet(job)
            case _:
                raise WorkerError(f"worker request: op: unknown op {op!r} (known: {', '.join(OPS)})")
    finally:
        job.close()


def _op_markers(job: Job) -> Message:
    out: list[Message] = []
    for spec in job.view.lmdbs:
        if not _exists(spec):
            out.append(
                {
                    "lmdb": spec.name,
                    "path": spec.path,
                    "exists": False,
                    "version": None,
                    "marker": None,
                    "has_user_data": False,
                    "empty": True,
                    "last_txnid": 0,
                    "map_size": 0,
                    "used_bytes": 0,
                }
            )
            continue
        env = job.open(spec, write=False)
        state = marker.read_state(env, spec, job.instance, job.marker_dbi)
        info = env.info()
        out.append(
            {
                "lmdb": spec.name,
                "path": spec.path,
                "exists": True,
                "version": state.marker.version if state.marker else None,
                "marker": asdict(state.marker) if state.marker else None,
                "has_user_data": state.has_user_data,
                "empty": not state.has_user_data,
                "last_txnid": int(info["last_txnid"]),
                "map_size": int(info["map_size"]),
                "used_bytes": backup.env_used_bytes(env),
            }
        )
    return {"instance": job.instance, "lmdbs": out}


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


def _op_readers(job: Job) -> Message:
    out: list[Message] = []
    me = os.getpid()
    for spec in job.view.lmdbs:
        if not _exists(spec):
            out.append({"lmdb": spec.name, "exists": False, "open_by_pid": None, "readers": []})
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
            readers.append({"pid": pid, "thread": thread, "txnid": txnid, **describe_pid(pid)})
        out.append({"lmdb": spec.name, "exists": True, "open_by_pid": holder, "readers": readers})
    return {"lmdbs": out}


def _op_plan(job: Job) -> Message:
    migs = migrations.discover(_source(job), _names(job))
    target = _field(job.request, "target", int, optional=True)
    goal, plans = _plan_all(job, migs, target)
    return {
        "target": goal,
        "newest": migs.newest,
        "lmdbs": [p.to_json() for p in plans],
        "steps": [_step_json(s) for p in plans for s in p.steps],
    }


def _history_step(
    job: Job, result: migrator.StepResult, step: migrations.Step, backup_id: str | None
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


class _StepTracker:
    """Maps the migrator's progress and step callbacks onto the global plan for progress events."""

    def __init__(self, job: Job, steps: Sequence[migrations.Step], phase: str) -> None:
        self.job = job
        self.steps = list(steps)
        self.phase = phase
        self.index = 0
        self.reported = -1  # index of the last step that reported progress
        self.started = time.monotonic()
        # Wall-clock start of each step, for the history entry of a step that fails or is cancelled
        # (a committed step knows its own duration). Steps run back to back: one starts when the
        # previous one committed, the first when the phase starts.
        self._step_starts: dict[tuple[str, int], str] = {}
        self._mark_current_started()

    def _mark_current_started(self) -> None:
        step = self.current
        if step is not None:
            self._step_starts[(step.lmdb, step.to_version)] = history.now_iso()

    def start_of(self, step: migrations.Step) -> str | None:
        """When ``step`` started (ISO, UTC), or None when it never became the running step."""
        return self._step_starts.get((step.lmdb, step.to_version))

    @property
    def current(self) -> migrations.Step | None:
        return self.steps[self.index] if self.index < len(self.steps) else None

    def on_progress(self, p: migrator.Progress) -> None:
        step = self.current
        percent = round(100.0 * p.done / p.total, 1) if p.total else 100.0
        # The first report of each step always goes out: "step k's transaction is open" is what a
        # watcher (the daemon's status, the crash test) needs to see, throttling or not.
        first = self.reported != self.index
        self.reported = self.index
        self.job.progress(
            {
                "phase": self.phase,
                "lmdb": p.lmdb,
                "step": p.migration or (step.migration.name if step and step.migration else None),
                "from": step.from_version if step else None,
                "to": step.to_version if step else None,
                "done": p.done,
                "total": p.total,
                "percent": percent,
                "index": self.index,
                "steps": len(self.steps),
            },
            force=first or p.done >= p.total,
        )

    def on_step(self, result: migrator.StepResult) -> migrations.Step:
        step = self.current
        assert step is not None and step.lmdb == result.lmdb and step.to_version == result.to_version, (
            f"migrator ran {result.lmdb} {result.from_version}->{result.to_version}, "
            f"planned {step.describe() if step else 'nothing'}"
        )
        self.index += 1
        self._mark_current_started()
        self.job.progress(
            {
                "phase": "step_committed",
                "lmdb": result.lmdb,
                "step": result.migration or None,
                "from": result.from_version,
                "to": result.to_version,
                "index": self.index,
                "steps": len(self.steps),
                "duration_s": round(result.duration_s, 6),
            },
            force=True,
        )
        return step


def _migrate_envs(
    job: Job,
    migs: migrations.MigrationSet,
    plans: Sequence[LmdbPlan],
    envs: Mapping[str, lmdb.Environment],
    specs: Mapping[str, LmdbSpec],
    *,
    target: int | None,
    phase: str,
    on_step: Callable[[migrator.StepResult, migrations.Step], None],
    guard: bool,
    tracker: _StepTracker | None = None,
) -> list[migrator.MigrateResult]:
    """Run every plan's steps; ``tracker`` (default: a new one) when the caller needs step start times."""
    if tracker is None:
        tracker = _StepTracker(job, [s for p in plans for s in p.steps], phase)
    baseline = _field(job.request, "baseline", int, optional=True)
    grow_map = bool(job.request.get("grow_map", False))
    results: list[migrator.MigrateResult] = []
    for p in plans:
        spec = specs[p.spec.name]

        def step_done(result: migrator.StepResult) -> None:
            on_step(result, tracker.on_step(result))

        with write_guard(f"{phase} of LMDB {spec.name}") if guard else contextlib.nullcontext():
            results.append(
                migrator.migrate(
                    envs[spec.name],
                    spec,
                    migs,
                    instance=job.instance,
                    target=target,
                    baseline=baseline,
                    marker_dbi=job.marker_dbi,
                    cancel=job.cancelled,
                    progress=tracker.on_progress,
                    logger=logging.getLogger("lssupervisor.migration"),
                    grow_map=grow_map,
                    on_step=step_done,
                )
            )
    return results


def _cancel_message(job: Job, exc: MigrationCancelled) -> MigrationCancelled:
    if job.deadline is not None and time.monotonic() > job.deadline and not job.cancel.is_set():
        return MigrationCancelled(f"{exc} (migrations.timeout of {job.timeout:g}s expired)")
    return exc


def _op_migrate(job: Job) -> Message:
    started = time.monotonic()
    target = _field(job.request, "target", int, optional=True)
    migs = migrations.load(_source(job), _names(job))
    goal, plans = _plan_all(job, migs, target)
    job.close()  # planning opened read-only; reopen for writing
    backup_id: str | None = None
    if any(p.steps for p in plans):
        existing = [p.spec for p in plans if p.exists]
        if job.backup_enabled and existing:
            backup_id = _take_backup(job, existing, reason=f"before migrating to {goal}").id
        elif not job.backup_enabled:
            logging.getLogger(__name__).warning("backup disabled: migrating without a backup")
    envs = {p.spec.name: job.open(p.spec, write=True, create=not p.exists) for p in plans}
    specs = {p.spec.name: p.spec for p in plans}

    def record(result: migrator.StepResult, step: migrations.Step) -> None:
        job.record(_history_step(job, result, step, backup_id))

    tracker = _StepTracker(job, [s for p in plans for s in p.steps], "migrate")
    try:
        results = _migrate_envs(
            job, migs, plans, envs, specs,
            target=target, phase="migrate", on_step=record, guard=True, tracker=tracker,
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
        if isinstance(exc, MigrationCancelled):
            raise _cancel_message(job, exc) from None
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
    return {
        "target": goal,
        "backup_id": backup_id,
        "lmdbs": [r.to_json() for r in results],
        "steps": sum(len(r.steps) for r in results),
        "duration_s": round(time.monotonic() - started, 6),
    }


def _failed_step(
    plans: Sequence[LmdbPlan], envs: Mapping[str, lmdb.Environment], job: Job
) -> migrations.Step | None:
    """The step that was running when a migration failed: the first planned step whose target the
    marker has not reached (read back after the abort)."""
    for p in plans:
        env = envs.get(p.spec.name)
        if env is None:
            continue
        try:
            version = job.read_marker_version(env, p.spec)
        except (lmdb.Error, MigrationError):
            version = None
        for step in p.steps:
            if version is None or version < step.to_version:
                return step
    return None


def _take_backup(
    job: Job, specs: Sequence[LmdbSpec], *, reason: str, protect: Sequence[str] = ()
) -> backupdir.Manifest:
    directory = job.need_backup_dir()
    envs = {s.name: job.open(s, write=False) for s in specs}
    started = time.monotonic()
    job.progress({"phase": "backup", "event": "start", "lmdbs": [s.name for s in specs]}, force=True)
    manifest = backup.create(
        envs,
        specs,
        directory,
        job.instance,
        job.read_marker_version,
        keep=job.backup_keep,
        reason=reason,
        progress=lambda event: job.progress(event, force=True),
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


def _op_dry_run(job: Job) -> Message:
    started = time.monotonic()
    target = _field(job.request, "target", int, optional=True)
    migs = migrations.load(_source(job), _names(job))
    goal, plans = _plan_all(job, migs, target)
    directory = job.need_backup_dir()
    directory.mkdir(parents=True, exist_ok=True)
    backupdir.clean_stale_partials(directory, prefix=".dryrun-")
    existing = [p for p in plans if p.exists]
    used = sum(backup.env_used_bytes(job.open(p.spec, write=False)) for p in existing)
    backupdir.check_free_space(
        directory,
        backupdir.space_needed(2 * used),
        "a dry run on a copy (twice the LMDBs' used size: the copy and the migration's writes, + margin)",
        "free space, or move backup.dir (the dry run works there)",
    )
    work = directory / f".dryrun-{backupdir.new_backup_id(None)}{backupdir.PARTIAL_SUFFIX}"
    work.mkdir()
    backupdir.claim(work)
    out: list[Message] = []
    copies: dict[str, lmdb.Environment] = {}
    try:
        copy_specs: dict[str, LmdbSpec] = {}
        before: dict[str, tuple[int, str | None]] = {}  # last txn id, file identity
        for p in plans:
            copy_dir = work / p.spec.name
            copy_dir.mkdir()
            if p.exists:
                live = job.open(p.spec, write=False)
                info = live.info()
                before[p.spec.name] = (int(info["last_txnid"]), _file_identity(backupdir.data_file(p.spec)))
                live.copy(str(copy_dir / backupdir.DATA_FILE if p.spec.no_subdir else copy_dir), compact=True)
                map_size = max(p.spec.map_size, int(info["map_size"]))
            else:
                before[p.spec.name] = (0, None)
                map_size = p.spec.map_size
            copy_specs[p.spec.name] = dataclasses.replace(
                p.spec, path=str(copy_dir), no_subdir=False, map_size=map_size
            )
            copies[p.spec.name] = open_lmdb(copy_specs[p.spec.name], write=True, create=True)
        per_lmdb: dict[str, list[migrator.StepResult]] = {p.spec.name: [] for p in plans}

        def collect(result: migrator.StepResult, step: migrations.Step) -> None:
            per_lmdb[result.lmdb].append(result)

        try:
            _migrate_envs(
                job,
                migs,
                plans,
                copies,
                copy_specs,
                target=target,
                phase="dry_run",
                on_step=collect,
                guard=False,
            )
        except MigrationCancelled as exc:
            raise _cancel_message(job, exc) from None
        for p in plans:
            name = p.spec.name
            results = per_lmdb[name]
            after_txnid, after_sha = 0, None
            if p.exists:
                after_txnid = int(job.envs[name].info()["last_txnid"])
                after_sha = _file_identity(backupdir.data_file(p.spec))
            out.append(
                {
                    "lmdb": name,
                    "steps": [r.to_json() for r in results],
                    "keys": sum(r.puts + r.deletes + r.copied + r.raw_writes for r in results),
                    "bytes": sum(r.bytes_written for r in results),
                    "duration_s": round(sum(r.duration_s for r in results), 6),
                    "live_last_txnid_before": before[name][0],
                    "live_last_txnid_after": after_txnid,
                    "live_file_before": before[name][1],
                    "live_file_after": after_sha,
                }
            )
    finally:
        for env in copies.values():
            env.close()
        shutil.rmtree(work, ignore_errors=True)
    changed = [
        o["lmdb"]
        for o in out
        if (o["live_file_before"], o["live_last_txnid_before"])
        != (o["live_file_after"], o["live_last_txnid_after"])
    ]
    if changed:
        # The live envs were opened read-only (MDB_RDONLY): LMDB itself forbids a write by us, so a
        # change here was made by LS or the application while we copied. Say so; it is no failure.
        logging.getLogger(__name__).warning(
            "dry run: live LMDB(s) %s changed during the dry run (written by another process: "
            "our environment was read-only)",
            ", ".join(changed),
        )
    return {
        "target": goal,
        "live_changed_by_others": changed,
        "plan": [p.to_json() for p in plans],
        "lmdbs": out,
        "duration_s": round(time.monotonic() - started, 6),
    }


def _file_identity(path: Path) -> str:
    """Size, mtime and inode of a file: any write through LMDB changes the mtime (hashing a sparse,
    map-sized data file would cost seconds)."""
    st = path.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns} ino={st.st_ino}"


def _op_stamp(job: Job) -> Message:
    version = _field(job.request, "version", int)
    only = _field(job.request, "lmdb", str, optional=True)
    migs = migrations.discover(_source(job), _names(job))
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
    out: list[Message] = []
    for spec in specs:
        env = job.open(spec, write=True, create=not _exists(spec))
        old = job.read_marker_version(env, spec)
        if old is not None and old > version:
            logging.getLogger(__name__).warning(
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
        out.append({"lmdb": spec.name, "from": old, "to": version})
    return {"lmdbs": out}


def _op_backup(job: Job) -> Message:
    specs = [s for s in job.view.lmdbs if _exists(s)]
    if not specs:
        raise BackupError(f"no LMDB of instance {job.instance!r} exists yet; nothing to back up")
    started = time.monotonic()
    reason = str(job.request.get("reason") or "manual")
    manifest = _take_backup(job, specs, reason=reason)
    duration = time.monotonic() - started
    return {
        "backup": manifest.to_json(),
        "duration_s": round(duration, 6),
        "bytes_per_s": int(manifest.size / duration) if duration > 0 else None,
    }


def _op_backups(job: Job) -> Message:
    directory = job.need_backup_dir()
    return {"backups": [b.manifest.to_json() for b in backupdir.list_backups(directory)]}


def _op_rollback(job: Job) -> Message:
    directory = job.need_backup_dir()
    wanted = _field(job.request, "backup_id", str, optional=True)
    info = backupdir.find_backup(directory, wanted)
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
            differs = differs or not backupdir.holds_copy(backupdir.data_file(spec), entry.size, entry.sha256)
        else:
            before[entry.name] = None
            differs = True
    pre_backup: str | None = None
    if differs and job.backup_enabled:
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
    out: list[Message] = []
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
        out.append(
            {"lmdb": r.name, "restored": r.restored, "from": before.get(r.name), "to": r.schema_version}
        )
    return {
        "backup_id": manifest.id,
        "schema_version": manifest.schema_version,
        "lmdbs": out,
        "pre_rollback_backup": pre_backup,
    }


def _op_fleet(job: Job) -> Message:
    out: list[Message] = []
    for spec in job.view.lmdbs:
        if not _exists(spec):
            out.append({"lmdb": spec.name, "exists": False, "markers": []})
            continue
        env = job.open(spec, write=False)
        with env.begin(write=False) as txn:
            found = marker.read_markers(env, txn, native=spec.native, marker_dbi=job.marker_dbi)
        out.append({"lmdb": spec.name, "exists": True, "markers": [asdict(m) for m in found]})
    return {"instance": job.instance, "lmdbs": out}

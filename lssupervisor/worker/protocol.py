"""The worker protocol: typed requests, results, progress and errors between the daemon (or the CLI)
and a worker process. Imports no ``lmdb``: the daemon uses this module.

Theory of operation
-------------------
A worker is a *session*: ``python -m lssupervisor.worker`` reads requests, one JSON line each, on its
stdin, serves them in order, and answers on a private fd that is its stdout (``print()`` in a migration
goes to stderr). The session ends when stdin reaches EOF, or when the parent SIGKILLs the worker's
process group (cancel: LMDB aborts the open write transaction, I3). The daemon keeps ONE session for a
whole reconcile cycle: started and imported while LS still runs, it plans, proves LS gone, backs up,
migrates and reads the markers back, so no step pays a Python start while LS is down. The offline CLI
opens a session per command.

Every line is an envelope, ``{"id": N, "kind": K, "body": {...}}``:

- parent -> worker: ``kind`` is an :class:`Op`, ``body`` the op's request (a dataclass below) with the
  :class:`Settings` in ``body.settings``;
- worker -> parent: ``kind`` is ``progress`` (:class:`Progress`), ``log`` (:class:`LogLine`), then exactly
  one of ``result`` (the op's result type, :data:`RESULT_TYPES`) or ``failure`` (:class:`Failure`) per
  request, in request order.

Errors travel as an :class:`~lssupervisor.errors.ErrorCode` with an optional structured
:class:`~lssupervisor.errors.Remedy`, never as a class name or an advice sentence to be parsed.
Progress has one formatter, :func:`describe`, used by the CLI, the daemon's log, ``STATUS=`` and
``/status``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from lssupervisor.errors import ErrorCode, Remedy
from lssupervisor.lsmodel import LsView
from lssupervisor.worker.backupdir import Manifest
from lssupervisor.worker.wire import WireError, from_wire, to_wire

# Test knob: every LMDB write happens under flock(LOCK_EX|LOCK_NB) on <path>.lock, bracketed in the
# record; the LS stand-in holds LOCK_SH on it for life, so a failed lock proves LS ran during a write.
OVERLAP_ENV = "LSSUPERVISOR_TEST_OVERLAP_LOCK"
WORKER_MODULE = "lssupervisor.worker"
PARENT_ENV = "LSSUPERVISOR_WORKER_PARENT"


class Op(enum.Enum):
    PLAN = "plan"  # markers + plan current -> target (read-only; LS may run)
    IMPORT = "import"  # load (compile and execute) the migrations a plan needs (LS may run)
    MARKERS = "markers"  # read each LMDB's marker and state (read-only)
    READERS = "readers"  # the LMDB reader tables: is an LS among them? (read-only)
    MIGRATE = "migrate"  # backup, then every step (LS stopped)
    DRY_RUN = "dry_run"  # the plan on a compact copy; the live LMDB untouched
    STAMP = "stamp"
    BACKUP = "backup"
    BACKUPS = "backups"
    ROLLBACK = "rollback"
    FLEET = "fleet"  # every instance's marker seen in our LMDB
    RETIRE = "retire"  # tombstone every entry of DBIs that new-dbi migrations replaced (prune)


# ---------------------------------------------------------------------------------------------------
# values shared by requests and results


@dataclass(frozen=True, slots=True)
class BackupSettings:
    enabled: bool = True
    dir: str = ""
    keep: int = 5


@dataclass(frozen=True, slots=True)
class Settings:
    """What every request needs from our config (the worker reads no config file)."""

    ls: LsView
    marker_dbi: str = "lssupervisor"
    migrations: str | None = None  # directory or package of migration files
    baseline: int | None = None
    backup: BackupSettings = field(default_factory=BackupSettings)
    history: str | None = None  # path of history.jsonl
    grow_map: bool = False
    timeout: float | None = None  # the whole op; the worker cancels itself after it
    log_level: str = "info"
    trusted_gid: int | None = None  # security.trusted_group, resolved (who may write migrations, I8)


@dataclass(frozen=True, slots=True)
class Marker:
    """One instance's schema marker. ``timestamp`` is the LS header timestamp (ns)."""

    version: int
    migration: str  # file stem of the migration that set it, "" for a stamp
    checksum: str  # sha256 of that file, "" for a stamp
    time: str  # RFC 3339 UTC of the write
    tool_version: str
    instance: str
    timestamp: int = 0


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One planned step."""

    lmdb: str
    from_version: int
    to_version: int
    migration: str | None  # None: marker only (no file for this version on this LMDB)
    description: str
    strategy: str | None
    checksum: str | None

    def line(self) -> str:
        """``main 1→2 (0002_users_json)`` for logs and status."""
        name = f" ({self.migration})" if self.migration else " (marker only)"
        return f"{self.lmdb} {self.from_version}→{self.to_version}{name}"


class PlanAction(enum.Enum):
    NONE = "none"  # at the target already
    STAMP = "stamp"  # unmarked and empty (or missing): stamped with the target
    MIGRATE = "migrate"
    BASELINE = "baseline"  # unmarked with data: schema.baseline is its version


@dataclass(frozen=True, slots=True)
class LmdbPlan:
    lmdb: str
    exists: bool
    marker_version: int | None
    has_user_data: bool
    current: int | None  # where planning starts (marker, or baseline); None: will be stamped
    action: PlanAction
    steps: tuple[StepInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one committed step did."""

    lmdb: str
    from_version: int
    to_version: int
    migration: str  # "" for a marker-only step
    checksum: str
    marker: Marker
    puts: int  # entries written through the API (tombstones included)
    deletes: int  # entries deleted (tombstoned) through the API
    copied: int  # entries written by copy_dbi
    raw_writes: int  # distinct keys touched through m.txn
    bytes_written: int  # keys + values (headers included) written through the API
    duration_s: float
    txn_id: int
    map_size: int  # the map size the step committed with


@dataclass(frozen=True, slots=True)
class MigrateResult:
    """What the migration did to one LMDB."""

    lmdb: str
    before: Marker | None
    after: Marker | None
    stamped: str  # "" | "empty" (unmarked and empty: stamped target) | "baseline"
    steps: tuple[StepResult, ...] = ()


# ---------------------------------------------------------------------------------------------------
# requests (parent -> worker); ``settings`` first in each


@dataclass(frozen=True, slots=True)
class PlanRequest:
    settings: Settings
    target: int | None = None  # None: the newest migration


@dataclass(frozen=True, slots=True)
class ImportRequest:
    settings: Settings
    target: int | None = None


@dataclass(frozen=True, slots=True)
class MarkersRequest:
    settings: Settings


@dataclass(frozen=True, slots=True)
class ReadersRequest:
    settings: Settings


@dataclass(frozen=True, slots=True)
class MigrateRequest:
    settings: Settings
    target: int | None = None


@dataclass(frozen=True, slots=True)
class DryRunRequest:
    settings: Settings
    target: int | None = None


@dataclass(frozen=True, slots=True)
class StampRequest:
    settings: Settings
    version: int
    lmdb: str | None = None  # None: every LMDB


@dataclass(frozen=True, slots=True)
class BackupRequest:
    settings: Settings
    reason: str = "manual"


@dataclass(frozen=True, slots=True)
class BackupsRequest:
    settings: Settings


@dataclass(frozen=True, slots=True)
class RollbackRequest:
    settings: Settings
    backup_id: str | None = None  # None: the newest


@dataclass(frozen=True, slots=True)
class FleetRequest:
    settings: Settings


@dataclass(frozen=True, slots=True)
class RetireDbi:
    lmdb: str
    dbi: str
    replaced_by: str  # the migration whose REPLACES names it


@dataclass(frozen=True, slots=True)
class RetireRequest:
    """Count (``dry_run``) or tombstone, ``batch`` entries per write transaction, every live entry of
    ``dbis`` (see :mod:`lssupervisor.worker.retire`)."""

    settings: Settings
    dbis: tuple[RetireDbi, ...]
    dry_run: bool = True
    batch: int = 10_000


Request = (
    PlanRequest
    | ImportRequest
    | MarkersRequest
    | ReadersRequest
    | MigrateRequest
    | DryRunRequest
    | StampRequest
    | BackupRequest
    | BackupsRequest
    | RollbackRequest
    | FleetRequest
    | RetireRequest
)

REQUEST_TYPES: dict[Op, type[Any]] = {
    Op.PLAN: PlanRequest,
    Op.IMPORT: ImportRequest,
    Op.MARKERS: MarkersRequest,
    Op.READERS: ReadersRequest,
    Op.MIGRATE: MigrateRequest,
    Op.DRY_RUN: DryRunRequest,
    Op.STAMP: StampRequest,
    Op.BACKUP: BackupRequest,
    Op.BACKUPS: BackupsRequest,
    Op.ROLLBACK: RollbackRequest,
    Op.FLEET: FleetRequest,
    Op.RETIRE: RetireRequest,
}
OP_OF: dict[type[Any], Op] = {cls: op for op, cls in REQUEST_TYPES.items()}


# ---------------------------------------------------------------------------------------------------
# results (worker -> parent)


@dataclass(frozen=True, slots=True)
class PlanResult:
    target: int
    newest: int
    lmdbs: tuple[LmdbPlan, ...]
    steps: tuple[StepInfo, ...]

    @property
    def markers(self) -> tuple[tuple[str, int | None], ...]:
        return tuple((p.lmdb, p.marker_version) for p in self.lmdbs)

    @property
    def writes(self) -> bool:
        """The cycle must write the LMDB (steps, or a stamp)."""
        return any(p.action is not PlanAction.NONE for p in self.lmdbs)


@dataclass(frozen=True, slots=True)
class ImportResult:
    migrations: tuple[str, ...]  # file stems, in plan order
    duration_s: float


@dataclass(frozen=True, slots=True)
class LmdbState:
    lmdb: str
    path: str
    exists: bool
    version: int | None
    marker: Marker | None
    has_user_data: bool
    last_txnid: int
    map_size: int
    used_bytes: int


@dataclass(frozen=True, slots=True)
class MarkersResult:
    instance: str
    lmdbs: tuple[LmdbState, ...]

    def versions(self) -> dict[str, int | None]:
        return {m.lmdb: m.version for m in self.lmdbs}


@dataclass(frozen=True, slots=True)
class Reader:
    pid: int
    thread: str
    txnid: int | None  # None: the slot holds no snapshot
    alive: bool
    name: str
    cmdline: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LmdbReaders:
    lmdb: str
    exists: bool
    # A process holding LMDB's lock-file lock (i.e. having the environment open), when the kernel
    # names one: an LS with the env open but no reader slot in use yet.
    open_by_pid: int | None
    readers: tuple[Reader, ...] = ()


@dataclass(frozen=True, slots=True)
class ReadersResult:
    lmdbs: tuple[LmdbReaders, ...]


@dataclass(frozen=True, slots=True)
class MigrateDone:
    target: int
    backup_id: str | None
    lmdbs: tuple[MigrateResult, ...]
    steps: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class DryRunLmdb:
    lmdb: str
    steps: tuple[StepResult, ...]
    keys: int
    bytes: int
    duration_s: float
    live_last_txnid_before: int
    live_last_txnid_after: int
    live_file_before: str | None
    live_file_after: str | None


@dataclass(frozen=True, slots=True)
class DryRunResult:
    target: int
    live_changed_by_others: tuple[str, ...]
    plan: tuple[LmdbPlan, ...]
    lmdbs: tuple[DryRunLmdb, ...]
    duration_s: float


@dataclass(frozen=True, slots=True)
class Stamped:
    lmdb: str
    from_version: int | None
    to_version: int


@dataclass(frozen=True, slots=True)
class StampResult:
    lmdbs: tuple[Stamped, ...]


@dataclass(frozen=True, slots=True)
class BackupResult:
    backup: Manifest
    duration_s: float
    bytes_per_s: int | None


@dataclass(frozen=True, slots=True)
class BackupsResult:
    backups: tuple[Manifest, ...]


@dataclass(frozen=True, slots=True)
class Restored:
    lmdb: str
    restored: bool  # False: the LMDB already held exactly this copy
    from_version: int | None
    to_version: int | None


@dataclass(frozen=True, slots=True)
class RollbackResult:
    backup_id: str
    schema_version: int | None
    lmdbs: tuple[Restored, ...]
    pre_rollback_backup: str | None


@dataclass(frozen=True, slots=True)
class FleetLmdb:
    lmdb: str
    exists: bool
    markers: tuple[Marker, ...] = ()


@dataclass(frozen=True, slots=True)
class FleetResult:
    instance: str
    lmdbs: tuple[FleetLmdb, ...]


@dataclass(frozen=True, slots=True)
class RetiredDbi:
    """One DBI: ``entries``/``bytes`` (key + value) live before, ``tombstoned`` written now (0 in a dry
    run), ``tombstones`` already there before."""

    lmdb: str
    dbi: str
    replaced_by: str
    exists: bool
    entries: int = 0
    bytes: int = 0
    tombstoned: int = 0
    tombstones: int = 0


@dataclass(frozen=True, slots=True)
class RetireResult:
    dry_run: bool
    dbis: tuple[RetiredDbi, ...]


RESULT_TYPES: dict[Op, type[Any]] = {
    Op.PLAN: PlanResult,
    Op.IMPORT: ImportResult,
    Op.MARKERS: MarkersResult,
    Op.READERS: ReadersResult,
    Op.MIGRATE: MigrateDone,
    Op.DRY_RUN: DryRunResult,
    Op.STAMP: StampResult,
    Op.BACKUP: BackupResult,
    Op.BACKUPS: BackupsResult,
    Op.ROLLBACK: RollbackResult,
    Op.FLEET: FleetResult,
    Op.RETIRE: RetireResult,
}

Result = (
    PlanResult
    | ImportResult
    | MarkersResult
    | ReadersResult
    | MigrateDone
    | DryRunResult
    | StampResult
    | BackupResult
    | BackupsResult
    | RollbackResult
    | FleetResult
    | RetireResult
)


# ---------------------------------------------------------------------------------------------------
# progress, logs, failures (worker -> parent)


class Phase(enum.Enum):
    IMPORT = "import"  # loading a migration module
    BACKUP = "backup"  # copying an LMDB
    BACKUP_DONE = "backup_done"
    MIGRATE = "migrate"  # inside a step (the first write moves the daemon to MIGRATING)
    STEP_COMMITTED = "step_committed"
    DRY_RUN = "dry_run"


@dataclass(frozen=True, slots=True)
class Progress:
    """Where an op is. Steps fill ``lmdb``/``migration``/versions/``index``/``steps``; ``done``/``total``
    come from ``m.progress`` (the author's estimate) and ``read``/``written`` from the API's own
    counters (a heartbeat every few seconds, with no code in the migration)."""

    phase: Phase
    lmdb: str = ""
    migration: str = ""
    from_version: int | None = None
    to_version: int | None = None
    index: int = 0  # 0-based position of the step in the plan
    steps: int = 0
    done: int | None = None
    total: int | None = None
    read: int = 0  # records read through the API in this step
    written: int = 0  # records written through the API in this step
    elapsed_s: float = 0.0  # since the step (or the backup of this LMDB) began
    bytes: int = 0  # backup: bytes copied so far

    @property
    def percent(self) -> float | None:
        if self.done is None or not self.total:
            return None
        return round(100.0 * min(self.done, self.total) / self.total, 1)

    @property
    def rate(self) -> float | None:
        """Records per second through the API in this step."""
        if self.elapsed_s <= 0:
            return None
        return (self.read + self.written) / self.elapsed_s


def describe(p: Progress) -> str:
    """The one line a person reads for a progress message (CLI, log, STATUS=, /status)."""
    arrow = f"{p.from_version}→{p.to_version}"
    position = f"step {p.index + 1}/{p.steps}" if p.steps else ""
    match p.phase:
        case Phase.IMPORT:
            return f"importing {p.migration}" if p.migration else "importing the migrations"
        case Phase.BACKUP:
            return f"backing up {p.lmdb}: {_mib(p.bytes)} copied" if p.bytes else f"backing up {p.lmdb}"
        case Phase.BACKUP_DONE:
            return f"backed up {p.lmdb} ({_mib(p.bytes)})"
        case Phase.STEP_COMMITTED:
            name = f" ({p.migration})" if p.migration else ""
            return f"committed {p.lmdb} {arrow}{name}, {position} in {p.elapsed_s:.1f}s"
        case Phase.MIGRATE | Phase.DRY_RUN:
            verb = "migrating" if p.phase is Phase.MIGRATE else "dry run"
            parts = [f"{verb} {p.lmdb} {arrow}"]
            if p.migration:
                parts.append(f"({p.migration})")
            detail = []
            if p.percent is not None:
                detail.append(f"{p.percent:g}%")
            if p.read or p.written:
                detail.append(f"{p.read} read, {p.written} written")
            if p.rate is not None and (p.read or p.written):
                detail.append(f"{p.rate:,.0f}/s")
            if p.elapsed_s:
                detail.append(f"{p.elapsed_s:.0f}s")
            text = " ".join(parts)
            if detail:
                text += ": " + ", ".join(detail)
            return f"{text} [{position}]" if position else text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True, slots=True)
class LogLine:
    level: str  # debug | info | warning | error
    logger: str
    msg: str


@dataclass(frozen=True, slots=True)
class Failure:
    """A request failed. ``backup_id``: a migrate that took its backup before failing. ``stderr``: the
    worker's last stderr lines when it died (crash diagnostics)."""

    code: ErrorCode
    message: str
    exit_code: int
    remedy: Remedy | None = None
    backup_id: str | None = None
    stderr: str = ""


class Kind(enum.Enum):
    PROGRESS = "progress"
    LOG = "log"
    RESULT = "result"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class Reply:
    """One message from the worker about request ``id``."""

    id: int
    op: Op
    body: Progress | LogLine | Result | Failure

    @property
    def final(self) -> bool:
        return isinstance(self.body, Failure) or not isinstance(self.body, Progress | LogLine)


# ---------------------------------------------------------------------------------------------------
# envelopes


def encode_request(request_id: int, request: Request) -> bytes:
    line = {"id": request_id, "kind": OP_OF[type(request)].value, "body": to_wire(request)}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes | str) -> tuple[int, Request]:
    data = _envelope(line)
    try:
        op = Op(data["kind"])
    except ValueError:
        raise WireError(
            f"request: unknown op {data['kind']!r} (known: {', '.join(o.value for o in Op)})"
        ) from None
    request: Request = from_wire(REQUEST_TYPES[op], data["body"], f"{op.value} request")
    return data["id"], request


def encode_reply(request_id: int, op: Op, body: Progress | LogLine | Result | Failure) -> bytes:
    if isinstance(body, Progress):
        kind = Kind.PROGRESS
    elif isinstance(body, LogLine):
        kind = Kind.LOG
    elif isinstance(body, Failure):
        kind = Kind.FAILURE
    else:
        kind = Kind.RESULT
    line = {"id": request_id, "op": op.value, "kind": kind.value, "body": to_wire(body)}
    return json.dumps(line, separators=(",", ":"), default=str).encode() + b"\n"


def decode_reply(line: bytes | str) -> Reply:
    data = _envelope(line)
    try:
        op = Op(data.get("op"))
        kind = Kind(data["kind"])
    except ValueError:
        raise WireError(f"reply: unknown op or kind in {str(line)[:120]!r}") from None
    types_: dict[Kind, type[Any]] = {
        Kind.PROGRESS: Progress,
        Kind.LOG: LogLine,
        Kind.FAILURE: Failure,
        Kind.RESULT: RESULT_TYPES[op],
    }
    body = from_wire(types_[kind], data["body"], f"{op.value} {kind.value}")
    return Reply(id=data["id"], op=op, body=body)


def _envelope(line: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise WireError(f"not a protocol line ({exc}): {str(line)[:120]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), int) or "kind" not in data:
        raise WireError(f"not a protocol envelope: {str(line)[:120]!r}")
    return data

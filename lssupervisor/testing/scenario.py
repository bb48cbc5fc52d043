"""Multi-instance scenarios: several lssupervisor instances syncing through one storage.

Theory of operation
-------------------
A :class:`Cluster` owns a work directory with one shared storage (by default ``storage/``, the fs
backend's bucket; or an S3 bucket given as ``s3://BUCKET/PREFIX?endpoint=URL``, with the credentials
in ``storage_env``) and one directory per instance, set up exactly as a user would: ``lssupervisor
init`` writes the config set, the demo application's baseline migration is copied into the instance's
``migrations/``, and a few intervals are tuned so that a scenario takes seconds, not minutes.

Each instance runs ``lssupervisor run -c CFG`` as a subprocess (own session, log file). Migrations are
shipped by renaming a file into the watched migrations directory, as a package manager does; the
daemon's reconcile cycle does the rest. State comes from ``<state_dir>/state.json``.

The demo application (:class:`AppWriter`) writes live into each instance's LMDB: ``user:<inst>-<n>``
keys unique per instance and ``shared:<k>`` keys written by every instance. It reads the instance's
schema marker INSIDE its write transaction and writes that version's format (v1 text, v2 JSON) behind
an LS native header, so a write can never use the wrong format, and it blocks (as a real application
does) on LMDB's writer lock while a migration runs. Every committed write is recorded, so the final
checks (:func:`final_checks`) can prove that nothing was lost, that the later write won, and that no
version 2 snapshot ever carried a version 1 value.

Rules this module keeps: one LMDB environment per path per process (the writers and :meth:`Cluster.dump`
share :meth:`Cluster.env`); no transaction is held across a sleep; every process started here is
ended by pid in :meth:`Cluster.close` (use the cluster as a context manager); waits poll a condition
with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO, TypeVar

import lmdb
import psutil
import yaml

from lssupervisor import resources
from lssupervisor.testing.lsbinary import find_real_ls, standin_binary
from lssupervisor.testing.ports import free_port
from lssupervisor.testing.standin.snapshot import SnapshotError, load_data, parse_name
from lssupervisor.worker import lsheader
from lssupervisor.worker.marker import DEFAULT_MARKER_DBI, KEY_PREFIX, read_marker

T = TypeVar("T")
# {dbi: {key: (value, or None for a tombstone, LS timestamp)}}
Dump = dict[str, dict[bytes, tuple[bytes | None, int]]]

APP_DBI = "users"
LMDB_NAME = "main"
# examples/demo-app/migrations in a checkout; shipped inside the package by the build (lssupervisor demo
# runs from a wheel with no checkout).
DEMO_MIGRATIONS = resources.path("demo-migrations")
BASELINE = DEMO_MIGRATIONS / "0001_users_text.py"
FORMAT_CHANGE = DEMO_MIGRATIONS / "0002_users_json.py"
MAP_SIZE = 1 << 30  # the stand-in's (and LS's) default with create: true; virtual, not disk
DAEMON_STOP_TIMEOUT = 20.0
LS_STOP_TIMEOUT = 5.0


class ScenarioError(RuntimeError):
    """A scenario step did not happen in time, or a process misbehaved (message says which)."""


# ===================================================================================================
# The demo application's record formats


def encode_v1(record: Mapping[str, str]) -> bytes:
    """Version 1: ``name=Alice;email=a@x`` (values must not contain ``;`` or ``=``)."""
    return ";".join(f"{k}={v}" for k, v in sorted(record.items())).encode()


def encode_v2(record: Mapping[str, str]) -> bytes:
    """Version 2: compact JSON with sorted keys."""
    return json.dumps(dict(record), sort_keys=True, separators=(",", ":")).encode()


def encode(version: int, record: Mapping[str, str]) -> bytes:
    match version:
        case 1:
            return encode_v1(record)
        case 2:
            return encode_v2(record)
        case _:
            raise ValueError(f"the demo application knows schema versions 1 and 2, not {version}")


def decode(value: bytes) -> tuple[int, dict[str, str]]:
    """(format version, record) of an application value. ValueError when it is neither format."""
    if value.startswith(b"{"):
        data = json.loads(value)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"not a version 2 record: {value!r}")
        return 2, {str(k): v for k, v in data.items()}
    record: dict[str, str] = {}
    for part in value.decode().split(";"):
        name, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"not a version 1 record: {value!r}")
        record[name] = val
    return 1, record


def format_of(value: bytes) -> int:
    """1 or 2; 0 when the value is neither format."""
    try:
        return decode(value)[0]
    except (ValueError, UnicodeDecodeError):
        return 0


# ===================================================================================================
# Small helpers


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns a truthy value; ScenarioError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ScenarioError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)  # polling a condition with a deadline


@dataclass(frozen=True, slots=True)
class LsBinary:
    path: str
    kind: str  # "real" or "stand-in"
    why: str  # how it was chosen, for the narration

    @property
    def real(self) -> bool:
        return self.kind == "real"


def find_ls_binary(explicit: str | None, workdir: Path) -> LsBinary:
    """``explicit`` when given; else the real LS by the one rule of :mod:`.lsbinary`
    (``$LIGHTNINGSTREAM_BIN``, else ``lightningstream`` on PATH); else the stand-in, saying why."""
    if explicit:
        return LsBinary(os.path.abspath(explicit) if os.sep in explicit else explicit,
                        "stand-in" if "standin" in explicit else "real", "given")
    real = find_real_ls()
    if real.path is not None:
        return LsBinary(real.path, "real", real.how)
    return LsBinary(standin_binary(workdir), "stand-in", real.how)


# ===================================================================================================
# The demo application


@dataclass(frozen=True, slots=True)
class Write:
    """One committed write of an :class:`AppWriter`."""

    instance: str
    key: bytes
    value: bytes  # application value as written (format ``version``)
    timestamp: int  # LS header timestamp, ns
    version: int  # the instance's marker version read inside the same transaction


class AppWriter:
    """Writes the demo application's records into one instance's LMDB from a thread.

    Each write is one short write transaction: read our marker, build the record in that version's
    format, put it with a fresh LS header, commit. Nothing is held open between writes, so a migration
    (another process) waits at most one write, and our next write waits for the migration.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        instance: str,
        *,
        interval: float = 0.05,
        shared_keys: int = 3,
        shared_every: int = 3,
        marker_dbi: str = DEFAULT_MARKER_DBI,
        dbi_lock: threading.Lock | None = None,
    ) -> None:
        self.env = env
        # LMDB: "A transaction that uses [mdb_dbi_open] must finish (either commit or abort) before any
        # other transaction in the process may use this function." Every thread of this process that
        # opens DBIs on ``env`` shares this lock (Cluster.dump does) and holds it from before its
        # transaction begins until it has ended.
        self.dbi_lock = dbi_lock or threading.Lock()
        self.instance = instance
        self.interval = interval
        self.shared_keys = shared_keys
        self.shared_every = shared_every
        self.marker_dbi = marker_dbi
        self._writes: list[Write] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seq = 0
        self._users = 0
        self.attempts = 0  # write transactions begun or about to begin (a test's "it has tried")
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"app-writer-{instance}", daemon=True)

    def start(self) -> AppWriter:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop and join. A write blocked on a migration finishes first (LMDB's writer lock)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise ScenarioError(f"app writer of {self.instance} did not stop within {timeout:g}s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def writes(self) -> list[Write]:
        with self._lock:
            return list(self._writes)

    def _next(self) -> tuple[bytes, dict[str, str]]:
        self._seq += 1
        if self.shared_keys and self._seq % self.shared_every == 0:
            k = (self._seq // self.shared_every) % self.shared_keys + 1
            return f"shared:{k}".encode(), {"name": f"{self.instance} write {self._seq}",
                                              "email": f"shared{k}@example.org"}
        self._users += 1
        n = self._users
        return f"user:{self.instance}-{n:04d}".encode(), {"name": f"{self.instance} user {n}",
                                                           "email": f"u{n}@{self.instance}.example"}

    def write_one(self) -> Write | None:
        """One write; None (nothing written) while the LMDB has no marker for us yet."""
        key, record = self._next()
        self.attempts += 1
        # Blocks in begin() while a migration (another process) holds LMDB's writer lock. The DBI lock
        # is taken first and released only after the commit: it used to be released before the commit
        # (``with begin() as txn, lock``), and a dump's read transaction then opened a DBI while this
        # one was unfinished: `mdb_dbi_flags: Invalid argument` in Cluster.dump (or MDB_BAD_DBI here).
        with self.dbi_lock, self.env.begin(write=True) as txn:
            marker = read_marker(self.env, txn, self.instance, native=True, marker_dbi=self.marker_dbi)
            if marker is None:
                txn.abort()
                return None
            value = encode(marker.version, record)
            db = self.env.open_db(APP_DBI.encode(), txn=txn, create=True)
            # Taken inside the transaction: after any migration that committed before us.
            timestamp = time.time_ns()
            txn.put(key, lsheader.encode(value, timestamp, txn.id()), db=db)
        write = Write(self.instance, key, value, timestamp, marker.version)
        with self._lock:
            self._writes.append(write)
        return write

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.write_one()
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by the checks; a dead writer must not pass silently
            self.error = exc


# ===================================================================================================
# Snapshots in the shared storage


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """One decoded snapshot under ``storage/v<version>/``."""

    name: str
    version: int  # the storage prefix it lives under
    instance: str
    db: str
    timestamp_ns: int  # from the name: when LS stored it
    # {dbi: {key: (value or None for deleted, timestamp)}}
    entries: Mapping[str, Mapping[bytes, tuple[bytes | None, int]]]


# ===================================================================================================
# The shared storage: a directory, or an S3 bucket (read with MinIO's client, as lssupervisor does)


class FsStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"fs://{root}"

    def location(self, version: int) -> str:
        return str(self.root / f"v{version}")

    def location_of(self, rendered: Mapping[str, Any]) -> str | None:
        root = nested(rendered, "storage", "options", "root_path")
        return root if isinstance(root, str) else None

    def names(self, version: int) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root / f"v{version}")
                          if not n.startswith(".") and not n.endswith(".tmp"))
        except FileNotFoundError:
            return []

    def read(self, version: int, name: str) -> bytes:
        return (self.root / f"v{version}" / name).read_bytes()


class S3Store:
    """``s3://BUCKET/PREFIX?endpoint=URL&region=R`` as ``lssupervisor init`` lays it out:
    ``PREFIX/v<N>/<snapshot>``. Credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` of ``env``."""

    def __init__(self, url: str, env: Mapping[str, str]) -> None:
        import urllib.parse

        from minio import Minio

        self.url = url
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        endpoint = urllib.parse.urlsplit(query.get("endpoint", ["https://s3.amazonaws.com"])[0])
        self.client = Minio(
            endpoint.netloc, access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
            secure=endpoint.scheme == "https", region=query.get("region", ["us-east-1"])[0],
        )

    def location(self, version: int) -> str:
        return f"{self.prefix}/v{version}/" if self.prefix else f"v{version}/"

    def location_of(self, rendered: Mapping[str, Any]) -> str | None:
        prefix = nested(rendered, "storage", "options", "global_prefix")
        return prefix if isinstance(prefix, str) else None

    def names(self, version: int) -> list[str]:
        loc = self.location(version)
        return sorted((o.object_name or "")[len(loc):]
                      for o in self.client.list_objects(self.bucket, prefix=loc, recursive=True)
                      if not (o.object_name or "").endswith("update-marker"))

    def read(self, version: int, name: str) -> bytes:
        resp = self.client.get_object(self.bucket, self.location(version) + name)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()


# ===================================================================================================
# Instances and the cluster


@dataclass(slots=True)
class Instance:
    name: str
    dir: Path
    config: Path
    lmdb_path: Path
    migrations: Path
    state_dir: Path
    http: str
    ls_http: str
    log_path: Path
    daemon: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    writer: AppWriter | None = None
    ls_pids_seen: set[int] = field(default_factory=set)

    @property
    def rendered_config(self) -> Path:
        return self.state_dir / "lightningstream.yaml"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def history_file(self) -> Path:
        return self.state_dir / "history.jsonl"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def nested(doc: Mapping[str, Any], *keys: str) -> Any:
    """``doc[k1][k2]...`` or None when any level is missing (state documents are read defensively)."""
    cur: Any = doc
    for k in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return cur


class Cluster:
    """Instances of lssupervisor sharing one fs storage. Use as a context manager."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        ls_binary: str | None = None,
        *,
        poll_interval: str = "200ms",
        storage: str | None = None,
        storage_env: Mapping[str, str] | None = None,
        drain: bool = False,
    ) -> None:
        """``storage``: None for ``<workdir>/storage`` (fs), or an ``s3://`` URL as ``lssupervisor init``
        takes it; ``storage_env``: what the daemons (and so LS) get on top of our environment (the S3
        credentials)."""
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = self.workdir / "storage"  # the fs storage (unused with s3)
        self.storage_env = dict(storage_env or {})
        self.drain = drain  # lightningstream.drain: `sync --only-once` on the old config before migrating
        self.store: FsStore | S3Store
        if storage is None or storage.startswith("fs://"):
            if storage is not None:
                self.storage = Path(storage[len("fs://"):])
            self.storage.mkdir(exist_ok=True)
            self.store = FsStore(self.storage)
        else:
            self.store = S3Store(storage, {**os.environ, **self.storage_env})
        self.ls = find_ls_binary(ls_binary, self.workdir)
        self.poll_interval = poll_interval
        self.instances: dict[str, Instance] = {}
        self._envs: dict[str, lmdb.Environment] = {}
        self._dbi_locks: dict[str, threading.Lock] = {}
        self._env_lock = threading.Lock()
        self._snap_cache: dict[tuple[int, str], SnapshotFile | None] = {}
        self.started = time.monotonic()

    # -- context manager ----------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        problems = self.close()
        if problems and exc_type is None:  # never mask the exception already on its way out
            raise ScenarioError("; ".join(problems))

    # -- set-up -------------------------------------------------------------------------------------

    def add_instance(self, name: str) -> Instance:
        """``lssupervisor init`` for ``name``, the baseline migration copied in, intervals tuned."""
        if name in self.instances:
            raise ScenarioError(f"instance {name!r} exists already")
        idir = self.workdir / name
        http, ls_http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        argv = [
            sys.executable, "-m", "lssupervisor", "init", str(idir),
            "--lmdb", str(idir / "lmdb"),
            "--storage", self.store.url,
            "--instance", name,
            "--lightningstream", self.ls.path,
            "--http", http,
            "--ls-http", ls_http,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise ScenarioError(f"lssupervisor init for {name} failed ({done.returncode}): "
                                f"{done.stderr.strip() or done.stdout.strip()}")
        inst = Instance(
            name=name, dir=idir, config=idir / "lssupervisor.yaml", lmdb_path=idir / "lmdb",
            migrations=idir / "migrations", state_dir=idir / "state", http=http, ls_http=ls_http,
            log_path=idir / "lssupervisor.log",
        )
        shutil.copy2(BASELINE, inst.migrations / BASELINE.name)
        self._tune(inst)
        self.instances[name] = inst
        return inst

    def _tune(self, inst: Instance) -> None:
        """Make the generated config set fast enough for a demo, keeping its comments and validity."""
        template = inst.dir / "lightningstream.yaml.in"
        text = template.read_text()
        text += (
            "\n# Added by the demo: poll faster than LS's 1s defaults so a scenario takes seconds.\n"
            f"lmdb_poll_interval: {self.poll_interval}\n"
            f"storage_poll_interval: {self.poll_interval}\n"
        )
        yaml.safe_load(text)  # still one valid YAML document
        template.write_text(text)
        config = inst.config.read_text()
        tuned = config.replace(
            "\nlightningstream:\n",
            "\nlightningstream:\n"
            "  # Added by the demo: the LS stand-in evaluates /healthz every 100ms (LS: every second).\n"
            "  env:\n"
            '    LSSTANDIN_HEALTH_INTERVAL_MS: "100"\n'
            "  stop_timeout: 5s\n" + ("  drain: true\n  drain_timeout: 20s\n" if self.drain else ""),
            1,
        )
        if tuned == config:
            raise ScenarioError(f"{inst.config}: no 'lightningstream:' section to tune")
        tuned += (
            "\n# Added by the demo: react to a shipped migration quickly.\n"
            "watch:\n"
            "  debounce: 200ms\n"
        )
        from lssupervisor.config import parse_config

        parse_config(tuned, str(inst.config), inst.dir)  # raises ConfigError if the edit broke it
        inst.config.write_text(tuned)

    # -- processes ----------------------------------------------------------------------------------

    def start(self, name: str) -> None:
        inst = self.instances[name]
        if inst.daemon is not None and inst.daemon.poll() is None:
            raise ScenarioError(f"{name}: lssupervisor is running already")
        inst.log = inst.log or open(inst.log_path, "ab")  # noqa: SIM115 (closed in close())
        inst.daemon = subprocess.Popen(
            [sys.executable, "-m", "lssupervisor", "run", "-c", str(inst.config)],
            stdin=subprocess.DEVNULL, stdout=inst.log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=inst.dir, env={**os.environ, **self.storage_env},
        )

    def stop(self, name: str, timeout: float = DAEMON_STOP_TIMEOUT) -> None:
        """SIGTERM (the daemon stops LS in order), wait, SIGKILL the group at the deadline."""
        inst = self.instances[name]
        if inst.daemon is not None:
            _terminate(inst.daemon, timeout)
            self._kill_stray_ls(inst)

    def close(self) -> list[str]:
        """Stop writers, every process started here (by pid), close environments. Returns what went
        wrong while stopping (an LS that outlived its supervisor breaks I6: the caller must fail)."""
        problems: list[str] = []
        for inst in self.instances.values():
            if inst.writer is not None:
                with contextlib.suppress(ScenarioError):
                    inst.writer.stop()
        for name in list(self.instances):
            try:
                self.stop(name, timeout=5.0)
            except ScenarioError as exc:
                problems.append(str(exc))
            except Exception as exc:  # keep stopping the others; report it
                problems.append(f"{name}: stopping failed: {exc!r}")
        for inst in self.instances.values():
            if inst.log is not None:
                inst.log.close()
                inst.log = None
        with self._env_lock:
            for env in self._envs.values():
                env.close()
            self._envs.clear()
        return problems

    def _kill_stray_ls(self, inst: Instance) -> None:
        """An LS the daemon started must not outlive it (I6); if any does, end them all and say so."""
        strays: list[int] = []
        for pid in sorted(inst.ls_pids_seen | {p for p in [self.ls_pid(inst.name)] if p}):
            try:
                proc = psutil.Process(pid)
                if str(inst.rendered_config) in " ".join(proc.cmdline()):
                    proc.kill()
                    proc.wait(5)
                    strays.append(pid)
            except psutil.Error:
                continue
        if strays:
            raise ScenarioError(f"{inst.name}: LS pid(s) {strays} outlived their supervisor (I6); killed")

    # -- shipping a migration -----------------------------------------------------------------------

    def ship_migration(self, name: str, file: str | os.PathLike[str]) -> Path:
        """Install a migration file as a package manager would: write a temporary file in the same
        filesystem, then rename it into place (the watcher sees one complete file appear)."""
        inst = self.instances[name]
        src = Path(file)
        dest = inst.migrations / src.name
        tmp = inst.migrations / f".{src.name}.tmp-{os.getpid()}"
        shutil.copy2(src, tmp)
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
        return dest

    # -- observing ----------------------------------------------------------------------------------

    def state(self, name: str) -> dict[str, Any]:
        """The instance's status document (its daemon's ``state.json``)."""
        inst = self.instances[name]
        doc = _read_json(inst.state_file)
        pid = nested(doc, "lightningstream", "pid")
        if isinstance(pid, int):
            inst.ls_pids_seen.add(pid)
        return doc

    def schema_version(self, name: str) -> int | None:
        v = nested(self.state(name), "lmdbs", LMDB_NAME, "schema_version")
        return v if isinstance(v, int) else None

    def ls_pid(self, name: str) -> int | None:
        v = nested(self.state(name), "lightningstream", "pid")
        return v if isinstance(v, int) else None

    def running_on(self, name: str, version: int) -> dict[str, Any] | None:
        """The state document when the instance is RUNNING with LS ready on ``version``, else None."""
        doc = self.state(name)
        if (
            doc.get("state") == "RUNNING"
            and nested(doc, "lmdbs", LMDB_NAME, "schema_version") == version
            and isinstance(nested(doc, "lightningstream", "pid"), int)
            and self.location(name) == self.store.location(version)
        ):
            return doc
        return None

    def wait_state(
        self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str = ""
    ) -> dict[str, Any]:
        """Poll the instance's state until ``predicate`` holds; ScenarioError (with the last state and
        the log's tail) on timeout, or at once if the daemon died."""
        inst = self.instances[name]
        last: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            nonlocal last
            if inst.daemon is not None and inst.daemon.poll() is not None:
                raise ScenarioError(
                    f"{name}: lssupervisor exited with {inst.daemon.returncode} while waiting for "
                    f"{what or 'a state'}; log tail:\n{self.log_tail(name)}"
                )
            last = self.state(name)
            return last if predicate(last) else None

        try:
            return wait_until(check, timeout, f"{name}: {what or 'state'}")
        except ScenarioError as exc:
            if "timed out" not in str(exc):
                raise
            raise ScenarioError(
                f"{exc}; last state {json.dumps(last)[:400]}; log tail:\n{self.log_tail(name)}"
            ) from None

    def log_tail(self, name: str, lines: int = 25) -> str:
        try:
            text = self.instances[name].log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def prefix(self, name: str) -> Path | None:
        """The fs ``root_path`` of the instance's rendered LS config (where LS syncs now)."""
        try:
            doc = yaml.safe_load(self.instances[name].rendered_config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        root = nested(doc, "storage", "options", "root_path")
        return Path(root) if isinstance(root, str) else None

    def location(self, name: str) -> str | None:
        """Where the instance's rendered LS config syncs: fs ``root_path`` or s3 ``global_prefix``."""
        try:
            doc = yaml.safe_load(self.instances[name].rendered_config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return self.store.location_of(doc) if isinstance(doc, dict) else None

    def history(self, name: str) -> list[dict[str, Any]]:
        """``history.jsonl`` entries (written by the worker: migrations, stamps, backups)."""
        out: list[dict[str, Any]] = []
        try:
            lines = self.instances[name].history_file.read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    # -- LMDB ---------------------------------------------------------------------------------------

    def env(self, name: str) -> lmdb.Environment:
        """This process's one environment for the instance's LMDB (shared by writer and dump)."""
        with self._env_lock:
            env = self._envs.get(name)
            if env is None:
                path = self.instances[name].lmdb_path
                if not (path / "data.mdb").exists():
                    raise ScenarioError(f"{name}: LMDB {path} does not exist yet (start the instance first)")
                env = lmdb.open(str(path), subdir=True, max_dbs=64, map_size=MAP_SIZE, create=False)
                self._envs[name] = env
                self._dbi_locks[name] = threading.Lock()
            return env

    def dbi_lock(self, name: str) -> threading.Lock:
        """Held by every thread here while it opens DBIs on the instance's environment (LMDB forbids
        concurrent ``mdb_dbi_open`` in one process)."""
        self.env(name)
        return self._dbi_locks[name]

    def dump(self, name: str, *, tombstones: bool = False) -> Dump:
        """Every synced DBI (markers included) as ``{dbi: {key: (value, timestamp)}}``, in one read
        transaction of the shared environment (safe while LS or the daemon runs)."""
        env = self.env(name)
        out: dict[str, dict[bytes, tuple[bytes | None, int]]] = {}
        with self.dbi_lock(name), env.begin() as txn:
            names = [bytes(k).decode() for k in txn.cursor().iternext(values=False)]
            for dbi in names:
                if dbi.startswith("_sync"):
                    continue
                db = env.open_db(dbi.encode(), txn=txn, create=False)
                entries: dict[bytes, tuple[bytes | None, int]] = {}
                for key, raw in txn.cursor(db).iternext():
                    header, value = lsheader.parse(raw)
                    if header.deleted:
                        if tombstones:
                            entries[bytes(key)] = (None, header.timestamp)
                    else:
                        entries[bytes(key)] = (value, header.timestamp)
                out[dbi] = entries
        return out

    def markers(self, name: str) -> dict[str, tuple[int, int]]:
        """Schema markers seen in the instance's LMDB: ``{instance: (version, timestamp)}``."""
        out: dict[str, tuple[int, int]] = {}
        for key, (value, ts) in self.dump(name).get(DEFAULT_MARKER_DBI, {}).items():
            if key.startswith(KEY_PREFIX) and value is not None:
                out[key[len(KEY_PREFIX):].decode()] = (int(json.loads(value)["version"]), ts)
        return out

    # -- writers ------------------------------------------------------------------------------------

    def start_writer(self, name: str, interval: float = 0.05) -> AppWriter:
        inst = self.instances[name]
        if inst.writer is not None and inst.writer.running:
            raise ScenarioError(f"{name}: writer runs already")
        inst.writer = AppWriter(self.env(name), name, interval=interval, dbi_lock=self.dbi_lock(name)).start()
        return inst.writer

    def stop_writers(self) -> None:
        for inst in self.instances.values():
            if inst.writer is not None:
                inst.writer.stop()

    def writes(self) -> list[Write]:
        out: list[Write] = []
        for inst in self.instances.values():
            if inst.writer is not None:
                out.extend(inst.writer.writes())
        return out

    def writer_errors(self) -> dict[str, BaseException]:
        return {i.name: i.writer.error for i in self.instances.values()
                if i.writer is not None and i.writer.error is not None}

    # -- storage ------------------------------------------------------------------------------------

    def snapshot_names(self, version: int) -> list[str]:
        return self.store.names(version)

    def snapshot_counts(self, version: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.snapshot_names(version):
            with contextlib.suppress(ValueError):
                inst = parse_name(n).instance_id
                counts[inst] = counts.get(inst, 0) + 1
        return counts

    def snapshots(self, version: int) -> list[SnapshotFile]:
        """Every snapshot under version ``version``'s location, decoded (objects are immutable: cached)."""
        out: list[SnapshotFile] = []
        for n in self.snapshot_names(version):
            key = (version, n)
            if key not in self._snap_cache:
                self._snap_cache[key] = _decode_snapshot(self.store, version, n)
            snap = self._snap_cache[key]
            if snap is not None:
                out.append(snap)
        return out


def _decode_snapshot(store: FsStore | S3Store, version: int, name: str) -> SnapshotFile | None:
    try:
        info = parse_name(name)
    except ValueError:
        return None
    try:
        snap = load_data(store.read(version, name))
    except (OSError, SnapshotError) as exc:
        raise ScenarioError(f"{store.location(version)}{name}: snapshot does not decode ({exc})") from exc
    entries: dict[str, dict[bytes, tuple[bytes | None, int]]] = {}
    for dbi in snap.databases:
        entries[dbi.name] = {
            kv.key: (None if kv.flags & lsheader.FLAG_DELETED else kv.value, kv.timestamp_ns)
            for kv in dbi.entries
        }
    return SnapshotFile(name, version, info.instance_id, info.syncer_name, info.timestamp_ns, entries)


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process, wait ``timeout``, then SIGKILL its whole group (it leads its own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Anything left in its group (a re-exec child) goes too; the leader is reaped, the group id is
    # still ours only while members live, so this cannot hit a stranger.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# ===================================================================================================
# Checks


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Summary:
    """What the final table shows."""

    keys: int  # keys in the application DBI
    writes: int  # committed writes recorded
    formats: Mapping[str, Mapping[int, int]]  # instance -> format version -> count
    equal: bool
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def latest_writes(writes: Sequence[Write]) -> dict[bytes, Write]:
    """Per key, the write with the greatest timestamp (the one LS's merge must keep)."""
    best: dict[bytes, Write] = {}
    for w in writes:
        cur = best.get(w.key)
        if cur is None or w.timestamp > cur.timestamp:
            best[w.key] = w
    return best


def check_writes(app: Mapping[bytes, tuple[bytes | None, int]], writes: Sequence[Write]) -> list[str]:
    """Problems with ``app`` (an application DBI dump) against the recorded writes: a write missing
    and not superseded, a key whose surviving value is not its latest write, or a value not in v2."""
    problems: list[str] = []
    latest = latest_writes(writes)
    for key, w in sorted(latest.items()):
        found = app.get(key)
        if found is None or found[0] is None:
            problems.append(f"{key.decode()}: written by {w.instance} at {w.timestamp}, missing")
            continue
        value, ts = found
        assert value is not None
        if ts != w.timestamp:
            problems.append(f"{key.decode()}: timestamp {ts}, expected the latest write's {w.timestamp} "
                            f"(by {w.instance})")
        elif decode(value)[1] != decode(w.value)[1]:
            problems.append(f"{key.decode()}: value {value!r} is not the latest write {w.value!r}")
    for key in sorted(set(app) - set(latest)):
        problems.append(f"{key.decode()}: present but never written by the application")
    return problems


def final_checks(cluster: Cluster, migrated_to: int = 2) -> Summary:
    """The end-of-scenario checks; call after the writers stopped and sync settled."""
    names = list(cluster.instances)
    checks: list[Check] = []
    dumps = {n: cluster.dump(n) for n in names}
    writes = cluster.writes()

    errors = cluster.writer_errors()
    checks.append(Check("writers ran without error", not errors,
                        "; ".join(f"{n}: {e!r}" for n, e in errors.items()) or f"{len(writes)} writes"))

    first = dumps[names[0]]
    unequal = [n for n in names[1:] if dumps[n] != first]
    checks.append(Check("all LMDBs hold identical synced data", not unequal,
                        f"differs: {', '.join(unequal)}" if unequal else "users + markers, timestamps too"))

    formats: dict[str, dict[int, int]] = {}
    for n, d in dumps.items():
        per: dict[int, int] = {}
        for value, _ts in d.get(APP_DBI, {}).values():
            if value is not None:
                f = format_of(value)
                per[f] = per.get(f, 0) + 1
        formats[n] = per
    bad_format = {n: f for n, f in formats.items() if set(f) - {migrated_to}}
    checks.append(Check(f"every value is in the v{migrated_to} format", not bad_format,
                        str(bad_format) if bad_format else f"{sum(formats[names[0]].values())} values"))

    problems = check_writes(first.get(APP_DBI, {}), writes)
    shared = sorted({w.key for w in writes if w.key.startswith(b"shared:")})
    checks.append(Check("every write is present or superseded; the later write wins", not problems,
                        "; ".join(problems[:5]) if problems
                        else f"{len(latest_writes(writes))} keys, {len(shared)} written on both sides"))

    marker_problems = []
    for n in names:
        seen = cluster.markers(n)
        for m in names:
            if seen.get(m, (None, 0))[0] != migrated_to:
                marker_problems.append(f"{n} sees {m} at {seen.get(m, (None, 0))[0]}")
    checks.append(Check(f"every LMDB has every instance's marker at {migrated_to}", not marker_problems,
                        "; ".join(marker_problems) or ", ".join(names)))

    v1_in_new = [
        f"{s.name} {k.decode()}"
        for s in cluster.snapshots(migrated_to)
        for k, (v, _ts) in s.entries.get(APP_DBI, {}).items()
        if v is not None and format_of(v) != migrated_to
    ]
    n_new = len(cluster.snapshots(migrated_to))
    checks.append(Check(f"no v{migrated_to} snapshot holds an older-format value",
                        not v1_in_new and n_new > 0,
                        "; ".join(v1_in_new[:3]) if v1_in_new else f"{n_new} snapshots decoded"))

    # Each instance's snapshots: under the old prefix only before its migration, under the new one
    # only after it (the marker's timestamp is the migration's commit time).
    order_problems = []
    markers = cluster.markers(names[0])
    for n in names:
        migrated_at = markers.get(n, (0, 0))[1]
        late_old = [s.name for s in cluster.snapshots(migrated_to - 1)
                    if s.instance == n and s.timestamp_ns >= migrated_at]
        early_new = [s.name for s in cluster.snapshots(migrated_to)
                     if s.instance == n and s.timestamp_ns <= migrated_at]
        if late_old or early_new:
            order_problems.append(f"{n}: v{migrated_to - 1} after migrating {late_old[:2]}, "
                                  f"v{migrated_to} before {early_new[:2]}")
    checks.append(Check("each instance synced v1 only before, v2 only after its migration",
                        not order_problems, "; ".join(order_problems) or "by snapshot time vs marker time"))

    app = first.get(APP_DBI, {})
    return Summary(keys=len(app), writes=len(writes), formats=formats, equal=not unequal,
                   checks=tuple(checks))


def settled(cluster: Cluster) -> bool:
    """Sync has settled: every LMDB equal, and every recorded write's key arrived everywhere."""
    names = list(cluster.instances)
    dumps = [cluster.dump(n) for n in names]
    if any(d != dumps[0] for d in dumps[1:]):
        return False
    keys = {w.key for w in cluster.writes()}
    return keys <= set(dumps[0].get(APP_DBI, {}))


# ===================================================================================================
# Narration


class Timeline:
    """Timestamped lines ``+  3.2s  alpha  text``; kept for tests, printed when ``out`` is given."""

    def __init__(self, out: TextIO | None = None, start: float | None = None) -> None:
        self.out = out
        self.start = time.monotonic() if start is None else start
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def say(self, who: str, text: str) -> None:
        line = f"+{time.monotonic() - self.start:6.1f}s  {who:<6} {text}"
        with self._lock:
            self.lines.append(line)
            if self.out is not None:
                print(line, file=self.out, flush=True)


class StateWatcher:
    """Narrates what each instance's status shows: state changes, LS pid changes, schema versions."""

    def __init__(self, cluster: Cluster, timeline: Timeline, interval: float = 0.05) -> None:
        self.cluster = cluster
        self.timeline = timeline
        self.interval = interval
        self._stop = threading.Event()
        self._seen: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._thread = threading.Thread(target=self._run, name="state-watcher", daemon=True)

    def __enter__(self) -> StateWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def poll(self) -> None:
        for name in list(self.cluster.instances):
            doc = self.cluster.state(name)
            if not doc:
                continue
            now = (doc.get("state"), doc.get("substate"), nested(doc, "lightningstream", "pid"),
                   nested(doc, "lmdbs", LMDB_NAME, "schema_version"))
            before = self._seen.get(name)
            if now == before:
                continue
            self._seen[name] = now
            state, sub, pid, version = now
            label = f"{state}/{sub}" if sub else str(state)
            if before is None or (before[0], before[1]) != (state, sub):
                extra = f" (LS pid {pid}, schema v{version})" if state == "RUNNING" else ""
                self.timeline.say(name, f"state {label}{extra}")

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # narration must never break the scenario
                self.poll()
            self._stop.wait(self.interval)


# ===================================================================================================
# The rolling migration, step by step (the demo and the acceptance test run this)


@dataclass(slots=True)
class RollingResult:
    summary: Summary
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def _users_from(d: Mapping[str, Mapping[bytes, Any]], instance: str) -> int:
    prefix = f"user:{instance}-".encode()
    return sum(1 for k in d.get(APP_DBI, {}) if k.startswith(prefix))


def rolling_migration(
    cluster: Cluster,
    say: Callable[[str, str], None],
    names: tuple[str, str] = ("alpha", "beta"),
    *,
    step_timeout: float = 30.0,
) -> RollingResult:
    """Two instances on v1 syncing live writes; ship v2 to the first, then to the second; check."""
    a, b = names
    t0 = time.monotonic()
    result_timings: dict[str, float] = {}
    facts: dict[str, Any] = {}

    for n in names:
        cluster.add_instance(n)
        store = cluster.store
        where = ("storage/v<version>" if isinstance(store, FsStore)
                 else f"s3://{store.bucket}/{store.location(0).replace('v0/', 'v<version>/')}")
        say(n, f"lssupervisor init {cluster.instances[n].dir.name}/ (LMDB {n}/lmdb, storage "
               f"{where}, migrations: {BASELINE.name})")
    for n in names:
        cluster.start(n)
        doc = _wait_running(cluster, n, 1, step_timeout)
        say(n, f"supervising LS pid {nested(doc, 'lightningstream', 'pid')}, schema v1, "
               f"prefix {_rel_prefix(cluster, n)}")
    result_timings["started"] = time.monotonic() - t0

    for n in names:
        cluster.start_writer(n)
    say("app", f"writers started on {a} and {b}: user:<instance>-<n> and shared:<k> keys, v1 text format")

    def both_see_each_other() -> bool:
        da, db = cluster.dump(a), cluster.dump(b)
        return _users_from(db, a) > 0 and _users_from(da, b) > 0

    wait_until(both_see_each_other, step_timeout, f"{a} and {b} to see each other's writes in v1")
    counts = cluster.snapshot_counts(1)
    say("sync", f"v1 syncing both ways: {sum(counts.values())} snapshots under v1/ "
                f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")

    # --- first instance -----------------------------------------------------------------------------
    pid_before = cluster.ls_pid(a)
    t_ship = time.monotonic()
    say(a, f"shipping {FORMAT_CHANGE.name} into {a}/migrations/ (temp file + rename, as a package "
           "manager does)")
    cluster.ship_migration(a, FORMAT_CHANGE)
    doc = _wait_running(cluster, a, 2, step_timeout)
    result_timings[f"{a}_migration"] = time.monotonic() - t_ship
    pid_after = nested(doc, "lightningstream", "pid")
    say(a, f"{_migrated(cluster, a)}; LS pid {pid_before} → {pid_after}, "
           f"prefix now {_rel_prefix(cluster, a)}")
    facts["pid_changed"] = pid_before != pid_after
    a_migrated_ns = cluster.markers(a)[a][1]

    # Beta keeps writing v1 and syncing under v1/ while alpha is on v2.
    def b_still_on_v1() -> bool:
        later = [s for s in cluster.snapshots(1) if s.instance == b and s.timestamp_ns > a_migrated_ns]
        v1_writes = [w for w in _writer(cluster, b).writes()
                     if w.version == 1 and w.timestamp > a_migrated_ns]
        a_on_v2 = any(s.instance == a for s in cluster.snapshots(2))
        return len(later) >= 3 and len(v1_writes) >= 10 and a_on_v2

    wait_until(b_still_on_v1, step_timeout, f"{b} to keep syncing v1 while {a} is on v2")
    c1, c2 = cluster.snapshot_counts(1), cluster.snapshot_counts(2)
    say(b, f"still on v1 and syncing: {c1.get(b, 0)} snapshots under v1/ so far; "
           f"{a} has {c2.get(a, 0)} under v2/")
    for n in names:
        w = _writer(cluster, n).writes()[-1]
        say("app", f"{n} just wrote {w.key.decode()} = {w.value.decode()}")
    facts["b_v1_snapshots_while_a_v2"] = c1.get(b, 0)

    # --- second instance ----------------------------------------------------------------------------
    pid_before = cluster.ls_pid(b)
    t_ship = time.monotonic()
    say(b, f"shipping {FORMAT_CHANGE.name} into {b}/migrations/")
    cluster.ship_migration(b, FORMAT_CHANGE)
    doc = _wait_running(cluster, b, 2, step_timeout)
    result_timings[f"{b}_migration"] = time.monotonic() - t_ship
    say(b, f"{_migrated(cluster, b)}; LS pid {pid_before} → {nested(doc, 'lightningstream', 'pid')}, "
           f"prefix now {_rel_prefix(cluster, b)}")
    b_migrated_ns = cluster.markers(b)[b][1]

    def both_write_v2() -> bool:
        return all(
            sum(1 for w in _writer(cluster, n).writes() if w.version == 2 and w.timestamp > b_migrated_ns)
            >= 3
            for n in names
        )

    wait_until(both_write_v2, step_timeout, "both writers to write v2 records")
    cluster.stop_writers()
    say("app", f"writers stopped after {len(cluster.writes())} writes")
    t_settle = time.monotonic()
    wait_until(lambda: settled(cluster), step_timeout, "both LMDBs to hold the same data")
    result_timings["settle"] = time.monotonic() - t_settle
    say("sync", f"settled: {a} and {b} hold the same data")
    summary = final_checks(cluster)
    result_timings["total"] = time.monotonic() - t0
    return RollingResult(summary=summary, timings=result_timings, facts=facts)


def _wait_running(cluster: Cluster, name: str, version: int, timeout: float) -> dict[str, Any]:
    return cluster.wait_state(
        name, lambda _doc: cluster.running_on(name, version) is not None, timeout,
        f"RUNNING with LS on schema v{version}",
    )


def _rel_prefix(cluster: Cluster, name: str) -> str:
    if isinstance(cluster.store, S3Store):
        loc = cluster.location(name)
        return "(no rendered LS config)" if loc is None else f"s3://{cluster.store.bucket}/{loc}"
    prefix = cluster.prefix(name)
    if prefix is None:
        return "(no rendered LS config)"
    with contextlib.suppress(ValueError):
        return f"{prefix.relative_to(cluster.workdir)}/"
    return str(prefix)


def _writer(cluster: Cluster, name: str) -> AppWriter:
    writer = cluster.instances[name].writer
    if writer is None:
        raise ScenarioError(f"{name}: no app writer started")
    return writer


def _migrated(cluster: Cluster, name: str) -> str:
    """``migrated main 1→2 with 0002_users_json (52 keys rewritten, backup ...)`` from history.jsonl."""
    steps = [e for e in cluster.history(name) if e.get("kind") == "migrate" and e.get("result") == "ok"]
    if not steps:
        return f"migrated (no history entry; backup {_last_backup(cluster, name)})"
    e = steps[-1]
    keys = f"{e['keys']} records rewritten, " if isinstance(e.get("keys"), int) else ""
    return (f"migrated {e.get('lmdb')} {e.get('from_version')}→{e.get('to_version')} with "
            f"{e.get('migration')} ({keys}backup {e.get('backup_id') or _last_backup(cluster, name)})")


def _last_backup(cluster: Cluster, name: str) -> str:
    for entry in reversed(cluster.history(name)):
        if entry.get("backup_id"):
            return str(entry["backup_id"])
    backup = nested(cluster.state(name), "backups", "last")
    if isinstance(backup, Mapping):
        return str(backup.get("id") or backup.get("backup_id") or "?")
    return "none recorded"


def iter_lines(summary: Summary) -> Iterator[str]:
    """The final table, as lines."""
    names = sorted(summary.formats)
    yield f"{'instance':<10} {'keys':>5} {'v1':>5} {'v2':>5}"
    for n in names:
        f = summary.formats[n]
        yield f"{n:<10} {sum(f.values()):>5} {f.get(1, 0):>5} {f.get(2, 0):>5}"
    yield f"equal: {'yes' if summary.equal else 'NO'}    writes recorded: {summary.writes}"
    for c in summary.checks:
        yield f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}"


__all__ = [
    "APP_DBI",
    "FORMAT_CHANGE",
    "AppWriter",
    "Check",
    "Cluster",
    "Instance",
    "RollingResult",
    "ScenarioError",
    "SnapshotFile",
    "StateWatcher",
    "Summary",
    "Timeline",
    "Write",
    "check_writes",
    "decode",
    "encode",
    "final_checks",
    "format_of",
    "iter_lines",
    "latest_writes",
    "rolling_migration",
    "settled",
    "wait_until",
]

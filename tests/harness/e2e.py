"""The real daemon (``python -m lssupervisor run``) against the LS stand-in, for end-to-end tests.

A :class:`ConfigSet` is a config set in ``tmp_path`` (our YAML, an LS template with fs storage, an
LMDB directory, a migrations directory with a baseline); a :class:`Daemon` is one daemon process with
its log in a file. Everything that waits, waits on a condition with a deadline: the daemon's log,
``state.json``, the stand-in's start records. ``close()`` kills what is left by pid.

The stand-in's start record (``LSSTANDIN_RECORD``) is written after its test knobs are in place, so
waiting for an LS's record is waiting until it really ignores SIGTERM, crashes on its timer, etc. The
daemon reports RUNNING after ``settle_time`` whatever LS is doing, so :meth:`Daemon.running_ls_pid` and
:func:`wait_running_on` also wait for the stand-in's record of that pid: "running" in a test means the
LS really started (and counting ``starts()`` is then exact).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import psutil
import yaml

from lssupervisor.config import load_config
from lssupervisor.lsconfig.render import inspect_template, lenient_env, load_template
from lssupervisor.worker import client
from lssupervisor.worker import protocol as p
from tests.harness.wait import wait_for

STANDIN = str(Path(sys.executable).with_name("lightningstream-standin"))
TEMPLATE = """\
instance: e2e
lmdbs:
  main:
    path: {lmdb}
    options:
      create: true
    schema_tracks_changes: true
storage:
  type: fs
  options:
    root_path: {storage}/v${{APP_SCHEMA_VERSION}}
lmdb_poll_interval: {poll}
storage_poll_interval: 100ms
"""

BASELINE = '''"""Baseline: the users DBI."""

VERSION = 1


def upgrade(m):
    m.db("users", create=True)
'''

WATCH = "watch:\n  debounce: 200ms\n"
WATCH_OFF = "watch:\n  enabled: false\n"


def step_migration(version: int) -> str:
    """A migration file for ``version`` that adds one record."""
    return f'''"""Step {version}: add a record."""

VERSION = {version}


def upgrade(m):
    m.db("users", create=True)
    m.put("users", b"step-{version}", b"done")
    m.progress(1, 1)
'''


class ConfigSet:
    """A config set in tmp_path: lssupervisor.yaml, the LS template (fs storage), an LMDB dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "lssupervisor.yaml"
        self.template = root / "lightningstream.yaml.in"
        self.lmdb = root / "db"
        self.storage = root / "storage"
        self.state = root / "state"
        self.record = root / "ls-starts.jsonl"
        self.migrations = root / "migrations"
        self.lmdb.mkdir()
        self.storage.mkdir()
        self.migrations.mkdir()
        self.binary = STANDIN
        # The application's migrations: a baseline (an empty LMDB is stamped with it at boot).
        (self.migrations / "0001_baseline.py").write_text(BASELINE)
        self.write_template()
        self.write()

    def write_template(self, poll: str = "100ms", ls_http: str = "") -> None:
        text = TEMPLATE.format(lmdb=self.lmdb, storage=self.storage, poll=poll)
        if ls_http:
            text += f"http:\n  address: {ls_http}\n"
        self.template.write_text(text)

    def write(
        self,
        *,
        stop_timeout: str = "3s",
        settle_time: str = "200ms",
        ls_env: dict[str, str] | None = None,
        restart: dict[str, str] | None = None,
        pdeathsig: bool = True,
        state_dir: str = "state",
        http: str = "",
        ls_extra: str = "",
        extra: str = "",
        binary: str = STANDIN,
    ) -> None:
        """``ls_extra``: more lines of the ``lightningstream:`` block (indented by 2); ``extra``: more
        top-level YAML (``schema:``, ``watch:``, ``hooks:``...).

        The file watcher is off unless ``extra`` configures it (:data:`WATCH`): a test that edits a file
        and sends SIGHUP must not race a second, watcher-made reconcile that lands anywhere in its
        cycle depending on how busy the machine is."""
        self.binary = binary
        env = {"LSSTANDIN_RECORD": str(self.record), **(ls_env or {})}
        env_yaml = "".join(f"\n    {k}: {json.dumps(v)}" for k, v in env.items())
        policy = {"initial_delay": "200ms", "max_delay": "1s", "jitter": "0", **(restart or {})}
        restart_yaml = "".join(f"\n  {k}: {v}" for k, v in policy.items())
        self.config.write_text(
            f"""\
state_dir: {state_dir}
lightningstream:
  binary: {binary}
  args: [sync]
  template: {self.template.name}
  stop_timeout: {stop_timeout}
  settle_time: {settle_time}
  ready_timeout: 20s
  pdeathsig: {"true" if pdeathsig else "false"}
  env:{env_yaml}
{ls_extra}restart:{restart_yaml}
migrations:
  path: migrations
http:
  address: "{http}"
{extra}{"" if "watch:" in extra else WATCH_OFF}"""
        )

    def records(self) -> list[dict[str, Any]]:
        """Every line of the record file: stand-in starts (LS, and `LS -c candidate` validation runs)
        and, with the overlap knob, the worker's write_txn_begin/end."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def starts(self) -> list[dict[str, Any]]:
        """The stand-in's start records (pid, time_ns, config...), one per LS start; the daemon's
        `LS -c candidate` validation runs (no subcommand) are left out."""
        return [
            r for r in self.records()
            if r.get("event") == "start" and not str(r.get("config", "")).endswith(".candidate")
        ]

    def start_pids(self) -> list[int]:
        return [int(s["pid"]) for s in self.starts()]

    def wait_recorded(self, pid: int, timeout: float = 30.0) -> dict[str, Any]:
        """The start record of the LS ``pid``: once it exists, the stand-in's knobs are in place (it
        records after installing them). A daemon reports RUNNING after ``settle_time`` whatever the
        LS is doing, so a test about what LS does with a signal waits for this first."""
        return wait_for(
            lambda: next((s for s in self.starts() if s["pid"] == pid), None),
            timeout=timeout,
            what=f"the start record of LS pid {pid}",
        )

    def confirm_started(self, pid: int) -> None:
        """Wait for the stand-in's record of ``pid`` (a real LS writes none: nothing to wait for)."""
        if self.binary == STANDIN:
            self.wait_recorded(pid)

    def state_doc(self) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.state / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None


class Daemon:
    """One ``lssupervisor run`` process with its log in a file."""

    def __init__(self, cs: ConfigSet, name: str = "daemon", extra: tuple[str, ...] = ()) -> None:
        self.cs = cs
        self.logfile = cs.root / f"{name}.log"
        self._log = self.logfile.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lssupervisor", "run", "-c", str(cs.config), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cs.root,
        )
        self.pid = self.proc.pid

    def text(self) -> str:
        return self.logfile.read_text(errors="replace")

    def lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.text().splitlines() if rx.search(line)]

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        def found() -> list[str]:
            if self.proc.poll() is not None:
                hits = self.lines(pattern)
                if len(hits) >= count:
                    return hits
                raise AssertionError(f"daemon exited {self.proc.returncode} before {pattern!r}")
            hits = self.lines(pattern)
            return hits if len(hits) >= count else []

        try:
            return wait_for(found, timeout=timeout, what=f"{count}x {pattern!r} in the daemon log")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log ---\n{self.text()}") from None

    def wait_state(self, state: str, timeout: float = 30.0) -> dict[str, Any]:
        def ok() -> dict[str, Any]:
            doc = self.cs.state_doc() or {}
            return doc if doc.get("state") == state and doc.get("pid") == self.pid else {}

        try:
            return wait_for(ok, timeout=timeout, what=f"state {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last {self.cs.state_doc()}\n{self.text()}") from None

    def running_ls_pid(self, timeout: float = 30.0) -> int:
        """The LS pid once the daemon is RUNNING and that LS recorded its start."""
        doc = self.wait_state("RUNNING", timeout)
        pid = doc["lightningstream"]["pid"]
        assert isinstance(pid, int)
        self.cs.confirm_started(pid)
        return pid

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill what is left: the daemon, then any stand-in it started (by recorded pid)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        kill_recorded_ls(self.cs)


class Daemons:
    """Daemons started by one test; ``close_all`` in the fixture's ``finally``."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def start(self, cs: ConfigSet, name: str = "daemon", extra: tuple[str, ...] = ()) -> Daemon:
        d = Daemon(cs, name, extra)
        self.started.append(d)
        return d

    def close_all(self) -> None:
        for d in self.started:
            d.close()


def kill_recorded_ls(cs: ConfigSet) -> None:
    for rec in cs.starts():
        pid = rec["pid"]
        try:
            proc = psutil.Process(pid)
            if str(cs.root) in " ".join(proc.cmdline()):  # a reused pid is not ours to kill
                proc.kill()
                proc.wait(10)
        except psutil.Error:
            pass


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- reading the daemon's state --------------------------------------------------------------------


def doc_of(d: Daemon) -> dict[str, Any]:
    """The daemon's state.json now (empty while there is none)."""
    return d.cs.state_doc() or {}


def wait_running_on(d: Daemon, version: int, timeout: float = 60.0) -> dict[str, Any]:
    """state.json of ``d`` once it is RUNNING with the LMDB and LS's config at schema ``version``."""

    def ok() -> dict[str, Any]:
        doc = doc_of(d)
        good = (
            doc.get("pid") == d.pid
            and doc.get("state") == "RUNNING"
            and doc.get("schema_version") == version
            and (doc.get("lmdbs") or {}).get("main", {}).get("schema_version") == version
        )
        return doc if good else {}

    try:
        doc = wait_for(ok, timeout=timeout, what=f"RUNNING on schema v{version}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last {doc_of(d)}\n{d.text()}") from None
    d.cs.confirm_started(doc["lightningstream"]["pid"])
    return doc


def rendered_root(cs: ConfigSet) -> str:
    """The storage root the rendered LS config points at (the prefix carries the version, I2)."""
    doc = yaml.safe_load((cs.state / "lightningstream.yaml").read_text())
    return str(doc["storage"]["options"]["root_path"])


def markers(cs: ConfigSet) -> dict[str, int | None]:
    """The LMDB's markers, read by a worker (as the daemon does)."""
    cfg = load_config(cs.config)
    template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    view = inspect_template(template, lenient_env(os.environ))
    result = client.call(p.MarkersRequest(client.settings(cfg, view)), p.MarkersResult, timeout=60)
    return result.versions()


def own_workers(cs: ConfigSet) -> list[psutil.Process]:
    """Worker processes of this test's daemon: their cwd is the config set's root (the daemon's),
    so workers of daemons in other tests running in parallel (xdist) are not counted."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if "lssupervisor.worker" in " ".join(proc.info["cmdline"] or []) and proc.info["cwd"] == str(cs.root):
            found.append(proc)
    return found


def dump(path: Path) -> tuple[int, dict[bytes, list[tuple[bytes, bytes]]]]:
    """Last txn id and every named DBI's entries of the LMDB at ``path`` (read-only; nothing else
    has it open when this runs)."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        out: dict[bytes, list[tuple[bytes, bytes]]] = {}
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                out[name] = list(txn.cursor(db=db))
        return int(env.info()["last_txnid"]), out
    finally:
        env.close()


# -- acting as the application ---------------------------------------------------------------------


def ship(cs: ConfigSet, name: str, text: str) -> Path:
    """Install a migration file by rename (the watcher sees one complete file appear)."""
    tmp = cs.migrations / f".{name}.tmp"
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    dest = cs.migrations / name
    os.rename(tmp, dest)
    return dest


def run_cli(cs: ConfigSet, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``lssupervisor ARGS -c <config>`` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "lssupervisor", *args, "-c", str(cs.config)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )

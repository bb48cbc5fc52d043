"""The LS-down window of a reconcile cycle, broken down, under the real daemon.

    .venv/bin/python benchmarks/bench_cycle.py                      # stand-in or real LS, 5 rounds
    .venv/bin/python benchmarks/bench_cycle.py --ls /path/to/lightningstream --rounds 7
    .venv/bin/python benchmarks/bench_cycle.py --tree /path/to/another/checkout   # compare a version

Each round builds a fresh instance (an LMDB of ``--records`` records, fs storage, LS serving /healthz on
loopback), starts ``lssupervisor run`` and waits until LS runs on schema v1, then ships ``--steps``
trivial migrations at once and waits until LS runs on the new version. From the daemon's JSON log and
history.jsonl it prints, per phase, the median and min-max over the rounds:

- stop: SIGTERM to LS until its group is gone; prove: PROVING; backup; migrate (the steps); verify
  (markers read back); render (config for the new version, validated, swapped) until the new LS starts;
  start->ready (LS started until the daemon says RUNNING);
- LS-down window = new LS started - old LS gone; overhead = that window - (backup + steps), where backup
  and steps are the worker's own durations from history.jsonl: the time LS is down for anything but the
  migration's own work;
- readiness lag = the daemon's /readyz first 200 - LS's own /healthz startup_main first true, both
  polled by this script every millisecond;
- importing: the time spent loading the migrations before LS was stopped (not in the window).

The LS binary is chosen like the demo's: ``--ls``, else $LIGHTNINGSTREAM_BIN, else ``lightningstream`` on
PATH, else the stand-in. Not a test: timings depend on the machine; docs/performance.md records results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# The LS template of the crash campaign: one instance, fs storage under v<version>, /healthz on loopback.
from lssupervisor.testing.crashes import TEMPLATE  # noqa: E402
from lssupervisor.testing.ports import free_port  # noqa: E402 (outside the ephemeral range: no races)

HDR = struct.Struct(">QQBB4xH")
TS0 = 1_700_000_000_000_000_000

CONFIG = """\
state_dir: state
lightningstream:
  binary: {binary}
  args: [sync]
  template: lightningstream.yaml.in
  stop_timeout: 5s
  ready_timeout: 60s
migrations:
  path: migrations
http:
  address: {http}
schema:
  baseline: 1
log:
  format: json
watch:
  debounce: 100ms
"""

BASELINE = '''"""Baseline."""

VERSION = 1


def upgrade(m):
    m.db("users", create=True)
'''

STEP = '''"""Step {version}: a trivial change to one record."""

VERSION = {version}


def upgrade(m):
    m.put("users", b"user:000000000", b"step {version}")
'''


def find_ls(explicit: str | None) -> tuple[str, str]:
    if explicit:
        return explicit, "given"
    if os.environ.get("LIGHTNINGSTREAM_BIN"):
        return os.environ["LIGHTNINGSTREAM_BIN"], "$LIGHTNINGSTREAM_BIN"
    on_path = shutil.which("lightningstream")
    if on_path:
        return on_path, "lightningstream on PATH"
    return str(Path(sys.executable).with_name("lightningstream-standin")), "the stand-in"


def build_lmdb(path: Path, records: int) -> None:
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"users", txn=txn)
        tid = txn.id()
        for i in range(records):
            txn.put(b"user:%09d" % i, HDR.pack(TS0 + i, tid, 0, 0, 0) + b'{"n": %d}' % i, db=db)
    env.close()


def parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Poller(threading.Thread):
    """Polls LS's /healthz and the daemon's /readyz every millisecond, noting when each turns ready."""

    def __init__(self, ls_http: str, http: str) -> None:
        super().__init__(daemon=True)
        self.ls_http, self.http = ls_http, http
        self.stop = threading.Event()
        self.armed = threading.Event()
        self.ls_ready: float | None = None
        self.daemon_ready: float | None = None

    def _get(self, url: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except OSError:
            return 0, b""

    def run(self) -> None:
        self.armed.wait()
        while not self.stop.is_set() and (self.ls_ready is None or self.daemon_ready is None):
            if self.ls_ready is None:
                status, body = self._get(f"http://{self.ls_http}/healthz")
                if status == 200:
                    try:
                        meta = json.loads(body).get("metadata") or {}
                    except ValueError:
                        meta = {}
                    if meta.get("startup_main"):
                        self.ls_ready = time.time()
            if self.daemon_ready is None:
                status, _ = self._get(f"http://{self.http}/readyz")
                if status == 200:
                    self.daemon_ready = time.time()
            time.sleep(0.001)


def wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def one_round(root: Path, tree: Path, binary: str, records: int, steps: int) -> dict[str, float]:
    root.mkdir(parents=True)
    (root / "migrations").mkdir()
    (root / "migrations" / "0001_baseline.py").write_text(BASELINE)
    build_lmdb(root / "db", records)
    (root / "storage").mkdir()
    ls_http, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    (root / "lightningstream.yaml.in").write_text(
        TEMPLATE.format(instance="bench", lmdb=root / "db", storage=root / "storage", ls_http=ls_http)
    )
    (root / "lssupervisor.yaml").write_text(CONFIG.format(binary=binary, http=http))
    log_path = root / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lssupervisor", "run", "-c", str(root / "lssupervisor.yaml")],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=root, env=env,
        )
    try:
        state = root / "state" / "state.json"

        def running_on(version: int) -> bool:
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return False
            return bool(doc.get("state") == "RUNNING" and doc.get("schema_version") == version)

        wait(lambda: running_on(1), 60, "RUNNING on v1")
        poller = Poller(ls_http, http)
        poller.start()
        # Ship the steps in one rename each, the last one last: the watcher's debounce makes one cycle.
        for v in range(2, steps + 2):
            tmp = root / "migrations" / f".{v}.tmp"
            tmp.write_text(STEP.format(version=v))
            os.chmod(tmp, 0o644)
            os.rename(tmp, root / "migrations" / f"{v:04d}_step{v}.py")
        # Arm the poller once LS is down, so it sees the NEW LS turn ready.
        wait(lambda: not _http_ok(f"http://{ls_http}/healthz"), 60, "the old LS to stop")
        poller.armed.set()
        wait(lambda: running_on(steps + 1), 120, f"RUNNING on v{steps + 1}")
        wait(lambda: poller.ls_ready and poller.daemon_ready, 30, "both readiness signals")
        poller.stop.set()
        poller.join()
    finally:
        daemon.terminate()
        daemon.wait(30)
    return measure(root, log_path, poller)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.2):
            return True
    except OSError:
        return False


def measure(root: Path, log_path: Path, poller: Poller) -> dict[str, float]:
    events: list[tuple[float, str, dict[str, Any]]] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue  # LS's own lines (output: inherit)
        doc = json.loads(line)
        events.append((parse_time(doc["time"]), str(doc.get("msg", "")), doc))

    def first(pred: Callable[[str, dict[str, Any]], bool], after: float = 0.0) -> float:
        for t, msg, doc in events:
            if t >= after and pred(msg, doc):
                return t
        raise SystemExit(f"event not found after {after} in {log_path}")

    planned = first(lambda m, d: m.startswith("migration planned: 1→"))
    stop = first(lambda m, d: m == "state RECONCILING -> STOPPING", planned)
    gone = first(lambda m, d: m == "lightningstream exited", stop)
    def entered(name: str) -> Callable[[str, dict[str, Any]], bool]:
        return lambda m, d: d.get("substate") == name and m.startswith("state ")

    substep = {
        name: first(entered(name), planned)
        for name in ("PROVING", "BACKING_UP", "MIGRATING", "VERIFYING", "RENDERING")
    }
    importing = first(lambda m, d: d.get("substate") == "IMPORTING", planned) if any(
        d.get("substate") == "IMPORTING" for _, _, d in events
    ) else planned
    started = first(lambda m, d: m.startswith("lightningstream started"), gone)
    ready = first(lambda m, d: m == "state STARTING -> RUNNING", started)
    history = [json.loads(x) for x in (root / "state" / "history.jsonl").read_text().splitlines()]
    # The worker's own time for the backup and each step (the boot's baseline stamp is kind "stamp").
    work = sum(
        float((e.get("extra") or {}).get("duration_s") or 0.0)
        for e in history
        if e.get("kind") in ("backup", "migrate")
    )
    window = started - gone
    assert poller.ls_ready is not None and poller.daemon_ready is not None
    return {
        "importing (LS up)": stop - importing,
        "stop": gone - stop,
        "prove": substep["BACKING_UP"] - substep["PROVING"],
        "backup": substep["MIGRATING"] - substep["BACKING_UP"],
        "migrate": substep["VERIFYING"] - substep["MIGRATING"],
        "verify": substep["RENDERING"] - substep["VERIFYING"],
        "render + spawn": started - substep["RENDERING"],
        "start -> ready": ready - started,
        "LS-down window": window,
        "backup + steps (history)": work,
        "overhead = window - work": window - work,
        "readiness lag (/readyz - /healthz)": poller.daemon_ready - poller.ls_ready,
    }


def report(title: str, results: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"  {'phase':36s} {'median':>9s}   min-max over {len(results)} rounds (milliseconds)")
    for key in results[0]:
        values = sorted(1000 * r[key] for r in results)
        print(f"  {key:36s} {statistics.median(values):9.1f}   {values[0]:.1f}-{values[-1]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ls", help="LS binary (default: as the demo finds it)")
    parser.add_argument("--tree", help="the lssupervisor checkout to run (default: this one)")
    parser.add_argument("--baseline", help="another checkout, run in interleaved rounds (before/after)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args()
    binary, why = find_ls(args.ls)
    trees = {"this tree": Path(args.tree).resolve() if args.tree else HERE.parent}
    if args.baseline:
        trees = {"baseline": Path(args.baseline).resolve(), **trees}
    scratch = Path(tempfile.mkdtemp(prefix="bench_cycle_"))
    print(f"LS: {binary} ({why}); {args.records} records, {args.steps} steps")
    for name, tree in trees.items():
        print(f"  {name}: {tree}")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        for r in range(args.rounds):
            for name, tree in trees.items():  # interleaved, so load drift hits both alike
                work = scratch / f"{name.replace(' ', '-')}-{r}"
                results[name].append(one_round(work, tree, binary, args.records, args.steps))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    for name, rows in results.items():
        report(f"{name} ({trees[name]})", rows)


if __name__ == "__main__":
    main()

"""The crash campaign: kill -9 the daemon or its worker at many points of real reconcile cycles, and
check after every kill that nothing was lost or mixed.

    python -m lssupervisor.testing.crashes --points 100 [--records 2000] [--seed N] [--dir DIR]

One instance (an LMDB of ``records`` records, fs storage, the LS stand-in or a real LS) runs under
``lssupervisor run``. Point k ships migration k+1, which rewrites every record to ``v<k+1>:<i>`` in one
step; while its cycle runs, the campaign kills, with SIGKILL, either the daemon or the cycle's worker,
at a random moment of a randomly aimed sub-step (PLANNING ... STARTING). Then it checks:

1. **one version**: the LMDB's marker says v, and every record reads ``v<v>:<i>`` (I3: a step commits
   with its marker, or not at all);
2. **restorable backups**: every backup in the backup dir holds an LMDB wholly at one version, the one
   its manifest names (I7, I9);
3. **no overlap**: no LS ran while a worker wrote the LMDB (I1): the worker's write brackets and the
   stand-in's life-long lock (``LSSUPERVISOR_TEST_OVERLAP_LOCK``) never collided;
4. **convergence**: after a restart (daemon killed) or ``lssupervisor resume`` (worker killed), the
   instance runs on the new version.

It prints where each kill landed and the number of inconsistent outcomes (goal: 0). A 20-point run is
part of the test suite (tests/test_crash_campaign.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lssupervisor.testing.fixtures import build_lmdb, read_marker_version, read_values
from lssupervisor.testing.ports import free_port
from lssupervisor.worker.protocol import OVERLAP_ENV

INSTANCE = "crash"
# The sub-steps a kill is aimed at (STOPPING and STARTING are the LS stop and start around the cycle).
AIMS = (
    "PLANNING",
    "IMPORTING",
    "STOPPING",
    "PROVING",
    "BACKING_UP",
    "MIGRATING",
    "VERIFYING",
    "RENDERING",
    "STARTING",
)
# Where the cycle's worker lives (started at IMPORTING, ends after VERIFYING): a worker kill is aimed here.
WORKER_AIMS = ("IMPORTING", "STOPPING", "PROVING", "BACKING_UP", "MIGRATING", "VERIFYING")

TEMPLATE = """\
instance: {instance}
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
lmdb_poll_interval: 100ms
storage_poll_interval: 100ms
http:
  address: {ls_http}
"""

CONFIG = """\
state_dir: state
lightningstream:
  binary: {binary}
  args: [sync]
  template: lightningstream.yaml.in
  stop_timeout: 5s
  ready_timeout: 60s
  env:
    {overlap_env}: {record}
    LSSTANDIN_HEALTH_INTERVAL_MS: "20"
migrations:
  path: migrations
backup:
  keep: 3
restart:
  initial_delay: 100ms
  max_delay: 1s
  jitter: 0
watch:
  debounce: 50ms
"""

BASELINE = '''"""Baseline: the users DBI."""

VERSION = 1


def upgrade(m):
    m.db("users", create=True)
'''

STEP = '''"""Step {version}: every record becomes v{version}:<i>, in one transaction with the marker."""

VERSION = {version}


def upgrade(m):
    m.rewrite("users", lambda key, value: b"v{version}:" + key.split(b":", 1)[1])
'''


class CampaignError(Exception):
    """The campaign itself could not go on (not an inconsistent outcome: those are counted)."""


def _wait(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CampaignError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Outcome:
    point: int
    victim: str  # daemon | worker
    aimed: str
    landed: str  # the state/sub-step status showed when the kill was sent
    version: int | None = None
    problems: list[str] = field(default_factory=list)


class Instance:
    """One lssupervisor instance in ``root`` with its daemon."""

    def __init__(self, root: Path, binary: str, records: int) -> None:
        self.root = root
        self.records = records
        self.lmdb = root / "db"
        self.migrations = root / "migrations"
        self.state = root / "state"
        self.overlap = root / "overlap.jsonl"
        self.log = root / "daemon.log"
        root.mkdir(parents=True)
        self.migrations.mkdir()
        (self.migrations / "0001_baseline.py").write_text(BASELINE)
        (root / "storage").mkdir()
        data = {"users": {f"user:{i:06d}": f"v1:{i:06d}" for i in range(records)}}
        self.spec = build_lmdb(self.lmdb, data, marker=1, instance=INSTANCE)
        (root / "lightningstream.yaml.in").write_text(
            TEMPLATE.format(
                instance=INSTANCE,
                lmdb=self.lmdb,
                storage=root / "storage",
                ls_http=f"127.0.0.1:{free_port()}",
            )
        )
        (root / "lssupervisor.yaml").write_text(
            CONFIG.format(binary=binary, overlap_env=OVERLAP_ENV, record=self.overlap)
        )
        self.daemon: subprocess.Popen[bytes] | None = None

    # -- the daemon --

    def start(self) -> None:
        env = {**os.environ, OVERLAP_ENV: str(self.overlap)}  # the worker brackets its writes
        with self.log.open("ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "lssupervisor", "run", "-c", str(self.root / "lssupervisor.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=env,
            )

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(10)
        self.daemon = None

    def status(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.state / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def running_on(self, version: int) -> bool:
        doc = self.status()
        return bool(
            self.daemon is not None
            and doc.get("pid") == self.daemon.pid
            and doc.get("state") == "RUNNING"
            and doc.get("schema_version") == version
        )

    def where(self) -> str:
        doc = self.status()
        return str(doc.get("substate") or doc.get("state") or "?")

    def worker_pid(self) -> int | None:
        if self.daemon is None:
            return None
        try:
            for proc in psutil.Process(self.daemon.pid).children():
                if "lssupervisor.worker" in " ".join(proc.cmdline()):
                    return proc.pid
        except psutil.Error:
            return None
        return None

    def ship(self, version: int) -> None:
        tmp = self.migrations / f".{version}.tmp"
        tmp.write_text(STEP.format(version=version))
        os.chmod(tmp, 0o644)
        os.rename(tmp, self.migrations / f"{version:04d}_step{version}.py")

    def resume(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "lssupervisor", "resume", "-c", str(self.root / "lssupervisor.yaml")],
            capture_output=True,
            timeout=60,
            check=False,
            cwd=self.root,
        )

    # -- the checks --

    def one_version(self, spec_path: Path | None = None) -> tuple[int | None, list[str]]:
        """The marker's version and what contradicts it (records of another version)."""
        spec = self.spec if spec_path is None else type(self.spec)(name="main", path=str(spec_path))
        version = read_marker_version(spec, instance=INSTANCE)
        users = read_values(spec).get("users", {})
        problems = []
        if version is None:
            problems.append("no marker")
            return None, problems
        if len(users) != self.records:
            problems.append(f"{len(users)} records, expected {self.records}")
        wrong = [k for k, v in users.items() if not v.startswith(b"v%d:" % version)]
        if wrong:
            problems.append(f"{len(wrong)} records not at the marker's version {version} (e.g. {wrong[0]!r})")
        return version, problems

    def backups_restorable(self) -> list[str]:
        problems = []
        for manifest_path in sorted((self.state / "backups").glob("*/manifest.json")):
            manifest = json.loads(manifest_path.read_text())
            copy = manifest_path.parent / "main"
            version, found = self.one_version(copy)
            expected = manifest["lmdbs"][0]["schema_version"]
            if found or version != expected:
                problems.append(
                    f"backup {manifest_path.parent.name}: at {version}, manifest {expected}: {found}"
                )
        return problems

    def overlaps(self) -> list[str]:
        if not self.overlap.exists():
            return []
        return [line for line in self.overlap.read_text().splitlines() if '"overlap"' in line]


def _kill_worker(inst: Instance) -> bool:
    """SIGKILL the cycle's worker (a child of the daemon this campaign started, found by pid right
    before the kill); False when there is none or it ended in between."""
    pid = inst.worker_pid()
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _one_point(inst: Instance, rng: random.Random, point: int) -> Outcome:
    """Ship the next migration, kill the daemon or the worker in the middle of its cycle, check."""
    version = point + 2
    victim = rng.choice(("daemon", "worker"))
    aimed = rng.choice(WORKER_AIMS if victim == "worker" else AIMS)
    delay = rng.uniform(0, 0.03)
    inst.ship(version)
    _wait(lambda: inst.where() == aimed or inst.running_on(version), 60, f"{aimed} of v{version}", 0.001)
    time.sleep(delay)  # a random moment within (or just after) the aimed sub-step
    where = inst.where()
    if victim == "worker" and not _kill_worker(inst):
        # No worker outside IMPORTING..VERIFYING (or it just ended): every point still kills
        # something, so the daemon it is.
        victim = "daemon"
    outcome = Outcome(point, victim, aimed, where)
    if victim == "daemon":
        assert inst.daemon is not None
        inst.daemon.kill()
        inst.daemon.wait(30)
        _wait(lambda: inst.worker_pid() is None, 10, "the worker to die with the daemon")
    # The LMDB right after the kill (a killed daemon takes its worker and LS down with it).
    outcome.version, problems = inst.one_version()
    outcome.problems.extend(problems)
    # Recover: a new daemon, or `resume` for a daemon that parked when its worker died.
    if victim == "daemon":
        inst.start()
    else:
        settled = ("PARKED", "RUNNING", "BACKOFF", "STARTING")
        _wait(lambda: inst.status().get("state") in settled, 60, "the daemon to settle after its worker died")
        if not inst.running_on(version):
            inst.resume()
    try:
        _wait(lambda: inst.running_on(version), 90, f"RUNNING on v{version}")
    except CampaignError as exc:
        outcome.problems.append(f"did not converge: {exc}; last status {inst.status().get('reason')}")
    after, problems = inst.one_version()
    outcome.problems.extend(f"after recovery: {p}" for p in problems)
    if after != version:
        outcome.problems.append(f"after recovery at v{after}, expected v{version}")
    outcome.problems.extend(inst.backups_restorable())
    outcome.problems.extend(f"LS ran during a write: {line}" for line in inst.overlaps())
    return outcome


def run(
    root: Path, points: int, *, records: int, seed: int, binary: str, out: Callable[[str], None]
) -> list[Outcome]:
    """The campaign; ``out`` gets one line per point. Stops early when an instance cannot recover."""
    rng = random.Random(seed)
    inst = Instance(root, binary, records)
    inst.start()
    outcomes: list[Outcome] = []
    try:
        _wait(lambda: inst.running_on(1), 60, "the instance to run on v1")
        for point in range(points):
            o = _one_point(inst, rng, point)
            outcomes.append(o)
            mark = "ok" if not o.problems else "INCONSISTENT: " + "; ".join(o.problems)
            out(f"point {point:3d}: kill {o.victim:6s} aimed {o.aimed:10s} landed {o.landed:10s} -> {mark}")
            if o.problems and not inst.running_on(point + 2):
                break  # the instance is in an unknown state; the campaign cannot go on meaningfully
    finally:
        inst.stop()
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    bad = [o for o in outcomes if o.problems]
    landed = Counter(o.landed for o in outcomes)
    return (
        f"{len(bad)} inconsistent outcomes of {len(outcomes)} kills "
        f"(daemon {sum(o.victim == 'daemon' for o in outcomes)}, "
        f"worker {sum(o.victim == 'worker' for o in outcomes)}); landed in: "
        + ", ".join(f"{k} {v}" for k, v in sorted(landed.items()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ls", help="LS binary (default: the stand-in)")
    parser.add_argument("--dir", help="work directory (kept); default: a temporary one, removed")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    binary = args.ls or str(Path(sys.executable).with_name("lightningstream-standin"))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lss-crashes-")) / "instance"
    print(f"crash campaign: {args.points} points, {args.records} records, seed {seed}, LS {binary}")
    try:
        outcomes = run(root, args.points, records=args.records, seed=seed, binary=binary, out=print)
    finally:
        if not args.dir:
            shutil.rmtree(root.parent, ignore_errors=True)
    print(summary(outcomes))
    sys.exit(1 if any(o.problems for o in outcomes) or len(outcomes) < args.points else 0)


if __name__ == "__main__":
    main()

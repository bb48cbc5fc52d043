"""How long a crashed LS stays down beyond the restart policy's own delay.

    .venv/bin/python benchmarks/bench_restart.py [--rounds 10] [--ls BIN]

Starts ``lssupervisor run`` with a constant backoff (1 s, no jitter), then SIGKILLs LS ``--rounds``
times. For each crash: overhead = the daemon's "lightningstream started" time - the kill - the drawn
delay (read back from the daemon's "restart N in D" reason). That is the time the daemon adds to notice
the exit, collect LS's group and spawn the next LS. Also prints the readiness lag of the restarted LS
(/readyz 200 - LS's own /healthz startup true). Median and min-max. Not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_cycle import Poller, build_lmdb, find_ls, parse_time, wait  # noqa: E402

from lssupervisor.durations import parse_seconds  # noqa: E402
from lssupervisor.testing.crashes import TEMPLATE  # noqa: E402
from lssupervisor.testing.ports import free_port  # noqa: E402

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
schema:
  baseline: 1
restart:
  initial_delay: 1s
  max_delay: 1s
  multiplier: 1
  jitter: 0
  burst_limit: 1000
http:
  address: {http}
log:
  format: json
"""


def _another_pid(running_pid: Callable[[], int | None], old: int) -> int | None:
    """The RUNNING LS's pid once it is not ``old`` (the one just killed)."""
    pid = running_pid()
    return pid if pid is not None and pid != old else None


def _both_ready(poller: Poller) -> bool:
    return poller.ls_ready is not None and poller.daemon_ready is not None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ls", help="LS binary (default: as the demo finds it)")
    parser.add_argument("--tree", help="the lssupervisor checkout to run (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    binary, why = find_ls(args.ls)
    tree = Path(args.tree).resolve() if args.tree else HERE.parent
    root = Path(tempfile.mkdtemp(prefix="bench_restart_"))
    (root / "migrations").mkdir()
    (root / "migrations" / "0001_baseline.py").write_text(
        '"""Baseline."""\nVERSION = 1\n\n\ndef upgrade(m):\n    pass\n'
    )
    build_lmdb(root / "db", 100)
    (root / "storage").mkdir()
    ls_http, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    (root / "lightningstream.yaml.in").write_text(
        TEMPLATE.format(instance="bench", lmdb=root / "db", storage=root / "storage", ls_http=ls_http)
    )
    (root / "lssupervisor.yaml").write_text(CONFIG.format(binary=binary, http=http))
    print(f"LS: {binary} ({why}); lssupervisor: {tree}")
    log_path = root / "daemon.log"
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lssupervisor", "run", "-c", str(root / "lssupervisor.yaml")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
    overheads: list[float] = []
    lags: list[float] = []
    try:
        state = root / "state" / "state.json"

        def running_pid() -> int | None:
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return None
            pid = (doc.get("lightningstream") or {}).get("pid")
            return pid if doc.get("state") == "RUNNING" and isinstance(pid, int) else None

        pid = wait(running_pid, 60, "RUNNING")
        for _ in range(args.rounds):
            poller = Poller(ls_http, http)
            poller.start()
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            wait(lambda: not _ok(f"http://{http}/readyz"), 10, "/readyz to drop")
            poller.armed.set()
            new = wait(functools.partial(_another_pid, running_pid, pid), 60, "the restarted LS")
            wait(functools.partial(_both_ready, poller), 30, "readiness")
            poller.stop.set()
            poller.join()
            started = delay = None
            for line in log_path.read_text().splitlines():
                if not line.startswith("{"):
                    continue
                doc = json.loads(line)
                msg = str(doc.get("msg", ""))
                if msg.startswith(f"lightningstream started pid={new} "):
                    started = parse_time(doc["time"])
                if msg == "state RUNNING -> BACKOFF" and " in " in str(doc.get("reason", "")):
                    delay = parse_seconds(str(doc["reason"]).rsplit(" in ", 1)[1])
            assert started is not None and delay is not None, "log lines not found"
            overheads.append(started - killed - delay)
            assert poller.ls_ready is not None and poller.daemon_ready is not None
            lags.append(poller.daemon_ready - poller.ls_ready)
            pid = new
    finally:
        daemon.terminate()
        daemon.wait(30)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for name, values in (("crash -> new LS, beyond the delay", overheads), ("readiness lag", lags)):
        ms = sorted(1000 * v for v in values)
        print(
            f"  {name:36s} median {statistics.median(ms):7.1f} ms   min-max {ms[0]:.1f}-{ms[-1]:.1f}"
            f"   over {len(ms)} crashes"
        )


def _ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=0.2):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()

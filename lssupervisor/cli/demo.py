"""``lssupervisor demo``: a narrated rolling migration of two instances, checked at the end.

What it does (docs/demo.md walks through the output):

1. ``lssupervisor init`` two instances, ``alpha`` and ``beta``, sharing one fs storage directory; each
   gets the demo application's baseline migration (version 1: ``name=Alice;email=a@x`` text records).
2. Starts both supervisors; each stamps its empty LMDB at version 1 and starts Lightning Stream (the
   real one when ``$LIGHTNINGSTREAM_BIN`` or ``lightningstream`` on PATH is found, else the stand-in)
   with ``root_path: storage/v1``.
3. Starts a live writer per instance; both sync under ``v1/``.
4. Ships ``0002_users_json.py`` to alpha: alpha stops LS, backs up, migrates its LMDB to JSON records,
   and restarts LS on ``storage/v2``, while beta keeps writing text records and syncing under ``v1/``.
5. Ships the migration to beta; beta does the same and merges with alpha under ``v2/``.
6. Stops the writers, waits until both LMDBs hold the same data, and checks: identical data, every
   value JSON, every write present (or superseded by a later one), the later write won on keys both
   wrote, no ``v2/`` snapshot ever held a text record, each instance on ``v2/`` only after it migrated.

7. Prints the fleet as the storage shows it (``lssupervisor fleet --storage``).

``--storage s3`` runs the same over an S3 bucket on a local S3-API server (moto's server mode, the dev
extras' ``moto[server]``), started for the demo on loopback and stopped at the end; the daemons get
the credentials in their environment only.

Exit 0 only if every check passed. Every process is stopped on the way out (Ctrl-C and SIGTERM too).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

from lssupervisor.errors import ExitCode, SupervisorError, UsageError
from lssupervisor.testing.scenario import (
    Cluster,
    ScenarioError,
    StateWatcher,
    Timeline,
    iter_lines,
    rolling_migration,
)

INTERRUPTED = 130


def _terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C: the cluster's context manager stops every process.
    raise KeyboardInterrupt


def _workdir(requested: str | None) -> Path:
    if requested is None:
        return Path(tempfile.mkdtemp(prefix="lssupervisor-demo-"))
    path = Path(requested).resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--dir {requested}: exists and is not an empty directory; name a new one")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up: a second Ctrl-C must not leave processes behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fleet_lines(cluster: Cluster, env: dict[str, str]) -> list[str]:
    """``fleet --storage`` as alpha's config sees it (its view of the shared storage)."""
    import os

    from lssupervisor.config import load_config
    from lssupervisor.storage import fleet, location

    cfg = load_config(cluster.instances["alpha"].config)
    backend = location.open_backend(location.layout_for(cfg, {**os.environ, **env}), timeout=10)
    try:
        rep = fleet.report(backend.list_versions(), time.time(), float(cfg.fleet.stale_after))
        return [f"fleet --storage ({backend.describe()}):", *fleet.table(rep).splitlines()]
    finally:
        backend.close()


def run(workdir: Path, out: TextIO, storage: str = "fs") -> int:
    timeline = Timeline(out)
    with contextlib.ExitStack() as stack:
        url: str | None = None
        env: dict[str, str] = {}
        if storage == "s3":
            from lssupervisor.testing import s3server

            if not s3server.available():
                raise UsageError(
                    "demo --storage s3 needs a local S3-API server: pip install 'moto[server]' (dev extras)"
                )
            server = stack.enter_context(s3server.S3Server.start())
            server.create_bucket("lssupervisor-demo")
            url = f"s3://lssupervisor-demo/app?endpoint={server.endpoint}"
            env = server.environ()
            print(f"S3-API server (moto) on {server.endpoint}, bucket lssupervisor-demo", file=out)
        return _run(workdir, out, timeline, Cluster(workdir, storage=url, storage_env=env), env)
    return int(ExitCode.SOFTWARE)  # unreachable; mypy cannot see that ExitStack does not swallow


def _run(workdir: Path, out: TextIO, timeline: Timeline, cluster: Cluster, env: dict[str, str]) -> int:
    fleet_lines: list[str] = []
    try:
        print(f"lssupervisor demo in {workdir}", file=out)
        print(f"  Lightning Stream: {cluster.ls.kind} {cluster.ls.path} ({cluster.ls.why})", file=out)
        print("  each instance runs `lssupervisor run`; migrations are picked up by its watcher", file=out)
        print("", file=out, flush=True)
        try:
            with StateWatcher(cluster, timeline):
                result = rolling_migration(cluster, timeline.say)
            with contextlib.suppress(SupervisorError):
                fleet_lines = _fleet_lines(cluster, env)
        except ScenarioError as exc:
            print(f"\ndemo failed: {exc}", file=out)
            for name in cluster.instances:
                print(f"  logs: {cluster.instances[name].log_path}", file=out)
            return int(ExitCode.SOFTWARE)
    finally:
        with _uninterruptible():
            problems = cluster.close()
    if problems:
        print(f"\ndemo failed while stopping: {'; '.join(problems)}", file=out)
        return int(ExitCode.SOFTWARE)
    summary = result.summary
    print("", file=out)
    for line in iter_lines(summary):
        print(line, file=out)
    if fleet_lines:
        print("", file=out)
        for line in fleet_lines:
            print(f"  {line}", file=out)
    t = result.timings
    print(f"\ntook {t['total']:.1f}s (alpha's migration cycle {t.get('alpha_migration', 0):.1f}s, "
          f"beta's {t.get('beta_migration', 0):.1f}s, final sync {t.get('settle', 0):.1f}s)", file=out)
    if summary.ok:
        print("all checks passed", file=out)
        return 0
    failed = [c.name for c in summary.checks if not c.ok]
    print(f"FAILED: {'; '.join(failed)} (details above; files in {workdir})", file=out)
    return int(ExitCode.SOFTWARE)


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = _workdir(args.dir)
    keep = bool(args.keep or args.dir)
    # Ctrl-C and SIGTERM both stop the demo cleanly, whatever it inherited: a shell starts a
    # background job (`lssupervisor demo &` in a script, a CI step) with SIGINT ignored, and Python
    # then leaves it ignored, so Ctrl-C's KeyboardInterrupt would never come.
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate_as_interrupt),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    code = int(ExitCode.SOFTWARE)
    started = time.monotonic()
    try:
        code = run(workdir, sys.stdout, getattr(args, "storage", "fs") or "fs")
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.monotonic() - started:.1f}s; every process the demo started "
              "is stopped", file=sys.stderr)
        code = INTERRUPTED
    except SupervisorError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        code = int(exc.exit_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if keep or code != 0:
            print(f"files kept in {workdir} (configs, LMDBs, storage/v1 and v2, logs)")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    return code


__all__ = ["cmd_demo", "run"]

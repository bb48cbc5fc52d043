"""The backup a migration takes first, against ``mdb_copy -c`` of the same LMDB, in the same run.

    .venv/bin/python benchmarks/bench_backup.py [--records 2500000] [--rounds 5] [--baseline TREE]

Builds a native-mode LMDB (default ~300 MB), then in interleaved rounds times ``mdb_copy -c SRC DST``
(LMDB's own compact copy, written with O_DIRECT, no hash) and ``backup.create`` as the worker runs it
before the first step (free-space check, compact copy of one read snapshot hashed while written, one
fsync, the cheap I7 check of the copy, manifest, rename). Prints median and min-max of the ratio
mdb_copy / backup (target >= 0.9). ``--baseline TREE`` times another checkout's ``backup.create`` in
the same rounds (e.g. a worktree of an older commit). Each backup runs in a fresh child process with
the tree first on ``sys.path``; only the ``create`` call is timed. Needs ``mdb_copy`` (Debian:
lmdb-utils). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lssupervisor.lsmodel import LmdbSpec  # noqa: E402
from lssupervisor.testing.fixtures import build_lmdb  # noqa: E402
from lssupervisor.worker import backup  # noqa: E402
from lssupervisor.worker.ops import open_lmdb  # noqa: E402

HDR = struct.Struct(">QQBB4xH")
INSTANCE = "bench"


def build(path: Path, records: int) -> LmdbSpec:
    spec = build_lmdb(path, {}, marker=1, instance=INSTANCE, map_size=4 << 30)
    env = lmdb.open(str(path), map_size=4 << 30, max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"users", txn=txn)
        tid = txn.id()
        out = txn.cursor(db)
        batch = []
        for i in range(records):
            value = b'{"id": %d, "name": "user %d", "email": "u%d@example.org", "on": true}' % (i, i, i)
            batch.append((b"user:%09d" % i, HDR.pack(1_700_000_000_000_000_000 + i, tid, 0, 0, 0) + value))
            if len(batch) == 10000:
                out.putmulti(batch, append=True)
                batch.clear()
        out.putmulti(batch, append=True)
    env.close()
    return spec


def time_mdb_copy(src: Path, scratch: Path) -> float:
    dst = scratch / "mdb_copy"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    os.sync()  # every side starts with no other write-back queued before it
    started = time.perf_counter()
    subprocess.run(["mdb_copy", "-c", str(src), str(dst)], check=True)
    took = time.perf_counter() - started
    shutil.rmtree(dst)
    return took


# Run in a child with the tree under test first on sys.path: the same code for this tree and a baseline.
_CHILD = """
import json, sys, time
import lmdb
spec_json, directory, tree = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, tree)
from pathlib import Path
from lssupervisor.lsmodel import LmdbSpec
try:
    from lssupervisor.worker import backup
except ImportError:  # trees from before the plane layout
    from lssupervisor import backup
spec = LmdbSpec.from_json(spec_json)
env = lmdb.open(spec.path, readonly=True, max_dbs=spec.max_dbs, lock=True)
started = time.perf_counter()
backup.create({spec.name: env}, [spec], Path(directory), "bench", lambda env, spec: 1, keep=1)
print(time.perf_counter() - started)
"""


def time_backup(spec: LmdbSpec, scratch: Path, tree: Path) -> float:
    directory = scratch / "backups"
    shutil.rmtree(directory, ignore_errors=True)
    os.sync()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec.to_json()), str(directory), str(tree)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    shutil.rmtree(directory)
    return float(out)


def summary(values: list[float], unit: str) -> str:
    return f"median {statistics.median(values):.3f}{unit}  min-max {min(values):.3f}-{max(values):.3f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2_500_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose backup.create to time too")
    args = parser.parse_args()
    if shutil.which("mdb_copy") is None:
        raise SystemExit("mdb_copy not found (Debian: apt-get install lmdb-utils)")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_backup_"))
    try:
        spec = build(scratch / "src", args.records)
        env = open_lmdb(spec, write=False)
        used = backup.env_used_bytes(env)
        env.close()
        print(f"LMDB: {args.records} records, {used / 1e6:.0f} MB of pages in use")
        copies: list[float] = []
        times: dict[str, list[float]] = {"backup.create": []}
        trees = {"backup.create": HERE.parent}
        if args.baseline:
            trees["baseline create"] = args.baseline.resolve()
            times["baseline create"] = []
        for _ in range(args.rounds):  # interleaved: drift hits every side alike
            copies.append(time_mdb_copy(Path(spec.path), scratch))
            for label, tree in trees.items():
                times[label].append(time_backup(spec, scratch, tree))
        print(f"  {'mdb_copy -c':<16} {summary(copies, 's')}")
        for label, values in times.items():
            print(f"  {label:<16} {summary(values, 's')}")
        for label, values in times.items():
            ratios = [c / b for c, b in zip(copies, values, strict=True)]
            name = "mdb_copy/" + ("backup" if label == "backup.create" else "baseline")
            print(
                f"  {name:<16} {summary(ratios, '')}  over {args.rounds} interleaved rounds (target >= 0.9)"
            )
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

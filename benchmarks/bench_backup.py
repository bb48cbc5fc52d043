"""The backup a migration takes first, against ``mdb_copy -c`` of the same LMDB, in the same run.

    .venv/bin/python benchmarks/bench_backup.py [--records 2500000] [--rounds 5]

Builds a native-mode LMDB (default ~300 MB), then in interleaved rounds times ``mdb_copy -c SRC DST``
(LMDB's own compact copy, no hashing, no fsync) and ``backup.create`` as the worker runs it before the
first step (free-space check, compact copy of one read snapshot hashed while written, one fsync,
the cheap I7 check of the copy, manifest, rename). Prints median and min-max of the ratio
mdb_copy / backup (target >= 0.9). Needs ``mdb_copy`` (Debian: lmdb-utils). Not a test.
"""

from __future__ import annotations

import argparse
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


def read_marker(env: lmdb.Environment, spec: LmdbSpec) -> int | None:
    from lssupervisor.worker import marker

    with env.begin() as txn:
        found = marker.read_marker(env, txn, INSTANCE, native=spec.native)
    return found.version if found else None


def time_mdb_copy(src: Path, scratch: Path) -> float:
    dst = scratch / "mdb_copy"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    started = time.perf_counter()
    subprocess.run(["mdb_copy", "-c", str(src), str(dst)], check=True)
    took = time.perf_counter() - started
    shutil.rmtree(dst)
    return took


def time_backup(spec: LmdbSpec, scratch: Path) -> float:
    directory = scratch / "backups"
    shutil.rmtree(directory, ignore_errors=True)
    env = open_lmdb(spec, write=False)
    try:
        started = time.perf_counter()
        backup.create({spec.name: env}, [spec], directory, INSTANCE, read_marker, keep=1)
        took = time.perf_counter() - started
    finally:
        env.close()
    shutil.rmtree(directory)
    return took


def summary(values: list[float], unit: str) -> str:
    return f"median {statistics.median(values):.3f}{unit}  min-max {min(values):.3f}-{max(values):.3f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2_500_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
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
        copies, backups = [], []
        for _ in range(args.rounds):  # interleaved: drift hits both alike
            copies.append(time_mdb_copy(Path(spec.path), scratch))
            backups.append(time_backup(spec, scratch))
        ratios = sorted(c / b for c, b in zip(copies, backups, strict=True))
        for label, times in (("mdb_copy -c", copies), ("backup.create", backups)):
            print(f"  {label:<16} {summary(times, 's')}")
        rounds = f"over {args.rounds} interleaved rounds (target >= 0.9)"
        print(f"  {'mdb_copy/backup':<16} {summary(ratios, '')}  {rounds}")
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

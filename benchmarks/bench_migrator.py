"""Benchmark the migration engine against raw py-lmdb loops doing the same work, in the same run.

    .venv/bin/python benchmarks/bench_migrator.py                 # 1M records, all measurements
    .venv/bin/python benchmarks/bench_migrator.py --records 200000 --no-rss

Prints throughput ratios, median and min-max over interleaved rounds (targets: a value rewrite
through m.items/m.put >= 0.8x the raw cursor loop, with a JSON and with a trivial transform; copy_dbi
>= 0.9x a raw putmulti(append=True) loop) and the worker's memory for 100k vs 2M records in
a subprocess (target: peak grows < 50 MB). Not a test: timings depend on the machine. Results are
recorded in docs/performance.md.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.worker.migrations import Migration, Step, Strategy
from lssupervisor.worker.migrator import MigrationApi, open_env, run_step

HDR = struct.Struct(">QQBB4xH")
TS0 = 1_700_000_000_000_000_000
MAP_SIZE = 4 << 30  # with writemap=True LMDB extends the file (sparse) to this size


def build(path: Path, records: int) -> LmdbSpec:
    """A native-mode LMDB with ``records`` users of ~90-byte JSON values."""
    spec = LmdbSpec(name="main", path=str(path), map_size=MAP_SIZE, native=True)
    path.mkdir(parents=True, exist_ok=True)
    # writemap=False: the master file stays compact (writemap would extend it to MAP_SIZE).
    env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=8, writemap=False)
    with env.begin(write=True) as txn:
        db = env.open_db(b"users", txn=txn)
        tid = txn.id()
        batch = []
        for i in range(records):
            value = json.dumps(
                {"id": i, "name": f"user number {i}", "email": f"u{i}@example.org", "on": True}
            )
            batch.append((b"user:%09d" % i, HDR.pack(TS0 + i, tid, 0, 0, 0) + value.encode()))
            if len(batch) == 10000:
                txn.cursor(db).putmulti(batch, append=True)
                batch.clear()
        txn.cursor(db).putmulti(batch, append=True)
    env.close()
    return spec


def transform(value: bytes) -> bytes:
    data = json.loads(value)
    data["email"] = data["email"].upper()
    return json.dumps(data).encode()


# --- the raw baselines --------------------------------------------------------------------------


def raw_rewrite(env: lmdb.Environment, fn: Callable[[bytes], bytes] = transform) -> int:
    """A raw cursor loop: parse header, skip tombstones, transform, put back with the same timestamp."""
    n = 0
    with env.begin(write=True) as txn:
        db = env.open_db(b"users", txn=txn, create=False)
        tid = txn.id()
        unpack, pack = HDR.unpack_from, HDR.pack
        for key, raw in txn.cursor(db).iternext():
            ts, _t, version, flags, extra = unpack(raw, 0)
            if version:
                raise ValueError("bad header")
            if flags & 1:
                continue
            txn.put(key, pack(ts, tid, 0, 0, 0) + fn(raw[24 + 8 * extra :]), db=db)
            n += 1
    return n


def raw_copy(env: lmdb.Environment) -> int:
    """A raw putmulti(append=True) copy into a new DBI, header parsed and rebuilt."""
    n = 0
    with env.begin(write=True) as txn:
        src = env.open_db(b"users", txn=txn, create=False)
        dst = env.open_db(b"users_v2", txn=txn)
        tid = txn.id()
        unpack, pack = HDR.unpack_from, HDR.pack
        out = txn.cursor(dst)
        batch: list[tuple[bytes, bytes]] = []
        for key, raw in txn.cursor(src).iternext():
            ts, _t, version, flags, extra = unpack(raw, 0)
            if version:
                raise ValueError("bad header")
            if flags & 1:
                continue
            batch.append((key, pack(ts, tid, 0, 0, 0) + raw[24 + 8 * extra :]))
            if len(batch) >= 4096:
                out.putmulti(batch, append=True)
                n += len(batch)
                batch.clear()
        out.putmulti(batch, append=True)
        n += len(batch)
    return n


# --- the same through the engine ----------------------------------------------------------------


def upgrade_rewrite(m: MigrationApi) -> None:
    for key, value in m.items("users"):
        m.put("users", key, transform(value))


def trivial(value: bytes) -> bytes:
    """The cheapest real change: what is left of the time is the API's own overhead."""
    return value.upper()


def upgrade_trivial(m: MigrationApi) -> None:
    for key, value in m.items("users"):
        m.put("users", key, trivial(value))


def upgrade_rewrite_batch(m: MigrationApi) -> None:
    m.rewrite("users", lambda key, value: trivial(value))


def upgrade_copy(m: MigrationApi) -> None:
    m.copy_dbi("users", "users_v2")


def step_for(upgrade: Callable[[MigrationApi], None], strategy: Strategy) -> Step:
    mig = Migration(
        version=1,
        slug="bench",
        path=Path("/nonexistent/0001_bench.py"),
        description="bench",
        lmdb="main",
        strategy=strategy,
        checksum="0" * 64,
        upgrade=upgrade,
    )
    return Step("main", 0, 1, mig)


def api_run(env: lmdb.Environment, spec: LmdbSpec, step: Step) -> int:
    result = run_step(env, spec, step, instance="bench")
    return result.puts + result.copied


# --- harness --------------------------------------------------------------------------------------


def timed(
    master: Path, work: Path, writemap: bool, fn: Callable[[lmdb.Environment, LmdbSpec], int]
) -> tuple[float, int]:
    """Run ``fn`` on a fresh copy of the master LMDB; seconds for the whole write transaction."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(master, work)
    spec = LmdbSpec(name="main", path=str(work), map_size=MAP_SIZE, native=True)
    os.sync()  # the copy's dirty pages must not be written back during the timed run
    # sync=False: commit's fsync is disk noise, the same for both sides; we compare the CPU path.
    env = lmdb.open(str(work), map_size=MAP_SIZE, max_dbs=spec.max_dbs, writemap=writemap, sync=False)
    try:
        started = time.perf_counter()
        n = fn(env, spec)
        return time.perf_counter() - started, n
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


def compare(
    master: Path, scratch: Path, records: int, writemap: bool, reps: int
) -> dict[str, list[float]]:
    """Seconds of every case, ``reps`` rounds, interleaved so that drift hits both sides alike."""
    rewrite = step_for(upgrade_rewrite, Strategy.PREFIX)
    rewrite_trivial = step_for(upgrade_trivial, Strategy.PREFIX)
    rewrite_batch = step_for(upgrade_rewrite_batch, Strategy.PREFIX)
    copy = step_for(upgrade_copy, Strategy.NEW_DBI)
    cases: dict[str, Callable[[lmdb.Environment, LmdbSpec], int]] = {
        "raw_rewrite": lambda env, spec: raw_rewrite(env),
        "api_rewrite": lambda env, spec: api_run(env, spec, rewrite),
        "raw_trivial": lambda env, spec: raw_rewrite(env, trivial),
        "api_trivial": lambda env, spec: api_run(env, spec, rewrite_trivial),
        "api_rewrite_fn": lambda env, spec: api_run(env, spec, rewrite_batch),
        "raw_copy": lambda env, spec: raw_copy(env),
        "api_copy": lambda env, spec: api_run(env, spec, copy),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            seconds, n = timed(master, scratch / name, writemap, fn)
            if n != records:
                raise SystemExit(f"{name}: wrote {n} of {records}")
            times[name].append(seconds)
    return times


def ratio_line(label: str, raw: list[float], api: list[float], target: float) -> str:
    """Per round raw/api (the API's speed relative to the raw loop): median and min-max."""
    ratios = sorted(r / a for r, a in zip(raw, api, strict=True))
    median = statistics.median(ratios)
    verdict = "ok" if median >= target else "BELOW TARGET"
    return (
        f"  {label:14s} api/raw: median {median:.3f}  min-max {ratios[0]:.3f}-{ratios[-1]:.3f}  "
        f"over {len(ratios)} interleaved rounds (target >= {target}: {verdict})"
    )


def rss_child(path: str, writemap: bool, kind: str) -> None:
    """Subprocess body: run one step through the API and print memory figures as JSON."""
    peak_anon = 0

    def anon_kb() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def sample(m: MigrationApi) -> None:
        nonlocal peak_anon
        peak_anon = max(peak_anon, anon_kb())

    def upgrade(m: MigrationApi) -> None:
        if kind == "copy":
            m.copy_dbi("users", "users_v2")
        else:
            for i, (key, value) in enumerate(m.items("users")):
                m.put("users", key, transform(value))
                if not i & 0xFFFF:
                    sample(m)
        sample(m)

    spec = LmdbSpec(name="main", path=path, map_size=MAP_SIZE, native=True)
    env = open_env(spec, writemap=writemap)
    baseline_anon = anon_kb()
    run_step(
        env, spec, step_for(upgrade, Strategy.PREFIX if kind != "copy" else Strategy.NEW_DBI), instance="b"
    )
    env.close()
    with open("/proc/self/status") as f:
        status = {k: v.split()[0] for k, _, v in (line.partition(":") for line in f) if v.strip()}
    print(
        json.dumps(
            {
                "vm_hwm_mb": int(status["VmHWM"]) / 1024,
                "peak_anon_mb": peak_anon / 1024,
                "anon_before_mb": baseline_anon / 1024,
            }
        )
    )


def measure_rss(scratch: Path, small: int, large: int, writemap: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for records in (small, large):
        path = scratch / f"rss_{records}"
        shutil.rmtree(path, ignore_errors=True)
        build(path, records)
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(path), "--rss-kind", "rewrite"]
            + ([] if writemap else ["--no-writemap"]),
            capture_output=True,
            text=True,
            check=True,
        )
        out[str(records)] = json.loads(proc.stdout)
        shutil.rmtree(path, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (median, min-max)")
    parser.add_argument("--rss-small", type=int, default=100_000)
    parser.add_argument("--rss-large", type=int, default=2_000_000)
    parser.add_argument("--no-rss", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-writemap", action="store_true", help="open with writemap=False")
    parser.add_argument("--both-writemap", action="store_true", help="measure writemap off and on")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--rss-kind", default="rewrite", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, not args.no_writemap, args.rss_kind)
        return
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench_migrator_"))
    scratch.mkdir(parents=True, exist_ok=True)
    modes = [False, True] if args.both_writemap else [not args.no_writemap]
    try:
        master = scratch / "master"
        t0 = time.perf_counter()
        build(master, args.records)
        print(f"built {args.records} records in {time.perf_counter() - t0:.1f}s at {master}")
        for writemap in modes:
            times = compare(master, scratch, args.records, writemap, args.reps)
            r = args.records
            print(f"\nwritemap={writemap} records={r} ({args.reps} interleaved rounds)")
            for name, seconds in times.items():
                med = statistics.median(seconds)
                print(f"  {name:12s} median {med:7.3f}s  {r / med / 1000:8.0f}k records/s")
            print(ratio_line("JSON rewrite", times["raw_rewrite"], times["api_rewrite"], 0.8))
            print(ratio_line("trivial rewrite", times["raw_trivial"], times["api_trivial"], 0.8))
            print(ratio_line("m.rewrite(fn)", times["raw_trivial"], times["api_rewrite_fn"], 0.8))
            print(ratio_line("copy_dbi", times["raw_copy"], times["api_copy"], 0.9))
        if not args.no_rss:
            for writemap in modes:
                figures = measure_rss(scratch, args.rss_small, args.rss_large, writemap)
                small, large = figures[str(args.rss_small)], figures[str(args.rss_large)]
                print(f"\nworker memory, value rewrite, writemap={writemap}")
                for records, fig in figures.items():
                    print(
                        f"  {int(records):>9} records: peak RSS (VmHWM) {fig['vm_hwm_mb']:7.1f} MB, "
                        f"peak anonymous {fig['peak_anon_mb']:7.1f} MB"
                    )
                print(
                    f"  growth {args.rss_small} -> {args.rss_large}: VmHWM "
                    f"{large['vm_hwm_mb'] - small['vm_hwm_mb']:+.1f} MB, anonymous "
                    f"{large['peak_anon_mb'] - small['peak_anon_mb']:+.1f} MB (target < 50 MB)"
                )
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

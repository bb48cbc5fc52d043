"""How long `fleet --storage` takes on a fleet of 50 instances x 3 versions (x 3 snapshots each, what
LS's cleaner keeps around), against moto's S3 server on loopback and against an fs storage.

    python benchmarks/bench_fleet.py [INSTANCES] [VERSIONS] [SNAPSHOTS]
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lssupervisor.storage import fleet
from lssupervisor.storage.fs import FsBackend
from lssupervisor.storage.s3 import S3Backend
from lssupervisor.testing.s3server import S3Server
from lssupervisor.testing.standin.snapshot import build_name


def names(instances: int, versions: int, snapshots: int) -> list[tuple[int, str]]:
    now = time.time_ns()
    return [
        (
            v,
            build_name(
                "main", f"node-{i:03d}", now - (versions - v) * 3_600_000_000_000 - s * 60_000_000_000
            ),
        )
        for v in range(1, versions + 1)
        for i in range(instances)
        for s in range(snapshots)
    ]


def best(fn, runs: int = 5) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    instances, versions, snapshots = (
        int(a) for a in (sys.argv[1:] + ["50", "3", "3"][len(sys.argv) - 1 :])[:3]
    )
    objs = names(instances, versions, snapshots)
    print(f"{instances} instances x {versions} versions x {snapshots} snapshots = {len(objs)} objects")
    with S3Server.start() as server:
        server.create_bucket("bench")
        s3 = server.s3()
        for v, n in objs:
            s3.put_object(Bucket="bench", Key=f"app/v{v}/{n}", Body=io.BytesIO(b"x" * 64))
        backend = S3Backend(
            {
                "bucket": "bench",
                "endpoint_url": server.endpoint,
                "access_key": server.access_key,
                "secret_key": server.secret_key,
            },
            "app/v",
            "/",
            timeout=10,
        )
        rep = fleet.report(backend.list_versions(), time.time(), 12 * 3600)
        assert sum(len(i) for i in rep.versions.values()) == instances * versions
        t = best(lambda: fleet.report(backend.list_versions(), time.time(), 12 * 3600))
        print(f"s3 (moto, loopback): list + report {t * 1000:.0f} ms")
        with tempfile.TemporaryDirectory() as d:
            cfg = Path(d) / "set"
            env = dict(
                os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "lssupervisor",
                    "init",
                    str(cfg),
                    "--lmdb",
                    f"{d}/db",
                    "--storage",
                    f"s3://bench/app?endpoint={server.endpoint}",
                    "--instance",
                    "me",
                ],
                check=True,
                capture_output=True,
                env=env,
            )
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "lssupervisor",
                    "fleet",
                    "-c",
                    str(cfg / "lssupervisor.yaml"),
                    "--storage",
                    "--json",
                ],
                check=True,
                capture_output=True,
                env=env,
            )
            took = (time.perf_counter() - start) * 1000
            print(f"s3: `lssupervisor fleet --storage --json` end to end {took:.0f} ms")
    with tempfile.TemporaryDirectory() as d:
        for v, n in objs:
            (Path(d) / f"v{v}").mkdir(exist_ok=True)
            (Path(d) / f"v{v}" / n).write_bytes(b"x" * 64)
        fs = FsBackend(f"{d}/v", "")
        t = best(lambda: fleet.report(fs.list_versions(), time.time(), 12 * 3600))
        print(f"fs: list + report {t * 1000:.1f} ms")


if __name__ == "__main__":
    main()

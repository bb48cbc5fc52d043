"""The daemon over S3: `/fleet` and the fleet metrics from its background listing, and the
credentials in no file, log line, status document or metric lssupervisor writes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lssupervisor.testing.scenario import Cluster
from tests.harness import wait_for
from tests.harness.s3 import Bucket


def get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_daemon_serves_the_fleet_and_never_the_credentials(tmp_path: Path, s3_bucket: Bucket) -> None:
    env = s3_bucket.environ()
    storage = f"s3://{s3_bucket.name}/fleet?endpoint={s3_bucket.endpoint}"
    with Cluster(tmp_path / "work", storage=storage, storage_env=env) as cluster:
        inst = cluster.add_instance("alpha")
        inst.config.write_text(inst.config.read_text() + "\nfleet:\n  interval: 1s\n  stale_after: 1h\n")
        # Another instance's snapshot under v1, and an old one's under v0: alpha sees the whole fleet.
        s3 = s3_bucket.server.s3()
        s3.put_object(Bucket=s3_bucket.name, Key="fleet/v0/main__old__20200101-000000-000000000__GX.pb.gz",
                      Body=b"x")
        cluster.start("alpha")
        cluster.wait_state("alpha", lambda _d: cluster.running_on("alpha", 1) is not None, 30, "v1")
        cluster.start_writer("alpha")

        def fleet_doc() -> dict[str, Any] | None:
            code, body = get(inst.http, "/fleet")
            if code != 200:
                return None
            doc: dict[str, Any] = json.loads(body)
            return doc if "alpha" in doc["versions"].get("1", {}).get("instances", {}) else None

        doc = wait_for(fleet_doc, timeout=30, what="alpha's own snapshot in /fleet")
        assert set(doc) == {"versions", "stragglers", "stale"}
        assert doc["stragglers"] == ["old"] and doc["stale"] == ["old"]
        assert doc["versions"]["1"]["instances"]["alpha"]["snapshots"] >= 1

        _, metrics = get(inst.http, "/metrics")
        text = metrics.decode()
        assert 'lssupervisor_fleet_instances{version="1"} 1.0' in text
        assert 'lssupervisor_fleet_instances{version="0"} 1.0' in text
        assert "lssupervisor_fleet_stragglers 1.0" in text and "lssupervisor_fleet_stale 1.0" in text
        assert "lssupervisor_fleet_last_refresh_timestamp_seconds" in text
        _, status = get(inst.http, "/status")

        served = [metrics, status, json.dumps(doc).encode()]
        cluster.stop("alpha")

        # Every file lssupervisor (and LS through it) wrote: configs, state, history, logs, backups.
        written = [p for p in (tmp_path / "work").rglob("*") if p.is_file() and "lmdb" not in p.parts]
        assert any(p.name == "lightningstream.yaml" for p in written)
        assert any(p.name == "state.json" for p in written)
        rendered = (inst.state_dir / "lightningstream.yaml").read_text()
        assert "${AWS_SECRET_ACCESS_KEY}" in rendered  # a reference LS expands, never the value
        for secret in (env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]):
            for path in written:
                assert secret.encode() not in path.read_bytes(), path
            for body in served:
                assert secret.encode() not in body

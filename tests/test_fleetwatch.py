"""The daemon's fleet view never makes the main loop wait: configure() returns at once even when the
storage does not answer, /fleet says why it has nothing yet, and close() ends the thread."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from lssupervisor.cli.main import main
from lssupervisor.config import load_config
from lssupervisor.daemon.fleetwatch import FleetWatch
from lssupervisor.lsconfig.render import load_template
from lssupervisor.storage.backend import Listing, StoredObject
from lssupervisor.testing.standin.snapshot import build_name
from tests.harness import wait_for


def config(tmp_path: Path, storage: str, extra: str = "") -> Path:
    d = tmp_path / "set"
    argv = ["init", str(d), "--lmdb", str(tmp_path / "db"), "--storage", storage, "--instance", "me"]
    assert main(argv) == 0
    cfg = d / "lssupervisor.yaml"
    cfg.write_text(cfg.read_text() + extra)
    return cfg


def test_a_silent_storage_never_blocks_configure_and_close_ends_the_thread(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        cfg = load_config(config(tmp_path, f"s3://bkt/app?endpoint=http://127.0.0.1:{port}",
                                 "\nfleet:\n  timeout: 3s\n  interval: 1s\n"))
        template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
        watch = FleetWatch({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
        try:
            watch.configure(cfg, template)
            # The main loop's side only stores a reference: configure returned before the probe of
            # the silent storage could time out (a blocking configure would return after it).
            code, body = watch.http_document()
            assert code == 503 and "error" in json.loads(body) and b"no answer within" not in body
            wait_for(lambda: b"no answer within 3s" in watch.http_document()[1], what="the timeout")
        finally:
            watch.close()
        assert watch._thread is not None and not watch._thread.is_alive()


def test_fs_fleet_view_and_its_metrics(tmp_path: Path) -> None:
    root = tmp_path / "snapshots"
    (root / "v1").mkdir(parents=True)
    now = time.time_ns()
    (root / "v1" / build_name("main", "peer", now)).write_bytes(b"x")
    cfg = load_config(config(tmp_path, f"fs://{root}", "\nfleet:\n  interval: 1s\n"))
    template = load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    watch = FleetWatch({})
    try:
        watch.configure(cfg, template)
        doc = wait_for(lambda: watch.http_document()[0] == 200 and json.loads(watch.http_document()[1]), 10,
                       what="the first listing")
        assert doc["versions"]["1"]["instances"]["peer"]["snapshots"] == 1
        (root / "v2").mkdir()
        (root / "v2" / build_name("main", "me", now)).write_bytes(b"x")
        wait_for(lambda: watch.report is not None and watch.report.stragglers == ("peer",), 10,
                 what="the next refresh to see v2")
        metrics = {m.name: m for m in watch.collector().collect()}
        samples = {(s.name, tuple(s.labels.items())): s.value for m in metrics.values() for s in m.samples}
        assert samples[("lssupervisor_fleet_instances", (("version", "1"),))] == 1.0
        assert samples[("lssupervisor_fleet_instances", (("version", "2"),))] == 1.0
        assert samples[("lssupervisor_fleet_stragglers", ())] == 1.0
        assert samples[("lssupervisor_fleet_stale", ())] == 0.0
        assert abs(samples[("lssupervisor_fleet_last_refresh_timestamp_seconds", ())] - time.time()) < 30
    finally:
        watch.close()


def test_unversioned_storage_turns_the_view_off_until_the_next_load(tmp_path: Path) -> None:
    cfg_path = config(tmp_path, f"fs://{tmp_path}/snapshots")
    template_path = cfg_path.parent / "lightningstream.yaml.in"
    template_path.write_text(template_path.read_text().replace("/v${APP_SCHEMA_VERSION}", "/all"))
    cfg = load_config(cfg_path)
    watch = FleetWatch({})
    try:
        watch.configure(cfg, load_template(template_path, cfg.schema.variable))
        wait_for(lambda: b"fleet view off until the next reload" in watch.http_document()[1], 10,
                 what="the view to turn off")
        assert watch.http_document()[0] == 503
    finally:
        watch.close()


def test_report_counts_each_instance_once() -> None:
    from lssupervisor.storage import fleet

    now = time.time()
    listing = Listing({
        1: [StoredObject(build_name("main", "a", int((now - 100) * 1e9)), 1, now)],
        2: [StoredObject(build_name("main", "a", int((now - 10) * 1e9)), 1, now),
            StoredObject(build_name("shard", "a", int((now - 5) * 1e9)), 1, now)],
    })
    rep = fleet.report(listing, now, 3600)
    assert rep.counts() == {1: 0, 2: 1} and rep.current == {"a": 2} and rep.stragglers == ()
    assert rep.document()["versions"]["2"]["instances"]["a"]["snapshots"] == 2

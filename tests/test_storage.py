"""The storage as lssupervisor sees it: `check`'s probe, `fleet --storage`, `prune`, over fs and over a
real S3-API server on loopback (moto). Config sets are written by `lssupervisor init` as a user would;
objects are real files / real S3 objects named as LS names them."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.cli.main import main
from lssupervisor.config import load_config
from lssupervisor.errors import ExitCode, Refused
from lssupervisor.storage import fleet, location
from lssupervisor.storage import prune as pruning
from lssupervisor.testing.standin.snapshot import build_name
from tests.harness.s3 import Bucket

STANDIN = str(Path(sys.executable).parent / "lightningstream-standin")
MIGRATION = '"""Step {v}."""\nVERSION = {v}\n\n\ndef upgrade(m):\n    pass\n'
NOW = time.time()


@pytest.fixture(autouse=True)
def _now() -> None:
    """Names and ages are relative to the start of each test (the module is imported long before)."""
    global NOW
    NOW = time.time()


def config_set(tmp_path: Path, storage: str, *, versions: int = 3, stamp: int | None = None) -> Path:
    """`lssupervisor init` + migrations 1..versions (prefix strategy) + the LMDB stamped at ``stamp``."""
    d = tmp_path / "set"
    assert main(["init", str(d), "--lmdb", str(tmp_path / "db"), "--storage", storage, "--instance", "me",
                 "--lightningstream", STANDIN]) == 0
    for v in range(1, versions + 1):
        (d / "migrations" / f"{v:04d}_step{v}.py").write_text(MIGRATION.format(v=v))
    cfg = d / "lssupervisor.yaml"
    if stamp is not None:
        assert main(["stamp", "-c", str(cfg), str(stamp)]) == 0
    return cfg


def name(inst: str, age_s: float, db: str = "main") -> str:
    return build_name(db, inst, int((NOW - age_s) * 1e9))


def put_fs(root: Path, version: int, names: list[str], mtime_age: float = 7 * 86400) -> None:
    d = root / f"v{version}"
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"x" * 100)
        os.utime(d / n, (NOW - mtime_age, NOW - mtime_age))


def put_s3(bucket: Bucket, prefix: str, names: list[str]) -> None:
    s3 = bucket.server.s3()
    for n in names:
        s3.put_object(Bucket=bucket.name, Key=prefix + n, Body=io.BytesIO(b"x" * 100))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    capsys.readouterr()  # what earlier commands printed
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip().startswith("{") else out), err


@pytest.fixture
def s3_env(s3_bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    for k, v in s3_bucket.environ().items():
        monkeypatch.setenv(k, v)
    return s3_bucket


def s3_url(bucket: Bucket) -> str:
    return f"s3://{bucket.name}/app?endpoint={bucket.endpoint}"


# ------------------------------------------------------------------------------------------- fleet


def test_fleet_storage_json_over_s3(
    tmp_path: Path, s3_env: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path, s3_url(s3_env))
    put_s3(s3_env, "app/v1/", [name("a", 7200), name("a", 5000), name("b", 100), name("old", 86400 * 3)])
    put_s3(s3_env, "app/v2/", [name("a", 10), name("c", 20), "update-marker"])
    put_s3(s3_env, "app/v10/", [])  # nothing: no such prefix in S3
    put_s3(s3_env, "other/v1/", [name("x", 1)])  # not ours
    rc, doc, err = run_json(capsys, "fleet", "-c", str(cfg), "--storage", "--json")
    assert rc == 0, err
    assert set(doc) == {"versions", "stragglers", "stale"}
    assert set(doc["versions"]) == {"1", "2"}
    v1, v2 = doc["versions"]["1"]["instances"], doc["versions"]["2"]["instances"]
    assert set(v1) == {"a", "b", "old"} and set(v2) == {"a", "c"}
    assert v1["a"]["snapshots"] == 2 and v2["a"]["snapshots"] == 1
    assert set(v1["a"]) == {"snapshots", "newest", "age_s"}
    assert abs(v1["b"]["age_s"] - 100) < 60
    assert v1["b"]["newest"].endswith("Z")
    assert doc["stragglers"] == ["b", "old"]  # newest snapshot under v1 while v2 is in use
    assert doc["stale"] == ["old"]  # silent for 3 days; default stale_after: 12h
    rc, doc, _ = run_json(capsys, "fleet", "-c", str(cfg), "--storage", "--json", "--stale-after", "60s")
    assert doc["stale"] == ["b", "old"]
    rc, text, _ = run_json(capsys, "fleet", "-c", str(cfg), "--storage")
    assert rc == 0 and "STRAGGLER" in text and f"s3 bucket {s3_env.name}" in text


def test_fleet_storage_over_fs_finds_version_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "snapshots"
    cfg = config_set(tmp_path, f"fs://{root}")
    put_fs(root, 1, [name("a", 50), name("b", 30), "main__b__garbage.pb.gz", ".hidden"])
    put_fs(root, 3, [name("a", 5)])
    (root / "v3-old").mkdir()  # not a version directory
    (root / "v7").write_text("a file, not a directory")
    rc, doc, err = run_json(capsys, "fleet", "-c", str(cfg), "--storage", "--json")
    assert rc == 0, err
    versions = doc["versions"]
    assert sorted(versions) == ["1", "3"]
    assert sorted(versions["1"]["instances"]) == ["a", "b"] and sorted(versions["3"]["instances"]) == ["a"]
    assert versions["1"]["instances"]["b"]["snapshots"] == 1  # the garbage name is not a snapshot
    assert doc["stragglers"] == ["b"] and doc["stale"] == []


def test_fleet_storage_refuses_an_unversioned_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path, f"fs://{tmp_path}/snapshots")
    template = cfg.parent / "lightningstream.yaml.in"
    template.write_text(template.read_text().replace("/v${APP_SCHEMA_VERSION}", "/all"))
    rc = main(["fleet", "-c", str(cfg), "--storage"])
    assert rc == ExitCode.CONFIG
    assert "does not contain ${APP_SCHEMA_VERSION}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- check


def test_check_probes_s3(tmp_path: Path, s3_env: Bucket, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_set(tmp_path, s3_url(s3_env))
    capsys.readouterr()
    assert main(["render-config", "-c", str(cfg), "--version", "2"]) == 0
    text = capsys.readouterr().out
    assert 'global_prefix: "app/v2/"' in text and '"${AWS_SECRET_ACCESS_KEY}"' in text
    assert s3_env.server.secret_key not in text
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "accepts the rendered config" in out
    assert f"ok: s3 bucket {s3_env.name} at {s3_env.endpoint}: exists, credentials accepted" in out
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    assert main(["check", "-c", str(cfg)]) == ExitCode.CONFIG
    out = capsys.readouterr().out
    assert "credentials were refused (SignatureDoesNotMatch)" in out and "wrong-secret-value" not in out
    assert main(["check", "-c", str(cfg), "--offline"]) == 0  # no probe: nothing else is wrong
    assert "s3 bucket" not in capsys.readouterr().out


def test_check_names_a_missing_bucket(
    tmp_path: Path, s3_env: Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path, f"s3://no-such-bucket-x/app?endpoint={s3_env.endpoint}")
    assert main(["check", "-c", str(cfg)]) == ExitCode.CONFIG
    out = capsys.readouterr().out
    assert "error: storage s3 bucket no-such-bucket-x at" in out and "the bucket does not exist" in out


def test_check_probe_is_bounded_by_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    # A listener that accepts and never answers: the probe must give up after fleet.timeout.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
        cfg = config_set(tmp_path, f"s3://bkt/app?endpoint=http://127.0.0.1:{port}")
        cfg.write_text(cfg.read_text() + "\nfleet:\n  timeout: 500ms\n")
        assert main(["check", "-c", str(cfg)]) == ExitCode.CONFIG  # returns: a hang fails pytest-timeout
    out = capsys.readouterr().out
    assert "no answer within 0.5s" in out, out


def test_check_probes_fs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_set(tmp_path, f"fs://{tmp_path}/snapshots")
    assert main(["check", "-c", str(cfg)]) == 0
    assert "does not exist yet; LS creates it in" in capsys.readouterr().out
    (tmp_path / "snapshots").write_text("a file where the storage directory should be")
    assert main(["check", "-c", str(cfg)]) == ExitCode.CONFIG
    assert "is not a directory" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- prune


def test_prune_dry_run_then_delete_over_fs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "snapshots"
    cfg = config_set(tmp_path, f"fs://{root}", stamp=3)
    put_fs(root, 1, [name("a", 90000), name("b", 90000)])
    put_fs(root, 2, [name("a", 88000), name("b", 88000), "main__a__x.tmp"])
    put_fs(root, 3, [name("a", 10), name("b", 10), name("me", 10)], mtime_age=10)
    rc, out, err = run_json(capsys, "prune", "-c", str(cfg), "--below", "3")
    assert rc == 0, err
    assert "version 1: 2 object(s), 200 B" in out and "version 2: 3 object(s), 300 B" in out
    assert "nothing was deleted (dry run)" in out
    assert len(list((root / "v1").iterdir())) == 2
    rc, doc, err = run_json(capsys, "prune", "-c", str(cfg), "--below", "3", "--yes", "--json")
    assert rc == 0, err
    assert doc["complete"] is True
    assert doc["versions"]["1"]["deleted"] == 2 and doc["versions"]["2"]["deleted"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["v3"]  # retired directories are gone
    assert len(list((root / "v3").iterdir())) == 3  # the current one untouched
    rc, out, _ = run_json(capsys, "prune", "-c", str(cfg), "--below", "3", "--yes")
    assert rc == 0 and "no version below 3" in out  # a rerun has nothing to do


def test_prune_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "snapshots"
    cfg = config_set(tmp_path, f"fs://{root}", stamp=2)
    put_fs(root, 1, [name("a", 90000), name("gone", 90000)])
    put_fs(root, 2, [name("a", 10), name("me", 10)], mtime_age=10)

    # above this instance's version
    assert main(["prune", "-c", str(cfg), "--below", "3"]) == ExitCode.REFUSED
    assert "this instance's LMDB is at version 2" in capsys.readouterr().err
    # a straggler below N, named
    assert main(["prune", "-c", str(cfg), "--below", "2"]) == ExitCode.REFUSED
    err = capsys.readouterr().err
    assert "instance gone still syncs version 1" in err and "--ignore-instance gone" in err
    # ... until the operator says it is gone; then a young object still holds it back
    os.utime(root / "v1" / name("a", 90000), (NOW - 60, NOW - 60))
    assert main(["prune", "-c", str(cfg), "--below", "2", "--ignore-instance", "gone"]) == ExitCode.REFUSED
    err = capsys.readouterr().err
    assert "within --grace 24h" in err and "(instance a)" in err
    assert main(["prune", "-c", str(cfg), "--below", "2", "--ignore-instance", "gone", "--grace", "30s",
                 "--yes"]) == 0
    assert not (root / "v1").exists() and len(list((root / "v2").iterdir())) == 2


def test_prune_over_s3_and_a_failure_half_way_then_a_rerun(
    tmp_path: Path, s3_env: Bucket, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_set(tmp_path, s3_url(s3_env), stamp=3)
    old = [name("i0", 90000 + i) for i in range(7)]
    put_s3(s3_env, "app/v1/", old[:4])
    put_s3(s3_env, "app/v2/", old[4:])
    put_s3(s3_env, "app/v3/", [name("i0", 5), name("me", 5)])
    rc, out, err = run_json(capsys, "prune", "-c", str(cfg), "--below", "3", "--grace", "0s")
    assert rc == 0, err
    assert "version 1: 4 object(s)" in out and "version 2: 3 object(s)" in out

    # A prune user whose key is revoked after the first batch: a real refusal from the server.
    user_key, user_secret = s3_env.server.user("pruner")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", user_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", user_secret)
    loaded = load_config(cfg)
    backend = location.open_backend(location.layout_for(loaded, os.environ), timeout=5)
    plan = pruning.plan(backend.list_versions(), below=3, lmdb_version=3, now=time.time(), grace=0,
                        describe=backend.describe)

    def revoke(version: int, done: int, total: int) -> None:
        if done == 2:
            s3_env.server.revoke("pruner", user_key)

    outcome = pruning.run(backend, plan, batch=2, on_batch=revoke)
    backend.close()
    assert not outcome.complete and outcome.error and "credentials were refused" in outcome.error
    assert outcome.count(outcome.deleted) == 2 and outcome.count(outcome.not_attempted) == 5
    assert len(s3_env.keys("app/v1/")) + len(s3_env.keys("app/v2/")) == 5

    # The rerun (working credentials) deletes the rest; the current prefix is untouched.
    for k, v in s3_env.environ().items():
        monkeypatch.setenv(k, v)
    rc, doc, err = run_json(capsys, "prune", "-c", str(cfg), "--below", "3", "--grace", "0s", "--yes",
                            "--json")
    assert rc == 0, err
    assert doc["complete"] is True
    assert s3_env.keys("app/v1/") == [] and s3_env.keys("app/v2/") == []
    assert len(s3_env.keys("app/v3/")) == 2


def test_prune_cli_reports_a_partial_failure(
    tmp_path: Path, s3_env: Bucket, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_set(tmp_path, s3_url(s3_env), stamp=2)
    put_s3(s3_env, "app/v1/", [name("a", 90000)])
    put_s3(s3_env, "app/v2/", [name("a", 5)])
    # A user allowed to list but not to delete: DeleteObjects answers per key, the run reports it.
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}]}
    key, secret = s3_env.server.user("reader", policy)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    rc = main(["prune", "-c", str(cfg), "--below", "2", "--grace", "0s", "--yes"])
    err = capsys.readouterr().err
    assert rc == ExitCode.STORAGE, err
    assert "1 object(s) not deleted" in err and "rerun `lssupervisor prune --below 2 --yes`" in err
    assert len(s3_env.keys("app/v1/")) == 1


def test_prune_plan_is_pure_and_refuses_without_a_marker() -> None:
    from lssupervisor.storage.backend import Listing, StoredObject

    listing = Listing({1: [StoredObject(name("a", 90000), 10, NOW - 90000)]})
    with pytest.raises(Refused, match="no schema marker"):
        pruning.plan(listing, below=2, lmdb_version=None, now=NOW, grace=0, describe=str)
    rep = fleet.report(listing, NOW, 3600)
    assert rep.stale == ("a",) and rep.counts() == {1: 1}


def test_check_reports_replaces_and_refuses_the_marker_dbi(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path, f"fs://{tmp_path}/snapshots", versions=1)
    mig = cfg.parent / "migrations" / "0002_users_v2.py"
    mig.write_text('"""New DBI."""\nVERSION = 2\nSTRATEGY = "new-dbi"\nREPLACES = ["users"]\n\n\n'
                   "def upgrade(m):\n    pass\n")
    assert main(["check", "-c", str(cfg), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "0002_users_v2 replaces DBI users (LMDB main): `lssupervisor prune --below 2`" in out
    mig.write_text(mig.read_text().replace('"users"', '"lssupervisor"'))
    assert main(["check", "-c", str(cfg), "--offline"]) == ExitCode.CONFIG
    assert "is lssupervisor's marker DBI" in capsys.readouterr().out
    mig.write_text(mig.read_text().replace('STRATEGY = "new-dbi"', 'STRATEGY = "prefix"'))
    assert main(["check", "-c", str(cfg), "--offline"]) == ExitCode.CONFIG
    assert "REPLACES is for STRATEGY 'new-dbi'" in capsys.readouterr().out

"""The stand-in's s3 backend against a real S3-API server (moto, on loopback), like LS's simpleblob s3:
object names under global_prefix, strict options, credentials from ${...} references, LS's errors.
Run against the real binary too (``real_ls``) when one is installed (tests/harness/real_ls.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from lssupervisor.worker import lsheader
from tests.harness.real_ls import real_ls_binary
from tests.harness.s3 import Bucket
from tests.harness.standin import NAME_RE, STANDIN, Procs


@pytest.fixture(params=[pytest.param("standin"), pytest.param("real", marks=pytest.mark.real_ls)])
def ls(request: pytest.FixtureRequest) -> Iterator[Procs]:
    procs = Procs([real_ls_binary()]) if request.param == "real" else Procs(STANDIN)
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture
def standin() -> Iterator[Procs]:
    procs = Procs(STANDIN)
    try:
        yield procs
    finally:
        procs.kill_all()


def config(tmp: Path, bucket: Bucket, instance: str, *, prefix: str = "app/v1/", extra: str = "",
           http: str = "") -> Path:
    path = tmp / f"ls-{instance}.yaml"
    text = (
        f"instance: {instance}\n"
        "lmdbs:\n  main:\n"
        f"    path: {tmp / ('lmdb-' + instance)}\n"
        "    options: {create: true, map_size: 64MB}\n"
        "    schema_tracks_changes: true\n"
        + bucket.storage_options(prefix) + extra
        + "lmdb_poll_interval: 100ms\nstorage_poll_interval: 100ms\n"
    )
    if http:
        text += f"http:\n  address: {http}\n"
    path.write_text(text)
    return path


def put(path: Path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=8, map_size=64 << 20)
    try:
        db = env.open_db(b"data")
        with env.begin(write=True) as t:
            t.put(key, lsheader.encode(value, 1_700_000_000_000_000_000, t.id()), db=db)
    finally:
        env.close()


def get(path: Path, key: bytes) -> bytes | None:
    env = lmdb.open(str(path), max_dbs=8, map_size=64 << 20)
    try:
        db = env.open_db(b"data")
        with env.begin() as t:
            raw = t.get(key, db=db)
        return None if raw is None else lsheader.parse(raw)[1]
    finally:
        env.close()


def test_only_once_uploads_under_global_prefix_and_a_peer_loads_it(
    ls: Procs, tmp_path: Path, s3_bucket: Bucket
) -> None:
    put(tmp_path / "lmdb-a", b"k", b"from-a")
    env = s3_bucket.environ()
    rc, _, err = ls.run("-c", str(config(tmp_path, s3_bucket, "a")), "sync", "--only-once", env=env)
    assert rc == 0, err
    keys = s3_bucket.keys()
    assert len(keys) == 1 and keys[0].startswith("app/v1/"), keys
    assert NAME_RE.match(keys[0][len("app/v1/") :])
    rc, _, err = ls.run("-c", str(config(tmp_path, s3_bucket, "b")), "sync", "--only-once", env=env)
    assert rc == 0, err
    assert get(tmp_path / "lmdb-b", b"k") == b"from-a"
    # Another prefix is another world: nothing of v1 reaches an instance on v2.
    rc, _, err = ls.run("-c", str(config(tmp_path, s3_bucket, "c", prefix="app/v2/")), "sync", "--only-once",
                        env=env)
    assert rc == 0, err
    assert get(tmp_path / "lmdb-c", b"k") is None


def test_snapshots_list_strips_the_global_prefix(ls: Procs, tmp_path: Path, s3_bucket: Bucket) -> None:
    put(tmp_path / "lmdb-a", b"k", b"v")
    env = s3_bucket.environ()
    cfg = str(config(tmp_path, s3_bucket, "a"))
    assert ls.run("-c", cfg, "sync", "--only-once", env=env)[0] == 0
    rc, out, err = ls.run("-c", cfg, "snapshots", "list", env=env)
    assert rc == 0, err
    assert "main__a__" in out and "app/v1/" not in out


def test_wrong_secret_never_syncs_and_is_retried(ls: Procs, tmp_path: Path, s3_bucket: Bucket) -> None:
    put(tmp_path / "lmdb-a", b"k", b"v")
    env = s3_bucket.environ()
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    # LS does not exit on refused credentials: it retries the initial listing until --timeout (75).
    rc, _, err = ls.run("--timeout", "2500ms", "-c", str(config(tmp_path, s3_bucket, "a")), "sync", env=env)
    assert rc == 75, err
    assert "signature we calculated does not match" in err
    assert "not-the-secret" not in err
    assert s3_bucket.keys() == []


def test_missing_bucket_is_logged_and_retried(ls: Procs, tmp_path: Path, s3_bucket: Bucket) -> None:
    cfg = config(tmp_path, s3_bucket, "a")
    cfg.write_text(cfg.read_text().replace(f"bucket: {s3_bucket.name}", "bucket: no-such-bucket-here"))
    rc, _, err = ls.run("--timeout", "2500ms", "-c", str(cfg), "sync", env=s3_bucket.environ())
    assert rc == 75, err
    assert "The specified bucket does not exist" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    global_prefx: x/\n", "field global_prefx not found in type s3.Options"),
        ("    create_bucket: \"yes\"\n", "into bool"),
        ("    endpoint_url_x: 1\n", "not found in type s3.Options"),
    ],
)
def test_options_are_strict_like_simpleblob(
    standin: Procs, tmp_path: Path, s3_bucket: Bucket, extra: str, message: str
) -> None:
    cfg = config(tmp_path, s3_bucket, "a")
    cfg.write_text(cfg.read_text().replace('    access_key: "', extra + '    access_key: "', 1))
    rc, _, err = standin.run("-c", str(cfg), "sync", "--only-once", env=s3_bucket.environ())
    assert rc == 1 and message in err, err


def test_unset_credentials_are_refused_at_backend_creation(
    standin: Procs, tmp_path: Path, s3_bucket: Bucket
) -> None:
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    rc, _, err = standin.run("-c", str(config(tmp_path, s3_bucket, "a")), "sync", "--only-once", env=env)
    assert rc == 1 and "credentials are required" in err, err


def test_create_bucket_and_update_marker(standin: Procs, tmp_path: Path, s3_bucket: Bucket) -> None:
    cfg = config(tmp_path, s3_bucket, "a")
    text = cfg.read_text().replace(f"bucket: {s3_bucket.name}", f"bucket: {s3_bucket.name}-new")
    cfg.write_text(text.replace("    access_key:", "    create_bucket: true\n    use_update_marker: true\n"
                                "    access_key:", 1))
    put(tmp_path / "lmdb-a", b"k", b"v")
    rc, _, err = standin.run("-c", str(cfg), "sync", "--only-once", env=s3_bucket.environ())
    assert rc == 0, err
    other = Bucket(s3_bucket.server, s3_bucket.name + "-new")
    keys = other.keys()
    assert "app/v1/update-marker" in keys and any(k.startswith("app/v1/main__a__") for k in keys)

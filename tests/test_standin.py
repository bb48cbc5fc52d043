"""The Lightning Stream stand-in behaves like LS v1.0 where the supervisor depends on it.

Black-box tests run against the stand-in and, marked ``real_ls``, against the real LS when installed
($LIGHTNINGSTREAM_BIN, else ``lightningstream`` on PATH; tests/harness/real_ls.py).
Every process is started in its own session and killed by process group in a finally.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from lssupervisor.testing.ports import free_port
from lssupervisor.testing.standin import snapshot as snap
from lssupervisor.testing.standin.config import (
    ConfigLoadError,
    go_expand_env,
    load_text,
    parse_bytesize,
    parse_go_duration,
)
from lssupervisor.testing.standin.storage import FSBackend
from lssupervisor.worker import lsheader
from tests.harness import wait_for
from tests.harness.real_ls import real_ls_binary
from tests.harness.standin import NAME_RE, STANDIN, Procs


@pytest.fixture
def standin() -> Iterator[Procs]:
    procs = Procs(STANDIN)
    try:
        yield procs
    finally:
        procs.kill_all()


@pytest.fixture(
    params=[
        pytest.param("standin"),
        pytest.param("real", marks=pytest.mark.real_ls),
    ]
)
def ls(request: pytest.FixtureRequest) -> Iterator[Procs]:
    """Black-box checks run against both the stand-in and (when available) the real binary."""
    procs = Procs([real_ls_binary()]) if request.param == "real" else Procs(STANDIN)
    try:
        yield procs
    finally:
        procs.kill_all()


def write_config(
    tmp: Path,
    *,
    instance: str = "a",
    http: str = "",
    native: bool = True,
    extra: str = "",
    lmdb_name: str | None = None,
    store: str = "store",
) -> Path:
    path = tmp / f"ls-{instance}.yaml"
    lmdb_path = tmp / (lmdb_name or f"lmdb-{instance}")
    text = (
        f"instance: {instance}\n"
        "lmdbs:\n"
        "  main:\n"
        f"    path: {lmdb_path}\n"
        "    options: {create: true, map_size: 64MB}\n"
        f"    schema_tracks_changes: {'true' if native else 'false'}\n"
        "storage:\n"
        "  type: fs\n"
        "  options:\n"
        f"    root_path: {tmp / store}\n"
        "lmdb_poll_interval: 100ms\n"
        "storage_poll_interval: 100ms\n"
    )
    if http:
        text += f"http:\n  address: {http}\n"
    path.write_text(text + extra)
    return path


class Db:
    """One env per path per process (py-lmdb rule); DBI handles opened outside write txns."""

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path), max_dbs=16, map_size=64 << 20)
        self.data = self.env.open_db(b"data")

    def put(self, key: bytes, value: bytes, ts: int | None = None, deleted: bool = False) -> None:
        with self.env.begin(write=True) as t:
            t.put(key, lsheader.encode(value, ts or time.time_ns(), t.id(), deleted=deleted), db=self.data)

    def put_raw(self, key: bytes, value: bytes) -> None:
        with self.env.begin(write=True) as t:
            t.put(key, value, db=self.data)

    def get(self, key: bytes) -> tuple[lsheader.Header, bytes] | None:
        with self.env.begin() as t:
            v = t.get(key, db=self.data)
        return None if v is None else lsheader.parse(v)

    def close(self) -> None:
        self.env.close()


@pytest.fixture
def dbs() -> Iterator[Callable[[Path], Db]]:
    opened: list[Db] = []

    def open_db(path: Path) -> Db:
        d = Db(path)
        opened.append(d)
        return d

    try:
        yield open_db
    finally:
        for d in opened:
            d.close()


def snapshots(root: Path, inst: str | None = None) -> list[str]:
    if not root.exists():
        return []
    names = sorted(n for n in os.listdir(root) if n.endswith(".pb.gz"))
    return [n for n in names if inst is None or n.split("__")[1] == inst]


def put_snapshot(
    root: Path, inst: str, entries: list[tuple[bytes, bytes, int, int]], ts: int | None = None
) -> str:
    """Write a snapshot of DBI ``data`` as another LS instance would."""
    root.mkdir(parents=True, exist_ok=True)
    ts = ts or time.time_ns()
    body = b"".join(snap.encode_kv(k, v, t, f) for k, v, t, f in sorted(entries))
    meta = snap.Meta(
        generation_id="GX", instance_id=inst, database_name="main", timestamp_ns=ts, lmdb_txn_id=5
    )
    name = snap.build_name("main", inst, ts)
    (root / name).write_bytes(snap.compress(snap.encode_snapshot(meta, [("data", 0, "", body)])))
    return name


def read_snapshot(root: Path, name: str) -> dict[bytes, tuple[bytes, int, int]]:
    s = snap.load_data((root / name).read_bytes())
    out = {}
    for d in s.databases:
        if d.name == "data":
            for kv in d.entries:
                out[bytes(kv.key)] = (bytes(kv.value), kv.timestamp_ns, kv.flags)
    return out


def healthz(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return dict(json.load(r))
    except OSError:
        return None


# ------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a ${X} b", "a x b"),
        ("$X/$Y", "x/"),  # unset → empty, silently
        ("v${UNSET}/", "v/"),
        ("${X:-default}", ""),  # the whole "X:-default" is the name
        ("pa$word", "pa"),
        ("cost $$5", "cost 5"),  # $$ is the special variable "$" (unset)
        ("a $ b", "a $ b"),  # $ before a non-name character stays
        ("end$", "end$"),
        ("${}x", "x"),  # bad syntax eaten
        ("${X", "X"),  # "${" eaten
        ("$1st", "st"),  # special single-character variable
        ("# comment $X", "# comment x"),  # comments are expanded too
        ("$X_Y.z", ".z"),  # names are [A-Za-z0-9_]+
        ("${X}${X}", "xx"),
    ],
)
def test_go_expand_env(text: str, expected: str) -> None:
    assert go_expand_env(text, {"X": "x"}) == expected


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("100ms", 100_000_000),
        ("1s", 10**9),
        ("1.5h", 5_400 * 10**9),
        ("1h2m3.5s", 3_723_500_000_000),
        ("0", 0),
        ("-2us", -2000),
        ("1µs", 1000),
    ],
)
def test_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize("text", ["5", "", "1x", "abc", ".s"])
def test_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_bytesize_and_bare_int_duration() -> None:
    assert parse_bytesize("1GB") == 1 << 30
    assert parse_bytesize("512 mb") == 512 << 20
    assert parse_bytesize("4096") == 4096
    raw = load_text("lmdbs: {m: {path: /x}}\nlmdb_poll_interval: 200000000\n", {})
    assert raw["lmdb_poll_interval"] == 200_000_000  # bare int is nanoseconds (yaml.v2)


def test_strict_yaml_errors_name_lines() -> None:
    with pytest.raises(ConfigLoadError, match=r"line 3: field bogus not found in type config.LMDB"):
        load_text("lmdbs:\n  main:\n    bogus: 1\n", {})
    with pytest.raises(ConfigLoadError, match=r"line 2: field instance already set in type config.Config"):
        load_text("instance: a\ninstance: b\n", {})
    with pytest.raises(ConfigLoadError, match=r'line 3: key "m" already set in map'):
        load_text("lmdbs:\n  m: {path: /a}\n  m: {path: /b}\n", {})


def test_snapshot_roundtrip_and_name() -> None:
    entries = [(b"a", b"1", 5, 0), (b"b", b"", 7, 1)]
    body = b"".join(snap.encode_kv(*e) for e in entries)
    meta = snap.Meta(
        generation_id="GX",
        instance_id="i",
        hostname="h",
        lmdb_txn_id=9,
        timestamp_ns=11,
        database_name="main",
    )
    s = snap.load_data(snap.compress(snap.encode_snapshot(meta, [("data", 8, "", body)])))
    assert (s.format_version, s.compat_version) == (3, 1)
    assert s.meta == meta
    assert s.databases[0].name == "data" and s.databases[0].flags == 8
    assert [
        (bytes(k.key), bytes(k.value), k.timestamp_ns, k.flags) for k in s.databases[0].entries
    ] == entries
    name = snap.build_name("main", "inst-1", 1_700_000_000_123_456_789)
    assert name == "main__inst-1__20231114-221320-123456789__GX.pb.gz"
    assert snap.parse_name(name).timestamp_ns == 1_700_000_000_123_456_789


def test_fs_store_writes_tmp_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str, bool]] = []
    real_rename = os.rename

    def spy(src: str, dst: str) -> None:
        seen.append((src, dst, os.path.exists(src) and not os.path.exists(dst)))
        real_rename(src, dst)

    be = FSBackend(str(tmp_path))
    (tmp_path / "x__a__20240101-000000-000000000__GX.pb.gz.tmp").write_bytes(b"partial")
    monkeypatch.setattr(os, "rename", spy)
    be.store("main__a__20240101-000000-000000000__GX.pb.gz", b"data")
    assert seen == [
        (
            str(tmp_path / "main__a__20240101-000000-000000000__GX.pb.gz.tmp"),
            str(tmp_path / "main__a__20240101-000000-000000000__GX.pb.gz"),
            True,
        )
    ]
    assert [b.name for b in be.list("")] == ["main__a__20240101-000000-000000000__GX.pb.gz"]  # .tmp hidden


# ------------------------------------------------------------------------------------ config via CLI


def test_unknown_and_duplicate_keys_exit_1(ls: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, extra="bogus_key: 1\n")
    rc, _, err = ls.run("-c", str(cfg))
    assert rc == 1
    assert "line 13: field bogus_key not found in type config.Config" in err
    cfg.write_text(cfg.read_text().replace("bogus_key: 1\n", "instance: b\n"))
    rc, _, err = ls.run("-c", str(cfg))
    assert rc == 1
    assert "line 13: field instance already set" in err


def test_root_command_validates_and_prints_help(ls: Procs, tmp_path: Path) -> None:
    rc, out, _ = ls.run("-c", str(write_config(tmp_path)))
    assert rc == 0
    assert "sync" in out
    bad = write_config(tmp_path, extra="lmdb_poll_interval: 10ms\n")
    bad.write_text(bad.read_text().replace("lmdb_poll_interval: 100ms\n", ""))
    rc, _, err = ls.run("-c", str(bad))
    assert rc == 1
    assert "lmdb_poll_interval: too short interval" in err
    rc, out, _ = ls.run("version", "-c", str(tmp_path / "missing.yaml"))
    assert rc == 0 and out.strip()


def test_fs_rejects_global_prefix_only_when_backend_created(ls: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("    root_path:", "    global_prefix: v1/\n    root_path:"))
    assert ls.run("-c", str(cfg))[0] == 0  # options are not checked by the validator
    rc, _, err = ls.run("-c", str(cfg), "sync", "--only-once")
    assert rc == 1
    assert "global_prefix not found" in err


def test_deprecated_root_path_without_options_panics(ls: Procs, tmp_path: Path) -> None:
    """LS copies storage.root_path into storage.options, a nil map when ``options`` is absent: a Go
    panic (exit 2) in every subcommand. With ``options: {}`` it is only a deprecation warning."""
    cfg = tmp_path / "ls.yaml"
    base = f"instance: a\nlmdbs: {{main: {{path: {tmp_path / 'db'}}}}}\nstorage:\n  type: fs\n"
    cfg.write_text(base + f"  root_path: {tmp_path / 'store'}\n")
    rc, _, err = ls.run("-c", str(cfg))
    assert rc == 2
    assert "panic: assignment to entry in nil map" in err
    cfg.write_text(base + f"  options: {{}}\n  root_path: {tmp_path / 'store'}\n")
    rc, _, err = ls.run("-c", str(cfg))
    assert rc == 0, err
    assert "storage.root_path is deprecated" in err


def test_env_expansion_applies_to_whole_file(ls: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, instance="${LSTEST_INST}")
    cfg.write_text("# comment with $LSTEST_INST\n" + cfg.read_text())
    rc, _, err = ls.run("-c", str(cfg), "sync", "--only-once", env={"LSTEST_INST": "expanded"})
    assert rc == 0, err
    assert (tmp_path / "lmdb-expanded" / "data.mdb").exists()  # the lmdb path was expanded too
    assert not (tmp_path / "lmdb-${LSTEST_INST}").exists()


# ------------------------------------------------------------------------------------ sync


def test_only_once_uploads_full_snapshot_with_real_name(ls: Procs, tmp_path: Path, dbs: Any) -> None:
    db = dbs(tmp_path / "lmdb-a")
    with db.env.begin(write=True) as t:
        for i in range(2000):
            t.put(b"k%05d" % i, lsheader.encode(b"v%d" % i, 1_000 + i, t.id()), db=db.data)
    rc, _, err = ls.run("-c", str(write_config(tmp_path)), "sync", "--only-once")
    assert rc == 0, err
    names = snapshots(tmp_path / "store")
    assert len(names) == 1 and NAME_RE.match(names[0]), names
    content = read_snapshot(tmp_path / "store", names[0])
    assert len(content) == 2000
    assert content[b"k00001"] == (b"v1", 1_001, 0)
    assert not [n for n in os.listdir(tmp_path / "store") if n.endswith(".tmp")]


def test_merge_rule(ls: Procs, tmp_path: Path, dbs: Any) -> None:
    db = dbs(tmp_path / "lmdb-a")
    db.put(b"newer-remote", b"local", ts=100)
    db.put(b"older-remote", b"local", ts=300)
    db.put(b"tie-remote-lower", b"zzz", ts=200)
    db.put(b"tie-remote-higher", b"aaa", ts=200)
    db.put(b"only-local", b"stay", ts=50)
    db.put(b"deleted-remotely", b"alive", ts=100)
    put_snapshot(
        tmp_path / "store",
        "x",
        [
            (b"newer-remote", b"remote", 200, 0),
            (b"older-remote", b"remote", 200, 0),
            (b"tie-remote-lower", b"mmm", 200, 0),
            (b"tie-remote-higher", b"bbb", 200, 0),
            (b"deleted-remotely", b"", 150, 1),
            (b"new-remote", b"fresh", 10, 0),
        ],
    )
    rc, _, err = ls.run("-c", str(write_config(tmp_path)), "sync", "--only-once")
    assert rc == 0, err
    got = {
        k: db.get(k)
        for k in (
            b"newer-remote",
            b"older-remote",
            b"tie-remote-lower",
            b"tie-remote-higher",
            b"only-local",
            b"deleted-remotely",
            b"new-remote",
        )
    }
    assert got[b"newer-remote"][1] == b"remote" and got[b"newer-remote"][0].timestamp == 200
    assert got[b"older-remote"][1] == b"local"
    assert got[b"tie-remote-lower"][1] == b"mmm"  # equal timestamps: the lower value wins
    assert got[b"tie-remote-higher"][1] == b"aaa"
    assert got[b"only-local"][1] == b"stay"  # missing from the snapshot: left alone
    assert got[b"deleted-remotely"][0].deleted and got[b"deleted-remotely"][1] == b""
    assert got[b"new-remote"][1] == b"fresh" and got[b"new-remote"][0].timestamp == 10


def test_own_snapshot_loaded_before_writing(ls: Procs, tmp_path: Path, dbs: Any) -> None:
    old = put_snapshot(
        tmp_path / "store", "a", [(b"from-old-self", b"keep", 100, 0)], ts=time.time_ns() - 10**9
    )
    db = dbs(tmp_path / "lmdb-a")
    db.put(b"new-local", b"x", ts=200)
    rc, _, err = ls.run("-c", str(write_config(tmp_path)), "sync", "--only-once")
    assert rc == 0, err
    mine = snapshots(tmp_path / "store", "a")
    assert len(mine) == 2 and mine[0] == old
    content = read_snapshot(tmp_path / "store", mine[-1])
    assert content[b"from-old-self"] == (b"keep", 100, 0)
    assert content[b"new-local"][0] == b"x"


def test_receive_never_writes(ls: Procs, tmp_path: Path, dbs: Any) -> None:
    db = dbs(tmp_path / "lmdb-a")
    db.put(b"local", b"1", ts=5)
    put_snapshot(tmp_path / "store", "x", [(b"remote", b"2", 6, 0)])
    rc, _, err = ls.run("-c", str(write_config(tmp_path)), "receive", "--only-once")
    assert rc == 0, err
    assert snapshots(tmp_path / "store", "a") == []
    assert db.get(b"remote")[1] == b"2"


def test_two_instances_converge(ls: Procs, tmp_path: Path, dbs: Any) -> None:
    a_port, b_port = free_port(), free_port()
    a = ls.start("-c", str(write_config(tmp_path, instance="a", http=f"127.0.0.1:{a_port}")), "sync")
    b = ls.start("-c", str(write_config(tmp_path, instance="b", http=f"127.0.0.1:{b_port}")), "sync")
    for port in (a_port, b_port):
        wait_for(lambda p=port: (healthz(p) or {}).get("metadata", {}).get("startup_main"), what="startup")
    da = dbs(tmp_path / "lmdb-a")
    da.put(b"hello", b"from-a")
    db_b = dbs(tmp_path / "lmdb-b")
    wait_for(lambda: db_b.get(b"hello"), what="A's write on B")
    assert db_b.get(b"hello")[1] == b"from-a"
    db_b.put(b"hello", b"from-b")  # newer timestamp
    wait_for(lambda: da.get(b"hello")[1] == b"from-b", what="B's update on A")
    assert a.poll() is None and b.poll() is None


def test_value_without_header_exits_1(ls: Procs, tmp_path: Path, dbs: Any) -> None:
    db = dbs(tmp_path / "lmdb-a")
    db.put_raw(b"plain", b"no header here")
    rc, _, err = ls.run("-c", str(write_config(tmp_path)), "sync", "--only-once")
    assert rc == 1
    assert "invalid entry" in err


def test_shadow_mode_syncs_plain_values(standin: Procs, tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "lmdb-a"), max_dbs=16, map_size=64 << 20)
    d = env.open_db(b"data")
    with env.begin(write=True) as t:
        t.put(b"k", b"plain-a", db=d)
    env.close()
    rc, _, err = standin.run(
        "-c", str(write_config(tmp_path, instance="a", native=False)), "sync", "--only-once"
    )
    assert rc == 0, err
    rc, _, err = standin.run(
        "-c", str(write_config(tmp_path, instance="b", native=False)), "sync", "--only-once"
    )
    assert rc == 0, err
    env = lmdb.open(str(tmp_path / "lmdb-b"), max_dbs=16, map_size=64 << 20)
    try:
        d = env.open_db(b"data")
        sh = env.open_db(b"_sync_shadow_data")
        with env.begin() as t:
            assert t.get(b"k", db=d) == b"plain-a"
            h, v = lsheader.parse(t.get(b"k", db=sh))
            assert v == b"plain-a" and h.timestamp == 1  # main-to-shadow at start uses ts 1
    finally:
        env.close()


# ------------------------------------------------------------------------------------ process


def test_timeout_exits_75(ls: Procs, tmp_path: Path) -> None:
    rc, _, _ = ls.run("-c", str(write_config(tmp_path)), "--timeout", "300ms", "sync")
    assert rc == 75


def test_healthz_startup_flag_and_port_in_use(ls: Procs, tmp_path: Path) -> None:
    port = free_port()
    p = ls.start("-c", str(write_config(tmp_path, http=f"127.0.0.1:{port}")), "sync")
    body = wait_for(
        lambda: (healthz(port) or {}).get("metadata", {}).get("startup_main") and healthz(port),
        what="startup_main true",
    )
    assert body["ok"] is True and body["status"] == "OK"
    rc, _, err = ls.run("-c", str(write_config(tmp_path, instance="b", http=f"127.0.0.1:{port}")), "sync")
    assert rc == 1
    assert "address already in use" in err
    assert p.poll() is None


def test_sigterm_kills_at_once(ls: Procs, tmp_path: Path) -> None:
    port = free_port()
    p = ls.start("-c", str(write_config(tmp_path, http=f"127.0.0.1:{port}")), "sync")
    wait_for(lambda: healthz(port), what="http up")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == -signal.SIGTERM


def test_sigint_kills_too(standin: Procs, tmp_path: Path) -> None:
    port = free_port()
    p = standin.start("-c", str(write_config(tmp_path, http=f"127.0.0.1:{port}")), "sync")
    wait_for(lambda: healthz(port), what="http up")
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=10) == -signal.SIGINT


def ignored_signals(pid: int) -> set[int]:
    """The signals ``pid`` ignores (SigIgn in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError(f"no SigIgn line for pid {pid}")


def http_answers(port: int) -> bool:
    """Whether anything answers HTTP on ``port`` (a 503 is an answer too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_ignore_sigterm_knob(standin: Procs, tmp_path: Path) -> None:
    port = free_port()
    p = standin.start(
        "-c",
        str(write_config(tmp_path, http=f"127.0.0.1:{port}")),
        "sync",
        env={"LSSTANDIN_IGNORE_SIGTERM": "1"},
    )
    wait_for(lambda: healthz(port), what="http up")
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= ignored_signals(p.pid)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        p.send_signal(sig)
    # A fatal signal marks the whole process for death when it is sent: an HTTP answer produced after
    # the sends proves the process survived them (no waiting for something not to happen).
    assert http_answers(port)
    assert p.poll() is None
    p.kill()
    assert p.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize(("env", "code"), [({}, 2), ({"LSSTANDIN_EXIT_CODE": "7"}, 7)])
def test_crash_knob(standin: Procs, tmp_path: Path, env: dict[str, str], code: int) -> None:
    rc, _, err = standin.run(
        "-c", str(write_config(tmp_path)), "sync", env={"LSSTANDIN_CRASH_AFTER_MS": "200", **env}
    )
    assert rc == code
    assert "panic:" in err and "LSSTANDIN_CRASH_AFTER_MS" in err


# Every behaviour knob at once, each set to change any run it acts on: a crash at once with its own
# exit code, SIGTERM ignored, a re-exec child.
ALL_KNOBS = {
    "LSSTANDIN_CRASH_AFTER_MS": "0",
    "LSSTANDIN_EXIT_CODE": "7",
    "LSSTANDIN_IGNORE_SIGTERM": "1",
    "LSSTANDIN_REEXEC": "1",
}


@pytest.mark.parametrize(
    "command", [[], ["version"], ["snapshots", "list"]], ids=["validation", "version", "snapshots"]
)
def test_knobs_leave_runs_other_than_sync_alone(
    standin: Procs, tmp_path: Path, command: list[str]
) -> None:
    """The daemon's `LS -c candidate` validation (no command) must answer for the config, whatever
    knob the test set for the LS it supervises (docs/standin.md, "Test knobs")."""
    record = tmp_path / "record.jsonl"
    env = {**ALL_KNOBS, "LSSTANDIN_RECORD": str(record)}
    p = standin.start("-c", str(write_config(tmp_path)), *command, env=env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert b"panic:" not in err
    (line,) = record.read_text().splitlines()  # one process: no re-exec child
    assert json.loads(line)["pid"] == p.pid


def test_knobs_act_on_receive_too(standin: Procs, tmp_path: Path) -> None:
    rc, _, err = standin.run(
        "-c",
        str(write_config(tmp_path)),
        "receive",
        env={"LSSTANDIN_CRASH_AFTER_MS": "0", "LSSTANDIN_EXIT_CODE": "7"},
    )
    assert rc == 7 and "panic:" in err


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_reexec_knob_orphans_child_when_only_parent_is_signalled(standin: Procs, tmp_path: Path) -> None:
    port = free_port()
    parent = standin.start(
        "-c", str(write_config(tmp_path, http=f"127.0.0.1:{port}")), "sync", env={"LSSTANDIN_REEXEC": "1"}
    )
    child = wait_for(lambda: _children(parent.pid), what="re-exec child")[0]
    wait_for(lambda: healthz(port), what="child serving")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=10) == -signal.SIGTERM
    assert healthz(port) is not None  # the real sync process lives on, orphaned
    os.kill(child, 0)
    os.killpg(parent.pid, signal.SIGKILL)  # same process group: this is how to clean up
    wait_for(lambda: healthz(port) is None, what="orphan gone")


def test_minimum_pid_reexec_exit_code_passes_through(standin: Procs, tmp_path: Path) -> None:
    rc, _, err = standin.run(
        "-c",
        str(write_config(tmp_path)),
        "--minimum-pid",
        "200",
        "sync",
        "--only-once",
        env={"LSSTANDIN_REEXEC": "1"},
    )
    assert rc == 0, err
    assert "Starting new instance" in err


def test_record_file_and_lock(standin: Procs, tmp_path: Path) -> None:
    record = tmp_path / "ls.jsonl"
    port = free_port()
    cfg = write_config(tmp_path, http=f"127.0.0.1:{port}")
    p = standin.start("-c", str(cfg), "sync", env={"LSSTANDIN_RECORD": str(record)})
    wait_for(lambda: healthz(port), what="http up")
    line = json.loads(record.read_text().splitlines()[0])
    assert line["pid"] == p.pid and line["event"] == "start" and line["config"] == str(cfg)
    assert {"ppid", "time_ns", "argv"} <= set(line)
    fd = os.open(str(record) + ".lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # LS is running
        p.kill()
        p.wait(timeout=10)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel dropped it at death
    finally:
        os.close(fd)


def test_snapshots_list(ls: Procs, tmp_path: Path) -> None:
    n1 = put_snapshot(tmp_path / "store", "x", [(b"k", b"v", 1, 0)], ts=2_000_000_000_000_000_000)
    n2 = put_snapshot(tmp_path / "store", "a", [(b"k", b"v", 1, 0)], ts=1_000_000_000_000_000_000)
    rc, out, _ = ls.run("-c", str(write_config(tmp_path)), "snapshots", "list")
    assert rc == 0
    assert out.split() == sorted([n1, n2])
    rc, out, _ = ls.run("-c", str(write_config(tmp_path)), "snapshots", "list", "-t")
    assert out.split() == [n2, n1]

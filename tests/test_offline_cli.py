"""The offline commands end to end: `lssupervisor plan|migrate|stamp|history|backups|rollback|fleet`
against a real config set, LS template, migrations and LMDB; the daemon's lock and a running LS are
refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest

from lssupervisor.cli.main import main
from lssupervisor.config import load_config
from lssupervisor.daemon import lock
from lssupervisor.errors import ExitCode
from lssupervisor.lsmodel import LmdbSpec
from lssupervisor.testing.fixtures import build_lmdb, read_marker_version, read_values
from lssupervisor.worker import backupdir
from tests.harness.workers import BASIC_MIGRATIONS, INSTANCE, write_migrations


@dataclass
class ConfigSet:
    root: Path
    config: Path
    spec: LmdbSpec

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([argv[0], "-c", str(self.config), *argv[1:]])
        out, err = capsys.readouterr()
        return code, out, err


@pytest.fixture
def cs(tmp_path: Path) -> ConfigSet:
    write_migrations(tmp_path / "migrations", BASIC_MIGRATIONS)
    (tmp_path / "ls.yaml.in").write_text(
        textwrap.dedent(f"""\
        instance: {INSTANCE}
        lmdbs:
          main:
            path: {tmp_path}/db
            schema_tracks_changes: true
        storage:
          type: fs
          options:
            root_path: {tmp_path}/storage/v${{APP_SCHEMA_VERSION}}
    """)
    )
    config = tmp_path / "lssupervisor.yaml"
    config.write_text(
        textwrap.dedent("""\
        state_dir: state
        lightningstream:
          template: ls.yaml.in
        migrations:
          path: migrations
        backup:
          keep: 3
        http:
          address: ""
    """)
    )
    data = {"data": {f"k{i:06d}": f"value-{i}" for i in range(500)}}
    spec = build_lmdb(tmp_path / "db", data, marker=1, instance=INSTANCE)
    return ConfigSet(tmp_path, config, spec)


def test_plan_as_table_and_json(cs: ConfigSet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cs.run(capsys, "plan")
    assert code == 0
    assert out.splitlines()[:2] == [
        "LMDB  MARKER  FROM  TARGET  ACTION",
        "main  1       1     3       migrate",
    ]
    assert "0002_upper  prefix" in out and "0003_copy   new-dbi" in out
    code, out, _ = cs.run(capsys, "plan", "--to", "2", "--json")
    data = json.loads(out)
    assert code == 0 and data["target"] == 2 and [s["to_version"] for s in data["steps"]] == [2]


def test_migrate_history_backups_and_fleet(cs: ConfigSet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cs.run(capsys, "migrate")
    assert code == 0, err
    assert "migrated to version 3" in out and "backup 2" in out
    # progress on stderr
    assert "committed main 1→2 (0002_upper), step 1/2" in err and "backed up main" in err
    assert read_marker_version(cs.spec, instance=INSTANCE) == 3
    code, out, _ = cs.run(capsys, "history", "--json")
    kinds = [(e["kind"], e.get("to_version")) for e in json.loads(out)]
    assert code == 0 and kinds == [("backup", 1), ("migrate", 2), ("migrate", 3)]
    code, out, _ = cs.run(capsys, "history")
    assert code == 0 and out.startswith("END") and "0003_copy" in out
    code, out, _ = cs.run(capsys, "backups", "--json")
    (only,) = json.loads(out)
    assert code == 0 and only["schema_version"] == 1 and only["reason"] == "before migrating to 3"
    code, out, _ = cs.run(capsys, "backups")
    assert code == 0 and only["id"] in out
    code, out, _ = cs.run(capsys, "fleet")
    assert code == 0 and f"{INSTANCE} (this instance)  3" in out
    code, out, _ = cs.run(capsys, "migrate", "--json")
    assert code == 0 and json.loads(out)["steps"] == 0


def test_dry_run_changes_nothing(cs: ConfigSet, capsys: pytest.CaptureFixture[str]) -> None:
    before = backupdir.file_digest(backupdir.data_file(cs.spec))
    code, out, _ = cs.run(capsys, "migrate", "--dry-run", "--json")
    data = json.loads(out)
    assert code == 0 and data["lmdbs"][0]["keys"] == 1000 and data["plan"][0]["action"] == "migrate"
    assert backupdir.file_digest(backupdir.data_file(cs.spec)) == before
    assert not (cs.root / "state" / "history.jsonl").exists()


def test_dry_run_works_while_the_daemon_holds_the_lock(
    cs: ConfigSet, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dry run of a live instance: the daemon's locks held (state dir and LMDB), the live LMDB only
    read. It must succeed, and leave the live data file byte-identical with the same last txn id."""
    data_file = backupdir.data_file(cs.spec)
    live_bytes = data_file.read_bytes()
    with lmdb.open(cs.spec.path, max_dbs=64, readonly=True) as env:
        live_txnid = env.info()["last_txnid"]
    with lock.acquire(load_config(cs.config), [cs.spec], "daemon"):
        code, _, err = cs.run(capsys, "migrate")  # the real migration still refuses
        assert code == int(ExitCode.LOCKED) and "daemon is stopped" in err
        code, out, err = cs.run(capsys, "migrate", "--dry-run", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["lmdbs"]
    assert result["keys"] == 1000 and len(result["steps"]) == 2
    assert result["live_last_txnid_before"] == result["live_last_txnid_after"] == live_txnid
    assert data_file.read_bytes() == live_bytes
    with lmdb.open(cs.spec.path, max_dbs=64, readonly=True) as env:
        assert env.info()["last_txnid"] == live_txnid
    assert read_marker_version(cs.spec, instance=INSTANCE) == 1
    # The copy lived in a private .dryrun-*.partial directory, removed at the end; nothing recorded.
    backups_dir = cs.root / "state" / "backups"
    assert not backups_dir.exists() or list(backups_dir.iterdir()) == []
    assert not (cs.root / "state" / "history.jsonl").exists()


WRITER = """
import sys, time, lmdb
env = lmdb.open(sys.argv[1], max_dbs=64)
db = env.open_db(b"busy")
print("ready", flush=True)
deadline = time.monotonic() + 30
n = 0
while time.monotonic() < deadline:
    with env.begin(write=True, db=db) as txn:
        txn.put(b"k%d" % n, b"v")  # a DBI the migrations never read; a headerless value is fine here
    n += 1
    time.sleep(0.002)
"""


def test_dry_run_reports_a_live_write_by_another_process_and_succeeds(
    cs: ConfigSet, capsys: pytest.CaptureFixture[str]
) -> None:
    """LS or the application may commit while a dry run copies the live LMDB: that is no failure (the
    dry run's environment is read-only), it is reported."""
    import subprocess
    import sys

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, cs.spec.path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        code, out, err = cs.run(capsys, "migrate", "--dry-run", "--json")
    finally:
        writer.kill()
        writer.wait()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["live_changed_by_others"] == ["main"]
    (result,) = doc["lmdbs"]
    assert result["live_last_txnid_after"] > result["live_last_txnid_before"]
    assert read_marker_version(cs.spec, instance=INSTANCE) == 1  # the dry run migrated only the copy


def test_unmarked_lmdb_is_refused_until_stamped(cs: ConfigSet, capsys: pytest.CaptureFixture[str]) -> None:
    build_lmdb(cs.root / "db2", {"data": {"a": "1"}})
    template = cs.root / "ls.yaml.in"
    template.write_text(template.read_text().replace(f"{cs.root}/db\n", f"{cs.root}/db2\n"))
    code, _, err = cs.run(capsys, "migrate", "--no-backup")
    assert code == int(ExitCode.MIGRATION)
    assert err.count("\n") == 1 and err.startswith("lssupervisor: error: ") and "lssupervisor stamp N" in err
    code, out, _ = cs.run(capsys, "stamp", "2")
    assert code == 0 and out.strip() == "stamped LMDB main: unmarked -> 2"
    code, out, err = cs.run(capsys, "migrate", "--no-backup")
    assert code == 0 and "no backup taken" in out and "without a backup" in err
    assert read_values(LmdbSpec(name="main", path=str(cs.root / "db2")))["data_v3"] == {b"a": b"1!"}


def test_rollback_restores_and_renders_the_config_back(
    cs: ConfigSet, capsys: pytest.CaptureFixture[str]
) -> None:
    original = read_values(cs.spec)
    assert cs.run(capsys, "migrate")[0] == 0
    code, out, _ = cs.run(capsys, "rollback")
    assert code == 0 and "LMDB main: restored (version 3 -> 1)" in out
    assert read_values(cs.spec) == original and read_marker_version(cs.spec, instance=INSTANCE) == 1
    rendered = (cs.root / "state" / "lightningstream.yaml").read_text()
    assert f"root_path: {cs.root}/storage/v1\n" in rendered
    code, out, _ = cs.run(capsys, "rollback")
    assert code == 0 and "LMDB main: already in place" in out
    code, _, err = cs.run(capsys, "rollback", "no-such-backup")
    assert code == int(ExitCode.MIGRATION) and "no backup 'no-such-backup'" in err


def test_rollback_warns_loudly_that_the_daemon_would_migrate_straight_back(
    cs: ConfigSet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cs.run(capsys, "migrate")[0] == 0
    code, out, err = cs.run(capsys, "rollback")
    assert code == 0
    # No pin: the newest migration (3) is the target, so the daemon would undo the rollback.
    assert "at its next start the daemon migrates main from 1 to 3 again" in out
    (warning,) = [line for line in err.splitlines() if "warning" in line]  # the rest is progress
    assert warning.startswith("lssupervisor: warning: the target is still 3 (the newest migration, 3)")
    assert "will migrate 1 -> 3 again at its next start or reconcile" in warning
    assert f"set `schema.target: 1` in {cs.config}" in warning
    assert cs.run(capsys, "plan", "--json")[1].count('"action": "migrate"') == 1  # what it warned about
    # Pinned as the warning says: no warning, and the summary names the pin.
    cs.config.write_text(cs.config.read_text() + "schema:\n  target: 1\n")
    code, out, err = cs.run(capsys, "rollback")
    assert code == 0 and "warning" not in err
    assert f"the daemon stays on version 1 (target schema.target: 1 in {cs.config})" in out


def test_rollback_names_the_target_file_to_pin(cs: ConfigSet, capsys: pytest.CaptureFixture[str]) -> None:
    target_file = cs.root / "app.target"
    cs.config.write_text(cs.config.read_text() + f"schema:\n  target_file: {target_file}\n")
    target_file.write_text("3\n")
    assert cs.run(capsys, "migrate")[0] == 0
    code, _, err = cs.run(capsys, "rollback")
    assert code == 0
    assert f"the target is still 3 ({target_file} says 3)" in err
    assert f"write 1 to schema.target_file: `echo 1 > {target_file}`" in err
    target_file.write_text("1\n")
    code, out, err = cs.run(capsys, "rollback")
    assert code == 0 and "warning" not in err
    assert f"the daemon stays on version 1 (target {target_file} says 1)" in out
    # Undoing the rollback (its safety backup, at 3) while the file says 1: the daemon would refuse.
    backups = json.loads(cs.run(capsys, "backups", "--json")[1])
    (undo,) = [b["id"] for b in backups if b["schema_version"] == 3]
    code, out, err = cs.run(capsys, "rollback", undo)
    assert code == 0 and "the daemon cannot plan from version 3" in out
    assert "warning: the daemon will not start LS on the restored version 3: " in err
    assert "above the target 1" in err


TWO_LMDB_MIGRATIONS = {
    "0001_main_init.py": '''
        """Initial schema."""
        VERSION = 1
        LMDB = "main"

        def upgrade(m):
            pass
    ''',
    "0002_main_upper.py": '''
        """Uppercase main's values; the shard only follows (marker only)."""
        VERSION = 2
        LMDB = "main"

        def upgrade(m):
            for key, value in m.items("data"):
                m.put("data", key, value.upper())
    ''',
}


def test_fleet_tells_a_marker_only_step_from_a_migration_and_a_stamp(
    cs: ConfigSet, capsys: pytest.CaptureFixture[str]
) -> None:
    for f in (cs.root / "migrations").iterdir():
        f.unlink()
    write_migrations(cs.root / "migrations", TWO_LMDB_MIGRATIONS)
    build_lmdb(cs.root / "shard", {"data": {"s": "1"}}, marker=1, instance=INSTANCE)
    template = cs.root / "ls.yaml.in"
    template.write_text(
        template.read_text().replace(
            "storage:", f"  shard:\n    path: {cs.root}/shard\n    schema_tracks_changes: true\nstorage:"
        )
    )
    code, out, err = cs.run(capsys, "migrate", "--no-backup")
    assert code == 0, err
    code, out, _ = cs.run(capsys, "fleet")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert f"{INSTANCE} (this instance)  2        0002_main_upper " in rows["main"]
    # The shard moved 1 -> 2 with main's migration: its marker names no migration, and it was no stamp.
    assert "(marker only: 0002_main_upper is for LMDB main)" in rows["shard"] and "stamp" not in out
    data = json.loads(cs.run(capsys, "fleet", "--json")[1])
    assert [e["markers"][0]["set_by"] for e in data["lmdbs"]] == [
        "0002_main_upper",
        "(marker only: 0002_main_upper is for LMDB main)",
    ]
    # A stamp of main (whose own migration would have recorded its name) shows as one.
    assert cs.run(capsys, "stamp", "2", "--lmdb", "main")[0] == 0
    code, out, _ = cs.run(capsys, "fleet")
    assert "2        (stamp)" in next(line for line in out.splitlines() if line.startswith("main"))


HOLD_LOCK = """
import sys
from lssupervisor.config import load_config
from lssupervisor.daemon.lock import acquire
lock = acquire(load_config(sys.argv[1]), [], "daemon")
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def daemon_lock(cs: ConfigSet) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(cs.config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(10)


@pytest.mark.parametrize("argv", [("migrate",), ("stamp", "2"), ("rollback",)])
def test_offline_commands_refuse_while_the_daemon_holds_the_lock(
    cs: ConfigSet,
    capsys: pytest.CaptureFixture[str],
    daemon_lock: subprocess.Popen[str],
    argv: tuple[str, ...],
) -> None:
    code, _out, err = cs.run(capsys, *argv)
    assert code == int(ExitCode.LOCKED)
    assert f"pid {daemon_lock.pid}" in err and "daemon is stopped" in err and err.count("\n") == 1
    if argv[0] == "migrate":
        assert "a running daemon migrates by itself" in err
    else:
        # The daemon never stamps nor rolls back: the advice is what works, not `reconcile`.
        assert "reconcile" not in err
        again = f"lssupervisor {' '.join(argv)}"
        assert f"stop it (e.g. `systemctl stop lssupervisor`), run `{again}` again" in err
    assert read_marker_version(cs.spec, instance=INSTANCE) == 1


FAKE_LS = """
import sys, lmdb
env = lmdb.open(sys.argv[2], max_dbs=64, readonly=True)
txn = env.begin()
print("ready", flush=True)
sys.stdin.read()
"""


def test_migrate_refuses_while_lightning_stream_has_the_lmdb_open(
    cs: ConfigSet, capsys: pytest.CaptureFixture[str]
) -> None:
    # argv[1] makes the process look like LS in its command line
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_LS, "lightningstream", cs.spec.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        code, _, err = cs.run(capsys, "migrate")
    finally:
        assert fake.stdin is not None
        fake.stdin.close()
        fake.wait(10)
    assert code == int(ExitCode.LS_RUNNING)
    assert f"Lightning Stream pid {fake.pid} has it open" in err
    assert read_marker_version(cs.spec, instance=INSTANCE) == 1
    assert not (cs.root / "state" / "backups").exists()

"""The state-dir and per-LMDB locks (I4): exclusive, naming the holder, dying with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lssupervisor.config import Config, PathOpt
from lssupervisor.daemon import lock
from lssupervisor.errors import ConfigError, ExitCode, LockHeld
from lssupervisor.lsmodel import LmdbSpec
from tests.harness import wait_for


def cfg_for(tmp_path: Path, state: str = "state") -> Config:
    return Config(state_dir=PathOpt(str(tmp_path / state)))


def test_acquire_writes_the_holder_and_refuses_a_second_taker(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    db = tmp_path / "db"
    with lock.acquire(cfg, [db], "daemon") as held:
        assert lock.read_holder(cfg.lock_path) == lock.Holder(
            pid=os.getpid(), purpose="daemon", state_dir=str(Path(cfg.state_dir).resolve())
        )
        assert (db / ".lssupervisor.lock").exists()
        assert lock.holder_pid(cfg) == os.getpid()
        assert lock.holder(cfg) == lock.Holder(os.getpid(), "daemon", str(cfg.state_dir))
        assert held.fileno() >= 0 and held.paths[0] == cfg.lock_path
        # Refused at once (LOCK_NB): a blocking acquire would hang here until pytest-timeout.
        with pytest.raises(LockHeld) as err:
            lock.acquire(cfg, [db], "migrate")  # flock is per open file: a second open collides
        assert err.value.holder_pid == os.getpid()
        assert err.value.exit_code is ExitCode.LOCKED
        assert f"locked by lssupervisor pid {os.getpid()} (daemon" in str(err.value)
    # Released: free again, and nobody holds it.
    assert lock.holder_pid(cfg) is None and lock.holder(cfg) is None
    with lock.acquire(cfg, [db], "migrate"):
        assert lock.read_holder(cfg.lock_path).purpose == "migrate"  # type: ignore[union-attr]


def test_same_lmdb_with_another_state_dir_collides(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with lock.acquire(cfg_for(tmp_path, "a"), [db], "daemon"):
        with pytest.raises(LockHeld) as err:
            lock.acquire(cfg_for(tmp_path, "b"), [db], "daemon")
        assert f"LMDB {db} is locked by lssupervisor pid {os.getpid()}" in str(err.value)
        # The refused acquire left nothing locked behind: state dir b is free.
        assert lock.holder_pid(cfg_for(tmp_path, "b")) is None


def test_no_subdir_lmdb_lock_lives_beside_the_file(tmp_path: Path) -> None:
    spec = LmdbSpec(name="main", path=str(tmp_path / "data.mdb"), no_subdir=True)
    assert lock.lmdb_lock_path(spec) == tmp_path / "data.mdb.lssupervisor.lock"
    directory = LmdbSpec(name="m", path=str(tmp_path / "d"))
    assert lock.lmdb_lock_path(directory) == tmp_path / "d" / ".lssupervisor.lock"
    with lock.acquire(cfg_for(tmp_path), [spec], "daemon"):
        assert (tmp_path / "data.mdb.lssupervisor.lock").exists()
        assert not (tmp_path / "data.mdb").exists()  # the LMDB itself is untouched


def test_add_lmdbs_on_reload(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    with lock.acquire(cfg, [tmp_path / "a"], "daemon") as held, lock.acquire(
        cfg_for(tmp_path, "other"), [tmp_path / "b"], "daemon"
    ):
        with pytest.raises(LockHeld):
            held.add_lmdbs([tmp_path / "b"])
        held.add_lmdbs([tmp_path / "c"])
        assert len(held.paths) == 3 - 1 + 1  # state dir, a, c


def test_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    code = (
        "import sys, time; from lssupervisor.daemon import lock;"
        " from lssupervisor.config import Config, PathOpt;"
        f"lock.acquire(Config(state_dir=PathOpt({str(cfg.state_dir)!r})), [], 'daemon');"
        "print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert lock.holder_pid(cfg) == proc.pid
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"):
            lock.acquire(cfg, [], "daemon")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: lock.holder_pid(cfg) is None, what="lock released by the kernel")
        with lock.acquire(cfg, [], "daemon"):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_is_held_without_proc_locks_falls_back_to_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_for(tmp_path)
    monkeypatch.setattr(lock, "PROC_LOCKS", tmp_path / "no-such-proc-locks")
    assert not lock.is_held(cfg.lock_path)
    with lock.acquire(cfg, [], "daemon"):
        assert lock.is_held(cfg.lock_path)
        assert lock.holder_pid(cfg) == os.getpid()
    assert not lock.is_held(cfg.lock_path)


def test_lock_fds_are_not_inherited(tmp_path: Path) -> None:
    cfg = cfg_for(tmp_path)
    with lock.acquire(cfg, [], "daemon") as held:
        assert not os.get_inheritable(held.fileno())


def test_a_lock_file_that_cannot_be_created_is_a_config_error_naming_it(tmp_path: Path) -> None:
    # An OSError here reached the daemon's main loop raw (a reload naming such an LMDB crashed it).
    blocker = tmp_path / "file"
    blocker.write_text("")
    with lock.acquire(cfg_for(tmp_path), [], "daemon") as held:
        with pytest.raises(ConfigError) as err:
            held.add_lmdbs([blocker / "db"])
        assert str(blocker / "db" / ".lssupervisor.lock") in str(err.value)
        assert err.value.exit_code is ExitCode.CONFIG
        assert held.paths == [cfg_for(tmp_path).lock_path]  # what it had is kept

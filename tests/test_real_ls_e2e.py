"""The daemon end to end against the REAL Lightning Stream binary.

These run only when a real LS is installed (``$LIGHTNINGSTREAM_BIN``, else ``lightningstream`` on PATH;
they skip with the reason otherwise);
the same scenarios run against the stand-in in test_supervisor_e2e.py and test_reconcile_e2e.py. They
check what only the real binary can prove: readiness from its real /healthz, its (absent) signal
handling under our group stop, pdeathsig through setpriv, and a migration that moves it to the new
prefix. Pointing ``$LIGHTNINGSTREAM_BIN`` at ``lightningstream-standin`` runs them against the stand-in.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import free_port, wait_for
from tests.harness.e2e import (
    WATCH,
    ConfigSet,
    Daemon,
    pid_alive,
    rendered_root,
    ship,
    step_migration,
    wait_running_on,
)
from tests.harness.real_ls import real_ls_binary

pytestmark = pytest.mark.real_ls


@pytest.fixture
def real_ls() -> str:
    return real_ls_binary()


@pytest.fixture
def daemon(tmp_path: Path, real_ls: str) -> Iterator[tuple[ConfigSet, Daemon]]:
    cs = ConfigSet(tmp_path)
    cs.write_template(ls_http=f"127.0.0.1:{free_port()}")  # readiness from LS's own /healthz
    cs.write(binary=real_ls, extra=WATCH)
    d = Daemon(cs)
    try:
        yield cs, d
    finally:
        d.close()


def _ls_processes(config: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if str(config) in cmd:
            found.append(p)
    return found


def test_real_ls_ready_from_healthz_and_stopped_by_group(daemon: tuple[ConfigSet, Daemon]) -> None:
    cs, d = daemon
    doc = wait_running_on(d, 1, timeout=60)
    assert doc["lightningstream"]["ready"] is True
    assert rendered_root(cs).endswith("/v1")
    pid = doc["lightningstream"]["pid"]
    # HUP with nothing changed: the same LS keeps running.
    d.send(signal.SIGHUP)
    d.wait_log(r"reconcile: nothing to do|LS config unchanged|keeps running", timeout=60)
    assert wait_running_on(d, 1)["lightningstream"]["pid"] == pid
    d.send(signal.SIGTERM)
    assert d.wait(timeout=60) == 0
    assert _ls_processes(cs.state / "lightningstream.yaml") == []


def test_real_ls_dies_with_a_sigkilled_supervisor(daemon: tuple[ConfigSet, Daemon]) -> None:
    _cs, d = daemon
    pid = wait_running_on(d, 1, timeout=60)["lightningstream"]["pid"]
    os.kill(d.pid, signal.SIGKILL)
    d.proc.wait(timeout=60)
    wait_for(lambda: not pid_alive(pid), what="LS gone after kill -9 of its supervisor")


def test_real_ls_moves_to_the_new_prefix_after_a_migration(daemon: tuple[ConfigSet, Daemon]) -> None:
    cs, d = daemon
    old = wait_running_on(d, 1, timeout=60)["lightningstream"]["pid"]
    wait_for(lambda: list((cs.storage / "v1").glob("main__*")), timeout=30, what="a v1 snapshot")
    ship(cs, "0002_step.py", step_migration(2))
    new = wait_running_on(d, 2, timeout=60)["lightningstream"]["pid"]
    assert new != old
    assert rendered_root(cs).endswith("/v2")
    wait_for(lambda: list((cs.storage / "v2").glob("main__*")), timeout=30, what="a v2 snapshot")

"""The shell's own duties, driven method by method on a real ``Supervisor`` (no main loop): what its
children inherit."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lssupervisor.config import load_config
from lssupervisor.core.actions import RunHook
from lssupervisor.core.events import TaskFailed
from lssupervisor.core.states import Task
from lssupervisor.daemon.prepare import load
from lssupervisor.daemon.supervisor import Supervisor
from lssupervisor.worker import client as worker_mod
from tests.harness import wait_for
from tests.harness.e2e import ConfigSet

# What systemd hands to the service only: a child speaking on the notify socket would be rejected
# (NotifyAccess=main) or, with NotifyAccess=all, could report READY=1 for us.
SYSTEMD_ONLY = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "20000000", "LISTEN_FDS": "1"}

DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"


def test_hooks_do_not_inherit_the_systemd_notification_variables(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    out = tmp_path / "hook-env.json"
    hook = json.dumps([sys.executable, "-c", DUMP_ENV, str(out)])
    cs.write(extra=f"hooks:\n  pre_migrate: [{hook}]\n")
    cfg = load_config(cs.config)
    sup = Supervisor(cfg, environ={**os.environ, **SYSTEMD_ONLY})
    sup.loaded = load(cfg, sup.environ)
    assert sup.jobs.run_hook(sup.loaded, RunHook(phase="pre", index=0, from_version=1, to_version=2)) == []
    job = sup.jobs.job
    assert job is not None and job.hook is not None
    try:
        wait_for(lambda: job.hook is not None and job.hook.poll() is not None, what="the hook to exit")
    finally:
        job.kill()
        job.hook.wait(30)
    assert job.hook.returncode == 0
    env = json.loads(out.read_text())
    assert env["LSSUPERVISOR_HOOK"] == "pre_migrate"
    assert not set(SYSTEMD_ONLY) & set(env), env


def test_workers_do_not_inherit_the_systemd_notification_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cs = ConfigSet(tmp_path)
    cfg = load_config(cs.config)
    sup = Supervisor(cfg, environ={**os.environ, **SYSTEMD_ONLY})
    sup.loaded = load(cfg, sup.environ)
    started: list[Mapping[str, str] | None] = []

    def start(*args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
        started.append(env)
        raise OSError(errno.EAGAIN, "not started by this test")

    monkeypatch.setattr(worker_mod.WorkerSession, "start", start)
    [failed] = sup._request(Task.PLAN, worker_mod.p.PlanRequest)
    assert isinstance(failed, TaskFailed) and "not started by this test" in failed.message
    [env] = started
    assert env is not None and env.get("PATH") == os.environ.get("PATH")
    assert not set(SYSTEMD_ONLY) & set(env), env


def test_stopping_the_health_poller_never_waits_for_its_request(tmp_path: Path) -> None:
    """A poller in the middle of a /healthz request (up to its timeout) must not hold up the main
    loop when LS exits; it is joined at exit instead."""
    import threading

    from lssupervisor.daemon.health import HealthPoller, HealthResult

    release = threading.Event()

    class SlowProbe:
        def check(self) -> HealthResult:
            release.wait(10)  # a request that takes its whole timeout
            return HealthResult(False, "slow")

    cs = ConfigSet(tmp_path)
    sup = Supervisor(load_config(cs.config), environ=dict(os.environ))
    sup.ls.poller = HealthPoller(SlowProbe(), 1234, lambda pid: None, interval=0.05)  # type: ignore[arg-type]
    try:
        sup.ls.stop_poller()
        # It returned while the poller is still inside its (10 s) request: not joined, only retired.
        assert sup.ls.poller is None and len(sup.ls.retired_pollers) == 1
        assert sup.ls.retired_pollers[0].running
    finally:
        release.set()
        sup.ls.stop_poller(join=True)
    assert sup.ls.retired_pollers == []

"""Running the LS stand-in (or the real LS) as a black box: processes in their own session, every
group killed at the end."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys

STANDIN = [sys.executable, "-m", "lssupervisor.testing.standin"]
NAME_RE = re.compile(r"^main__(?P<inst>[A-Za-z0-9-]+)__\d{8}-\d{6}-\d{9}__GX\.pb\.gz$")



class Procs:
    """Starts LS processes in their own session; kills every group at the end."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        full_env.setdefault("LSSTANDIN_HEALTH_INTERVAL_MS", "50")
        full_env.update(env or {})
        p = subprocess.Popen(
            [*self.cmd, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 20) -> tuple[int, str, str]:
        p = self.start(*args, env=env)
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out.decode(), err.decode()

    def kill_all(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.communicate(timeout=10)

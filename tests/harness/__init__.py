"""The test harness: what test modules share (they never import from each other).

- :mod:`.wait` — ``wait_for``, the one way to wait on another process (a condition, a deadline).
- :mod:`.e2e` — the real daemon against the LS stand-in: config sets, ``Daemon``, state and log
  readers, shipping migrations.
- :mod:`.workers` — worker-level fixtures: migration files, views, settings, sample LMDBs, replies.
- :mod:`.replay` — feeding event histories through the pure core and reading what it did.
- :mod:`.real_ls` — the real Lightning Stream binary for the tests that need one (or a skip).

docs/testing.md describes the rules these serve.
"""

from lssupervisor.testing.ports import free_port
from tests.harness.wait import wait_for

__all__ = ["free_port", "wait_for"]

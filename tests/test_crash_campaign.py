"""The crash campaign's short form: 20 kill -9s of the daemon or its worker across real reconcile
cycles, each followed by the checks of :mod:`lssupervisor.testing.crashes` (one version in the LMDB,
restorable backups, no LS during a write, convergence). The long form (>= 100 points) is
``python -m lssupervisor.testing.crashes --points 100`` (docs/testing.md).

``LSSUPERVISOR_CRASH_CAMPAIGN_SEED`` replays a run; the seed is printed either way.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from lssupervisor.testing.crashes import run, summary

POINTS = 20


def test_twenty_kills_across_cycles_leave_every_lmdb_at_one_version(tmp_path: Path) -> None:
    seed = int(os.environ.get("LSSUPERVISOR_CRASH_CAMPAIGN_SEED", str(random.randrange(1 << 30))))
    binary = str(Path(sys.executable).with_name("lightningstream-standin"))
    lines: list[str] = []
    outcomes = run(tmp_path / "instance", POINTS, records=5000, seed=seed, binary=binary, out=lines.append)
    report = f"seed {seed}\n" + "\n".join(lines) + "\n" + summary(outcomes)
    print(report)
    assert len(outcomes) == POINTS, report
    assert not [o for o in outcomes if o.problems], report
    # The kills must really have been spread over the cycle, the daemon and the worker both.
    assert {o.victim for o in outcomes} >= {"daemon", "worker"}, report
    assert len({o.landed for o in outcomes}) >= 4, report

"""Retiring a DBI that a new-dbi migration replaced (`REPLACES`): two instances over the LS stand-in.

alpha and beta sync `users`; migration 0002 (new-dbi) copies it to `users_v2` and declares
`REPLACES = ["users"]`. Once both run version 2, `prune --below 2` on alpha (daemon stopped: I4)
tombstones every `users` entry with a fresh timestamp and deletes the v1 snapshots; LS syncs the
deletions, and `users` is empty on both instances while `users_v2` is untouched."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from lssupervisor.errors import ExitCode
from lssupervisor.testing.scenario import Cluster, Dump
from lssupervisor.worker import lsheader
from tests.harness import wait_for

NEW_DBI = '''"""Users move to a new DBI, users_v2 (prune retires the old one once all are on 2)."""

VERSION = 2
STRATEGY = "new-dbi"
REPLACES = ["users"]


def upgrade(m):
    if m.exists("users"):
        m.copy_dbi("users", "users_v2")
'''
N = 40


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lssupervisor", *argv], capture_output=True, text=True,
                          timeout=120, check=False)


def live(d: Dump, dbi: str) -> dict[bytes, bytes]:
    return {k: v for k, (v, _) in d.get(dbi, {}).items() if v is not None}


def test_prune_retires_a_replaced_dbi_on_every_instance(tmp_path: Path) -> None:
    with Cluster(tmp_path / "work") as c:
        for n in ("alpha", "beta"):
            c.add_instance(n)
            c.start(n)
        for n in ("alpha", "beta"):
            c.wait_state(n, lambda _d, n=n: c.running_on(n, 1) is not None, 30, "v1")
        env = c.env("alpha")
        with c.dbi_lock("alpha"), env.begin(write=True) as txn:
            db = env.open_db(b"users", txn=txn)
            for i in range(N):
                value = lsheader.encode(b"name=U%d" % i, time.time_ns(), txn.id())
                txn.put(f"user:{i:03d}".encode(), value, db=db)
        wait_for(lambda: len(live(c.dump("beta"), "users")) == N, 30, what="beta to receive users")

        migration = tmp_path / "0002_users_v2.py"
        migration.write_text(NEW_DBI)
        for n in ("alpha", "beta"):
            c.ship_migration(n, migration)
        for n in ("alpha", "beta"):
            c.wait_state(n, lambda _d, n=n: c.running_on(n, 2) is not None, 60, "v2")
        wait_for(lambda: c.markers("alpha").get("beta", (0, 0))[0] == 2, 30, what="beta's v2 marker on alpha")
        copied = live(c.dump("beta"), "users_v2")
        assert len(copied) == N

        cfg = str(c.instances["alpha"].config)
        dry = cli("prune", "-c", cfg, "--below", "2", "--grace", "0s")
        assert dry.returncode == 0, dry.stderr
        assert f"DBI users (LMDB main, replaced by 0002_users_v2): {N} live entries" in dry.stdout

        # I4: the daemon holds the LMDB; writing the tombstones is refused while it runs, nothing deleted.
        refused = cli("prune", "-c", cfg, "--below", "2", "--grace", "0s", "--yes")
        assert refused.returncode == ExitCode.LOCKED, refused.stderr
        assert "stop it" in refused.stderr and "nothing was deleted" in refused.stderr
        assert len(c.snapshot_names(1)) > 0

        c.stop("alpha")
        done = cli("prune", "-c", cfg, "--below", "2", "--grace", "0s", "--yes")
        assert done.returncode == 0, done.stderr
        assert f"{N} tombstoned" in done.stdout
        assert c.snapshot_names(1) == []
        c.start("alpha")

        def retired_everywhere() -> bool:
            return all(live(c.dump(n), "users") == {} for n in ("alpha", "beta"))

        wait_for(retired_everywhere, 60, what="users emptied on alpha and beta")
        for n in ("alpha", "beta"):
            d = c.dump(n, tombstones=True)
            assert len(d["users"]) == N  # tombstones, until LS's sweeper removes them
            assert live(d, "users_v2") == copied  # the new DBI untouched
        # A rerun has nothing left to retire and needs no lock (the daemon runs again).
        again = cli("prune", "-c", cfg, "--below", "2", "--grace", "0s", "--yes")
        assert again.returncode == 0, again.stderr
        assert "0 live entries" in again.stdout

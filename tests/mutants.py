"""``make mutants``: does the suite turn red when an invariant breaks?

Each mutant below is a one-line change of the shipped code that breaks one invariant (I1-I10 of
docs/architecture.md's design, the reconcile order, the prefix rule). The runner copies the working
tree (every file git tracks or would track: the package, the tests, the files the package finds beside
it) into a scratch directory, applies ONE mutant there, and runs only the tests that claim to guard it,
with the scratch copy first on ``PYTHONPATH`` (the daemon, its workers and the LS stand-in are started
by those tests and inherit it). A mutant is *caught* when those tests fail, *survived* when they pass.
Before the mutants, the same tests run on an unmutated copy: they must pass there, or "caught" would
mean nothing.

    python -m tests.mutants            # all of them (make mutants)
    python -m tests.mutants -j 2 I3 I7 # some, two at a time
    python -m tests.mutants --list

Not part of ``make test`` (it runs the guarding tests once per mutant: minutes). docs/testing.md has the
rules for adding one.

MAINTAINING THE LIST: ``search`` must occur exactly once in ``file``. When a refactor moves or rewrites
the line, the runner reports the mutant as an ERROR (never skips it): update ``search``/``replace`` to
break the same rule in the new code, and keep ``tests`` naming the tests that guard it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANT_TIMEOUT_S = 1200.0


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    rule: str  # the invariant or rule it breaks, in words
    file: str  # relative to the repository root
    search: str  # occurs exactly once in ``file``
    replace: str
    tests: tuple[str, ...]  # pytest node ids that must turn red


# ---------------------------------------------------------------------------------------------------
# THE MUTANTS (update ``search`` after a refactor; see the module docstring)

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "I1-readers-ignored",
        "I1: the shell's proof that LS is gone ignores the LMDB reader table",
        "lssupervisor/daemon/lsprocess.py",
        "        for entry in readers.lmdbs:",
        "        for entry in ():",
        ("tests/test_reconcile_e2e.py::test_an_ls_among_the_lmdb_readers_keeps_the_migration_off_the_lmdb",),
    ),
    Mutant(
        "I1-survivors-ignored",
        "I1: the core migrates although LS processes survived the stop",
        "lssupervisor/core/cycle.py",
        "        if ev.remaining:",
        "        if False:",
        ("tests/test_reconcile.py::test_ls_not_proven_gone_parks_without_touching_the_lmdb",),
    ),
    Mutant(
        "I2-resume-renders-target",
        "I2: after a failed step, `resume` renders the target instead of the version the markers have",
        "lssupervisor/core/cycle.py",
        '                    st, version, f"migration failed; resuming on version {version}", now, acts',
        '                    st, cycle.target, f"migration failed; resuming on version {version}", now, acts',
        (
            "tests/test_reconcile.py::test_failed_step_with_on_failure_resume_renders_for_step_k_never_the_target",
            "tests/test_reconcile_e2e.py::test_on_failure_resume_restarts_ls_on_the_old_version",
        ),
    ),
    Mutant(
        "I3-marker-in-second-txn",
        "I3: a step commits its data, then writes its marker in a second transaction",
        "lssupervisor/worker/migrator.py",
        "            marker = write_marker(",
        "            txn.commit(); txn = env.begin(write=True); marker = write_marker(",
        ("tests/test_worker.py::test_each_step_commits_its_data_and_its_marker_in_one_transaction",),
    ),
    Mutant(
        "I4-no-lock",
        "I4: the state-dir and LMDB locks are never taken",
        "lssupervisor/daemon/lock.py",
        "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "        pass",
        (
            "tests/test_lock.py::test_acquire_writes_the_holder_and_refuses_a_second_taker",
            "tests/test_lock.py::test_same_lmdb_with_another_state_dir_collides",
            "tests/test_supervisor_e2e.py::test_second_supervisor_is_refused_naming_the_holder",
        ),
    ),
    Mutant(
        "I5-restart-is-a-failure",
        "I5: an intended restart (config changed) counts as a failure for the restart policy",
        "lssupervisor/core/lifecycle.py",
        "        if stopping.purpose is StopPurpose.FAILED_START:",
        "        if stopping.purpose in (StopPurpose.FAILED_START, StopPurpose.RESTART):",
        (
            "tests/test_lifecycle.py::test_hup_with_changed_config_restarts_once",
            "tests/test_supervisor_e2e.py::test_hup_with_a_changed_template_restarts_ls_once",
        ),
    ),
    Mutant(
        "I6-no-pdeathsig",
        "I6: LS is started without the parent-death signal (setpriv)",
        "lssupervisor/daemon/child.py",
        "        if wrapper is not None:",
        "        if False:",
        (
            "tests/test_child.py::test_kill9_of_supervisor_kills_ls",
            "tests/test_supervisor_e2e.py::test_kill9_of_the_supervisor_takes_ls_down",
        ),
    ),
    Mutant(
        "I7-backup-unverified",
        "I7: the backup is not verified before the first write",
        "lssupervisor/worker/backup.py",
        "            check_copy(dest, spec, expected, versions[spec.name], read_marker)",
        "            pass",
        ("tests/test_backup.py::test_a_copy_that_fails_its_check_blocks_the_first_write",),
    ),
    Mutant(
        "I7-hash-not-of-the-copy",
        "I7: a copy rewritten behind the hasher keeps a digest of bytes it no longer holds",
        "lssupervisor/worker/backup.py",
        "            if follower.size != os.fstat(fd).st_size or head != follower.head:",
        "            if False:",
        ("tests/test_backup.py::test_a_copy_changed_behind_its_hash_is_refused",),
    ),
    Mutant(
        "I8-loose-modes-trusted",
        "I8: an input writable by group or others (config, template, migrations, hooks) is trusted",
        "lssupervisor/trust.py",
        "    writable = mode & 0o022",
        "    writable = 0",
        (
            "tests/test_trust.py::test_row1_config_owned_by_nobody_and_0666_is_two_errors_with_their_fixes",
            "tests/test_trust.py::test_row4_each_loose_input_is_reported_with_the_path_that_fails",
        ),
    ),
    Mutant(
        "I9-restore-points-rotated",
        "I9: retention deletes the newest backup of a version the LMDB was at (the restore point)",
        "lssupervisor/worker/backupdir.py",
        "    deletable = [b for b in backups if b.id not in protect and b.id not in points]",
        "    deletable = [b for b in backups if b.id not in protect]",
        (
            "tests/test_restore_points.py::test_retention_keeps_the_newest_backup_of_each_version",
            "tests/test_restore_points.py::test_row5_retries_of_a_failing_step_keep_the_restore_point_of_every_version",
        ),
    ),
    Mutant(
        "I10-import-without-limit",
        "I10: importing the migrations has no time limit (a hanging import keeps the cycle forever)",
        "lssupervisor/core/cycle.py",
        '            return self._limit(st, now, self.cycle.import_timeout, "migrations.import_timeout")',
        "            return st",
        (
            "tests/test_reconcile.py::test_an_import_over_its_time_limit_is_cancelled_and_ls_keeps_running",
            "tests/test_reconcile_e2e.py::test_an_import_that_hangs_is_cut_off_and_ls_keeps_running",
        ),
    ),
    Mutant(
        "order-no-proof-after-drain",
        "reconcile order: the migration starts right after the drain, without proving the drain LS gone",
        "lssupervisor/core/cycle.py",
        "            return self._prove(replace(st, cycle=replace(cycle, drained=True)), now, acts)",
        "            return self._hooks("
        'replace(st, cycle=replace(cycle, drained=True)), "pre", 0, now, acts)',
        (
            "tests/test_reconcile.py::test_drain_runs_on_the_old_version_and_ls_is_proven_gone_again",
            "tests/test_reconcile_e2e.py::test_drain_and_hooks_run_in_order_with_ls_stopped",
        ),
    ),
    Mutant(
        "order-no-verify",
        "reconcile order: post hooks and rendering follow the migration without reading the markers back",
        "lssupervisor/core/cycle.py",
        '"shutdown after the migration", now, acts)\n        return self._verify(st, now, acts)\n',
        '"shutdown after the migration", now, acts)\n        return self._hooks(st, "post", 0, now, acts)\n',
        ("tests/test_reconcile.py::test_full_cycle_from_running_follows_the_substep_sequence",),
    ),
    Mutant(
        "prefix-rule-off",
        "prefix rule: a prefix migration is accepted on a storage location without the version variable",
        "lssupervisor/lsconfig/render.py",
        "    if a.storage_location == b.storage_location:",
        "    if False:",
        (
            "tests/test_lsconfig.py::test_prefix_safety_refuses",
            "tests/test_check.py::test_check_refuses_prefix_migrations_on_an_unversioned_location",
        ),
    ),
    Mutant(
        "standin-knobs-everywhere",
        "harness: the stand-in's crash/ignore knobs also act on the daemon's `LS -c` validation run",
        "lssupervisor/testing/standin/cli.py",
        "    knobs = args.command in KNOB_COMMANDS",
        "    knobs = True",
        ("tests/test_standin.py::test_knobs_leave_runs_other_than_sync_alone",),
    ),
)


# ---------------------------------------------------------------------------------------------------
# The runner


@dataclass(frozen=True, slots=True)
class Outcome:
    mutant: Mutant
    verdict: str  # caught | SURVIVED | ERROR
    seconds: float
    detail: str = ""


def tree_files() -> list[str]:
    """The working tree's files, as git sees them (tracked, or untracked and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    )
    return [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def scratch_copy(prefix: str) -> Path:
    """A copy of the working tree (uncommitted edits included) in a new temporary directory."""
    root = Path(tempfile.mkdtemp(prefix=f"lssupervisor-{prefix}-"))
    for name in tree_files():
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest)
    return root


def apply(root: Path, m: Mutant) -> str | None:
    """Apply ``m`` in the copy at ``root``; the reason it cannot be applied, or None."""
    path = root / m.file
    try:
        text = path.read_text()
    except OSError as exc:
        return f"{m.file}: cannot read ({exc.strerror}); update the mutant list in tests/mutants.py"
    count = text.count(m.search)
    if count != 1:
        return (
            f"{m.file}: the search string occurs {count} times, expected exactly once: {m.search.strip()!r}; "
            "update the mutant list in tests/mutants.py"
        )
    path.write_text(text.replace(m.search, m.replace))
    return None


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    return env


def code_under_test(root: Path) -> str | None:
    """Why the copy at ``root`` would not be the code the tests import, or None."""
    probe = subprocess.run(
        [sys.executable, "-c", "import lssupervisor; print(lssupervisor.__file__)"],
        capture_output=True, text=True, cwd=root, env=environment(root), timeout=60, check=False,
    )
    where = probe.stdout.strip()
    if not where.startswith(str(root)):
        return f"the tests would import lssupervisor from {where or probe.stderr.strip()}, not from {root}"
    return None


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist", *tests]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=root, env=environment(root),
            timeout=MUTANT_TIMEOUT_S, check=False,
        )
    except subprocess.TimeoutExpired:
        return -1, f"pytest did not finish within {MUTANT_TIMEOUT_S:g}s"
    return done.returncode, done.stdout + done.stderr


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def run_mutant(m: Mutant, keep: bool) -> Outcome:
    started = time.monotonic()
    root = scratch_copy(m.name)
    try:
        problem = apply(root, m)
        if problem is not None:
            return Outcome(m, "ERROR", time.monotonic() - started, problem)
        code, output = run_tests(root, m.tests)
        seconds = time.monotonic() - started
        if code == 1:
            return Outcome(m, "caught", seconds)
        if code == 0:
            return Outcome(m, "SURVIVED", seconds, "the guarding tests passed with the mutant in place")
        return Outcome(m, "ERROR", seconds, f"pytest exited {code} (not a test failure)\n{tail(output)}")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def baseline(mutants: list[Mutant]) -> str | None:
    """Why the guarding tests cannot judge the mutants (they fail on the real code), or None."""
    root = scratch_copy("baseline")
    try:
        problem = code_under_test(root)
        if problem is not None:
            return problem
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, output = run_tests(root, tests)
        if code != 0:
            return f"the guarding tests fail on the unmutated code (pytest exit {code}):\n{tail(output, 30)}"
        return None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (names or prefixes, e.g. I3); default all")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (printed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on unmutated code")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(m.name.startswith(n) for n in args.names)]
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32} {m.rule}\n{'':32} {m.file}: {m.search.strip()!r} -> {m.replace.strip()!r}")
        return 0
    if not chosen:
        print(f"no mutant matches {args.names}", file=sys.stderr)
        return 2
    if not args.no_baseline:
        print(f"baseline: the guarding tests of {len(chosen)} mutant(s), unmutated ...", flush=True)
        problem = baseline(chosen)
        if problem is not None:
            print(f"baseline: ERROR: {problem}", file=sys.stderr)
            return 2
    outcomes: list[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(lambda m: run_mutant(m, args.keep), chosen):
            outcomes.append(outcome)
            m = outcome.mutant
            print(f"{outcome.verdict:9} {m.name:32} {outcome.seconds:6.1f}s  {m.rule}", flush=True)
            if outcome.detail:
                print(f"          {outcome.detail}", flush=True)
    caught = sum(o.verdict == "caught" for o in outcomes)
    errors = sum(o.verdict == "ERROR" for o in outcomes)
    print(f"mutants: {caught}/{len(outcomes)} caught" + (f", {errors} error(s)" if errors else ""))
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""child.py against real processes: spawn, group signalling, pdeathsig, orphans, output.

The LS under test is the Lightning Stream stand-in (``python -m lssupervisor.testing.standin``: no
signal handler, knobs LSSTANDIN_IGNORE_SIGTERM / LSSTANDIN_REEXEC / LSSTANDIN_CRASH_AFTER_MS). Tests
about command-line matching use a plain sleeper script (many at once, no LMDB). Every test reaps what
it starts; orphans (reparented away from us, so invisible to conftest's leak check) are killed by the
``orphans`` fixture.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from lssupervisor.config import OutputMode
from lssupervisor.daemon import child as childmod
from lssupervisor.daemon.child import (
    ChildRecord,
    LsChild,
    config_from_cmdline,
    describe_exit,
    find_orphans,
    prove_gone,
    spawn_ls,
    stop_ls,
    sweep_orphans,
)
from lssupervisor.errors import ConfigError
from tests.harness import wait_for

REPO = Path(__file__).resolve().parent.parent

STANDIN = [sys.executable, "-m", "lssupervisor.testing.standin"]
READY = "All syncers running"  # logged by the stand-in (after its signal knobs) once syncing

# A sleeper for command-line matching tests: TERM kills it; honours the stand-in's two process knobs.
FAKE_LS = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    if os.environ.get("LSSTANDIN_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("LSSTANDIN_REEXEC") == "1" and os.environ.get("FAKE_LS_REEXECED") != "1":
        env = dict(os.environ, FAKE_LS_REEXECED="1")
        proc = subprocess.Popen([sys.executable, *sys.argv], env=env)
        sys.exit(proc.wait())
    print("fake-ls stdout line", flush=True)
    print(f"fake-ls ready pid={os.getpid()}", file=sys.stderr, flush=True)
    while True:
        signal.pause()
    """
)


def write_ls_config(tmp_path: Path, http: str = "") -> Path:
    """An LS config the stand-in accepts: one native LMDB, fs storage, fast polling."""
    path = tmp_path / "lightningstream.yaml"
    text = (
        "instance: test\n"
        "lmdbs:\n"
        "  main:\n"
        f"    path: {tmp_path / 'lmdb'}\n"
        "    options: {create: true, map_size: 16MB}\n"
        "    schema_tracks_changes: true\n"
        "storage:\n"
        "  type: fs\n"
        "  options:\n"
        f"    root_path: {tmp_path / 'store'}\n"
        "lmdb_poll_interval: 100ms\n"
        "storage_poll_interval: 100ms\n"
    )
    if http:
        text += f"http:\n  address: {http}\n"
    path.write_text(text)
    return path


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    return write_ls_config(tmp_path)


@pytest.fixture
def fake_ls(tmp_path: Path) -> Path:
    script = tmp_path / "fake_ls.py"
    script.write_text(FAKE_LS)
    return script


def ls_argv(rendered: Path) -> list[str]:
    return [*STANDIN, "--config", str(rendered), "sync"]


def fake_argv(fake_ls: Path, rendered: Path) -> list[str]:
    return [sys.executable, str(fake_ls), "--config", str(rendered), "sync"]


def ls_env(**knobs: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSSTANDIN_")}
    env.update(knobs)
    return env


class Lines:
    """Collects PREFIX output lines (called from the reader thread; list.append is atomic)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def has(self, fragment: str) -> bool:
        return any(fragment in line for line in self.lines)


@pytest.fixture
def children() -> Iterator[list[LsChild]]:
    """Children started by a test; any still alive at the end are killed and reaped."""
    started: list[LsChild] = []
    yield started
    for c in started:
        if c.poll() is None or c.group_alive():
            c.kill_group()
            c.wait(30)
        assert c.join_output(5)


def start(
    children: list[LsChild], argv: list[str], env: dict[str, str], lines: Lines | None = None, **kw: object
) -> LsChild:
    c = spawn_ls(
        argv,
        env,
        output=OutputMode.PREFIX if lines is not None else OutputMode.INHERIT,
        cwd=None,
        on_line=lines,
        **kw,  # type: ignore[arg-type]
    )
    children.append(c)
    return c


def _exec_done(pid: int, argv: list[str]) -> bool:
    try:
        return psutil.Process(pid).cmdline() == argv
    except psutil.Error:
        return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def orphans() -> Iterator[Callable[..., psutil.Process]]:
    """Start a process that is NOT our child (double fork, new session), like an LS left behind by
    an earlier supervisor run. Killed at the end if a test left it alive."""
    made: list[psutil.Process] = []

    def make(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> psutil.Process:
        launcher = (
            "import subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], start_new_session=True, stdin=subprocess.DEVNULL,\n"
            "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", launcher, *argv],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        proc = psutil.Process(int(out.stdout.strip()))
        made.append(proc)
        return proc

    yield make
    for proc in made:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                os.killpg(proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass


# ------------------------------------------------------------------------------------------------
# Spawn, poll, stop


def test_spawn_and_poll(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    c = start(children, ls_argv(rendered), ls_env(), lines)
    wait_for(lambda: lines.has(READY), what="LS to log ready")
    assert c.poll() is None
    assert c.returncode is None
    assert c.pgid == c.pid == os.getpgid(c.pid) == os.getsid(c.pid)
    assert c.group_pids() == [c.pid]
    assert c.group_alive()
    assert abs(c.create_time - psutil.Process(c.pid).create_time()) < 0.01
    assert c.started_at <= time.monotonic()
    assert c.record() == ChildRecord(c.pid, c.create_time, c.pid)
    # setpriv execs LS in place: the pid we hold is LS itself, and LS's argv is ours.
    assert psutil.Process(c.pid).cmdline()[1:] == ls_argv(rendered)[1:]
    assert psutil.Process(c.pid).ppid() == os.getpid()
    result = stop_ls(c, timeout=5)
    assert result.returncode == -signal.SIGTERM
    assert c.poll() == -15


def test_sigterm_to_group(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    c = start(children, ls_argv(rendered), ls_env(), lines)
    wait_for(lambda: lines.has(READY), what="LS to log ready")
    assert c.terminate_group()
    assert c.wait(30) == -15
    wait_for(lambda: not c.group_alive(), what="group gone")
    assert c.join_output(5)
    assert describe_exit(c.wait()) == "terminated by SIGTERM"
    # The group is empty and the leader reaped: signalling again is a no-op, never a stranger.
    assert c.terminate_group() is False
    assert c.kill_group() is False


def test_stop_ls_clean(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    c = start(children, ls_argv(rendered), ls_env(), lines)
    wait_for(lambda: lines.has(READY), what="LS to log ready")
    result = stop_ls(c, timeout=5)
    assert result.returncode == -15
    assert not result.killed
    assert result.description == "terminated by SIGTERM"
    assert not c.group_alive()
    assert prove_gone(c, rendered) == []


def test_ignoring_term_is_killed_at_timeout(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    c = start(children, ls_argv(rendered), ls_env(LSSTANDIN_IGNORE_SIGTERM="1"), lines)
    wait_for(lambda: lines.has(READY), what="LS to log ready (TERM ignored by then)")
    result = stop_ls(c, timeout=0.5)
    assert result.killed
    assert result.returncode == -signal.SIGKILL
    assert result.description == "killed by SIGKILL"
    assert result.elapsed >= 0.5  # stop_ls's own clock: SIGKILL no earlier than the timeout
    assert not c.group_alive()


def test_reexec_grandchild_is_gone_after_stop(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    c = start(children, ls_argv(rendered), ls_env(LSSTANDIN_REEXEC="1"), lines)
    wait_for(lambda: lines.has(READY), what="re-exec'd LS to log ready")
    members = wait_for(lambda: _members_if(c.pgid, 2), what="2 group members")
    grandchild = next(pid for pid in members if pid != c.pid)
    assert psutil.Process(grandchild).ppid() == c.pid
    # Signalling only the parent (what a naive supervisor does) orphans the real LS...
    os.kill(c.pid, signal.SIGTERM)
    assert c.wait(30) == -15
    assert _alive(grandchild)
    assert c.group_alive()
    assert c.group_pids() == [grandchild]
    # ...which stays in the group, so a group stop still ends it.
    result = stop_ls(c, timeout=5)
    assert not result.killed
    assert not _alive(grandchild)
    assert not c.group_alive()
    assert c.join_output(5)  # the grandchild held the pipe open; now it is closed


def test_reexec_ignoring_term_is_killed(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    env = ls_env(LSSTANDIN_REEXEC="1", LSSTANDIN_IGNORE_SIGTERM="1")
    c = start(children, ls_argv(rendered), env, lines)
    wait_for(lambda: lines.has(READY), what="re-exec'd LS to log ready")
    result = stop_ls(c, timeout=0.3)
    assert result.killed
    assert not c.group_alive()
    assert prove_gone(c, rendered) == []


def test_child_exit_is_seen_by_poll(children: list[LsChild], tmp_path: Path, rendered: Path) -> None:
    script = tmp_path / "exit3.py"
    script.write_text("import sys; print('bad config', file=sys.stderr); sys.exit(3)\n")
    lines = Lines()
    c = start(children, [sys.executable, str(script), "--config", str(rendered)], ls_env(), lines)
    rc = wait_for(c.poll, what="child exit")
    assert rc == 3
    assert describe_exit(rc) == "exited with status 3"
    assert c.join_output(5)
    assert lines.lines == ["bad config"]


def test_crash_is_seen_by_poll(children: list[LsChild], rendered: Path) -> None:
    lines = Lines()
    c = start(children, ls_argv(rendered), ls_env(LSSTANDIN_CRASH_AFTER_MS="50"), lines)
    rc = wait_for(c.poll, what="stand-in crash")
    assert rc == 2  # Go's panic status
    assert describe_exit(rc) == "exited with status 2"
    assert c.join_output(5)
    assert lines.has("panic: ")
    assert not c.group_alive()
    assert prove_gone(c, rendered) == []
    # Stopping what already ended is a no-op that reports how it ended.
    result = stop_ls(c, timeout=5)
    assert (result.returncode, result.killed) == (2, False)


def test_pdeathsig_spawn_refused_off_the_main_thread(rendered: Path) -> None:
    errors: list[BaseException] = []

    def spawn() -> None:
        try:
            spawn_ls(ls_argv(rendered), ls_env(), output=OutputMode.INHERIT, cwd=None, on_line=None)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=spawn)
    t.start()
    t.join(10)
    assert [str(e) for e in errors] == ["spawn_ls with pdeathsig must be called from the main thread"]


# ------------------------------------------------------------------------------------------------
# Output


def test_prefix_output_reaches_on_line_and_thread_ends(
    children: list[LsChild], tmp_path: Path, rendered: Path
) -> None:
    script = tmp_path / "chatty.py"
    script.write_text(
        "import sys\n"
        "print('to stdout', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "sys.stdout.buffer.write(b'bad utf8 \\xff\\r\\n'); sys.stdout.flush()\n"
        "print('x' * 100000, flush=True)\n"
        "print('last', flush=True)\n"
    )
    lines = Lines()
    c = start(children, [sys.executable, str(script)], ls_env(), lines)
    assert c.wait(10) == 0
    assert c.join_output(5)
    assert lines.lines[:3] == ["to stdout", "to stderr", "bad utf8 \ufffd"]
    assert "".join(lines.lines[3:-1]) == "x" * 100000  # split at MAX_LINE_BYTES, nothing lost
    assert len(lines.lines[3]) == childmod.MAX_LINE_BYTES
    assert lines.lines[-1] == "last"


def test_failing_on_line_does_not_stop_draining(children: list[LsChild], tmp_path: Path) -> None:
    script = tmp_path / "many.py"
    script.write_text("for i in range(2000):\n    print(f'line {i}', flush=True)\n")
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "line 5":
            raise RuntimeError("callback bug")

    c = spawn_ls(
        [sys.executable, str(script)], ls_env(), output=OutputMode.PREFIX, cwd=tmp_path, on_line=on_line
    )
    children.append(c)
    assert c.wait(10) == 0
    assert c.join_output(5)
    assert len(seen) == 2000


def test_inherit_output_has_no_reader(children: list[LsChild], rendered: Path) -> None:
    c = start(children, ls_argv(rendered), ls_env())
    assert c.join_output(0)
    wait_for(lambda: psutil.Process(c.pid).cmdline()[:1] == [sys.executable], what="exec of LS")
    assert not stop_ls(c, timeout=5).killed


# ------------------------------------------------------------------------------------------------
# Spawn errors and options


def test_missing_binary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lightningstream\.binary.*no-such-ls"):
        spawn_ls(
            ["no-such-ls", "--config", "x", "sync"],
            ls_env(),
            output=OutputMode.INHERIT,
            cwd=None,
            on_line=None,
        )
    missing = tmp_path / "absent" / "lightningstream"
    with pytest.raises(ConfigError, match=r"lightningstream\.binary"):
        spawn_ls([str(missing)], ls_env(), output=OutputMode.INHERIT, cwd=None, on_line=None)


def test_non_executable_binary_is_a_config_error(tmp_path: Path) -> None:
    binary = tmp_path / "lightningstream"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o644)
    with pytest.raises(ConfigError, match=str(binary)):
        spawn_ls([str(binary), "sync"], ls_env(), output=OutputMode.INHERIT, cwd=None, on_line=None)


def test_binary_resolved_through_env_path(children: list[LsChild], tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    binary = bindir / "lightningstream"
    binary.write_text(f"#!{sys.executable}\nimport sys; sys.exit(7)\n")
    binary.chmod(0o755)
    env = ls_env()
    env["PATH"] = f"{bindir}:{env.get('PATH', os.defpath)}"
    c = start(children, ["lightningstream", "sync"], env)
    assert c.wait(10) == 7


def test_min_pid_raises_the_child_pid(children: list[LsChild], rendered: Path) -> None:
    floor = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 50
    if floor >= int(Path("/proc/sys/kernel/pid_max").read_text()):
        pytest.skip("pid counter too close to pid_max")
    c = start(children, ls_argv(rendered), ls_env(), min_pid=floor)
    assert c.pid >= floor
    stop_ls(c, timeout=5)


def test_without_setpriv_warns_once_and_spawns(
    children: list[LsChild],
    rendered: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    childmod.setpriv_path.cache_clear()
    monkeypatch.setattr("shutil.which", lambda name, path=None: None if name == "setpriv" else sys.executable)
    try:
        for _ in range(2):
            c = start(children, ls_argv(rendered), ls_env())
            assert c.argv[0] == sys.executable
            stop_ls(c, timeout=5)
    finally:
        childmod.setpriv_path.cache_clear()
    assert sum("setpriv (util-linux) not found" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------
# I6: LS dies with a SIGKILLed supervisor


SUPERVISOR_LIKE = textwrap.dedent(
    """
    import os, signal, sys
    from lssupervisor.daemon.child import spawn_ls
    from lssupervisor.config import OutputMode
    pdeathsig = sys.argv[1] == "1"
    c = spawn_ls(sys.argv[2:], dict(os.environ), pdeathsig=pdeathsig, output=OutputMode.INHERIT,
                 cwd=None, on_line=None)
    print(c.pid, flush=True)
    signal.pause()
    """
)


def _run_supervisor_like(
    tmp_path: Path, argv: list[str], pdeathsig: bool
) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "supervisor_like.py"
    script.write_text(SUPERVISOR_LIKE)
    env = ls_env(PYTHONPATH=str(REPO))
    parent = subprocess.Popen(
        [sys.executable, str(script), "1" if pdeathsig else "0", *argv],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    ls_pid = int(parent.stdout.readline())
    parent.stdout.close()
    return parent, ls_pid


def test_kill9_of_supervisor_kills_ls(tmp_path: Path, rendered: Path) -> None:
    parent, ls_pid = _run_supervisor_like(tmp_path, ls_argv(rendered), pdeathsig=True)
    try:
        # setpriv's own argv names the config too; only once LS's argv shows has setpriv set the
        # parent-death signal and exec'd (dying before that is the documented race the sweep covers).
        wait_for(lambda: _exec_done(ls_pid, ls_argv(rendered)), what="setpriv to exec LS")
        parent.kill()
        parent.wait(30)
        wait_for(lambda: not _alive(ls_pid), what="LS to die with its supervisor")
    finally:
        if _alive(ls_pid):
            os.killpg(ls_pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)


def test_without_pdeathsig_ls_outlives_a_killed_supervisor(tmp_path: Path, rendered: Path) -> None:
    # The control for the test above: the wrapper is what makes LS die, and the sweep finds the orphan.
    parent, ls_pid = _run_supervisor_like(tmp_path, ls_argv(rendered), pdeathsig=False)
    try:
        wait_for(lambda: _alive(ls_pid), what="LS started")
        record = ChildRecord(ls_pid, psutil.Process(ls_pid).create_time(), ls_pid)
        parent.kill()
        parent.wait(30)
        wait_for(lambda: psutil.Process(ls_pid).ppid() != parent.pid, what="LS reparented")
        assert _alive(ls_pid)
        assert [p.pid for p in find_orphans(rendered, record)] == [ls_pid]
        assert sweep_orphans(rendered, record, timeout=5) == [ls_pid]
        assert not _alive(ls_pid)
    finally:
        if _alive(ls_pid):
            os.killpg(ls_pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# Orphans


def test_find_orphans_by_cmdline_forms(
    orphans: Callable[..., psutil.Process], fake_ls: Path, rendered: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("instance: other\n")
    base = fake_argv(fake_ls, rendered)[:2]
    matching = [
        orphans([*base, "--config", str(rendered), "sync"]),
        orphans([*base, f"--config={rendered}", "sync"]),
        orphans([*base, "-c", str(rendered), "sync"]),
        orphans([*base, f"-c{rendered}", "sync"]),
        orphans([*base, "-c", rendered.name, "sync"], cwd=tmp_path),  # relative to its cwd
        # An exec wrapper's argv, as seen before it execs: "wrapper ... -- ls -c X".
        orphans([sys.executable, "-c", "import signal; signal.pause()", "--", "ls", "-c", str(rendered)]),
    ]
    unrelated = [
        orphans([*base, "--config", str(other), "sync"]),  # another config: another supervisor's LS
        orphans([*base, "--config", str(rendered) + ".new", "sync"]),
        orphans([*base, str(rendered)]),  # names the file, but not as the config
    ]
    # Popen in the launcher returned after exec, so every command line is final already.
    found = {p.pid for p in find_orphans(rendered, None)}
    assert found == {p.pid for p in matching}
    ended = sweep_orphans(rendered, None, timeout=5)
    assert sorted(ended) == sorted(p.pid for p in matching)
    assert not any(_alive(p.pid) for p in matching)
    assert all(_alive(p.pid) for p in unrelated)  # never touched
    assert prove_gone(None, rendered) == []


def test_find_orphans_by_record(orphans: Callable[..., psutil.Process], rendered: Path) -> None:
    # A recorded LS whose command line does not name our config (e.g. the rendered path moved).
    proc = orphans([sys.executable, "-c", "import signal; signal.pause()"])
    record = ChildRecord(proc.pid, proc.create_time(), proc.pid)
    assert [p.pid for p in find_orphans(rendered, record)] == [proc.pid]
    # A record whose pid now belongs to another process (create_time differs) names nothing.
    stale = ChildRecord(proc.pid, proc.create_time() - 100, proc.pid)
    assert find_orphans(rendered, stale) == []
    assert sweep_orphans(rendered, stale) == []
    assert _alive(proc.pid)
    assert sweep_orphans(rendered, record, timeout=5) == [proc.pid]
    assert not _alive(proc.pid)


def _members_if(pgid: int, n: int) -> list[int]:
    members = childmod._group_members(pgid)
    return members if len(members) == n else []


def test_sweep_kills_term_ignoring_orphan_and_its_group(
    orphans: Callable[..., psutil.Process], rendered: Path, tmp_path: Path
) -> None:
    record_file = tmp_path / "starts.jsonl"
    env = ls_env(LSSTANDIN_IGNORE_SIGTERM="1", LSSTANDIN_REEXEC="1", LSSTANDIN_RECORD=str(record_file))
    leader = orphans(ls_argv(rendered), env=env)
    members = wait_for(lambda: _members_if(leader.pid, 2), what="re-exec'd grandchild")
    # The stand-in records its start after installing SIG_IGN: two lines = both ignore TERM now.
    wait_for(
        lambda: record_file.exists() and len(record_file.read_text().splitlines()) == 2,
        what="both processes to record their start",
    )
    t0 = time.monotonic()
    ended = sweep_orphans(rendered, None, timeout=0.3)
    assert sorted(ended) == sorted(members)
    # A lower bound only (it cannot fail on a slow machine): the TERM-ignoring group got its timeout.
    assert time.monotonic() - t0 >= 0.3
    assert not any(_alive(p) for p in members)
    assert prove_gone(ChildRecord(leader.pid, leader.create_time(), leader.pid), rendered) == []


def test_own_child_is_not_an_orphan_but_is_not_gone(children: list[LsChild], rendered: Path) -> None:
    c = start(children, ls_argv(rendered), ls_env())
    wait_for(lambda: _exec_done(c.pid, ls_argv(rendered)), what="setpriv to exec LS")
    assert find_orphans(rendered, c.record()) == []
    assert sweep_orphans(rendered, c.record()) == []
    assert c.poll() is None
    assert prove_gone(c, rendered) == [c.pid]
    assert prove_gone(c.record(), rendered) == [c.pid]
    assert prove_gone(None, rendered) == [c.pid]  # by cmdline
    stop_ls(c, timeout=5)
    assert prove_gone(c, rendered) == []
    assert prove_gone(c.record(), rendered) == []


def test_prove_gone_extra_pids(children: list[LsChild], tmp_path: Path, rendered: Path) -> None:
    # A process that holds the LMDB open but neither is in the group nor names the config.
    c = start(children, [sys.executable, "-c", "import signal; signal.pause()"], ls_env())
    assert prove_gone(None, rendered, extra_pids=[c.pid, 999_999_999]) == [c.pid]
    stop_ls(c, timeout=5)
    assert prove_gone(None, rendered, extra_pids=[c.pid]) == []


# ------------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (0, "exited with status 0"),
        (1, "exited with status 1"),
        (75, "exited with status 75"),
        (-15, "terminated by SIGTERM"),
        (-9, "killed by SIGKILL"),
        (-2, "terminated by SIGINT"),
        (-1, "terminated by SIGHUP"),
        (-11, "terminated by SIGSEGV"),
        (-99, "terminated by signal 99"),
    ],
)
def test_describe_exit(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text


@pytest.mark.parametrize(
    ("cmdline", "configs"),
    [
        (["ls", "--config", "a.yaml", "sync"], ["a.yaml"]),
        (["ls", "--config=a.yaml", "sync"], ["a.yaml"]),
        (["ls", "-c", "a.yaml"], ["a.yaml"]),
        (["ls", "-ca.yaml"], ["a.yaml"]),
        (["ls", "-c=a.yaml"], ["a.yaml"]),
        (["ls", "sync", "--config"], []),
        (["ls", "--configure", "x"], []),
        (["ls", "--", "-c", "a.yaml"], []),  # positional after "--" (the wrapper case is handled apart)
        (["ls", "a.yaml"], []),
    ],
)
def test_config_from_cmdline(cmdline: list[str], configs: list[str]) -> None:
    assert config_from_cmdline(cmdline) == configs


def test_child_record_json_roundtrip() -> None:
    record = ChildRecord(pid=123, create_time=1700000000.25, pgid=123)
    assert ChildRecord.from_json(record.to_json()) == record
    assert ChildRecord.from_json({"pid": 5, "create_time": 17, "pgid": 5}).create_time == 17.0


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"pid": 1, "create_time": 1.0},
        {"pid": "1", "create_time": 1.0, "pgid": 1},
        {"pid": 0, "create_time": 1.0, "pgid": 1},
        {"pid": True, "create_time": 1.0, "pgid": 1},
        {"pid": 1, "create_time": "x", "pgid": 1},
        {"pid": 1, "create_time": 1.0, "pgid": -4},
    ],
)
def test_child_record_rejects_bad_json(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="child record"):
        ChildRecord.from_json(data)


def test_ls_lines_are_logged_the_same_with_and_without_last_line(caplog: pytest.LogCaptureFixture) -> None:
    """``output: prefix`` logs LS's lines through one function, whether the supervisor keeps the last
    line (LastLine) or the reader logs them directly."""
    from lssupervisor.daemon.lsprocess import LastLine

    caplog.set_level("INFO", logger="lssupervisor.lightningstream")
    childmod.log_ls_line('time="x" level=fatal msg=boom')
    last = LastLine()
    last('time="x" level=fatal msg=boom')
    a, b = caplog.records
    assert (a.name, a.getMessage()) == (b.name, b.getMessage())
    assert a.getMessage() == 'lightningstream: time="x" level=fatal msg=boom'
    assert last.line == "level=fatal msg=boom"

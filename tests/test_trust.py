"""I8, trusted inputs: only files that root or our user could have written decide what runs.

Rows 1, 2 and 4 of issue 13, reproduced and refused: an untrusted config, template, target file,
migration (file or directory, or any parent), hook executable or symlink on the way is reported by
``check`` (path, owner, mode, the command that fixes it) and refused by ``run`` (at start and on
reload); a planted ``__pycache__`` is never executed, and a migration runs from exactly the bytes whose
sha256 history records. The Kubernetes volume layout (read-only mounts, ``..data`` symlinks, ``fsGroup``
bits) is built for real and mounted read-only in a private mount namespace.

The tests run as root in the suite and hand files to ``nobody`` with ``os.chown``; they skip (with
the reason) where this machine cannot chown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lssupervisor import trust
from lssupervisor.cli.check import Level, run_checks
from lssupervisor.config import load_config
from lssupervisor.errors import ExitCode, MigrationLoadError, UntrustedInput
from lssupervisor.worker import history
from lssupervisor.worker.migrations import discover, import_migration, load
from tests.harness.e2e import ConfigSet, Daemon, kill_recorded_ls

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="handing a file to another user (chown) needs root")


def nobody() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def give_away(path: Path) -> None:
    """Make ``path`` belong to nobody (a throwaway owner that is neither root nor us)."""
    os.lchown(path, nobody(), nobody())


MIGRATION = '''"""Step {v}."""
VERSION = {v}


def upgrade(m):
    pass
'''


def errors_of(config: Path, environ: dict[str, str] | None = None) -> list[str]:
    report = run_checks(str(config), environ if environ is not None else dict(os.environ))
    return [f.message for f in report.findings if f.level is Level.ERROR]


def warnings_of(config: Path) -> list[str]:
    report = run_checks(str(config), dict(os.environ))
    return [f.message for f in report.findings if f.level is Level.WARNING]


def config_set(root: Path, extra: str = "") -> Path:
    """A minimal valid config set (no LS binary needed: check skips LS's own validation)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "migrations").mkdir(exist_ok=True)
    (root / "migrations" / "0001_base.py").write_text(MIGRATION.format(v=1))
    (root / "lightningstream.yaml.in").write_text(
        f"instance: node-1\nlmdbs:\n  main:\n    path: {root / 'db'}\n    schema_tracks_changes: true\n"
        "storage:\n  type: fs\n  options:\n    root_path: /srv/ls/v${APP_SCHEMA_VERSION}\n"
    )
    cfg = root / "lssupervisor.yaml"
    cfg.write_text(
        f"state_dir: state\nlightningstream:\n  binary: {root / 'no-such-ls'}\n  pdeathsig: false\n{extra}"
    )
    return cfg


# ---------------------------------------------------------------------------------------------------
# The walk: owners, modes, parents, symlinks


def test_a_trusted_set_has_no_violation(tmp_path: Path) -> None:
    cfg = config_set(tmp_path / "set")
    assert errors_of(cfg) == []


@needs_root
def test_row1_config_owned_by_nobody_and_0666_is_two_errors_with_their_fixes(tmp_path: Path) -> None:
    cfg = config_set(tmp_path / "set")
    cfg.chmod(0o666)
    give_away(cfg)
    errors = [e for e in errors_of(cfg) if e.startswith("untrusted config")]
    assert errors == [
        f"untrusted config {cfg}: owned by nobody (uid {nobody()}), expected root "
        f"[owner nobody, group {trust.group_name(nobody())}, mode 0666]; fix: chown root {cfg}",
        f"untrusted config {cfg}: writable by group and others "
        f"[owner nobody, group {trust.group_name(nobody())}, mode 0666]; fix: chmod go-w {cfg}",
    ]


def test_row4_each_loose_input_is_reported_with_the_path_that_fails(tmp_path: Path) -> None:
    root = tmp_path / "set"
    hook = tmp_path / "bin" / "notify"
    hook.parent.mkdir()
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o777)
    cfg = config_set(
        root,
        extra=f"hooks:\n  pre_migrate:\n    - [{hook}]\n"
        f"  post_migrate:\n    - [{tmp_path / 'no-such-hook'}]\n",
    )
    (root / "migrations" / "0001_base.py").chmod(0o664)  # group-writable migration
    errors = errors_of(cfg)
    assert f"untrusted hooks.pre_migrate[0] {hook}: writable by group and others" in " ".join(errors)
    assert any(
        e.startswith(f"untrusted hooks.post_migrate[0] {tmp_path / 'no-such-hook'}: does not exist")
        for e in errors
    ), errors
    assert any(
        e.startswith(f"untrusted migration file {root / 'migrations' / '0001_base.py'}: writable by group ")
        and e.endswith(f"fix: chmod g-w {root / 'migrations' / '0001_base.py'}")
        for e in errors
    ), errors
    # A 0775 migrations directory, then a 0777 config directory: the parent is named, not the file.
    (root / "migrations" / "0001_base.py").chmod(0o644)
    (root / "migrations").chmod(0o775)
    assert any(
        e.startswith(f"untrusted migrations directory {root / 'migrations'}: writable by group")
        for e in errors_of(cfg)
    )
    (root / "migrations").chmod(0o755)
    root.chmod(0o777)
    errors = errors_of(cfg)
    assert any(
        e.startswith(f"untrusted config {cfg}: directory {root} on the way writable by group and others")
        and e.endswith(f"fix: chmod go-w {root}")
        for e in errors
    ), errors
    # Every input under that directory says so, each on its own line.
    assert any(
        e.startswith(f"untrusted LS template {root / 'lightningstream.yaml.in'}: directory {root}")
        for e in errors
    )


def test_a_bare_hook_name_is_looked_up_on_path_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "my-hook").write_text("#!/bin/sh\n")
    (bindir / "my-hook").chmod(0o755)
    cfg = config_set(tmp_path / "set", extra="hooks:\n  pre_migrate:\n    - [my-hook, --now]\n")
    env = {**os.environ, "PATH": str(bindir)}
    assert errors_of(cfg, env) == []
    (bindir / "my-hook").chmod(0o757)
    assert any(
        e.startswith(
            f"untrusted hooks.pre_migrate[0] my-hook: file {bindir / 'my-hook'} on the way writable by others"
        )
        for e in errors_of(cfg, env)
    )
    (bindir / "my-hook").unlink()
    assert any(
        f"untrusted hooks.pre_migrate[0] my-hook: not found on PATH ({bindir})" in e
        for e in errors_of(cfg, env)
    )


@needs_root
def test_a_hook_binary_owned_by_nobody_is_refused(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    give_away(hook)
    cfg = config_set(tmp_path / "set", extra=f"hooks:\n  post_migrate:\n    - [{hook}]\n")
    assert any(
        e.startswith(f"untrusted hooks.post_migrate[0] {hook}: owned by nobody")
        and e.endswith(f"fix: chown root {hook}")
        for e in errors_of(cfg)
    )


def test_sticky_root_owned_directory_is_passed_through_but_a_plain_world_writable_one_is_not(
    tmp_path: Path,
) -> None:
    policy = trust.Policy.current()
    shared = tmp_path / "shared"
    shared.mkdir()
    mine = shared / "mine"
    mine.mkdir()
    (mine / "f").write_text("x")
    shared.chmod(0o1777)  # like /tmp
    if os.stat(shared).st_uid == 0:
        assert trust.check_file(mine / "f", policy, "config") == []
    shared.chmod(0o777)
    assert [v.path for v in trust.check_file(mine / "f", policy, "config")] == [str(shared)]
    # The sticky exception is for directories passed through, never for the input itself.
    shared.chmod(0o1777)
    assert [v.problem for v in trust.check_file(shared, policy, "migrations directory")] == [
        "writable by group and others"
    ]


@needs_root
def test_sticky_directory_not_owned_by_root_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "mine").mkdir(parents=True)
    shared.chmod(0o1777)
    give_away(shared)
    problems = [v.problem for v in trust.check_file(shared / "mine", trust.Policy.current(), "config")]
    assert problems[0].startswith("owned by nobody") and problems[1] == "writable by group and others"


def test_symlinks_are_followed_and_their_targets_checked(tmp_path: Path) -> None:
    policy = trust.Policy.current()
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "real.yaml").write_text("x")
    tight = tmp_path / "tight"
    tight.mkdir()
    (tight / "cfg.yaml").symlink_to(loose / "real.yaml")
    assert trust.check_file(tight / "cfg.yaml", policy, "config") == []
    loose.chmod(0o775)
    found = trust.check_file(tight / "cfg.yaml", policy, "config")
    assert [(v.path, v.kind) for v in found] == [(str(loose), "directory")]
    assert found[0].line().startswith(f"untrusted config {tight / 'cfg.yaml'}: directory {loose} on the way")
    # A relative link with "..", and a dangling one (a missing input).
    loose.chmod(0o755)
    (tight / "rel.yaml").symlink_to("../loose/real.yaml")
    assert trust.walk(tight / "rel.yaml", policy, "config").resolved == str(loose / "real.yaml")
    (tight / "dangling").symlink_to(tmp_path / "nowhere")
    assert [v.problem for v in trust.check_file(tight / "dangling", policy, "config")] == ["does not exist"]


def test_a_symlink_loop_is_a_violation_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    found = trust.check_file(tmp_path / "a", trust.Policy.current(), "config")
    assert found[0].problem == "too many levels of symlinks"


@needs_root
def test_a_symlink_owned_by_nobody_is_refused_even_to_a_trusted_target(tmp_path: Path) -> None:
    (tmp_path / "real.yaml").write_text("x")
    link = tmp_path / "cfg.yaml"
    link.symlink_to(tmp_path / "real.yaml")
    give_away(link)
    (v,) = trust.check_file(link, trust.Policy.current(), "config")
    assert (v.kind, v.fix) == ("symlink", f"chown -h root {link}")


@needs_root
def test_trusted_group_is_an_explicit_opt_out_and_check_says_so(tmp_path: Path) -> None:
    root = tmp_path / "set"
    cfg = config_set(root)
    gid = 4242
    mig = root / "migrations" / "0001_base.py"
    os.chown(mig, nobody(), gid)
    mig.chmod(0o664)
    assert any(e.startswith(f"untrusted migration file {mig}: owned by nobody") for e in errors_of(cfg))
    cfg.write_text(cfg.read_text() + f"security:\n  trusted_group: '{gid}'\n")
    assert errors_of(cfg) == []
    assert any(
        f"security.trusted_group: members of group {trust.group_name(gid)} (gid {gid})" in w
        for w in warnings_of(cfg)
    )
    # Others still may not write, whatever the group.
    mig.chmod(0o666)
    assert any(e.startswith(f"untrusted migration file {mig}: writable by others") for e in errors_of(cfg))


def test_an_unknown_trusted_group_is_a_config_error(tmp_path: Path) -> None:
    cfg = config_set(tmp_path / "set", extra="security:\n  trusted_group: no-such-group-xyz\n")
    with pytest.raises(Exception, match=r"security.trusted_group: no group named 'no-such-group-xyz'"):
        load_config(cfg)


def test_require_names_the_first_violation_and_counts_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "set"
    cfg = config_set(root)
    root.chmod(0o777)
    with pytest.raises(
        UntrustedInput,
        match=r"^untrusted config .*writable by group and others.*"
        r"\(and \d+ more: `lssupervisor check` lists them\)$",
    ) as info:
        trust.require(trust.check_inputs(load_config(cfg), os.environ))
    assert info.value.exit_code is ExitCode.CONFIG


# ---------------------------------------------------------------------------------------------------
# Row 2: run exactly what was hashed


def _plant_pyc(source: Path, code: str) -> Path:
    """A __pycache__ .pyc for ``source`` holding ``code``, stamped with the source's mtime and size
    (what the import system checks), in a directory anyone may write."""
    cache = Path(importlib.util.cache_from_source(str(source)))
    cache.parent.mkdir(exist_ok=True)
    evil = compile(code, str(source), "exec")
    st = source.stat()
    import importlib._bootstrap_external as ext

    data = ext._code_to_timestamp_pyc(evil, st.st_mtime, st.st_size)  # type: ignore[attr-defined]
    cache.write_bytes(data)
    cache.parent.chmod(0o777)
    if ROOT:
        give_away(cache.parent)
        give_away(cache)
    return cache


def test_row2_planted_bytecode_never_runs_and_history_records_what_ran(tmp_path: Path) -> None:
    migs = tmp_path / "migrations"
    migs.mkdir()
    proof = tmp_path / "planted-ran"
    benign = migs / "0001_base.py"
    benign.write_text(MIGRATION.format(v=1) + "RAN = 'benign'\n")
    _plant_pyc(
        benign,
        f"open({str(proof)!r}, 'w').write('x')\nVERSION = 1\nRAN = 'planted'\ndef upgrade(m):\n    pass\n",
    )
    found = load(migs, ["main"])
    mig = found.get(1)
    assert not proof.exists(), "the planted __pycache__ bytecode was executed"
    assert mig.upgrade is not None and mig.upgrade.__globals__["RAN"] == "benign"
    # What history records is the sha256 of exactly the bytes that ran.
    import hashlib

    assert (
        mig.checksum
        == hashlib.sha256(benign.read_bytes()).hexdigest()
        == hashlib.sha256(mig.source).hexdigest()
    )
    # And nothing was written to __pycache__ by us.
    assert sorted(p.name for p in (migs / "__pycache__").iterdir()) == [
        Path(importlib.util.cache_from_source(str(benign))).name
    ]


def test_row2_a_file_changed_after_discovery_runs_the_discovered_bytes(tmp_path: Path) -> None:
    """One read: the bytes hashed at discovery are the bytes compiled, never a second read."""
    migs = tmp_path / "migrations"
    migs.mkdir()
    path = migs / "0001_base.py"
    path.write_text(MIGRATION.format(v=1) + "WHICH = 'a'\n")
    (mig,) = discover(migs, ["main"]).migrations
    path.write_text(MIGRATION.format(v=1) + "WHICH = 'b'\n")  # same size, swapped in between
    loaded = import_migration(mig)
    assert loaded.upgrade is not None and loaded.upgrade.__globals__["WHICH"] == "a"
    # Tampering with the in-memory copy is caught by the checksum, not executed.
    with pytest.raises(MigrationLoadError, match="do not match the checksum"):
        import_migration(
            type(mig)(**{**{f: getattr(mig, f) for f in mig.__slots__}, "source": b"VERSION = 1\n"})
        )


def test_row2_the_worker_records_the_sha256_of_what_it_executed(tmp_path: Path) -> None:
    """End to end through the offline `migrate` (a real worker process): history's checksum is the
    sha256 of the file's bytes, and a planted .pyc with the real source's stamp is ignored."""
    cs = ConfigSet(tmp_path)
    proof = tmp_path / "planted-ran"
    mig2 = cs.migrations / "0002_more.py"
    mig2.write_text(MIGRATION.format(v=2))
    _plant_pyc(mig2, f"open({str(proof)!r}, 'w').write('x')\nVERSION = 2\ndef upgrade(m):\n    pass\n")
    for argv in (["--to", "1"], []):  # an empty LMDB is stamped; then 0002 runs for real
        proc = subprocess.run(
            [sys.executable, "-m", "lssupervisor", "migrate", "-c", str(cs.config), *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    assert not proof.exists()
    import hashlib

    entries = history.read(cs.state / "history.jsonl").entries
    applied = {e.migration: e.checksum for e in entries if e.migration}
    assert applied["0002_more"] == hashlib.sha256(mig2.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Row 1: `run` refuses to start, and to reload into an untrusted set


@needs_root
def test_row1_run_refuses_to_start_on_an_untrusted_config(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    hook_ran = tmp_path / "hook-ran"
    cs.write(extra=f"hooks:\n  pre_migrate:\n    - [/bin/sh, -c, 'touch {hook_ran}']\n")
    cs.config.chmod(0o666)
    give_away(cs.config)
    d = Daemon(cs)
    try:
        assert d.wait(30) == ExitCode.CONFIG
        doc = cs.state_doc() or {}
        assert doc.get("state") == "STOPPED", doc
        assert f"untrusted config {cs.config}: owned by nobody" in str(doc.get("reason")), doc
        assert cs.starts() == [] and not hook_ran.exists()
    finally:
        d.close()


@needs_root
def test_row1_the_watcher_never_reloads_into_an_untrusted_config(tmp_path: Path) -> None:
    """The reproduction: config made 0666 and nobody's, a pre_migrate hook appended, a new migration
    dropped in. The daemon keeps the previous config; no hook, no migration, LS keeps its pid."""
    cs = ConfigSet(tmp_path)
    cs.write(extra="watch:\n  debounce: 100ms\n")
    d = Daemon(cs)
    try:
        ls_pid = d.running_ls_pid()
        hook_ran = tmp_path / "hook-ran"
        cs.config.write_text(
            cs.config.read_text() + f"hooks:\n  pre_migrate:\n    - [/bin/sh, -c, 'touch {hook_ran}']\n"
        )
        cs.config.chmod(0o666)
        give_away(cs.config)
        (cs.migrations / "0002_more.py").write_text(MIGRATION.format(v=2))
        d.wait_log(
            r"reload failed, keeping the previous config: cannot load the configuration: "
            r"untrusted config .*owned by nobody"
        )
        d.wait_log(r'state RECONCILING -> RUNNING" reason="reload failed, previous config kept: [^"]*nobody')
        assert not hook_ran.exists()
        assert d.running_ls_pid() == ls_pid
        doc = cs.state_doc() or {}
        assert doc["lmdbs"]["main"]["schema_version"] == 1, doc
    finally:
        d.close()


def test_row4_a_missing_hook_refuses_the_start(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    cs.write(extra=f"hooks:\n  pre_migrate:\n    - [{tmp_path / 'gone'}]\n")
    d = Daemon(cs)
    try:
        assert d.wait(30) == ExitCode.CONFIG
        assert "untrusted hooks.pre_migrate[0]" in d.text() and "does not exist" in d.text()
        assert cs.starts() == []
    finally:
        d.close()
        kill_recorded_ls(cs)


# ---------------------------------------------------------------------------------------------------
# Every setup we ship passes as shipped


def test_systemd_unit_layout_passes(tmp_path: Path) -> None:
    """The unit: config in ConfigurationDirectory= (root, 0755), files root 0644, StateDirectory= with
    StateDirectoryMode= as the unit sets it, owned by User=, and UMask= for what we create."""
    unit = (REPO / "systemd" / "lssupervisor.service").read_text()
    state_mode = int(re.search(r"^StateDirectoryMode=(\d+)$", unit, re.M).group(1), 8)  # type: ignore[union-attr]
    umask = int(re.search(r"^UMask=(\d+)$", unit, re.M).group(1), 8)  # type: ignore[union-attr]
    etc = tmp_path / "etc" / "lssupervisor"
    old = os.umask(0o022)  # systemd creates ConfigurationDirectory= 0755; the package installs 0644
    try:
        cfg = config_set(etc, extra="")
        cfg.write_text(cfg.read_text().replace("state_dir: state", f"state_dir: {tmp_path / 'var-lib'}"))
    finally:
        os.umask(old)
    (tmp_path / "var-lib").mkdir(mode=state_mode)
    os.chmod(tmp_path / "var-lib", state_mode)
    old = os.umask(umask)
    try:
        (etc / "migrations" / "0002_next.py").write_text(MIGRATION.format(v=2))  # shipped by the app
    finally:
        os.umask(old)
    assert errors_of(cfg) == []


def test_container_image_layout_passes(tmp_path: Path) -> None:
    """The Dockerfile's `install -d` lines, with the modes it gives."""
    dockerfile = (REPO / "Dockerfile").read_text()
    dirs = {
        path: int(mode, 8)
        for mode, path in re.findall(r"install -d (?:-o \S+ -g \S+ )?-m (\d+) (\S+)", dockerfile)
    }
    assert set(dirs) == {"/var/lib/lssupervisor", "/etc/lssupervisor"}, dirs
    for path, mode in dirs.items():
        (tmp_path / path.lstrip("/")).mkdir(parents=True)
        os.chmod(tmp_path / path.lstrip("/"), mode)
    etc = tmp_path / "etc" / "lssupervisor"
    cfg = config_set(etc)
    cfg.write_text(
        cfg.read_text().replace("state_dir: state", f"state_dir: {tmp_path / 'var/lib/lssupervisor'}")
    )
    assert errors_of(cfg) == []


KUBELET_TS = "..2025_01_02_03_04_05.123456789"


def _kubelet_volume(volume: Path, files: dict[str, str], fs_group: int, default_mode: int) -> None:
    """A ConfigMap volume as the kubelet writes it (atomic writer + SetVolumeOwnership with fsGroup):
    the volume directory 2777 (emptyDir's 0777 + setgid) group fsGroup, the data in a timestamped
    directory 2755, ``..data`` -> it, each key -> ``..data/<key>``, files ``defaultMode`` (read-only
    volumes get no group write from fsGroup), every entry root-owned."""
    volume.mkdir(parents=True)
    ts = volume / KUBELET_TS
    ts.mkdir()
    for name, text in files.items():
        (ts / name).write_text(text)
        os.chmod(ts / name, default_mode | 0o440)
        os.chown(ts / name, 0, fs_group)
    os.chmod(ts, 0o2755)
    os.chown(ts, 0, fs_group)
    (volume / "..data").symlink_to(KUBELET_TS)
    for name in files:
        (volume / name).symlink_to(f"..data/{name}")
    os.chmod(volume, 0o2777)
    os.chown(volume, 0, fs_group)


_IN_NAMESPACE = r"""
import json, os, subprocess, sys
from lssupervisor import trust
from lssupervisor.cli.check import Level, run_checks
config, euid, egid, ro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
for path in ro:
    # A read-only bind mount of the volume, as the kubelet mounts ConfigMap/Secret/readOnly volumes.
    subprocess.run(["mount", "--bind", path, path], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True)
# Run as the pod's user (runAsUser/runAsGroup/fsGroup): whose files are "ours", and whose access counts.
os.setgroups([egid])
os.setgid(egid)
os.setuid(euid)
# offline: the storage (s3.example.net) is not probed; the network stays on loopback.
report = run_checks(config, {"PATH": "/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                             "POD_NAME": "pdns-0"}, offline=True)
print(json.dumps([[f.level.value, f.message] for f in report.findings]))
"""


def _check_in_mount_namespace(config: Path, euid: int, egid: int, read_only: list[Path]) -> list[list[str]]:
    if not ROOT:
        pytest.skip("a private mount namespace and read-only bind mounts need root")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare(1) or mount(8) not available")
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            _IN_NAMESPACE,
            str(config),
            str(euid),
            str(egid),
            *map(str, read_only),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    if proc.returncode != 0 and (
        "Operation not permitted" in proc.stderr or "permission denied" in proc.stderr
    ):
        pytest.skip(f"cannot make a mount namespace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _kubernetes_pod(base: Path) -> tuple[Path, list[Path], int]:
    """The example StatefulSet's lssupervisor container, built from examples/kubernetes as shipped:
    the ConfigMap volume at /etc/lssupervisor, the migrations emptyDir filled by the init container
    (runAsUser), the state PVC root (fsGroup: root-owned, group-writable, setgid)."""
    pod = yaml.safe_load_all((REPO / "examples/kubernetes/statefulset.yaml").read_text())
    sts = next(d for d in pod if d["kind"] == "StatefulSet")
    sec = sts["spec"]["template"]["spec"]["securityContext"]
    uid, fs_group = sec["runAsUser"], sec["fsGroup"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    pod_spec = sts["spec"]["template"]["spec"]
    # A native sidecar: lssupervisor is an init container with restartPolicy Always.
    every = [*pod_spec.get("initContainers", []), *pod_spec["containers"]]
    container = next(c for c in every if c["name"] == "lssupervisor")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    cm = yaml.safe_load((REPO / "examples/kubernetes/configmap.yaml").read_text())
    if not ROOT:
        pytest.skip("building the kubelet's layout (root-owned, fsGroup) needs root")
    root = base / "pod"
    places = {path: root / path.lstrip("/") for path in mounts}

    def relocate(text: str) -> str:
        # One pass, longest first, so a relocated path is never relocated again (/tmp is a mount too).
        pattern = "|".join(re.escape(p) for p in sorted(places, key=len, reverse=True))
        return re.sub(pattern, lambda m: str(places[m.group(0)]), text)

    files = {name: relocate(text) for name, text in cm["data"].items()}
    _kubelet_volume(
        places["/etc/lssupervisor"], files, fs_group, volumes["config"]["configMap"]["defaultMode"]
    )
    migrations = places["/migrations"]  # emptyDir: 0777 + fsGroup setgid; files copied as runAsUser
    migrations.mkdir(parents=True)
    (migrations / "0001_base.py").write_text(MIGRATION.format(v=1) + 'LMDB = "main"\n')
    os.chown(migrations / "0001_base.py", uid, fs_group)
    # Worst case: a file present when the kubelet (re)applies fsGroup ownership gets group rw.
    os.chmod(migrations / "0001_base.py", 0o664)
    os.chmod(migrations, 0o2777)
    os.chown(migrations, 0, fs_group)
    state = places["/var/lib/lssupervisor"]  # the PVC's root after SetVolumeOwnership
    state.mkdir(parents=True)
    os.chmod(state, 0o2775)
    os.chown(state, 0, fs_group)
    read_only = [places[p] for p, m in mounts.items() if m.get("readOnly")]
    assert set(read_only) == {places["/etc/lssupervisor"], places["/migrations"]}
    return places["/etc/lssupervisor"] / "lssupervisor.yaml", read_only, uid


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """A directory the pod's user can reach (pytest's own tmp dirs are 0700 root): the check runs as
    that user, as in the pod."""
    path = Path(tempfile.mkdtemp(prefix="lssupervisor-pod-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_kubernetes_example_passes_as_shipped_on_the_kubelet_layout(pod_root: Path) -> None:
    config, read_only, uid = _kubernetes_pod(pod_root)
    findings = _check_in_mount_namespace(config, uid, uid, read_only)
    errors = [m for level, m in findings if level == "error"]
    assert errors == [], errors
    warnings = [m for level, m in findings if level == "warning"]
    # Both deliberate choices of the example are said out loud, never silent.
    assert any("security.trusted_group: members of group" in w for w in warnings), warnings
    assert any("listens beyond loopback" in w for w in warnings), warnings


def test_kubernetes_layout_without_the_read_only_mounts_is_refused(pod_root: Path) -> None:
    """The same tree, writable: the world-writable volume directory is then a real hole."""
    config, _, uid = _kubernetes_pod(pod_root)
    findings = _check_in_mount_namespace(config, uid, uid, [])
    errors = [m for level, m in findings if level == "error"]
    volume = config.parent
    assert any(
        e.startswith(f"untrusted config {config}: directory {volume} on the way writable by others")
        for e in errors
    ), errors
    assert any(
        e.startswith(f"untrusted migrations directory {volume.parent.parent / 'migrations'}: ")
        for e in errors
    ), errors


def test_a_read_only_view_of_a_writable_directory_is_not_trusted(pod_root: Path) -> None:
    """systemd's ProtectSystem=strict makes all of /etc read-only in the service's namespace; a 0777
    /etc/lssupervisor there is still writable for every user of the host. Only a read-only mount's
    own root directory is excepted (a Kubernetes volume), never a directory below it."""
    if not ROOT:
        pytest.skip("building the layout needs root")
    etc = pod_root / "etc"
    cfg = config_set(etc / "lssupervisor")
    cfg.write_text(cfg.read_text().replace("state_dir: state", f"state_dir: {pod_root / 'state'}"))
    (etc / "lssupervisor").chmod(0o777)
    findings = _check_in_mount_namespace(cfg, 0, 0, [etc])  # etc: a read-only mount, like ProtectSystem
    errors = [m for level, m in findings if level == "error"]
    expected = f"untrusted config {cfg}: directory {etc / 'lssupervisor'} on the way writable by group"
    assert any(e.startswith(expected) for e in errors), errors

"""What held under issue 13's hostile pass, kept so by tests that try it again.

- YAML tags are refused, in our config and in the LS template: an error line, never code, never a
  traceback (the template's ``storage.options`` used to raise PyYAML's ConstructorError raw);
- a storm of SIGHUPs is coalesced: a handful of reloads, LS keeps its pid;
- ENOSPC in the middle of a backup copy (a real tiny tmpfs; only the pre-flight free-space estimate is
  told the disk is big, so that the copy itself hits the wall) leaves no ``.partial`` behind.

Held elsewhere: no secret in /status, /metrics, /readyz, logs (tests/test_credentials.py), the rendered
config 0600 (tests/test_lsconfig.py), two daemons refused with 75 (tests/test_supervisor_e2e.py), a
second SIGTERM cancelling a running migration (tests/test_reconcile_e2e.py).
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from lssupervisor.cli.check import Level, run_checks
from lssupervisor.config import load_config
from lssupervisor.errors import ConfigError, TemplateError
from lssupervisor.lsconfig.render import Template, render
from lssupervisor.worker import protocol as p
from lssupervisor.worker.wire import to_wire
from tests.harness import wait_for
from tests.harness.e2e import ConfigSet, Daemon
from tests.harness.workers import make_settings, make_view, python_on_tiny_tmpfs, sample_lmdb

TAG = '!!python/object/apply:os.system ["touch {proof}"]'


def test_yaml_tags_are_refused_in_our_config(tmp_path: Path) -> None:
    proof = tmp_path / "pwned"
    cfg = tmp_path / "lssupervisor.yaml"
    cfg.write_text(f"state_dir: {TAG.format(proof=proof)}\n")
    with pytest.raises(
        ConfigError, match=r"lssupervisor.yaml: line 1 column 12: could not determine a constructor"
    ):
        load_config(cfg)
    assert not proof.exists()


@pytest.mark.parametrize("where", ["instance", "bucket"])
def test_yaml_tags_are_refused_in_the_template_as_an_error_line(tmp_path: Path, where: str) -> None:
    proof = tmp_path / "pwned"
    tag = TAG.format(proof=proof)
    text = (
        f"instance: {tag if where == 'instance' else 'n'}\nlmdbs:\n  main:\n    path: /x/db\n"
        f"storage:\n  type: s3\n  options:\n    bucket: {tag if where == 'bucket' else 'b'}\n"
    )
    expected = (
        "expected a string, got a list" if where == "instance" else "YAML tag 'tag:yaml.org,2002:python/"
    )
    with pytest.raises(TemplateError, match=re.escape(expected)):
        render(Template(tmp_path / "t.yaml.in", text, "APP_SCHEMA_VERSION"), 1, {})
    assert not proof.exists()
    # And `check` says it in one line instead of crashing.
    (tmp_path / "set").mkdir()
    cs = ConfigSet(tmp_path / "set")
    cs.template.write_text(text)
    errors = [f.message for f in run_checks(str(cs.config)).findings if f.level is Level.ERROR]
    assert any(expected in e for e in errors), errors


def test_a_hup_storm_is_coalesced(tmp_path: Path) -> None:
    cs = ConfigSet(tmp_path)
    d = Daemon(cs)
    try:
        ls_pid = d.running_ls_pid()
        for _ in range(50):
            d.send(signal.SIGHUP)
        d.wait_log(r'reason="reload \(SIGHUP\)"')
        wait_for(
            lambda: (
                (cs.state_doc() or {}).get("state") == "RUNNING"
                and not (cs.state_doc() or {}).get("substate")
            ),
            timeout=30,
            what="RUNNING again",
        )
        reloads = d.lines(r'reason="reload \(SIGHUP\)"')
        assert 1 <= len(reloads) <= 5, reloads
        assert d.running_ls_pid() == ls_pid
        assert d.proc.poll() is None
    finally:
        d.close()


_ENOSPC = """
import json, sys, threading
from lssupervisor.worker import backupdir, ops
from lssupervisor.worker import protocol as p
from lssupervisor.worker.wire import from_wire
# Only the pre-flight estimate is told there is room: the copy itself meets the real full tmpfs.
backupdir.free_bytes = lambda directory: 1 << 40
request = from_wire(p.BackupRequest, json.loads(sys.argv[1]))
try:
    ops.Session(lambda body: None, threading.Event()).serve(request)
except Exception as exc:
    print(type(exc).__name__, exc)
import os
print("left:", sorted(os.listdir(sys.argv[2])))
"""


def test_enospc_mid_copy_leaves_no_partial(tmp_path: Path) -> None:
    spec = sample_lmdb(tmp_path / "db", n=20000)  # a few MiB
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    backups = p.BackupSettings(enabled=True, dir=str(tiny), keep=2)
    request = to_wire(p.BackupRequest(make_settings(make_view(spec), tmp_path, backup=backups)))
    proc = python_on_tiny_tmpfs(tiny, "1m", _ENOSPC, json.dumps(request), str(tiny))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("BackupError"), proc.stdout
    assert "no space left for the backup copy of LMDB 'main'" in proc.stdout, proc.stdout
    assert "left: []" in proc.stdout, proc.stdout

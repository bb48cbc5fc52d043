"""lssupervisor check: one line per finding, exit 78 on any error, 0 otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lssupervisor.cli.check import Level, run_checks
from lssupervisor.cli.main import main
from lssupervisor.errors import ExitCode
from tests.harness.configs import TEMPLATE, config_set, fake_ls, migration


def levels(report: object) -> dict[Level, list[str]]:
    out: dict[Level, list[str]] = {level: [] for level in Level}
    for f in report.findings:  # type: ignore[attr-defined]
        out[f.level].append(f.message)
    return out


def test_check_passes_a_good_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_set(tmp_path, binary=fake_ls(tmp_path, "exit 0\n"))
    migration(tmp_path, 1, "prefix")
    migration(tmp_path, 2, "new-dbi")
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ok: 2 migration(s)" in out
    assert "template renders for version 2: storage /srv/ls/v2" in out  # the newest migration
    assert "accepts the rendered config" in out
    assert out.splitlines()[-1] == f"check: 0 error(s), 0 warning(s) in {cfg}"


def test_check_renders_for_the_configured_target(tmp_path: Path) -> None:
    cfg = config_set(tmp_path, extra="schema:\n  target: 7\n")
    found = levels(run_checks(str(cfg), {}))
    assert any("renders for version 7: storage /srv/ls/v7" in m for m in found[Level.OK])


def test_check_resolves_the_target_as_the_daemon_does(tmp_path: Path) -> None:
    """schema.target_file pins the target for the daemon and the offline commands; check must render
    for the same version (it used to take only schema.target and render for the newest migration)."""
    target_file = tmp_path / "app.target"
    cfg = config_set(tmp_path, extra=f"schema:\n  target_file: {target_file}\n")
    migration(tmp_path, 1, "prefix")
    migration(tmp_path, 2, "prefix")
    target_file.write_text("1\n")
    found = levels(run_checks(str(cfg), {}))
    assert f"target version 1 from schema.target_file {target_file}" in found[Level.OK]
    assert any("renders for version 1: storage /srv/ls/v1" in m for m in found[Level.OK])
    assert found[Level.ERROR] == []
    # No file yet: the newest migration, said as a warning (writing the file pins it).
    target_file.unlink()
    found = levels(run_checks(str(cfg), {}))
    assert any("does not exist: the target is the newest migration (2)" in m for m in found[Level.WARNING])
    assert any("renders for version 2" in m for m in found[Level.OK])
    # What the daemon would refuse, check refuses: garbage in the file, a target above the migrations.
    target_file.write_text("two\n")
    found = levels(run_checks(str(cfg), {}))
    expected = "schema.target_file must hold a version number (ASCII digits), got 'two'"
    assert any(expected in m for m in found[Level.ERROR])
    target_file.write_text("3\n")
    found = levels(run_checks(str(cfg), {}))
    assert any("target version 3 is above the newest migration 2" in m for m in found[Level.ERROR])


def test_check_warns_when_schema_target_shadows_the_target_file(tmp_path: Path) -> None:
    target_file = tmp_path / "app.target"
    target_file.write_text("1\n")
    cfg = config_set(tmp_path, extra=f"schema:\n  target: 2\n  target_file: {target_file}\n")
    migration(tmp_path, 1, "prefix")
    migration(tmp_path, 2, "prefix")
    found = levels(run_checks(str(cfg), {}))
    assert any("schema.target (2) is set and wins over schema.target_file" in m for m in found[Level.WARNING])
    assert any("renders for version 2" in m for m in found[Level.OK])


def test_check_missing_config_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == ExitCode.CONFIG
    out = capsys.readouterr().out
    assert "error: " in out and "no such file" in out
    assert "check: 1 error(s)" in out


def test_check_reports_a_bad_config_key(tmp_path: Path) -> None:
    cfg = config_set(tmp_path, extra="  stop_timeot: 5s\n")
    found = levels(run_checks(str(cfg), {}))
    assert len(found[Level.ERROR]) == 1
    assert "lightningstream.stop_timeot: unknown option" in found[Level.ERROR][0]


def test_check_reports_what_ls_would_refuse_in_the_template(tmp_path: Path) -> None:
    template = TEMPLATE.format(db="/d", root="/r/v$APP_SCHEMA_VERSION") + "bogus: 1\n"
    cfg = config_set(tmp_path, template=template)
    found = levels(run_checks(str(cfg), {}))
    assert any("line 10: bogus: unknown key" in m for m in found[Level.ERROR])


def test_check_refuses_prefix_migrations_on_an_unversioned_location(tmp_path: Path) -> None:
    cfg = config_set(tmp_path, root="/srv/ls")
    migration(tmp_path, 1, "prefix")
    found = levels(run_checks(str(cfg), {}))
    (error,) = found[Level.ERROR]
    assert "root_path: /srv/ls/v${APP_SCHEMA_VERSION}" in error
    assert "0001_step_1" in error


def test_check_only_warns_about_an_unversioned_location_without_prefix_migrations(tmp_path: Path) -> None:
    cfg = config_set(tmp_path, root="/srv/ls")
    migration(tmp_path, 1, "in-place")
    found = levels(run_checks(str(cfg), {}))
    assert found[Level.ERROR] == []
    assert any("no migration uses prefix yet" in m for m in found[Level.WARNING])


def test_check_warns_about_a_versioned_global_prefix_without_a_trailing_slash(tmp_path: Path) -> None:
    template = (
        f"instance: node-1\nlmdbs:\n  main:\n    path: {tmp_path / 'db'}\n    schema_tracks_changes: true\n"
        "storage:\n  type: s3\n  options:\n    bucket: ls\n    global_prefix: app/v${APP_SCHEMA_VERSION}\n"
    )
    cfg = config_set(tmp_path, template=template)
    migration(tmp_path, 1, "prefix")
    found = levels(run_checks(str(cfg), {}, offline=True))  # no credentials, no server: no probe
    assert found[Level.ERROR] == []
    assert any(
        "does not end with '/'" in m and m.endswith("global_prefix: app/v${APP_SCHEMA_VERSION}/")
        for m in found[Level.WARNING]
    ), found


def test_check_reports_bad_migrations(tmp_path: Path) -> None:
    cfg = config_set(tmp_path)
    migration(tmp_path, 2, "prefix")  # gap: 1 is missing
    found = levels(run_checks(str(cfg), {}))
    assert any("gap" in m for m in found[Level.ERROR])


def test_check_names_every_migration_problem_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path)
    migs = tmp_path / "migrations"
    migration(tmp_path, 1, "prefix")
    (migs / "0002_broken.py").write_text('"""Broken."""\nVERSION = 2\ndef upgrade(m)\n    pass\n')
    (migs / "0003_wrong.py").write_text(
        '"""Wrong."""\nVERSION = 4\nSTRATEGY = "sideways"\ndef upgrade(m):\n  pass\n'
    )
    (migs / "0005_late.py").write_text('"""Late."""\nVERSION = 5\ndef upgrade(m):\n    pass\n')
    (migs / "0006-dash.py").write_text("")
    assert main(["check", "-c", str(cfg)]) == ExitCode.CONFIG
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {migs / '0002_broken.py'}:3: syntax error: expected ':'",
        f"error: {migs / '0003_wrong.py'}:2: VERSION = 4 does not match the file name number 3",
        f"error: {migs / '0003_wrong.py'}:3: STRATEGY = 'sideways' is not one of 'prefix', 'new-dbi', "
        "'in-place'",
        f"error: {migs / '0006-dash.py'}: bad migration file name; expected NNNN_slug.py "
        "(e.g. 0003_split_names.py)",
        f"error: {migs}: gap in migration versions: 4 is missing before 0005_late.py",
    ]


def test_check_reports_unset_variables_and_mangled_dollars(tmp_path: Path) -> None:
    template = TEMPLATE.format(db="/d", root="/r/v${APP_SCHEMA_VERSION}") + "log:\n  level: ${LOG_LEVEL}\n"
    cfg = config_set(tmp_path, template=template)
    found = levels(run_checks(str(cfg), {}))
    assert any("${LOG_LEVEL} is not set" in m and ":11:" in m for m in found[Level.ERROR])
    found = levels(run_checks(str(cfg), {"LOG_LEVEL": "info"}))
    assert found[Level.ERROR] == []
    cfg = config_set(tmp_path, template=template.replace("${LOG_LEVEL}", "info") + "# x\ninstance2: $1\n")
    assert any("unknown key" in m for m in levels(run_checks(str(cfg), {}))[Level.ERROR])


def test_check_uses_the_ls_binary_and_reports_its_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fatal = "level=fatal msg=\"Config file error: something LS-only\""
    binary = fake_ls(tmp_path, f"echo '{fatal}' >&2\nexit 1\n")
    cfg = config_set(tmp_path, binary=binary)
    assert main(["check", "-c", str(cfg)]) == ExitCode.CONFIG
    out = capsys.readouterr().out
    assert 'error: ' in out and "Config file error: something LS-only" in out


def test_check_gives_ls_the_environment_it_will_get(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    binary = fake_ls(tmp_path, f'echo "$LS_EXTRA $APP_SCHEMA_VERSION ${{NOTIFY_SOCKET:-none}}" > {seen}\n')
    cfg = config_set(tmp_path, binary=binary, extra="  env:\n    LS_EXTRA: from-config\n")
    found = levels(run_checks(str(cfg), {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": os.environ["PATH"]}))
    assert found[Level.ERROR] == []
    # No migrations shipped yet: the daemon would stamp version 0, so check renders for 0 too.
    assert seen.read_text().split() == ["from-config", "0", "none"]


def test_check_warns_about_a_missing_binary_and_secrets_in_config(tmp_path: Path) -> None:
    cfg = config_set(tmp_path, extra="  env:\n    AWS_SECRET_ACCESS_KEY: oops\n")
    report = run_checks(str(cfg), {})
    found = levels(report)
    assert found[Level.ERROR] == []
    assert any("not found" in m and "no-such-ls" in m for m in found[Level.WARNING])
    secret = "lightningstream.env.AWS_SECRET_ACCESS_KEY looks like a secret"
    assert any(secret in m for m in found[Level.WARNING])
    assert all("\n" not in f.message for f in report.findings)


def test_check_reports_an_unusable_state_dir(tmp_path: Path) -> None:
    cfg = config_set(tmp_path)
    (tmp_path / "state").write_text("not a directory")
    found = levels(run_checks(str(cfg), {}))
    assert any("state_dir" in m and "is a file" in m for m in found[Level.ERROR])


# ---------------------------------------------------------------------------------------------------
# The PowerDNS example config set agrees with its recipe (docs/powerdns.md) and the shipped unit


REPO = Path(__file__).resolve().parent.parent


def test_the_pdns_example_config_follows_the_powerdns_recipe() -> None:
    import re

    import yaml

    from lssupervisor.config import load_config

    example = REPO / "config" / "pdns" / "lssupervisor.yaml"
    cfg = load_config(example)
    recipe_text = (REPO / "docs" / "powerdns.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", recipe_text, re.S) if "baseline:" in b]
    recipe = yaml.safe_load(block)
    # Auth's LMDB schema numbering: an unmarked Auth 4.8/4.9 LMDB is at 5, not 1.
    assert cfg.schema.baseline == recipe["schema"]["baseline"] == 5
    assert cfg.schema.target is None  # it would win over the target file
    assert str(cfg.schema.target_file) == recipe["schema"]["target_file"]
    assert str(cfg.migrations.path) == recipe["migrations"]["path"]
    # The shipped unit runs as pdns with NoNewPrivileges and no capabilities: no hook (not even a
    # commented-out one to uncomment) may suggest managing system services from the daemon.
    text = example.read_text(encoding="utf-8")
    assert not cfg.hooks.pre_migrate and not cfg.hooks.post_migrate
    assert not re.search(r"\[\s*(systemctl|sudo|service)\b", text)
    assert "docs/powerdns.md" in text and "Procedure A" in text
    # ProtectSystem=strict: only the state dir (StateDirectory=) and the LMDB dir are writable.
    assert Path(cfg.backup_dir).is_relative_to(Path(cfg.state_dir))

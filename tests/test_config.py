"""lssupervisor.config: strict loading, durations, paths, defaults, and the generated reference."""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing
from pathlib import Path

import pytest

from lssupervisor import config as config_mod
from lssupervisor.config import (
    Config,
    Duration,
    LogFormat,
    OnFailure,
    OutputMode,
    format_duration,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
    reference_markdown,
)
from lssupervisor.errors import ConfigError, ExitCode

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def parse(text: str, base: Path = Path("/etc/lss")) -> Config:
    return parse_config(text, "lss.yaml", base)


# ---------------------------------------------------------------------------------------------------
# defaults


@pytest.mark.parametrize("text", ["", "# only a comment\n", "lightningstream:\nrestart: {}\n"])
def test_empty_config_gives_every_default(text: str) -> None:
    cfg = parse(text)
    assert cfg.state_dir == "/etc/lss/state"
    assert cfg.rendered_config == Path("/etc/lss/state/lightningstream.yaml")
    assert cfg.backup_dir == Path("/etc/lss/state/backups")
    assert cfg.lock_path == Path("/etc/lss/state/lock")
    assert cfg.state_file == Path("/etc/lss/state/state.json")
    assert cfg.history_file == Path("/etc/lss/state/history.jsonl")
    assert cfg.paused_file == Path("/etc/lss/state/paused")
    ls = cfg.lightningstream
    assert ls.binary == "lightningstream"
    assert ls.args == ["sync"]
    assert ls.template == "/etc/lss/lightningstream.yaml.in"
    assert ls.config is None
    assert ls.env == {}
    assert (ls.stop_timeout, ls.ready_timeout, ls.settle_time) == (10, 300, 3)
    assert ls.min_pid == 0 and ls.pdeathsig is True and ls.drain is False
    assert ls.output is OutputMode.INHERIT
    assert cfg.schema.variable == "APP_SCHEMA_VERSION"
    assert cfg.schema.marker_dbi == "lssupervisor"
    assert cfg.schema.target is None and cfg.schema.baseline is None
    assert cfg.schema.on_failure is OnFailure.PARK
    assert cfg.migrations.path == "/etc/lss/migrations" and cfg.migrations.package is None
    assert cfg.backup.enabled is True and cfg.backup.keep == 5
    assert cfg.restart.initial_delay == 1 and cfg.restart.max_delay == 60
    assert cfg.http.address == "127.0.0.1:8265"
    assert cfg.watch.enabled is True
    assert cfg.log.format is LogFormat.TEXT and cfg.log.level == "info"


def test_defaults_are_not_shared_between_loads() -> None:
    a = parse("")
    a.lightningstream.args.append("--only-once")
    a.lightningstream.env["X"] = "1"
    b = parse("")
    assert b.lightningstream.args == ["sync"] and b.lightningstream.env == {}


def test_config_values_are_frozen() -> None:
    cfg = parse("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.state_dir = "/x"  # type: ignore[misc]


def test_a_full_config_loads() -> None:
    cfg = parse(
        """
state_dir: /var/lib/lss
lightningstream:
  binary: /usr/bin/lightningstream
  args: [sync, --log-format, json]
  template: tmpl.in
  config: /run/lss/ls.yaml
  env: {LS_X: "1"}
  stop_timeout: 1m30s
  min_pid: 300
  output: prefix
  drain: true
  drain_timeout: 45
schema: {variable: MYAPP_VERSION, target: 4, baseline: 1, on_failure: resume, target_file: target}
migrations: {path: null, package: myapp.migrations, grow_map: true, timeout: 2h}
backup: {enabled: false, dir: /backups, keep: 2}
hooks: {pre_migrate: [[/bin/true], [echo, hi]], timeout: 10s}
http: {address: "[::1]:9000"}
log: {format: json, level: DEBUG}
"""
    )
    assert cfg.state_dir == "/var/lib/lss"
    assert cfg.lightningstream.template == "/etc/lss/tmpl.in"
    assert cfg.rendered_config == Path("/run/lss/ls.yaml")
    assert cfg.lightningstream.stop_timeout == 90.0
    assert cfg.lightningstream.drain_timeout == 45.0  # a bare number is seconds
    assert isinstance(cfg.lightningstream.stop_timeout, Duration)
    assert cfg.lightningstream.output is OutputMode.PREFIX
    assert cfg.schema.target == 4 and cfg.schema.on_failure is OnFailure.RESUME
    assert cfg.schema.target_file == "/etc/lss/target"
    assert cfg.migrations.path is None and cfg.migrations.package == "myapp.migrations"
    assert cfg.migrations.timeout == 7200.0
    assert cfg.backup_dir == Path("/backups")
    assert cfg.hooks.pre_migrate == [["/bin/true"], ["echo", "hi"]]
    assert cfg.log.format is LogFormat.JSON


# ---------------------------------------------------------------------------------------------------
# strict errors: one line, the file, the dotted key, what was expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus: 1", "lss.yaml: bogus: unknown option (known here: backup, fleet, hooks, http"),
        ("lightningstream:\n  binar: x", "lightningstream.binar: unknown option (known here: args, binary"),
        ("restart:\n  wait_max: 1s", "restart.wait_max: unknown option"),
        ("lightningstream: [1]", "lightningstream: expected a mapping, got [1]"),
        ("- 1\n- 2", "lss.yaml: expected a mapping, got [1, 2]"),
        ("lightningstream:\n  stop_timeout: ten",
         "lightningstream.stop_timeout: expected a duration like 10s, got 'ten'"),
        ("lightningstream:\n  stop_timeout: true", "lightningstream.stop_timeout: expected a duration"),
        ("lightningstream:\n  stop_timeout: -1s", "lightningstream.stop_timeout: expected a duration"),
        ("lightningstream:\n  stop_timeout: -5", "expected a non-negative duration"),
        ("lightningstream:\n  stop_timeout: 0s", "lightningstream.stop_timeout: must be greater than 0"),
        ("lightningstream:\n  health_poll_interval: 0", "health_poll_interval: must be greater than 0"),
        ("lightningstream:\n  binary: ''", "lightningstream.binary: must not be empty"),
        ("lightningstream:\n  binary: 5", "lightningstream.binary: expected a string, got 5"),
        ("lightningstream:\n  args: sync", "lightningstream.args: expected a list of strings, got 'sync'"),
        ("lightningstream:\n  args: [sync, 5]", "lightningstream.args[1]: expected a string, got 5"),
        ("lightningstream:\n  args: [sync, --minimum-pid, '300']", "use lightningstream.min_pid instead"),
        ("lightningstream:\n  args: [sync, --minimum-pid=300]", "use lightningstream.min_pid instead"),
        ("lightningstream:\n  args: [-c, x.yaml, sync]", "do not pass --config"),
        ("lightningstream:\n  args: [--config=x.yaml]", "do not pass --config"),
        ("lightningstream:\n  args: [-cx.yaml, sync]", "do not pass --config"),
        ("lightningstream:\n  args: [-c=x.yaml, sync]", "do not pass --config"),
        ("lightningstream:\n  args: [dump, -Hcx.yaml]", "do not pass --config"),
        ("lightningstream:\n  min_pid: -1", "lightningstream.min_pid: expected 0..4194303, got -1"),
        ("lightningstream:\n  min_pid: true", "lightningstream.min_pid: expected an integer, got True"),
        ("lightningstream:\n  env: {A: 1}", "lightningstream.env.A: expected a string, got 1"),
        ("lightningstream:\n  env: [A]", "lightningstream.env: expected a mapping"),
        ("lightningstream:\n  output: loud", "lightningstream.output: expected one of 'inherit', 'prefix'"),
        ("lightningstream:\n  pdeathsig: 1", "lightningstream.pdeathsig: expected true or false, got 1"),
        ("lightningstream:\n  template: ''", "lightningstream.template: expected a path"),
        ("state_dir: 5", "state_dir: expected a path, got 5"),
        ("restart:\n  initial_delay: 0s", "restart.initial_delay: must be greater than 0"),
        ("restart:\n  initial_delay: 5s\n  max_delay: 1s", "restart.max_delay: must not be smaller"),
        ("restart:\n  multiplier: 0.5", "restart.multiplier: expected a number >= 1"),
        ("restart:\n  multiplier: fast", "restart.multiplier: expected a number, got 'fast'"),
        ("restart:\n  jitter: 2", "restart.jitter: expected a fraction between 0 and 1"),
        ("restart:\n  burst_limit: 0", "restart.burst_limit: expected an integer >= 1"),
        ("schema:\n  variable: APP-VERSION", "schema.variable: expected an environment variable name"),
        ("schema:\n  variable: 1VAR", "schema.variable: expected an environment variable name"),
        ("schema:\n  target: 0", "schema.target: expected a schema version >= 1, got 0"),
        ("schema:\n  baseline: 1.5", "schema.baseline: expected an integer, got 1.5"),
        ("schema:\n  baseline: -1", "schema.baseline: expected a schema version >= 0, got -1"),
        ("schema:\n  on_failure: retry", "schema.on_failure: expected one of 'park', 'resume'"),
        ("migrations:\n  package: a.m\n  path: m", "set exactly one of migrations.path and migrations.pa"),
        ("migrations:\n  path: null", "set exactly one of migrations.path and migrations.package"),
        ("backup:\n  keep: 0", "backup.keep: expected an integer >= 1, got 0"),
        ("hooks:\n  pre_migrate: [[]]", "hooks.pre_migrate[0]: expected a non-empty argv list"),
        ("hooks:\n  post_migrate: [echo]", "hooks.post_migrate[0]: expected a list of strings"),
        ("http:\n  address: localhost", "http.address: expected host:port like 127.0.0.1:8265"),
        ("http:\n  address: '127.0.0.1:99999'", "http.address: expected host:port"),
        ("log:\n  level: verbose", "log.level: expected debug, info, warning or error, got 'verbose'"),
        ("log:\n  format: xml", "log.format: expected one of 'text', 'json'"),
        ("watch:\n  debounce: soon", "watch.debounce: expected a duration"),
        ("state_dir: a\nstate_dir: b", "lss.yaml: line 2 column 1: duplicate key 'state_dir'"),
        ("restart:\n  jitter: 0.1\n  jitter: 0.2", "line 3 column 3: duplicate key 'jitter'"),
        ("state_dir: [unclosed", "lss.yaml: line 1 column"),
        ("a: b: c", "lss.yaml: line 1 column"),
    ],
)
def test_strict_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    text_of_error = str(exc.value)
    assert message in text_of_error
    assert text_of_error.startswith("lss.yaml")
    assert "\n" not in text_of_error
    assert exc.value.exit_code is ExitCode.CONFIG


def test_ls_args_that_only_look_like_config_are_accepted() -> None:
    """Only LS's -c is refused: an instance name with a c in it is not a config file."""
    args = ["-icache-1", "--instance=c", "sync", "--only-once", "-Ht"]
    assert parse("lightningstream:\n  args: [" + ", ".join(args) + "]").lightningstream.args == args


# ---------------------------------------------------------------------------------------------------
# durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("500ms", 0.5), ("10s", 10.0), ("1m30s", 90.0), ("2h", 7200.0), ("1.5s", 1.5),
     ("250us", 0.00025), ("100ns", 1e-7), (" 3s ", 3.0), (".5s", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "ms", "1d", "1s2", "s1", "-1s", "1 s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    # floats, as the config holds them (format_duration(int) fails on Python 3.11: no int.is_integer)
    [(0.0, "0s"), (0.5, "500ms"), (10.0, "10s"), (90.0, "90s"), (120.0, "2m"), (7200.0, "2h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("value", "seconds"), [("15s", 15.0), ("1m", 60.0), ("2", 2.0), ("0.25", 0.25)])
def test_duration_options_accept_strings_and_numbers_of_seconds(value: str, seconds: float) -> None:
    assert parse(f"lightningstream:\n  settle_time: {value}").lightningstream.settle_time == seconds


# ---------------------------------------------------------------------------------------------------
# paths


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    cfg_file = tmp_path / "etc" / "lss.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "state_dir: ../var/state\nlightningstream:\n  template: t/ls.yaml.in\n  config: ./run/ls.yaml\n"
        "backup:\n  dir: bk\nschema:\n  target_file: /abs/target\n"
    )
    cfg = load_config(cfg_file)
    assert cfg.state_dir == str(tmp_path / "var" / "state")
    assert cfg.lightningstream.template == str(tmp_path / "etc" / "t" / "ls.yaml.in")
    assert cfg.rendered_config == tmp_path / "etc" / "run" / "ls.yaml"
    assert cfg.backup_dir == tmp_path / "etc" / "bk"
    assert cfg.schema.target_file == "/abs/target"
    assert cfg.migrations.path == str(tmp_path / "etc" / "migrations")
    assert cfg.source == cfg_file.resolve()
    assert cfg.name == "lss.yaml"


def test_config_in_a_configmap_volume_survives_the_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as ``NAME -> ..data/NAME``, ``..data -> ..<timestamp>``, and an
    update swaps ``..data`` and deletes the old timestamped directory. Relative paths and the file the
    daemon reloads (and watches) must follow the name, not the directory the symlink pointed to then."""
    vol = tmp_path / "etc"
    vol.mkdir()

    def publish(stamp: str, text: str) -> None:
        (vol / stamp).mkdir()
        (vol / stamp / "lss.yaml").write_text(text)
        os.symlink(stamp, vol / "..data_tmp")
        os.rename(vol / "..data_tmp", vol / "..data")

    publish("..2024_01", "state_dir: /var/st\nlightningstream:\n  template: ls.yaml.in\n")
    os.symlink("..data/lss.yaml", vol / "lss.yaml")
    cfg = load_config(vol / "lss.yaml")
    assert cfg.source == vol / "lss.yaml"
    assert cfg.lightningstream.template == str(vol / "ls.yaml.in")

    publish("..2024_02", "state_dir: /var/st2\nlightningstream:\n  template: ls.yaml.in\n")
    shutil.rmtree(vol / "..2024_01")
    assert cfg.source is not None
    assert load_config(cfg.source).state_dir == "/var/st2"  # a reload reads the new version


def test_relative_config_path_works_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lss.yaml").write_text("state_dir: st\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("lss.yaml")
    assert cfg.state_dir == str(tmp_path / "st")


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/op")
    assert parse("state_dir: ~/lss").state_dir == "/home/op/lss"


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file \(create one with `lssupervisor init"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    (tmp_path / "latin1.yaml").write_bytes(b"state_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin1.yaml")


@pytest.mark.parametrize(
    ("address", "parsed"),
    [(":8500", ("", 8500)), ("127.0.0.1:8265", ("127.0.0.1", 8265)), ("[::1]:80", ("::1", 80)),
     ("localhost:0", ("localhost", 0))],
)
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address, "x") == parsed


@pytest.mark.parametrize("address", ["8500", "host:", "::1:80", "h:65536", "[::1]80"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ConfigError, match="x: expected host:port"):
        parse_address(address, "x")


# ---------------------------------------------------------------------------------------------------
# the generated reference


def test_reference_documents_every_option() -> None:
    ref = reference_markdown()

    def walk(cls: type, prefix: str) -> list[str]:
        keys = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                keys += walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                assert f.metadata.get("doc"), f"{prefix}{f.name} has no doc"
                keys.append(f"{prefix}{f.name}")
        return keys

    keys = walk(Config, "")
    assert len(keys) > 40
    for key in keys:
        assert f"| `{key}` |" in ref, key


def test_reference_rows_are_one_line_with_plain_defaults() -> None:
    """Every option is one table row (a newline inside a row breaks the markdown table), and number
    defaults read as numbers, not as YAML documents (``5\n...``)."""
    ref = reference_markdown()
    rows = [line for line in ref.splitlines() if line.startswith("| `")]
    assert all(line.endswith(" |") for line in rows), [r for r in rows if not r.endswith(" |")]
    assert "| `backup.keep` | an integer | `5` |" in ref
    assert "| `restart.multiplier` | a number | `2.0` |" in ref
    assert "| `lightningstream.min_pid` | an integer | `0` |" in ref
    assert "| `hooks.pre_migrate` | a list of lists of strings | `[]` |" in ref
    assert "| `lightningstream.args` | a list of strings | `[sync]` |" in ref


def test_docs_configuration_md_is_up_to_date() -> None:
    """docs/configuration.md is generated; regenerate with `make docs` (lssupervisor config-reference)."""
    assert DOCS.exists(), "docs/configuration.md missing: run `make docs`"
    assert DOCS.read_text(encoding="utf-8") == config_mod.reference_markdown(), (
        "docs/configuration.md drifted from lssupervisor/config.py: run "
        "`lssupervisor config-reference > docs/configuration.md`"
    )


def test_baseline_0_is_a_version_like_stamp_0() -> None:
    # A park message says "set schema.baseline: N" and `stamp 0` works: 0 must be accepted too.
    assert parse("schema:\n  baseline: 0").schema.baseline == 0

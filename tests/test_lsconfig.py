"""lsconfig: the LS template rendered for a schema version and checked as LS would check it."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lssupervisor.cli import render as render_cmd
from lssupervisor.config import parse_config
from lssupervisor.durations import parse_ns as parse_go_duration
from lssupervisor.errors import ConfigError, TemplateError, UsageError
from lssupervisor.fsutil import write_atomic
from lssupervisor.lsconfig import binary as lsbinary
from lssupervisor.lsconfig import render as lsconfig
from lssupervisor.lsconfig.binary import validate_with_binary
from lssupervisor.lsconfig.render import (
    Template,
    check_prefix_safety,
    go_expand,
    go_expand_env,
    inspect_template,
    load_template,
    ls_environment,
    render,
)
from lssupervisor.lsconfig.values import parse_bytesize
from tests.harness.real_ls import real_ls_binary

VAR = "APP_SCHEMA_VERSION"


def tmpl(text: str, path: str = "ls.yaml.in") -> Template:
    return Template(path=Path(path), text=textwrap.dedent(text).lstrip("\n"), variable=VAR)


FS_BASE = """
instance: node-1
lmdbs:
  main:
    path: /var/lib/app/db
    schema_tracks_changes: true
storage:
  type: fs
  options:
    root_path: /srv/ls/v${APP_SCHEMA_VERSION}
"""


def s3_template(extra_options: str = "", prefix: str = "app/v${APP_SCHEMA_VERSION}/") -> Template:
    return tmpl(
        f"""
        instance: node-1
        lmdbs:
          main:
            path: /var/lib/app/db
        storage:
          type: s3
          options:
            bucket: lightningstream
            global_prefix: {prefix}
            access_key: ${{AWS_ACCESS_KEY_ID}}
            secret_key: $AWS_SECRET_ACCESS_KEY
        {extra_options}
        """
    )


S3_ENV = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"}


# ---------------------------------------------------------------------------------------------------
# Go os.Expand semantics


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("$HOME/x", {"HOME": "/h"}, "/h/x"),
        ("${HOME}x", {"HOME": "/h"}, "/hx"),
        ("pa$word", {}, "pa"),  # unset: empty, silently
        ("$HOMEx", {"HOME": "/h"}, ""),  # the name runs to the last alphanumeric
        ("${VAR:-default}", {"VAR": "v"}, ""),  # looks up a variable named "VAR:-default"
        ("$$", {}, ""),  # special variable "$"
        ("a$1b", {}, "ab"),  # special variable "1", then "b"
        ("${1}", {}, ""),
        ("${@x}", {"@x": "odd"}, "odd"),
        ("$-x", {}, "x"),
        ("${}x", {}, "x"),  # "${}" is eaten
        ("a${b", {}, "ab"),  # unclosed "${" is eaten, the rest stays
        ("a${b\nc}d", {"b\nc": "N"}, "aNd"),  # a brace name runs across lines
        ("cost: 5$", {}, "cost: 5$"),  # trailing $ stays
        ("$ x $/y $.", {}, "$ x $/y $."),  # $ before a non-name character stays
        ("$_a", {"_a": "u"}, "u"),
        ("ü$Xü", {"X": "1"}, "ü1ü"),
        ("no dollar", {}, "no dollar"),
    ],
)
def test_go_expand_env(text: str, env: dict[str, str], expected: str) -> None:
    assert go_expand_env(text, env) == expected


_DOLLAR_TEXT = st.text(alphabet="$:{}-_aV1 \n/", max_size=30)


@settings(max_examples=300, deadline=None)
@given(_DOLLAR_TEXT)
def test_go_expand_agrees_with_the_standin(text: str) -> None:
    """Two independent readings of Go's os.Expand (ours and the LS stand-in's) must agree."""
    from lssupervisor.testing.standin import config as standin_config

    def mapping(name: str) -> str:
        return f"<{name}>"

    assert go_expand(text, mapping) == standin_config.go_expand(text, mapping)


@settings(max_examples=300, deadline=None)
@given(_DOLLAR_TEXT, st.integers(min_value=0, max_value=10**6))
def test_substituting_our_variable_equals_what_ls_would_expand(body: str, version: int) -> None:
    """Writing the version literally must give exactly what LS would make of ${VAR} itself."""
    text = body.replace("V", "${" + VAR + "}", 1).replace("a", "$" + VAR, 1)
    try:
        substituted, _ = lsconfig._substitute(Template(Path("t"), text, VAR), version, lsconfig._AnyEnv())
    except TemplateError as exc:
        assert "not closed on its line" in str(exc)  # refused outright: nothing is written
        return

    def env(name: str) -> str:
        return str(version) if name == VAR else f"<{name}>"

    assert go_expand(substituted, env) == go_expand(text, env)


@pytest.mark.parametrize(
    ("text", "ns"),
    [("0", 0), ("5s", 5 * 10**9), ("1m30s", 90 * 10**9), ("1.5h", 5400 * 10**9), ("100ms", 10**8),
     ("2us", 2000), ("-1s", -(10**9))],
)
def test_parse_go_duration(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "5x", "."])
def test_parse_go_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 1 << 30), ("64mb", 64 << 20), ("1048576", 1 << 20), ("2 KB", 2048), ("1g", 1 << 30)],
)
def test_parse_bytesize(text: str, size: int) -> None:
    assert parse_bytesize(text) == size


@pytest.mark.parametrize("text", ["1Gb", "GB", "1 XB", "-1GB", "20000000EB"])
def test_parse_bytesize_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytesize(text)


# ---------------------------------------------------------------------------------------------------
# render: substitution, variables, warnings


def test_render_substitutes_both_forms_and_leaves_other_variables_for_ls() -> None:
    t = s3_template(prefix="app/v$APP_SCHEMA_VERSION/${APP_SCHEMA_VERSION}/")
    r = render(t, 7, S3_ENV)
    assert "global_prefix: app/v7/7/" in r.text
    assert "access_key: ${AWS_ACCESS_KEY_ID}" in r.text  # the secret stays out of the file
    assert "secret_key: $AWS_SECRET_ACCESS_KEY" in r.text
    assert "ak" not in r.text
    assert r.view.storage_type == "s3"
    assert r.view.storage_location == "lightningstream/app/v7/7/"
    assert r.warnings == ()


def test_render_refuses_an_unset_variable_naming_it_and_the_line() -> None:
    with pytest.raises(TemplateError) as exc:
        render(s3_template(), 1, {"AWS_ACCESS_KEY_ID": "ak"})
    msg = str(exc.value)
    assert "ls.yaml.in:11:" in msg
    assert "AWS_SECRET_ACCESS_KEY" in msg
    assert "\n" not in msg


def test_render_lists_every_unset_variable() -> None:
    with pytest.raises(TemplateError) as exc:
        render(s3_template(), 1, {})
    assert "ls.yaml.in:10: ${AWS_ACCESS_KEY_ID}" in str(exc.value)
    assert "also unset: AWS_SECRET_ACCESS_KEY" in str(exc.value)


def test_render_warns_on_a_set_but_empty_variable() -> None:
    r = render(s3_template(), 1, {**S3_ENV, "AWS_SECRET_ACCESS_KEY": ""})
    assert len(r.warnings) == 1
    assert "ls.yaml.in:11" in r.warnings[0] and "empty" in r.warnings[0]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("x${REGION:-eu}", "no default syntax"),
        ("pa$1word", "$1"),
        ("pa$$word", "$$"),
        ("a${}b", "deleted"),
        ("${1}", "${1}"),
    ],
)
def test_render_warns_on_every_dollar_ls_would_mangle(value: str, fragment: str) -> None:
    t = s3_template(extra_options=f"    region: '{value}'")
    r = render(t, 1, S3_ENV)
    assert len(r.warnings) == 1, r.warnings
    assert fragment in r.warnings[0]
    assert ":12:" in r.warnings[0]


def test_render_refuses_a_default_on_our_own_variable() -> None:
    with pytest.raises(TemplateError, match="no \\$\\{VAR:-default\\} syntax"):
        render(s3_template(prefix="v${APP_SCHEMA_VERSION:-1}/"), 1, S3_ENV)


def test_render_word_after_dollar_is_a_variable_and_must_be_set() -> None:
    t = s3_template(extra_options="    region: pa$word")
    with pytest.raises(TemplateError, match=r"\$\{word\}.*literal \$"):
        render(t, 1, S3_ENV)


def test_render_ignores_variables_in_comments() -> None:
    t = tmpl("# uses $UNSET_IN_COMMENT and pa$1word and ${X:-y}\n" + textwrap.dedent(FS_BASE).lstrip())
    assert render(t, 1, {}).warnings == ()


@pytest.mark.parametrize("where", ["# broken ${ here\n", "# fine\nkey: a${b\n"])
def test_render_refuses_an_unclosed_brace_that_swallows_lines(where: str) -> None:
    t = tmpl(where + textwrap.dedent(FS_BASE).lstrip() + "# closing }\n")
    with pytest.raises(TemplateError, match=r"not closed on its line.*up to the '}' on line 1[01]"):
        render(t, 1, {})


def test_render_substitutes_in_comments_too() -> None:
    t = tmpl("# version ${APP_SCHEMA_VERSION}\n" + textwrap.dedent(FS_BASE).lstrip())
    assert render(t, 4, {}).text.startswith("# version 4\n")


# ---------------------------------------------------------------------------------------------------
# render: checked as LS would check it


def _fs_with(extra: str) -> Template:
    return tmpl(textwrap.dedent(FS_BASE).lstrip() + textwrap.dedent(extra).lstrip("\n"))


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("sync_interval: 1s\n", "line 10: sync_interval: unknown key"),
        ("http:\n  address: ':8500'\n  port: 1\n", "line 12: http.port: unknown key"),
        ("sweeper:\n  enabld: true\n", "sweeper.enabld: unknown key"),
        ("health:\n  start:\n    report_healthy: true\n", "health.start.report_healthy: unknown key"),
        ("log:\n  colour: true\n", "log.colour: unknown key"),
        ("instance: other\n", "line 10: instance: duplicate key"),
        ("lmdb_poll_interval: 1\n", "lmdb_poll_interval: too short"),  # a bare integer is nanoseconds
        ("lmdb_poll_interval: fast\n", "invalid duration"),
        ("storage_retry_count: 0\n", "storage_retry_count: a positive number"),
        ("storage_force_snapshot_interval: 30s\n", "minimum 1m"),
        ("only_once: maybe\n", "only_once: expected true or false"),
        ("http:\n  address: '8500'\n", "missing port"),
        ("log:\n  format: pretty\n", "log.format"),
        ("lmdbs: {}\n", "duplicate key"),
    ],
)
def test_render_refuses_what_ls_refuses(extra: str, fragment: str) -> None:
    with pytest.raises(TemplateError) as exc:
        render(_fs_with(extra), 1, {})
    assert fragment in str(exc.value)
    assert "rendered for version 1" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("instance: a\nstorage:\n  type: fs\n  options:\n    root_path: /x\n", "no LMDBs configured"),
        ("instance: a\nlmdbs:\n  main:\n    options:\n      create: true\nstorage:\n  type: fs\n"
         "  options:\n    root_path: /x\n", "lmdbs.main.path: no path"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\n    options:\n      map_size: 1Gb\n"
         "storage:\n  type: fs\n  options:\n    root_path: /x\n", "bits"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\n    optons: {}\nstorage:\n  type: fs\n",
         "lmdbs.main.optons: unknown key"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\n    options:\n      nosubdir: true\n"
         "storage:\n  type: fs\n", "lmdbs.main.options.nosubdir: unknown key"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\nstorage:\n  type: fs\n  options:\n"
         "    root_path: /x\n    global_prefix: v1/\n", "fs backend has no global_prefix"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\nstorage:\n  type: fs\n", "root_path: must be set"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\nstorage:\n  type: s3\n  options:\n    bucket: b\n"
         "    prefix: v1/\n", "storage.options.prefix: unknown option for the s3 backend"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\nstorage:\n  type: gcs\n", "'gcs' is unknown"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\n", "storage.type: not set"),
        ("lmdbs:\n  main:\n    path: /d\nstorage:\n  type: memory\n", "instance: not set"),
        ("instance: a\nlmdbs: [1]\nstorage:\n  type: memory\n", "lmdbs: expected a mapping"),
        ("instance: a\nlmdbs:\n  main:\n    path: /d\n  - x\n", "invalid YAML"),
        ("", "empty config"),
    ],
)
def test_render_refuses_broken_configs(text: str, fragment: str) -> None:
    with pytest.raises(TemplateError) as exc:
        render(tmpl(text), 1, {})
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_render_builds_the_view_like_ls() -> None:
    t = tmpl(
        """
        instance: node_1.example
        lmdbs:
          main:
            path: /var/lib/pdns/pdns.lmdb
            options: {no_subdir: true, map_size: 1GB, max_dbs: 100, create: true}
            schema_tracks_changes: true
          shard:
            path: /var/lib/pdns/pdns.lmdb-0
            options:
              map_size: 1048576
        storage:
          type: azure
          options: {container: c, global_prefix: "pdns/v${APP_SCHEMA_VERSION}/", account_name: x}
        http:
          address: 127.0.0.1:8500
        """
    )
    r = render(t, 12, {})
    v = r.view
    assert v.instance == "node-1-example"
    assert any("'node-1-example'" in w for w in r.warnings)
    main, shard = v.lmdbs
    assert (main.name, main.path, main.no_subdir, main.map_size, main.max_dbs, main.native) == (
        "main", "/var/lib/pdns/pdns.lmdb", True, 1 << 30, 100, True
    )
    assert (shard.name, shard.no_subdir, shard.map_size, shard.max_dbs, shard.native) == (
        "shard", False, 1 << 20, 64, False
    )
    assert v.storage_type == "azure"
    assert v.storage_location == "c/pdns/v12/"
    assert v.http_address == "127.0.0.1:8500"


def test_render_fs_view_and_deprecated_root_path() -> None:
    assert render(tmpl(FS_BASE), 3, {}).view.storage_location == "/srv/ls/v3"
    t = tmpl(
        """
        instance: a
        lmdbs: {main: {path: /d}}
        storage:
          type: fs
          options: {}
          root_path: /old/v${APP_SCHEMA_VERSION}
        """
    )
    r = render(t, 2, {})
    assert r.view.storage_location == "/old/v2"
    assert any("deprecated" in w for w in r.warnings)


@pytest.mark.parametrize("options", ["", "  options:\n", "  options: ~\n"])
def test_render_refuses_deprecated_root_path_without_options(options: str) -> None:
    """LS copies storage.root_path into storage.options, a nil Go map when options is absent or null:
    every LS subcommand panics (exit 2) on such a config."""
    t = tmpl("instance: a\nlmdbs: {main: {path: /d}}\nstorage:\n  type: fs\n" + options
             + "  root_path: /old/v${APP_SCHEMA_VERSION}\n")
    with pytest.raises(TemplateError, match=r"storage.root_path.*storage.options.root_path"):
        render(t, 2, {})


def test_render_warns_about_a_relative_lmdb_path() -> None:
    r = render(tmpl("instance: a\nlmdbs: {main: {path: db}}\nstorage: {type: memory}\n"), 1, {})
    assert any("relative" in w for w in r.warnings)


def test_render_expands_other_variables_for_the_checks() -> None:
    t = tmpl("instance: $NODE\nlmdbs: {main: {path: $DB}}\nstorage: {type: memory}\n")
    r = render(t, 1, {"NODE": "n1", "DB": "/d"})
    assert r.view.instance == "n1"
    assert r.view.lmdbs[0].path == "/d"
    assert r.text.startswith("instance: $NODE")


def test_render_refuses_a_negative_version() -> None:
    with pytest.raises(ValueError):
        render(tmpl(FS_BASE), -1, {})


# ---------------------------------------------------------------------------------------------------
# inspect_template and check_prefix_safety


def test_inspect_template_gives_the_view_without_a_version() -> None:
    v = inspect_template(tmpl(FS_BASE), {})
    assert v.lmdbs[0].path == "/var/lib/app/db"
    assert v.instance == "node-1"


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("path: /var/lib/app/db", "path: /var/lib/app/db-v${APP_SCHEMA_VERSION}", "must not move"),
        ("instance: node-1", "instance: node-1-$APP_SCHEMA_VERSION", "instance depends"),
    ],
)
def test_inspect_template_refuses_a_versioned_lmdb_or_instance(old: str, new: str, fragment: str) -> None:
    t = tmpl(FS_BASE.replace(old, new))
    with pytest.raises(TemplateError, match=fragment):
        inspect_template(t, {})


def test_prefix_safety_accepts_versioned_locations() -> None:
    check_prefix_safety(tmpl(FS_BASE))
    check_prefix_safety(s3_template())  # the credentials are unset here: not needed for this check
    check_prefix_safety(s3_template(prefix="app/").__class__(
        path=Path("t"), text=s3_template(prefix="app/").text.replace(
            "bucket: lightningstream", "bucket: ls-v${APP_SCHEMA_VERSION}"), variable=VAR))


def test_prefix_safety_warns_about_a_versioned_global_prefix_without_a_trailing_slash() -> None:
    assert check_prefix_safety(tmpl(FS_BASE)) == []
    assert check_prefix_safety(s3_template()) == []
    region = {"REGION": "eu"}
    assert check_prefix_safety(s3_template(prefix="ls-v${APP_SCHEMA_VERSION}/${REGION}/"), region) == []
    (warning,) = check_prefix_safety(s3_template(prefix="app/v${APP_SCHEMA_VERSION}"))
    assert "global_prefix 'app/v1' (for version 1) does not end with '/'" in warning
    assert warning.endswith("e.g. global_prefix: app/v${APP_SCHEMA_VERSION}/")
    assert "\n" not in warning
    # Other variables keep the value LS will see; only ours is shown as the variable.
    (warning,) = check_prefix_safety(s3_template(prefix="${REGION}/v${APP_SCHEMA_VERSION}-1"), region)
    assert warning.endswith("e.g. global_prefix: eu/v${APP_SCHEMA_VERSION}-1/")


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        (tmpl(FS_BASE.replace("/v${APP_SCHEMA_VERSION}", "")), "root_path: /srv/ls/v${APP_SCHEMA_VERSION}"),
        (s3_template(prefix="app/"), "global_prefix: v${APP_SCHEMA_VERSION}/"),
        (tmpl(FS_BASE + "    global_prefix: v${APP_SCHEMA_VERSION}/\n"), "fs backend has no global_prefix"),
        (tmpl("instance: a\nlmdbs: {main: {path: /d}}\nstorage: {type: memory}\n"), "memory"),
    ],
)
def test_prefix_safety_refuses(template: Template, fragment: str) -> None:
    with pytest.raises(TemplateError) as exc:
        check_prefix_safety(template)
    assert fragment in str(exc.value)


# ---------------------------------------------------------------------------------------------------
# load_template, ls_environment


def test_load_template_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml\.in: LS config template not found"):
        load_template(tmp_path / "missing.yaml.in", VAR)
    (tmp_path / "bin.in").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_template(tmp_path / "bin.in", VAR)
    (tmp_path / "ok.in").write_text(FS_BASE)
    t = load_template(tmp_path / "ok.in", VAR)
    assert t.text == FS_BASE and t.variable == VAR


def test_ls_environment_drops_systemd_variables(tmp_path: Path) -> None:
    cfg = parse_config(
        "lightningstream:\n  env: {LS_EXTRA: 'x', HOME: /ls}\nschema:\n  variable: MY_VER\n",
        "t.yaml", tmp_path,
    )
    base = {"HOME": "/root", "PATH": "/bin", "NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1",
            "WATCHDOG_PID": "2", "LISTEN_FDS": "1", "LISTEN_PID": "3", "LISTEN_FDNAMES": "x", "MY_VER": "9"}
    env = ls_environment(cfg, 5, base)
    assert env == {"HOME": "/ls", "PATH": "/bin", "LS_EXTRA": "x", "MY_VER": "5"}
    assert base["MY_VER"] == "9"  # the caller's mapping is not modified


# ---------------------------------------------------------------------------------------------------
# write_atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_atomic_writes_0600_and_keeps_the_previous_file(tmp_path: Path) -> None:
    p = tmp_path / "ls.yaml"
    assert write_atomic(p, "one\n") is True
    assert p.read_text() == "one\n" and _mode(p) == 0o600
    assert not (tmp_path / "ls.yaml.prev").exists()
    assert write_atomic(p, "two\n") is True
    assert p.read_text() == "two\n"
    assert (tmp_path / "ls.yaml.prev").read_text() == "one\n"
    assert _mode(tmp_path / "ls.yaml.prev") == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ls.yaml", "ls.yaml.prev"]


def test_write_atomic_unchanged_content_is_not_written(tmp_path: Path) -> None:
    p = tmp_path / "ls.yaml"
    write_atomic(p, "same\n")
    before = p.stat()
    assert write_atomic(p, "same\n") is False
    after = p.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert not (tmp_path / "ls.yaml.prev").exists()


def test_write_atomic_without_keep_previous(tmp_path: Path) -> None:
    p = tmp_path / "f"
    write_atomic(p, "a", mode=0o640)
    write_atomic(p, "b", mode=0o640, keep_previous=False)
    assert p.read_text() == "b" and _mode(p) == 0o640
    assert not (tmp_path / "f.prev").exists()


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_write_atomic_crash_leaves_the_old_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    p = tmp_path / "ls.yaml"
    write_atomic(p, "old\n")
    real = getattr(os, failing)
    calls = {"n": 0}

    def boom(*args: Any) -> Any:
        calls["n"] += 1
        # The first replace/fsync belongs to the .prev copy; fail on the one for the file itself.
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError):
        write_atomic(p, "new\n")
    monkeypatch.undo()
    assert p.read_text() == "old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ls.yaml", "ls.yaml.prev"]  # no temp left


# ---------------------------------------------------------------------------------------------------
# validate_with_binary


def _script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fake-ls"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_validate_with_binary_passes_the_config_and_env(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    fake = _script(tmp_path, f'echo "$1 $2 $LS_SECRET" > {out}\nexit 0\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("x")
    validate_with_binary(str(fake), cfg, {"LS_SECRET": "s3cr3t", "PATH": os.environ["PATH"]})
    assert out.read_text().strip() == f"-c {cfg} s3cr3t"


def test_validate_with_binary_reports_the_last_stderr_line(tmp_path: Path) -> None:
    fatal = 'level=fatal msg="Config file error: no LMDBs"'
    fake = _script(tmp_path, f"echo starting >&2\necho '{fatal}' >&2\nexit 1\n")
    with pytest.raises(TemplateError, match=f"refuses this config: {fatal}"):
        validate_with_binary(str(fake), tmp_path / "c.yaml", {})


def test_validate_with_binary_skips_a_missing_binary(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "nope"), "lightningstream-does-not-exist"):
        assert lsbinary.resolve_binary(missing) is None
        validate_with_binary(missing, tmp_path / "c.yaml", {})  # returns without raising
    not_executable = tmp_path / "ls"
    not_executable.write_text("#!/bin/sh\nexit 1\n")
    assert lsbinary.resolve_binary(str(not_executable)) is None


def test_validate_with_binary_times_out(tmp_path: Path) -> None:
    fake = _script(tmp_path, "exec sleep 30\n")
    with pytest.raises(TemplateError, match="did not finish"):
        validate_with_binary(str(fake), tmp_path / "c.yaml", {"PATH": os.environ["PATH"]}, timeout=0.3)


def _standin(tmp_path: Path) -> Path:
    return _script(tmp_path, f'exec {sys.executable} -m lssupervisor.testing.standin "$@"\n')


def test_validate_with_the_standin(tmp_path: Path) -> None:
    standin = _standin(tmp_path)
    rendered = render(tmpl(FS_BASE), 1, {})
    good = tmp_path / "good.yaml"
    good.write_text(rendered.text)
    validate_with_binary(str(standin), good, dict(os.environ))
    bad = tmp_path / "bad.yaml"
    bad.write_text(rendered.text + "bogus_key: 1\n")
    with pytest.raises(TemplateError, match="bogus_key"):
        validate_with_binary(str(standin), bad, dict(os.environ))


@pytest.mark.real_ls
def test_validate_with_real_lightningstream(tmp_path: Path) -> None:
    binary = real_ls_binary()
    env = {**os.environ, **S3_ENV}
    rendered = render(s3_template(), 3, env)
    good = tmp_path / "good.yaml"
    write_atomic(good, rendered.text)
    validate_with_binary(binary, good, env)
    # What we refuse for unknown keys, LS refuses too.
    bad = tmp_path / "bad.yaml"
    write_atomic(bad, rendered.text + "sync_interval: 1s\n")
    with pytest.raises(TemplateError):
        render(s3_template(extra_options="sync_interval: 1s"), 3, env)
    with pytest.raises(TemplateError, match="sync_interval"):
        validate_with_binary(binary, bad, env)


# ---------------------------------------------------------------------------------------------------
# lssupervisor render-config


def _config_set(tmp_path: Path, template: str) -> Path:
    (tmp_path / "lightningstream.yaml.in").write_text(template)
    cfg = tmp_path / "lssupervisor.yaml"
    cfg.write_text("state_dir: state\n")
    return cfg


def test_render_config_prints_the_rendered_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config_set(tmp_path, FS_BASE)
    assert render_cmd.cmd_render_config(argparse.Namespace(config=str(cfg), schema_version=5)) == 0
    out = capsys.readouterr().out
    assert "root_path: /srv/ls/v5" in out


def test_render_config_without_version_reads_the_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lmdb

    from lssupervisor.worker.marker import stamp

    db = tmp_path / "db"
    cfg = _config_set(tmp_path, FS_BASE.replace("/var/lib/app/db", str(db)))
    args = argparse.Namespace(config=str(cfg), schema_version=None)
    with pytest.raises(UsageError, match="no schema marker yet; give --version N"):
        render_cmd.cmd_render_config(args)
    view = inspect_template(load_template(tmp_path / "lightningstream.yaml.in", VAR), {})
    env = lmdb.open(str(db), max_dbs=8, subdir=True)
    try:
        stamp(env, view.lmdbs[0], 6, instance=view.instance)
    finally:
        env.close()
    capsys.readouterr()
    assert render_cmd.cmd_render_config(args) == 0
    assert "root_path: /srv/ls/v6" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The example config sets in config/


CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@pytest.mark.parametrize(
    ("example", "env", "location"),
    [
        ("pdns", {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}, "lightningstream/pdns/v3/"),
        ("generic", {"APP_INSTANCE": "app-1"}, "/mnt/shared/lightningstream/myapp/v3"),
    ],
)
def test_example_config_sets_load_render_and_are_prefix_safe(
    example: str, env: dict[str, str], location: str
) -> None:
    from lssupervisor.config import load_config

    cfg = load_config(CONFIG_DIR / example / "lssupervisor.yaml")
    template = load_template(CONFIG_DIR / example / "lightningstream.yaml.in", cfg.schema.variable)
    r = render(template, 3, ls_environment(cfg, 3, env))
    assert r.warnings == ()
    assert r.view.storage_location == location
    check_prefix_safety(template, env)
    assert inspect_template(template, env).lmdbs == r.view.lmdbs
    with pytest.raises(TemplateError, match="is not set"):
        render(template, 3, {})  # every variable it needs is named


def _key_tree(kind: Any) -> Any:
    """Keys of a schema, whichever of the two notations (ours: dicts; the stand-in's: tuples)."""
    if isinstance(kind, dict):
        return {k: _key_tree(v) for k, v in kind.items()}
    if isinstance(kind, tuple) and kind[0] == "struct":
        return {k: _key_tree(v) for k, v in kind[2].items()}
    if isinstance(kind, tuple) and kind[0] == "map":
        return ("map", _key_tree(kind[1]))
    return "leaf"


def test_ls_key_set_agrees_with_the_standin() -> None:
    """Both were read independently from LS's config.go; a key one of them misses is a bug in it."""
    from lssupervisor.testing.standin import config as standin_config

    assert _key_tree(lsconfig.LS_CONFIG_KEYS) == _key_tree(standin_config.CONFIG_SCHEMA)

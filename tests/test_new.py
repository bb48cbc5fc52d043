"""``lssupervisor new``: the next migration file, which ``check`` accepts, whose scaffold fails closed,
and whose commented example is real code."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lssupervisor.cli.main import main
from lssupervisor.cli.new import SLUG_MAX, render, slugify
from lssupervisor.config import load_config
from lssupervisor.daemon import lock
from lssupervisor.errors import ExitCode, MigrationError
from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, read_marker_version, run_migrations
from lssupervisor.worker.migrations import Strategy, discover
from tests.harness.configs import TEMPLATE, config_set, fake_ls, migration

T_OLD = 1_600_000_000_000_000_000
NOW = 2_000_000_000_000_000_000


def new(cfg: Path, *args: str) -> int:
    return main(["new", "-c", str(cfg), *args])


def written(capsys: pytest.CaptureFixture[str]) -> Path:
    out = capsys.readouterr().out
    (line,) = out.splitlines()  # stdout is the path alone: $EDITOR "$(lssupervisor new ...)"
    return Path(line)


@pytest.mark.parametrize(
    ("option", "strategy"),
    [("prefix", Strategy.PREFIX), ("new_dbi", Strategy.NEW_DBI), ("in_place", Strategy.IN_PLACE),
     ("in-place", Strategy.IN_PLACE)],
)
def test_new_writes_the_next_migration_and_check_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, strategy: Strategy
) -> None:
    cfg = config_set(tmp_path, binary=fake_ls(tmp_path, "exit 0\n"))
    migration(tmp_path, 1, "prefix")
    migration(tmp_path, 2, "prefix")
    assert new(cfg, "Split users' names into first and last", "--strategy", option) == 0
    path = written(capsys)
    assert path == tmp_path / "migrations" / "0003_split_users_names_into_first_and_last.py"
    assert path.stat().st_mode & 0o777 == 0o644
    (mig,) = [m for m in discover(tmp_path / "migrations", ["main"]).migrations if m.version == 3]
    assert mig.description == "Split users' names into first and last"
    assert mig.strategy is strategy
    assert main(["check", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ok: 3 migration(s)" in out
    # ...with a warning that the body is still the scaffold, naming the line of the raise.
    (warning,) = [line for line in out.splitlines() if line.startswith("warning: ")]
    raise_line = path.read_text().splitlines().index(
        '    raise NotImplementedError("write upgrade(m): this is the scaffold `lssupervisor new` wrote")'
    ) + 1
    assert warning.startswith(f"warning: {path}:{raise_line}: upgrade() is still the scaffold")


def test_the_first_migration_is_0001(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_set(tmp_path)
    assert new(cfg, "Baseline") == 0
    assert written(capsys).name == "0001_baseline.py"


def test_the_scaffold_fails_its_step_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path)
    assert new(cfg, "Not written yet") == 0
    path = written(capsys)
    spec = build_lmdb(tmp_path / "db", {"users": {"u1": ("x", T_OLD)}}, marker=0)
    with pytest.raises(MigrationError, match=rf"{re.escape(path.name)}:\d+: .*NotImplementedError"):
        run_migrations(spec, tmp_path / "migrations", clock=lambda: NOW)
    assert read_marker_version(spec) == 0
    assert read_lmdb(spec)["users"] == {b"u1": (b"x", T_OLD)}


def _filled_in(path: Path) -> None:
    """The scaffold with its commented example made real: uncomment the code, drop the raise."""
    lines = path.read_text().splitlines()
    body = [line[len("    #     "):] for line in lines if line.startswith("    #     ")]
    head = lines[: lines.index("def upgrade(m):")]
    docstring, rest = head[0], head[1:]  # the message is one line here
    indented = ("    " + line if line else "" for line in body)
    code = [docstring, "import json", *rest, "def upgrade(m):", *indented]
    path.write_text("\n".join(code) + "\n")


# Data each strategy's example expects, and what it must leave behind (the examples' own tests in
# examples/migrations/ check the same).
EXAMPLES = {
    "prefix": (
        {"users": {"u1": (json.dumps({"name": "Ada Lovelace"}), T_OLD)}},
        lambda dump: dump["users"][b"u1"] == (b'{"first": "Ada", "last": "Lovelace"}', T_OLD)
        and dump["users_by_last"][b"lovelace/u1"] == (b"", T_OLD),
    ),
    "new_dbi": (
        {"users": {"u1": ("Ada,ada@example.net", T_OLD)}},
        lambda dump: dump["users_v2"][b"u1"] == (b'{"email": "ada@example.net", "name": "Ada"}', T_OLD),
    ),
    "in_place": (
        {"users": {"u1": (json.dumps({"email": "Ada@Example.NET"}), T_OLD)}},
        lambda dump: dump["users"][b"u1"][0] == b'{"email": "ada@example.net"}'
        and dump["users"][b"u1"][1] > T_OLD,  # in-place: a fresh timestamp
    ),
}


@pytest.mark.parametrize("option", sorted(EXAMPLES))
def test_the_commented_example_is_real_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    cfg = config_set(tmp_path)
    assert new(cfg, f"Example {option}", "--strategy", option) == 0
    _filled_in(written(capsys))
    data, expected = EXAMPLES[option]
    spec = build_lmdb(tmp_path / "db", data, marker=0)
    run_migrations(spec, tmp_path / "migrations", clock=lambda: NOW)
    assert read_marker_version(spec) == 1
    assert expected(read_lmdb(spec))


def test_new_refuses_a_directory_with_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_set(tmp_path)
    migration(tmp_path, 2, "prefix")  # 1 is missing
    (tmp_path / "migrations" / "0003_bad.py").write_text("VERSION = 3\n")
    before = sorted(p.name for p in (tmp_path / "migrations").iterdir())
    assert new(cfg, "Next") == ExitCode.MIGRATION
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"lssupervisor: error: 3 problem(s) in {tmp_path / 'migrations'} (first: ")
    assert f"`lssupervisor check -c {cfg}` lists them" in line
    assert sorted(p.name for p in (tmp_path / "migrations").iterdir()) == before


def test_new_refuses_while_a_daemon_runs_on_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path)
    with lock.acquire(load_config(cfg), [], "daemon"):
        assert new(cfg, "Next") == ExitCode.LOCKED
    (line,) = capsys.readouterr().err.splitlines()
    assert "would run an unfinished migration" in line
    assert list((tmp_path / "migrations").iterdir()) == []


def test_prefix_needs_a_versioned_storage_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config_set(tmp_path, root="/srv/ls")
    assert new(cfg, "Next") == ExitCode.USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert "pass --strategy new_dbi or --strategy in_place" in line
    assert new(cfg, "Next", "--strategy", "new_dbi") == 0
    assert written(capsys).name == "0001_next.py"


def test_several_lmdbs_need_lmdb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = TEMPLATE.format(db=tmp_path / "db", root="/srv/ls/v${APP_SCHEMA_VERSION}").replace(
        "storage:", f"  shard:\n    path: {tmp_path / 'shard'}\n    schema_tracks_changes: true\nstorage:"
    )
    cfg = config_set(tmp_path, template=template)
    assert new(cfg, "Next") == ExitCode.USAGE
    assert "say which one this migration changes with --lmdb NAME" in capsys.readouterr().err
    assert new(cfg, "Next", "--lmdb", "nope") == ExitCode.USAGE
    assert new(cfg, "Next", "--lmdb", "shard") == 0
    path = written(capsys)
    assert discover(tmp_path / "migrations", ["main", "shard"]).migrations[0].lmdb == "shard"
    assert 'LMDB = "shard"' in path.read_text()


def test_an_empty_message_is_refused(tmp_path: Path) -> None:
    assert new(config_set(tmp_path), "  ") == ExitCode.USAGE


@pytest.mark.parametrize(
    ("message", "slug"),
    [
        ("Split names", "split_names"),
        ("  Résumé: naïve café!  \nsecond line ignored", "resume_naive_cafe"),
        ("users -> users_v2 (JSON)", "users_users_v2_json"),
        ("!!!", "migration"),
        ("ünïcödé ☃", "unicode"),
        ("a" * 60, "a" * SLUG_MAX),
        ("one two three four five six seven eight nine ten", "one_two_three_four_five_six_seven_eight"),
    ],
)
def test_slugify(message: str, slug: str) -> None:
    assert slugify(message) == slug
    assert re.fullmatch(r"[a-z0-9][a-z0-9_]*", slug) and len(slug) <= SLUG_MAX


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(lambda s: bool(s.strip())))
def test_any_message_reads_back_as_the_docstring(message: str) -> None:
    text = render(message.strip(), 7, Strategy.IN_PLACE, None)
    tree = ast.parse(text)
    assert ast.get_docstring(tree) == inspect.cleandoc(message.strip())
    assert re.fullmatch(r"[a-z0-9][a-z0-9_]*", slugify(message))

"""Loading, validating and planning migration files (no LMDB needed)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from lssupervisor.errors import ChecksumMismatch, MigrationError, MigrationLoadError, SchemaTooNew
from lssupervisor.worker.migrations import (
    Step,
    Strategy,
    check_checksums,
    discover,
    load,
    plan,
    scan,
)

MAIN = ("main",)


def write(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o644)
    return path


def good(directory: Path, version: int, slug: str = "step", extra: str = "") -> Path:
    return write(
        directory,
        f"{version:04d}_{slug}.py",
        f'''
        """Migration {version} {slug}."""
        VERSION = {version}
        {extra}

        def upgrade(m):
            m.calls.append({version})
        ''',
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[int] = []


def test_discover_reads_literals_in_order_and_defaults(tmp_path: Path) -> None:
    good(tmp_path, 2, "second", 'STRATEGY = "in-place"')
    good(tmp_path, 1, "first")
    write(tmp_path, "__init__.py", "")
    found = discover(tmp_path, MAIN)
    assert [m.name for m in found.migrations] == ["0001_first", "0002_second"]
    first, second = found.migrations
    assert first.description == "Migration 1 first."
    assert first.strategy is Strategy.PREFIX and second.strategy is Strategy.IN_PLACE
    assert first.lmdb == "main"
    assert len(first.checksum) == 64
    assert found.newest == 2
    assert first.upgrade is None  # discovery never imports


def test_discover_does_not_execute_files_and_load_does_not_run_upgrade(tmp_path: Path) -> None:
    flag = tmp_path / "imported"
    mig_dir = tmp_path / "m"
    write(
        mig_dir,
        "0001_side_effect.py",
        f'''
        """Touches a file when imported."""
        import pathlib
        pathlib.Path({str(flag)!r}).write_text("x")
        VERSION = 1

        def upgrade(m):
            raise AssertionError("upgrade must not run at load")
        ''',
    )
    discover(mig_dir, MAIN)
    assert not flag.exists()
    loaded = load(mig_dir, MAIN)
    assert flag.exists()
    assert loaded.loaded and loaded.migrations[0].upgrade is not None


def test_two_directories_with_same_file_names_do_not_clash(tmp_path: Path) -> None:
    good(tmp_path / "a", 1, "same")
    write(
        tmp_path / "b",
        "0001_same.py",
        '''
        """Other."""
        VERSION = 1

        def upgrade(m):
            m.calls.append("b")
        ''',
    )
    a = load(tmp_path / "a", MAIN).migrations[0]
    b = load(tmp_path / "b", MAIN).migrations[0]
    rec = Recorder()
    assert a.upgrade is not None and b.upgrade is not None
    a.upgrade(rec)
    b.upgrade(rec)
    assert rec.calls == [1, "b"]


def test_importable_package_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "myapp_pkg_for_test" / "migrations"
    write(tmp_path / "myapp_pkg_for_test", "__init__.py", "")
    write(pkg, "__init__.py", "")
    good(pkg, 1, "init")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = load("myapp_pkg_for_test.migrations", MAIN)
    assert found.directory == pkg.resolve()
    assert [m.name for m in found.migrations] == ["0001_init"]


def test_missing_source_is_clear(tmp_path: Path) -> None:
    with pytest.raises(MigrationLoadError, match="not a directory and not an importable package"):
        discover(tmp_path / "nope", MAIN)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0001_a.py": 1, "0003_c.py": 3}, r"gap in migration versions: 2 is missing before 0003_c.py"),
        ({"0001_a.py": 1, "0001_b.py": 1}, r"0001_b.py: duplicate version 1 \(also 0001_a.py\)"),
        ({"0002_a.py": 2}, r"1 is missing before 0002_a.py"),
    ],
)
def test_versions_must_be_contiguous_and_unique(tmp_path: Path, files: dict[str, int], message: str) -> None:
    for name, version in files.items():
        write(tmp_path, name, f'"""D."""\nVERSION = {version}\ndef upgrade(m):\n    pass\n')
    with pytest.raises(MigrationLoadError, match=message):
        discover(tmp_path, MAIN)


def test_discover_names_every_problem_in_one_error(tmp_path: Path) -> None:
    good(tmp_path, 1)
    write(tmp_path, "0002_x.py", 'VERSION = 2\ndef upgrade(m, extra):\n    pass\n')
    good(tmp_path, 6)
    write(tmp_path, "0006_again.py", '"""D."""\nVERSION = 6\ndef upgrade(m):\n    pass\n')
    found = scan(tmp_path, MAIN)
    assert found.problems == (
        f"{tmp_path / '0002_x.py'}:2: upgrade must take exactly one argument: def upgrade(m)",
        f"{tmp_path / '0002_x.py'}: missing module docstring; its first line describes the migration",
        f"{tmp_path / '0006_step.py'}: duplicate version 6 (also 0006_again.py)",
        f"{tmp_path}: gap in migration versions: 3 to 5 are missing before 0006_again.py",
    )
    assert [m.version for m in found.migrations] == [1, 6]  # the valid ones, for tools that list
    assert found.next_version == 7
    with pytest.raises(MigrationLoadError) as info:
        discover(tmp_path, MAIN)
    message = str(info.value)
    assert message.startswith(f"4 problems in the migrations in {tmp_path}: ")
    assert all(problem in message for problem in found.problems)
    assert "\n" not in message  # one line: a log line, a PARKED reason


def test_a_single_problem_is_its_own_message(tmp_path: Path) -> None:
    good(tmp_path, 2)
    with pytest.raises(MigrationLoadError) as info:
        discover(tmp_path, MAIN)
    assert str(info.value) == f"{tmp_path}: gap in migration versions: 1 is missing before 0002_step.py"


@pytest.mark.parametrize("name", ["1_short.py", "0001-dash.py", "0001_.py", "abcd_x.py", "0001_bad name.py"])
def test_bad_file_names_are_named(tmp_path: Path, name: str) -> None:
    write(tmp_path, name, '"""D."""\nVERSION = 1\ndef upgrade(m):\n    pass\n')
    with pytest.raises(MigrationLoadError, match="bad migration file name") as info:
        discover(tmp_path, MAIN)
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('"""D."""\nVERSION = 1\n', r"0001_x.py: missing top-level def upgrade\(m\)"),
        (
            '"""D."""\nVERSION = 1\ndef upgrade(m, n):\n    pass\n',
            r"0001_x.py:3: upgrade must take exactly one",
        ),
        (
            '"""D."""\nVERSION = 1\nasync def upgrade(m):\n    pass\n',
            r"0001_x.py:3: upgrade must be a plain def",
        ),
        ('"""D."""\ndef upgrade(m):\n    pass\n', r"0001_x.py: missing VERSION = 1"),
        ('"""D."""\nVERSION = 2\ndef upgrade(m):\n    pass\n', r"0001_x.py:2: VERSION = 2 does not match"),
        (
            '"""D."""\nVERSION = "1"\ndef upgrade(m):\n    pass\n',
            r"0001_x.py:2: VERSION = '1' does not match",
        ),
        ('"""D."""\nVERSION = 0 + 1\ndef upgrade(m):\n    pass\n', r"0001_x.py:2: VERSION must be a literal"),
        ("VERSION = 1\ndef upgrade(m):\n    pass\n", r"0001_x.py: missing module docstring"),
        (
            '"""D."""\nVERSION = 1\nSTRATEGY = "sideways"\ndef upgrade(m):\n    pass\n',
            r"0001_x.py:3: STRATEGY = 'sideways' is not one of 'prefix', 'new-dbi', 'in-place'",
        ),
        (
            '"""D."""\nVERSION = 1\nLMDB = "other"\ndef upgrade(m):\n    pass\n',
            r"0001_x.py:3: LMDB = 'other' is not an lmdb of the LS config \(known: 'main'\)",
        ),
        ('"""D."""\nVERSION = 1\ndef upgrade(m)\n    pass\n', r"0001_x.py:3: syntax error"),
        (
            '"""D."""\nVERSION = 1\nVERSION = 1\ndef upgrade(m):\n    pass\n',
            r"0001_x.py:3: VERSION assigned twice",
        ),
        (
            '"""D."""\nVERSION: int = 1\nVERSION: int = 2\ndef upgrade(m):\n    pass\n',
            r"0001_x.py:3: VERSION assigned twice",
        ),
        (
            '"""D."""\nVERSION = 1\nVERSION: int = 2\ndef upgrade(m):\n    pass\n',
            r"0001_x.py:3: VERSION assigned twice",
        ),
        (
            '"""D."""\nVERSION = 1\nSTRATEGY: str = "prefix"\nSTRATEGY = "in-place"\n'
            "def upgrade(m):\n    pass\n",
            r"0001_x.py:4: STRATEGY assigned twice",
        ),
    ],
)
def test_bad_migration_files_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    write(tmp_path, "0001_x.py", body)
    with pytest.raises(MigrationLoadError, match=message):
        discover(tmp_path, MAIN)


def test_annotated_assignments_are_read_like_plain_ones(tmp_path: Path) -> None:
    body = '"""D."""\nVERSION: int = 1\nSTRATEGY: str = "in-place"\ndef upgrade(m):\n    pass\n'
    write(tmp_path, "0001_x.py", body)
    (m,) = discover(tmp_path, MAIN).migrations
    assert (m.version, m.strategy.value) == (1, "in-place")


def test_lmdb_is_required_with_several_lmdbs(tmp_path: Path) -> None:
    good(tmp_path, 1)
    with pytest.raises(
        MigrationLoadError, match=r'0001_step.py: LMDB = "..." is required because .* 2 lmdbs'
    ):
        discover(tmp_path, ("main", "other"))
    write(tmp_path, "0001_step.py", '"""D."""\nVERSION = 1\nLMDB = "other"\ndef upgrade(m):\n    pass\n')
    assert discover(tmp_path, ("main", "other")).migrations[0].lmdb == "other"


def test_import_error_reports_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_broken.py",
        '''
        """Fails at import."""
        VERSION = 1
        import json
        CONFIG = json.loads("{not json")

        def upgrade(m):
            pass
        ''',
    )
    discover(tmp_path, MAIN)  # fine: nothing executed
    with pytest.raises(MigrationLoadError, match=r"0001_broken.py:4: import failed: JSONDecodeError"):
        load(tmp_path, MAIN)


def test_world_writable_file_is_refused(tmp_path: Path) -> None:
    path = good(tmp_path / "m", 1)
    path.chmod(0o666)
    with pytest.raises(
        MigrationLoadError,
        match=r"untrusted migration file .*0001_step.py: writable by group and others "
        r"\[owner root, group \w+, mode 0666\]; fix: chmod go-w .*0001_step.py$",
    ):
        discover(tmp_path / "m", MAIN)


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    good(tmp_path / "m", 1)
    (tmp_path / "m").chmod(0o777)
    with pytest.raises(
        MigrationLoadError, match=r"untrusted migrations directory .*/m: writable by group and others"
    ):
        discover(tmp_path / "m", MAIN)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = good(tmp_path / "m", 1)
    os.chown(path, 12345, 12345)
    with pytest.raises(
        MigrationLoadError, match=r"untrusted migration file .*0001_step.py: owned by 12345 \(uid 12345\)"
    ):
        discover(tmp_path / "m", MAIN)


def test_checksums_match_history(tmp_path: Path) -> None:
    good(tmp_path, 1)
    good(tmp_path, 2)
    found = discover(tmp_path, MAIN)
    check_checksums(found, {1: found.get(1).checksum, 2: found.get(2).checksum})
    check_checksums(found, [(1, found.get(1).checksum), (3, "unknown-version-is-plan's-job")])


def test_checksum_drift_names_file_and_both_checksums(tmp_path: Path) -> None:
    path = good(tmp_path, 1)
    recorded = discover(tmp_path, MAIN).get(1).checksum
    path.write_text(path.read_text() + "# edited after it ran\n")
    found = discover(tmp_path, MAIN)
    with pytest.raises(ChecksumMismatch) as info:
        check_checksums(found, {1: recorded})
    text = str(info.value)
    assert "0001_step.py" in text and recorded in text and found.get(1).checksum in text


def _set(tmp_path: Path, lmdbs: dict[int, str]) -> object:
    for version, lmdb in lmdbs.items():
        good(tmp_path, version, extra=f'LMDB = "{lmdb}"')
    return discover(tmp_path, sorted(set(lmdbs.values())))


def test_plan_single_lmdb(tmp_path: Path) -> None:
    for v in (1, 2, 3):
        good(tmp_path, v)
    found = discover(tmp_path, MAIN)
    steps = plan(found, {"main": 1}).steps
    assert [(s.from_version, s.to_version, s.migration.version if s.migration else None) for s in steps] == [
        (1, 2, 2),
        (2, 3, 3),
    ]
    assert plan(found, {"main": 0}, target=2).target == 2
    assert plan(found, {"main": 3}).empty


def test_plan_folds_other_lmdbs_versions_into_marker_moves(tmp_path: Path) -> None:
    found = _set(tmp_path, {1: "a", 2: "b", 3: "b", 4: "a", 5: "b"})
    result = plan(found, {"a": 0, "b": 1})  # type: ignore[arg-type]
    a = [
        (s.from_version, s.to_version, s.migration.version if s.migration else None)
        for s in result.for_lmdb("a")
    ]
    b = [
        (s.from_version, s.to_version, s.migration.version if s.migration else None)
        for s in result.for_lmdb("b")
    ]
    assert a == [(0, 3, 1), (3, 5, 4)]
    assert b == [(1, 2, 2), (2, 4, 3), (4, 5, 5)]


def test_plan_marker_only_step_when_lmdb_has_nothing_to_do(tmp_path: Path) -> None:
    found = _set(tmp_path, {1: "a", 2: "a"})
    assert plan(found, {"a": 2, "b": 0}).steps == (Step("b", 0, 2, None),)  # type: ignore[arg-type]


def test_plan_refuses_too_new_and_downward(tmp_path: Path) -> None:
    good(tmp_path, 1)
    good(tmp_path, 2)
    found = discover(tmp_path, MAIN)
    with pytest.raises(
        SchemaTooNew, match=r"LMDB 'main' is at schema version 3, newer than the newest migration 2"
    ):
        plan(found, {"main": 3})
    with pytest.raises(MigrationError, match="above the target 1; migrations only go up"):
        plan(found, {"main": 2}, target=1)
    with pytest.raises(MigrationError, match="target version 7 is unknown"):
        plan(found, {"main": 0}, target=7)

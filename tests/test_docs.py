"""Checks that keep the documentation true to the code.

The runbook is read at 3 a.m.: a command, exit code or state name that does not exist wastes the
reader's time when it matters most. These tests read README.md and docs/*.md as text and compare what
they cite with the code: the CLI parser, ``errors.ExitCode``, ``states.State``/``Substep``, the
Makefile, the CI entry point and the files links point to.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lssupervisor.cli.main import build_parser
from lssupervisor.core.states import State, Substep
from lssupervisor.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"
# Fenced blocks in these languages hold commands; untagged blocks hold output (which may start with
# "lssupervisor pid ...", not a command).
SHELL_LANGS = {"sh", "bash", "shell", "console", "sh-session"}


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


# ---------------------------------------------------------------------------------------------------
# A small markdown reader: fenced blocks, inline code spans (CommonMark backtick runs), links


@dataclass(frozen=True, slots=True)
class Fence:
    lang: str
    lines: tuple[tuple[int, str], ...]  # (line number, text)


def split_fences(text: str) -> tuple[list[Fence], list[tuple[int, str]]]:
    """Fenced code blocks, and the remaining (prose) lines with their numbers."""
    fences: list[Fence] = []
    prose: list[tuple[int, str]] = []
    fence_re = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
    current: list[tuple[int, str]] | None = None
    marker = ""
    lang = ""
    for number, line in enumerate(text.splitlines(), start=1):
        m = fence_re.match(line)
        if current is None:
            if m:
                current, marker, lang = [], m.group(2), m.group(3).lower()
            else:
                prose.append((number, line))
        elif m and m.group(2).startswith(marker) and not m.group(3):
            fences.append(Fence(lang, tuple(current)))
            current = None
        else:
            current.append((number, line))
    assert current is None, "unclosed code fence"
    return fences, prose


def code_spans(line: str) -> Iterator[str]:
    """Inline code spans of one line: a run of N backticks up to the next run of exactly N."""
    i = 0
    while i < len(line):
        if line[i] != "`":
            i += 1
            continue
        j = i
        while j < len(line) and line[j] == "`":
            j += 1
        run = line[i:j]
        close = re.compile(r"(?<!`)" + re.escape(run) + r"(?!`)")
        m = close.search(line, j)
        if m is None:
            i = j
            continue
        content = line[j : m.start()]
        if len(content) > 1 and content.startswith(" ") and content.endswith(" "):
            content = content[1:-1]
        yield content
        i = m.end()


# `lssupervisor <word>` where "lssupervisor" begins a command: at the start of the code, or after a
# prompt, a shell separator, a backtick (a command nested in a quoted message), "run:" or sudo.
COMMAND_RE = re.compile(
    r"(?:^|[`$;|&]\s*|\brun:\s+|\bsudo\s+)lssupervisor\s+([a-z][a-z0-9-]*)((?:\s+[^\s`;|&)]+)*)"
)


@dataclass(frozen=True, slots=True)
class Mention:
    where: str
    command: str
    rest: str


def command_mentions(path: Path) -> list[Mention]:
    text = path.read_text(encoding="utf-8")
    fences, prose = split_fences(text)
    found: list[Mention] = []
    for number, line in prose:
        for span in code_spans(line):
            for m in COMMAND_RE.finditer(span):
                found.append(Mention(f"{rel(path)}:{number}", m.group(1), m.group(2)))
    for fence in fences:
        if fence.lang not in SHELL_LANGS:
            continue
        for number, line in fence.lines:
            code = line.split("#", 1)[0]
            for m in COMMAND_RE.finditer(code.strip()):
                found.append(Mention(f"{rel(path)}:{number}", m.group(1), m.group(2)))
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


# ---------------------------------------------------------------------------------------------------
# commands


def test_the_docs_mention_commands_at_all() -> None:
    # Guards the extraction itself: if the regex broke, every later check would pass vacuously.
    commands = {m.command for m in command_mentions(OPERATIONS)}
    assert {"status", "pause", "resume", "rollback", "reload"} <= commands
    readme = {m.command for m in command_mentions(README)}
    assert {"init", "check", "run"} <= readme


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_every_lssupervisor_subcommand_in_the_docs_exists(path: Path) -> None:
    known = subparsers(build_parser())
    mentions = command_mentions(path)
    unknown = [f"{m.where}: lssupervisor {m.command}" for m in mentions if m.command not in known]
    assert not unknown, "subcommands not in cli.build_parser(): " + "; ".join(unknown)


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_every_long_option_after_a_subcommand_exists(path: Path) -> None:
    known = subparsers(build_parser())
    wrong = []
    for m in command_mentions(path):
        sub = known.get(m.command)
        if sub is None:
            continue  # reported by the subcommand test
        options = option_strings(sub)
        for token in m.rest.split():
            option = token.strip("[]").split("=", 1)[0]
            if option.startswith("--") and len(option) > 2 and option not in options:
                wrong.append(f"{m.where}: lssupervisor {m.command} {option}")
    assert not wrong, "options the subcommand does not have: " + "; ".join(wrong)


def test_the_extractor_sees_nested_and_shell_commands(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `lssupervisor status -c F`, and ``reason: then run `lssupervisor resume` ``.\n"
        "Not commands: `msg=\"lssupervisor exiting\"`, `lssupervisor.testing`, lssupervisor pause.\n"
        "```sh\n$ sudo lssupervisor plan --to 3  # comment: lssupervisor nothing\n```\n"
        "```\nlssupervisor pid 1: RUNNING\n```\n",
        encoding="utf-8",
    )
    found = [(m.command, m.rest.strip()) for m in command_mentions(doc)]
    assert found == [("status", "-c F"), ("resume", ""), ("plan", "--to 3")]


# ---------------------------------------------------------------------------------------------------
# exit codes


def exit_code_rows() -> dict[str, int]:
    """The runbook's exit code table: ``| 65 | `MIGRATION` | ...``."""
    rows: dict[str, int] = {}
    for line in OPERATIONS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*(\d+)\s*\|\s*`([A-Z_]+)`\s*\|", line)
        if m:
            rows[m.group(2)] = int(m.group(1))
    return rows


def test_the_exit_code_table_matches_errors_exitcode() -> None:
    rows = exit_code_rows()
    expected = {code.name: int(code) for code in ExitCode}
    assert rows == expected


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + len(heading))
    return text[start:] if following == -1 else text[start:following]


def test_every_exit_code_number_in_the_runbook_is_an_exit_code() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    values = {int(code) for code in ExitCode}
    cited: list[tuple[str, int]] = []
    # "exits **78**", "refuses with 75", "exit 0", "exits 78": our own exit codes in prose.
    for m in re.finditer(r"\b(?:exits?|refuses? with|with)\s+\*{0,2}(\d+)\*{0,2}", text):
        before = text[max(0, m.start() - 80) : m.start()]
        if "LS " in before or "argparse" in before:
            continue  # Lightning Stream's own exit codes, argparse's 2
        cited.append((m.group(0), int(m.group(1))))
    # The last column of the PARKED table: the exit code of a shutdown while parked.
    parked = section(text, "## PARKED")
    for line in parked.splitlines():
        if line.startswith("| ") and not line.startswith("| Reason") and not line.startswith("|---"):
            last = line.rstrip(" |").rsplit("|", 1)[-1]
            for number in re.findall(r"\b\d+\b", last):
                cited.append((line[:60], int(number)))
    assert cited, "found no exit codes in the runbook: the patterns are broken"
    wrong = [f"{where!r} -> {n}" for where, n in cited if n not in values]
    assert not wrong, f"not an ExitCode value: {wrong}"


def test_restart_prevent_exit_status_in_the_runbook_matches_the_units() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    m = re.search(r"RestartPreventExitStatus=([\d ]+)", text)
    assert m is not None
    documented = set(m.group(1).split())
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        line = next(x for x in unit.read_text().splitlines() if x.startswith("RestartPreventExitStatus="))
        assert set(line.split("=", 1)[1].split()) == documented, unit.name


# ---------------------------------------------------------------------------------------------------
# states


# Upper-case identifiers the runbook cites that are not ours (kernel and LMDB constants, the S3
# credentials' environment variables, a migration file's literal).
NOT_STATES = {"PR_SET_PDEATHSIG", "MDB_NOLOCK", "MDB_MAP_FULL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "REPLACES"}


def test_every_state_name_in_the_runbook_exists() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    states = {s.value for s in State}
    substeps = {s.value for s in Substep}
    names = {c.name for c in ExitCode}
    wrong: list[str] = []
    for m in re.finditer(r"`([A-Z][A-Z_]{2,})`", text):
        word = m.group(1)
        if word not in states | substeps | names | NOT_STATES:
            wrong.append(word)
    # Transitions as logged: "state RUNNING -> RECONCILING", "state RECONCILING step MIGRATING".
    for m in re.finditer(r"state ([A-Z_]+) -> ([A-Z_]+)", text):
        wrong += [w for w in m.groups() if w not in states]
    for m in re.finditer(r"state ([A-Z_]+) step ([A-Z_]+)", text):
        if m.group(1) not in states:
            wrong.append(m.group(1))
        if m.group(2) not in substeps:
            wrong.append(m.group(2))
    assert not wrong, f"not a State, Substep or ExitCode name: {sorted(set(wrong))}"


def test_the_runbook_describes_every_state_and_substate() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    rows = set(re.findall(r"^\|\s*`([A-Z_]+)`\s*\|", text, flags=re.M))
    names = [s.value for s in State] + [s.value for s in Substep]
    missing = [name for name in names if name not in rows]
    assert not missing, f"no table row for: {missing}"


# ---------------------------------------------------------------------------------------------------
# links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    return {slug(line.lstrip("#")) for _, line in prose if re.match(r"^#{1,6} ", line)}


def relative_links(path: Path) -> list[tuple[int, str]]:
    _, prose = split_fences(path.read_text(encoding="utf-8"))
    links = []
    for number, line in prose:
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            links.append((number, target))
    return links


def test_the_docs_have_relative_links_to_check() -> None:
    assert any(relative_links(README)), "no relative links found in README.md: the pattern is broken"


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_every_relative_link_points_at_an_existing_file(path: Path) -> None:
    broken = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{rel(path)}:{number}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{rel(path)}:{number}: {target} (no heading #{anchor})")
    assert not broken, "broken links: " + "; ".join(broken)


# ---------------------------------------------------------------------------------------------------
# the README's promise: `make demo` and `make test` on a fresh machine; CI runs the same


def test_the_readme_starts_with_make_demo_then_make_test() -> None:
    fences, _ = split_fences(README.read_text(encoding="utf-8"))
    assert fences, "README.md has no code block"
    commands = [line.split("#", 1)[0].strip() for _, line in fences[0].lines]
    commands = [c for c in commands if c]
    assert commands[:2] == ["make demo", "make test"]


def test_the_makefile_has_demo_and_test_targets() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z_][\w-]*)\s*:(?!=)", makefile, flags=re.M))
    assert {"demo", "test"} <= targets
    phony = re.search(r"^\.PHONY:(.*)$", makefile, flags=re.M)
    assert phony is not None and {"demo", "test"} <= set(phony.group(1).split())


def test_ci_runs_make_test() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.split("#", 1)[0].strip() for line in script.splitlines()]
    assert "make test" in lines


# ---------------------------------------------------------------------------------------------------
# the PowerDNS recipe's migration files load and do what the page says


POWERDNS = DOCS / "powerdns.md"


def recipe_migrations(directory: Path) -> list[str]:
    """Write the migration files shown in docs/powerdns.md into ``directory``; the placeholder block
    (``0004_*``, "also 0001, 0002, 0003 with their number") is written for each of those versions."""
    fences, _ = split_fences(POWERDNS.read_text(encoding="utf-8"))
    written: list[str] = []
    for fence in fences:
        if fence.lang != "python":
            continue
        lines = [line for _, line in fence.lines]
        m = re.match(r"^# \S*/(\d{4})_(\w+)\.py", lines[0])
        assert m is not None, f"python block without a file name comment: {lines[0]!r}"
        body = "\n".join(lines[1:]) + "\n"
        version = int(m.group(1))
        copies = range(1, version + 1) if "also 0001" in lines[0] else [version]
        for v in copies:
            name = f"{v:04d}_{m.group(2).replace(str(version), str(v))}.py"
            text = re.sub(r"^VERSION = \d+$", f"VERSION = {v}", body, flags=re.M)
            (directory / name).write_text(text, encoding="utf-8")
            written.append(name)
    return sorted(written)


def test_the_powerdns_migration_files_load(tmp_path: Path) -> None:
    from lssupervisor.worker import migrations

    names = recipe_migrations(tmp_path)
    assert [n[:4] for n in names] == ["0001", "0002", "0003", "0004", "0005", "0006"]
    found = migrations.discover(tmp_path, ["main", "shard"])
    assert found.newest == 6
    assert {m.lmdb for m in found.migrations} == {"main"}


def test_the_powerdns_migrations_only_move_the_markers(tmp_path: Path) -> None:
    from lssupervisor.errors import MigrationError
    from lssupervisor.testing.fixtures import build_lmdb, read_lmdb, read_marker_version, run_migrations

    mig = tmp_path / "migrations"
    mig.mkdir()
    recipe_migrations(mig)
    data = {"records": {"k1": ("v1", 1_700_000_000_000_000_000)}, "domains": {"d": ("x", 1)}}
    for name in ("main", "shard"):
        spec = build_lmdb(tmp_path / name, data, name=name, marker=5)
        before = read_lmdb(spec)
        run_migrations(spec, mig, target=6, lmdb_names=("main", "shard"))
        assert read_marker_version(spec) == 6
        assert read_lmdb(spec) == before  # values and LS timestamps untouched: Auth converts them

    # Below schema 5 the placeholders refuse, and the failed step leaves the LMDB as it was.
    old = build_lmdb(tmp_path / "old", data, name="main", marker=3)
    with pytest.raises(MigrationError, match="below Auth schema 5"):
        run_migrations(old, mig, target=6, lmdb_names=("main", "shard"))
    assert read_marker_version(old) == 3


def test_the_powerdns_template_versions_its_prefix() -> None:
    template = (ROOT / "config" / "pdns" / "lightningstream.yaml.in").read_text(encoding="utf-8")
    assert re.search(r"global_prefix: \S*\$\{APP_SCHEMA_VERSION\}", template)
    assert "global_prefix: pdns/v${APP_SCHEMA_VERSION}/" in POWERDNS.read_text(encoding="utf-8")

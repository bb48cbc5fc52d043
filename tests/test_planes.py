"""The package's planes as checked facts: what each plane may import, what the running daemon loads,
and the README's layout table against the tree.

The import contracts themselves are `lint-imports` (pyproject.toml, run by `make lint`); these tests
check the same boundaries at run time, where a lazy import inside a function would slip past a static
reading, and keep the documentation of the layout true.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.e2e import WATCH, ConfigSet, Daemon, ship, step_migration, wait_running_on

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lssupervisor"

# What loading the LMDB side means: py-lmdb itself, and the modules that open environments.
LMDB_SIDE = ("lmdb", "lssupervisor.worker.migrator", "lssupervisor.worker.marker", "lssupervisor.worker.ops")

# The daemon's entry points and everything the core is made of.
DAEMON_MODULES = (
    "lssupervisor.cli.run",
    "lssupervisor.daemon.supervisor",
    "lssupervisor.daemon.jobs",
    "lssupervisor.worker.client",
    "lssupervisor.core.lifecycle",
)


def loaded_after_import(*modules: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(json.loads(out.stdout))


def test_importing_the_daemon_loads_no_lmdb() -> None:
    loaded = loaded_after_import(*DAEMON_MODULES)
    assert not loaded & set(LMDB_SIDE), sorted(loaded & set(LMDB_SIDE))


def test_importing_the_core_loads_no_plane_and_no_io_library() -> None:
    loaded = loaded_after_import("lssupervisor.core.lifecycle", "lssupervisor.core.tables")
    ours = {m for m in loaded if m.startswith("lssupervisor.")}
    assert ours <= {
        "lssupervisor.errors",
        "lssupervisor.durations",
        *{m for m in ours if m.startswith("lssupervisor.core")},
    }, sorted(ours)
    io_libraries = {"lmdb", "psutil", "yaml", "watchdog", "prometheus_client", "subprocess", "socket"}
    assert not loaded & io_libraries


# Besides itself, the core uses two pure modules of ours: the errors (and exit codes) and the Go
# durations it words time limits with. Standard-library modules it may import: values, typing, enums,
# dataclasses, randomness (the default jitter source; tests inject their own). Anything else (os, time,
# subprocess, socket, pathlib, threading, logging...) would give the core a way to do I/O or a clock.
CORE_MAY_IMPORT = {
    "__future__",
    "abc",
    "collections",
    "collections.abc",
    "dataclasses",
    "enum",
    "math",
    "random",
    "typing",
}


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_the_core_imports_only_pure_stdlib_modules_and_itself() -> None:
    wrong = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for line, module in imports_of(path):
            ours = module in ("lssupervisor.errors", "lssupervisor.durations") or module.startswith(
                "lssupervisor.core"
            )
            if not ours and module not in CORE_MAY_IMPORT:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not wrong, wrong


def test_the_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("lint-imports is not installed in this environment (make test installs it)")
    done = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# the running daemon


def mapped_lmdb(pid: int) -> list[str]:
    """Shared objects of py-lmdb mapped into ``pid`` (its C extension is lmdb/cpython*.so)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if re.search(r"/lmdb/[^/]*\.so", line)})


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.close()


def test_the_running_daemon_never_maps_py_lmdb_even_after_a_whole_cycle(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    cs = ConfigSet(tmp_path)
    cs.write(extra=WATCH)
    d = Daemon(cs)
    daemons.append(d)
    wait_running_on(d, 1)
    assert mapped_lmdb(d.pid) == []
    ship(cs, "0002_step.py", step_migration(2))  # plan, import, prove, backup, migrate, verify
    wait_running_on(d, 2)
    history = (cs.state / "history.jsonl").read_text()
    assert '"kind":"migrate"' in history  # the cycle really wrote the LMDB, through its worker
    assert mapped_lmdb(d.pid) == []


# ---------------------------------------------------------------------------------------------------
# the README's layout table


def layout_rows() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    section = section[: section.find("\n## ", 5)] if "\n## " in section[5:] else section
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        package = cells[0].strip("`")
        rows[package] = set(re.findall(r"`([a-z_][a-z0-9_]*)`", cells[1]))
    return rows


def test_the_readme_layout_table_names_every_module_of_every_package() -> None:
    rows = layout_rows()
    actual: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.stem in ("__init__", "__main__") or "__pycache__" in path.parts:
            continue
        package = str(path.parent.relative_to(PACKAGE)).replace(".", "") or ""
        key = "lssupervisor/" if package == "" else f"{package}/"
        actual.setdefault(key, set()).add(path.stem)
    assert rows == actual

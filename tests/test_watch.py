"""The watcher sees replace-by-rename, symlink swaps and new migration files, and ignores noise."""

from __future__ import annotations

import os
import queue
from pathlib import Path

import pytest

from lssupervisor.daemon.watch import Watcher


def _drain(q: queue.SimpleQueue[str], want: str, timeout: float = 5.0) -> list[str]:
    """Collect notifications until ``want`` arrives (deadline), return everything seen."""
    seen: list[str] = []
    while True:
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no change notification for {want}; saw {seen}") from None
        seen.append(item)
        if item == want:
            return seen


@pytest.fixture
def watched(tmp_path: Path):  # type: ignore[no-untyped-def]
    etc = tmp_path / "etc"
    migrations = tmp_path / "migrations"
    etc.mkdir()
    migrations.mkdir()
    template = etc / "lightningstream.yaml.in"
    template.write_text("a: 1\n")
    q: queue.SimpleQueue[str] = queue.SimpleQueue()
    w = Watcher(files=[template], directories=[migrations], on_change=q.put_nowait)
    w.start()
    try:
        yield template, migrations, q
    finally:
        w.stop()


def test_rename_replace_of_a_file_is_seen(watched) -> None:  # type: ignore[no-untyped-def]
    template, _, q = watched
    tmp = template.with_name("tmp.new")
    tmp.write_text("a: 2\n")
    os.replace(tmp, template)
    _drain(q, str(template))


def test_migration_dropped_by_rename_is_seen(watched) -> None:  # type: ignore[no-untyped-def]
    _, migrations, q = watched
    staging = migrations.parent / "0002_x.py"
    staging.write_text("VERSION = 2\n")
    os.rename(staging, migrations / "0002_x.py")
    _drain(q, str(migrations))


def test_symlink_swap_is_seen(tmp_path: Path) -> None:
    # Kubernetes ConfigMap volumes: file -> ..data/file, and ..data is swapped atomically.
    vol = tmp_path / "vol"
    (vol / "v1").mkdir(parents=True)
    (vol / "v2").mkdir()
    (vol / "v1" / "target").write_text("2\n")
    (vol / "v2" / "target").write_text("3\n")
    os.symlink("v1", vol / "..data")
    os.symlink("..data/target", vol / "target")
    q: queue.SimpleQueue[str] = queue.SimpleQueue()
    w = Watcher(files=[vol / "target"], directories=[], on_change=q.put_nowait)
    w.start()
    try:
        os.symlink("v2", vol / "..data_tmp")
        os.replace(vol / "..data_tmp", vol / "..data")
        _drain(q, str(vol / "target"))
    finally:
        w.stop()


def test_noise_in_a_shared_directory_is_ignored(watched) -> None:  # type: ignore[no-untyped-def]
    template, migrations, q = watched
    (template.parent / "unrelated.conf").write_text("x")
    (migrations / "__pycache__").mkdir()
    (migrations / "__pycache__" / "0001_x.cpython-311.pyc").write_text("x")
    (migrations / "0001_x.py~").write_text("x")
    # A real change afterwards arrives, and nothing before it did.
    template.write_text("a: 3\n")
    assert _drain(q, str(template)) == [str(template)]

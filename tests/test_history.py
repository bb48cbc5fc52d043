"""history.jsonl: durable appends, tolerance of a crash-torn line, strictness elsewhere, checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lssupervisor.errors import ConfigError
from lssupervisor.worker import history
from lssupervisor.worker.history import Entry, Kind, Result


def step(version: int, checksum: str, *, result: Result = Result.OK, lmdb: str = "main") -> Entry:
    return Entry(
        kind=Kind.MIGRATE,
        result=result,
        start="2025-01-01T00:00:00.000000Z",
        end="2025-01-01T00:00:01.000000Z",
        lmdb=lmdb,
        instance="node-1",
        from_version=version - 1,
        to_version=version,
        migration=f"{version:04d}_m",
        migration_version=version,
        checksum=checksum,
        keys=10,
        bytes=1000,
        backup_id="b1",
    )


def rollback(to: int) -> Entry:
    return Entry(kind=Kind.ROLLBACK, result=Result.OK, start="s", end="e", lmdb="main", to_version=to)


def test_missing_file_is_an_empty_history(tmp_path: Path) -> None:
    assert history.read(tmp_path / "history.jsonl") == history.History(entries=())


def test_entries_round_trip_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "state" / "history.jsonl"
    first = step(1, "a" * 64)
    second = Entry(
        kind=Kind.STAMP, result=Result.OK, start="s", end="e", lmdb="main", to_version=3, extra={"note": "x"}
    )
    history.append(path, first)
    history.append_many(path, [second])
    lines = path.read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["migrate", "stamp"]
    assert "lmdb" in json.loads(lines[0]) and "keys" not in json.loads(lines[1])  # None fields left out
    assert history.read(path).entries == (first, second)


def test_torn_last_line_is_skipped_and_the_next_append_starts_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history.append(path, step(1, "a"))
    full = json.dumps(step(2, "b").to_json())
    with path.open("a") as f:
        f.write(full[: len(full) // 2])  # what a crash in the middle of write(2) leaves
    torn = history.read(path)
    assert [e.to_version for e in torn.entries] == [1]
    assert torn.torn_lines == (2,)
    history.append(path, step(2, "b"))
    again = history.read(path)
    assert [e.to_version for e in again.entries] == [1, 2]
    assert again.torn_lines == (2,)  # still reported, never silently merged into the new line


def test_complete_last_line_without_newline_counts(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps(step(1, "a").to_json()))  # crash after the object, before its "\n"
    assert [e.to_version for e in history.read(path).entries] == [1]
    history.append(path, step(2, "b"))
    assert [e.to_version for e in history.read(path).entries] == [1, 2]


@pytest.mark.parametrize("zeros", [b"\x00" * 180, b"\x00" * 90 + b"\n", b"\x00\x00 \t\x00\r"])
def test_a_line_of_nul_bytes_in_the_middle_is_torn_not_fatal(tmp_path: Path, zeros: bytes) -> None:
    """What ext4 with delayed allocation can leave of an append lost in a crash: the size grew, the
    data did not reach the disk. Appends after the crash continue on a fresh line."""
    path = tmp_path / "history.jsonl"
    history.append(path, step(1, "a"))
    with path.open("ab") as f:
        f.write(zeros)
    history.append(path, step(2, "b"))
    got = history.read(path)
    assert [e.to_version for e in got.entries] == [1, 2]
    assert got.torn_lines == (2,)


def test_nul_bytes_mixed_with_other_text_are_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history.append(path, step(1, "a"))
    with path.open("ab") as f:
        f.write(b"\x00\x00x\x00\n")
    history.append(path, step(2, "b"))
    with pytest.raises(ConfigError, match=r"history\.jsonl:2: bad history line"):
        history.read(path)


@pytest.mark.parametrize(
    "bad", ["not json at all", '{"kind": "migrate"}', '{"kind": "teleport", "result": "ok"}', '["a list"]']
)
def test_a_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "history.jsonl"
    history.append(path, step(1, "a"))
    with path.open("a") as f:
        f.write(bad + "\n")
    history.append(path, step(2, "b"))
    with pytest.raises(ConfigError, match=r"history\.jsonl:2: bad history line"):
        history.read(path)


def test_applied_checksums_follow_successes_and_rollbacks(tmp_path: Path) -> None:
    entries = [
        step(1, "c1"),
        step(2, "c2"),
        step(3, "bad", result=Result.FAILED),
        step(3, "c3"),
        rollback(1),  # a restore to version 1 un-applies 2 and 3: fixed files may run again
        step(2, "c2-fixed"),
    ]
    assert history.applied_checksums(entries) == {1: "c1", 2: "c2-fixed"}


def test_noop_rollback_does_not_unapply(tmp_path: Path) -> None:
    noop = Entry(kind=Kind.ROLLBACK, result=Result.NOOP, start="s", end="e", to_version=0)
    assert history.applied_checksums([step(1, "c1"), noop]) == {1: "c1"}

"""What every storage backend offers lssupervisor, and the values it returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# S3 DeleteObjects takes at most 1000 keys; fs deletes use the same batches so reports read alike.
MAX_BATCH = 1000


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object under a version location. ``name`` is relative to that location (what LS calls the
    blob name); ``modified`` is the storage's own last-modified time (epoch seconds)."""

    name: str
    size: int
    modified: float


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One delete batch: the names gone (or already gone) and the ones that failed, with why."""

    deleted: tuple[str, ...]
    failed: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Listing:
    """Every version location found, with its objects (sorted by name)."""

    versions: Mapping[int, Sequence[StoredObject]] = field(default_factory=dict)


class Backend(Protocol):
    """A storage whose version locations are ``layout.head + N + layout.tail``."""

    def describe(self, version: int | None = None) -> str:
        """Where: ``s3 bucket B at URL, prefix P`` / ``fs /root`` (no credentials), for messages."""
        ...

    def probe(self) -> str:
        """Read-only access check (bucket exists, credentials accepted, listing allowed / root is a
        writable directory). Returns what was checked; raises StorageError naming what to fix."""
        ...

    def list_versions(self) -> Listing:
        """Every version location that exists and its objects. Raises StorageError."""
        ...

    def delete(self, version: int, names: Sequence[str]) -> BatchResult:
        """Delete ``names`` (at most :data:`MAX_BATCH`) under ``version``'s location, in one request
        where the backend can. A name already gone counts as deleted. Raises StorageError when the
        whole batch failed (nothing known to be deleted)."""
        ...

    def close(self) -> None: ...

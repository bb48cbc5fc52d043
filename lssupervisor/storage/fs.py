"""The fs backend (simpleblob ``backends/fs``): a version location is a directory, its objects the
regular files directly in it (LS writes ``<name>.tmp`` and renames; it never makes subdirectories).

``root_path: /data/ls/v${APP_SCHEMA_VERSION}/sub`` is ``head="/data/ls/v"``, ``tail="/sub"``: the
version sits in one path component (``v<N>``), whose siblings are matched against it; ``tail`` is the
rest below it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lssupervisor.errors import ConfigError, StorageError
from lssupervisor.storage.backend import BatchResult, Listing, StoredObject

_VERSION = r"(0|[1-9][0-9]*)"


class FsBackend:
    def __init__(self, head: str, tail: str) -> None:
        if not head.startswith("/"):
            raise ConfigError(
                f"storage.options.root_path {head}N{tail}: lssupervisor needs an absolute root_path to "
                "find the version directories (LS resolves a relative one against its working directory)"
            )
        parent, _, comp_head = head.rpartition("/")
        comp_tail, sep, rest = tail.partition("/")
        self.parent = Path(parent or "/")
        self.rest = rest.strip("/") if sep else ""
        self._pattern = re.compile(re.escape(comp_head) + _VERSION + re.escape(comp_tail))
        self.head, self.tail = head, tail

    def root(self, version: int) -> Path:
        return Path(f"{self.head}{version}{self.tail}")

    def describe(self, version: int | None = None) -> str:
        if version is None:
            return f"fs {self.head}<N>{self.tail}"
        return f"fs {self.root(version)}"

    def probe(self) -> str:
        parent = self.parent
        if not parent.is_dir():
            raise StorageError(
                f"storage fs {parent}: does not exist or is not a directory (the parent of "
                f"root_path {self.head}<N>{self.tail}); create it, or fix storage.options.root_path"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise StorageError(
                f"storage fs {parent}: not writable by this user (uid {os.getuid()}); LS must create "
                "the version directory there: fix the owner or mode, or run as LS's user"
            )
        return f"fs {parent} exists and is writable"

    def list_versions(self) -> Listing:
        try:
            entries = list(os.scandir(self.parent))
        except FileNotFoundError:
            return Listing({})
        except OSError as exc:
            raise StorageError(f"storage fs {self.parent}: cannot list: {exc.strerror}") from None
        versions: dict[int, list[StoredObject]] = {}
        for entry in entries:
            m = self._pattern.fullmatch(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=True):
                continue
            version = int(m.group(1))
            root = Path(entry.path) / self.rest if self.rest else Path(entry.path)
            if not root.is_dir():
                continue
            objs: list[StoredObject] = []
            try:
                with os.scandir(root) as it:
                    for f in it:
                        if not f.is_file(follow_symlinks=False):
                            continue
                        try:
                            st = f.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # removed while we listed
                        objs.append(StoredObject(f.name, st.st_size, st.st_mtime))
            except OSError as exc:
                raise StorageError(f"storage fs {root}: cannot list: {exc.strerror}") from None
            objs.sort(key=lambda o: o.name)
            versions[version] = objs
        return Listing(dict(sorted(versions.items())))

    def delete(self, version: int, names: Sequence[str]) -> BatchResult:
        root = self.root(version)
        deleted: list[str] = []
        failed: list[tuple[str, str]] = []
        for name in names:
            if "/" in name or name in ("", ".", ".."):
                failed.append((name, "not an object name of this location"))
                continue
            try:
                os.remove(root / name)
            except FileNotFoundError:
                deleted.append(name)  # gone already: a rerun after a partial failure
            except OSError as exc:
                failed.append((name, exc.strerror or str(exc)))
            else:
                deleted.append(name)
        if not failed:
            self._remove_empty(root)
        return BatchResult(tuple(deleted), tuple(failed))

    def _remove_empty(self, root: Path) -> None:
        """The version directory (and the ones between it and the version component) once empty: a
        retired version leaves nothing behind. A directory with anything in it stays."""
        path = root
        stop = self.parent
        while path != stop and stop in path.parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    def close(self) -> None:
        pass

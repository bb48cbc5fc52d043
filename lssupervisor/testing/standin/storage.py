"""Storage backends of the stand-in (simpleblob ``fs`` and ``memory``).

``fs`` follows simpleblob v1 ``backends/fs/fs.go``: ``root_path`` is the only option (strict: any
other key is an error when the backend is created), the root is created with ``MkdirAll``,
``List`` returns regular files whose name has no ``/``, does not start with ``.`` and does not end
in ``.tmp``, sorted by name; ``Store`` writes ``<name>.tmp``, fsyncs it and the directory, then
renames. ``memory`` lives in the process only. ``s3``/``azure`` pass config validation but cannot
be created here.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

IGNORE_SUFFIX = ".tmp"


class StorageError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Blob:
    name: str
    size: int


class Backend(Protocol):
    def list(self, prefix: str) -> list[Blob]: ...
    def load(self, name: str) -> bytes: ...
    def store(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...


def _allowed(name: str) -> bool:
    return "/" not in name and not name.startswith(".") and not name.endswith(IGNORE_SUFFIX)


class FSBackend:
    def __init__(self, root_path: str) -> None:
        self.root = root_path

    def list(self, prefix: str) -> list[Blob]:
        blobs = []
        with os.scandir(self.root) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False):
                    continue
                name = e.name
                if not _allowed(name) or not name.startswith(prefix):
                    continue
                try:
                    size = e.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # removed in the meantime
                blobs.append(Blob(name, size))
        blobs.sort(key=lambda b: b.name)
        return blobs

    def load(self, name: str) -> bytes:
        if not _allowed(name):
            raise FileNotFoundError(name)
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def store(self, name: str, data: bytes) -> None:
        if not _allowed(name):
            raise PermissionError(name)
        full = os.path.join(self.root, name)
        tmp = full + IGNORE_SUFFIX  # hidden from list()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.rename(tmp, full)

    def delete(self, name: str) -> None:
        if not _allowed(name):
            raise PermissionError(name)
        try:
            os.remove(os.path.join(self.root, name))
        except FileNotFoundError:
            pass


class MemoryBackend:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}

    def list(self, prefix: str) -> list[Blob]:
        with self._lock:
            return sorted(
                (Blob(n, len(d)) for n, d in self._blobs.items() if n.startswith(prefix)),
                key=lambda b: b.name,
            )

    def load(self, name: str) -> bytes:
        with self._lock:
            if name not in self._blobs:
                raise FileNotFoundError(name)
            return self._blobs[name]

    def store(self, name: str, data: bytes) -> None:
        with self._lock:
            self._blobs[name] = bytes(data)

    def delete(self, name: str) -> None:
        with self._lock:
            self._blobs.pop(name, None)


def _yaml_line_of(options: dict[str, Any], key: str) -> int:
    # yaml.v2 Marshal of a map sorts the keys; the error line is the key's line in that dump.
    line = 1
    import yaml

    for k in sorted(options, key=str):
        if k == key:
            return line
        line += yaml.safe_dump({k: options[k]}, default_flow_style=False).count("\n")
    return line


def get_backend(type_name: str, options: dict[str, Any]) -> Backend:
    """simpleblob ``GetBackend``: raises StorageError with simpleblob's wording."""
    if type_name == "":
        raise StorageError("no storage.type configured")
    if type_name == "fs":
        unknown = sorted(str(k) for k in options if k != "root_path")
        if unknown:
            lines = [
                f"line {_yaml_line_of(options, k)}: field {k} not found in type fs.Options" for k in unknown
            ]
            raise StorageError("yaml: unmarshal errors:\n  " + "\n  ".join(lines))
        root = options.get("root_path")
        root = "" if root is None else (str(root).lower() if isinstance(root, bool) else str(root))
        if root == "":
            raise StorageError("options.root_path must be set for the fs backend")
        try:
            os.makedirs(root, 0o755, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"mkdir {root}: {exc.strerror}") from None
        return FSBackend(root)
    if type_name == "memory":
        return MemoryBackend()
    if type_name in ("s3", "azure"):
        raise StorageError(f"storage.type {type_name!r} is not supported by the stand-in (use fs or memory)")
    raise StorageError(f'storage.type "{type_name}" not found or registered')

"""Watch the files that define what LS should run, and tell the main loop when they change.

Watched: the migrations directory, the LS template, our config and the optional target-version file.
We watch the PARENT directory of each file rather than the file: editors and config management
replace files by rename, and Kubernetes swaps a ``..data`` symlink in a ConfigMap volume; a watch on
the file's inode would miss both. On any event in a watched directory we compare a cheap signature
(resolved path, inode, size, mtime) of each watched file, so noise in a shared directory (``/etc``)
does not trigger a reconcile.

The observer thread only calls ``on_change(path)`` (the daemon passes a function that
``put_nowait()``s an event); debouncing is done by the pure lifecycle core with its own clock, so it
is testable without threads.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

# Files in a migrations directory that never mean "a migration changed".
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", ".swx", ".tmp", "~")
_IGNORED_PARTS = ("__pycache__",)


@dataclass(frozen=True, slots=True)
class _Signature:
    resolved: str
    inode: int
    size: int
    mtime_ns: int


def _signature(path: Path) -> _Signature | None:
    try:
        st = path.stat()  # follows symlinks: a swapped link target changes the signature
        return _Signature(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return None


def _is_noise(path: str) -> bool:
    name = os.path.basename(path)
    if name.startswith((".#", "#")) or name.endswith(_IGNORED_SUFFIXES):
        return True
    return any(part in _IGNORED_PARTS for part in Path(path).parts)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (ours included) are not changes
        paths = [os.fsdecode(event.src_path)]
        dest = getattr(event, "dest_path", "")
        if dest:
            paths.append(os.fsdecode(dest))
        self._watcher._examine(paths)


class Watcher:
    """Watch ``files`` (via their parent directories) and ``directories`` (non-recursively)."""

    def __init__(
        self,
        files: Iterable[Path],
        directories: Iterable[Path],
        on_change: Callable[[str], None],
    ) -> None:
        self._files = sorted({Path(os.path.abspath(f)) for f in files})
        self._dirs = sorted({Path(os.path.abspath(d)) for d in directories})
        self._on_change = on_change
        self._signatures = {f: _signature(f) for f in self._files}
        self._lock = threading.Lock()  # watchdog may call from more than one emitter thread
        self._observer: Observer | None = None  # type: ignore[valid-type]

    def start(self) -> None:
        observer = Observer()
        observer.name = "lssupervisor-watch"
        handler = _Handler(self)
        scheduled: set[Path] = set()
        for d in [*(f.parent for f in self._files), *self._dirs]:
            if d in scheduled:
                continue
            if not d.is_dir():
                log.warning("watch: %s does not exist; changes there are not seen until restart", d)
                continue
            observer.schedule(handler, str(d), recursive=False)
            scheduled.add(d)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def _examine(self, paths: list[str]) -> None:
        with self._lock:
            for p in paths:
                parent = Path(os.path.dirname(os.path.abspath(p)))
                if parent in self._dirs and not _is_noise(p):
                    self._on_change(str(parent))
                    return
            # Anything in a watched file's directory may be a rename or symlink swap of that file.
            for f in self._files:
                sig = _signature(f)
                if sig != self._signatures[f]:
                    self._signatures[f] = sig
                    self._on_change(str(f))

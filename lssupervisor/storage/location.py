"""Where each schema version lives in the storage, learned from the LS template, and the backend
that reads it.

The template is rendered with a sentinel version (a number no schema reaches) and LS's environment;
the sentinel's place in ``global_prefix`` (s3) or ``root_path`` (fs) splits the location into
``head + N + tail``. Everything else in the storage options must not depend on the version (one
bucket, one endpoint for the whole fleet), or the fleet cannot be seen from one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lssupervisor.errors import ConfigError
from lssupervisor.lsconfig import render as lsconfig
from lssupervisor.storage.backend import Backend

if TYPE_CHECKING:
    from lssupervisor.config import Config

SENTINEL = 987654321
_OTHER = 123456789


@dataclass(frozen=True, slots=True)
class Layout:
    """``storage_type``, the versioned key (``global_prefix``/``root_path``) split around the version,
    and the backend options (credentials included: never printed, never written)."""

    storage_type: str
    key: str
    head: str
    tail: str
    options: Mapping[str, Any] = field(repr=False)
    poll_interval_s: float = 1.0  # LS's storage_poll_interval

    def location(self, version: int) -> str:
        return f"{self.head}{version}{self.tail}"


def layout_of(template: lsconfig.Template, ls_env: Mapping[str, str]) -> Layout:
    """The storage layout of ``template`` with ``ls_env`` (the environment LS gets). ConfigError when
    the storage location does not carry the version, or something else in it does."""
    settings = lsconfig.storage_settings(template, SENTINEL, ls_env)
    st_type, options = settings.type, settings.options
    other = lsconfig.storage_settings(template, _OTHER, ls_env).options
    var = template.variable
    match st_type:
        case "s3":
            key = "global_prefix"
        case "fs":
            key = "root_path"
        case _:
            raise ConfigError(
                f"{template.path}: storage.type {st_type}: lssupervisor reads only s3 and fs storage "
                "(fleet --storage, prune, check's probe)"
            )
    value = str(options.get(key) or "")
    marker = str(SENTINEL)
    if value.count(marker) != 1:
        raise ConfigError(
            f"{template.path}: storage.options.{key} does not contain ${{{var}}} exactly once: every "
            "version syncs in one place, so the storage cannot tell versions apart (use `lssupervisor "
            "fleet` for the markers instead)"
        )
    head, _, tail = value.partition(marker)
    for name in sorted(set(options) | set(other)):
        if name != key and options.get(name) != other.get(name):
            raise ConfigError(
                f"{template.path}: storage.options.{name} depends on ${{{var}}}: lssupervisor can only "
                f"see a fleet whose versions differ in {key} alone"
            )
    return Layout(
        storage_type=st_type, key=key, head=head, tail=tail, options=dict(options),
        poll_interval_s=settings.poll_interval_s,
    )


def open_backend(layout: Layout, *, timeout: float = 10.0) -> Backend:
    """The backend for ``layout``; every request bounded by ``timeout`` seconds."""
    if layout.storage_type == "fs":
        from lssupervisor.storage.fs import FsBackend

        return FsBackend(layout.head, layout.tail)
    from lssupervisor.storage.s3 import S3Backend

    return S3Backend(layout.options, layout.head, layout.tail, timeout=timeout)


def layout_for(cfg: Config, base_env: Mapping[str, str]) -> Layout:
    """The layout of ``cfg``'s template in the environment LS would get from ``base_env``."""
    template = lsconfig.load_template(Path(cfg.lightningstream.template), cfg.schema.variable)
    return layout_of(template, lsconfig.ls_environment(cfg, 0, base_env))


def probe(settings: lsconfig.StorageSettings, *, timeout: float = 10.0) -> str:
    """Read-only access check of the storage one rendered config names (``check``): s3 — the bucket
    exists, the credentials are accepted, listing the prefix is allowed; fs — ``root_path`` is a
    writable directory, or one LS can create. Returns what was checked; StorageError otherwise."""
    options = settings.options
    if settings.type == "s3":
        from lssupervisor.storage.s3 import S3Backend

        backend = S3Backend(options, str(options.get("global_prefix") or ""), "", timeout=timeout)
        try:
            return backend.probe()
        finally:
            backend.close()
    if settings.type == "fs":
        import os

        from lssupervisor.errors import StorageError

        root = Path(str(options.get("root_path") or ""))
        existing = root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"storage fs {root}: {existing} is not a directory; fix the root_path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(
                f"storage fs {root}: {existing} is not writable by this user (uid {os.getuid()}); LS writes "
                "there: fix its owner or mode"
            )
        if existing == root:
            return f"fs {root} exists and is writable"
        return f"fs {root} does not exist yet; LS creates it in {existing} (writable)"
    return f"storage.type {settings.type}: not probed (lssupervisor reads s3 and fs only)"

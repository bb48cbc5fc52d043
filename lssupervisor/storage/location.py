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

    def location(self, version: int) -> str:
        return f"{self.head}{version}{self.tail}"


def layout_of(template: lsconfig.Template, ls_env: Mapping[str, str]) -> Layout:
    """The storage layout of ``template`` with ``ls_env`` (the environment LS gets). ConfigError when
    the storage location does not carry the version, or something else in it does."""
    st_type, options = lsconfig.storage_options(template, SENTINEL, ls_env)
    _, other = lsconfig.storage_options(template, _OTHER, ls_env)
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
    return Layout(storage_type=st_type, key=key, head=head, tail=tail, options=dict(options))


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

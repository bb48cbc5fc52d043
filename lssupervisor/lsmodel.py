"""What lssupervisor needs to know of a Lightning Stream config, as plain values.

``lsconfig`` produces these from a rendered LS config; ``worker``, ``migrator``, ``backup`` and the
daemon consume them. They are plain, JSON-friendly values so that the daemon can hand them to a worker
process without either side re-reading files that may have changed in between.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_MAX_DBS = 64
# What LS gives an LMDB it creates (lmdbenv.DefaultMapSize = 1 * datasize.GB, DefaultFileMask 0664,
# DefaultDirMask 0775 in LS's lmdbenv/new.go), so an LMDB lssupervisor creates is the one LS would.
LS_DEFAULT_MAP_SIZE = 1 << 30
LS_DEFAULT_FILE_MODE = 0o664
LS_DEFAULT_DIR_MODE = 0o775


@dataclass(frozen=True, slots=True)
class LmdbSpec:
    """One ``lmdbs.<name>`` entry of the LS config."""

    name: str
    path: str
    no_subdir: bool = False
    map_size: int = 0  # bytes; 0 = not configured (keep the env's current size)
    max_dbs: int = DEFAULT_MAX_DBS
    native: bool = True  # schema_tracks_changes: values carry the LS header

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LmdbSpec:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class LsView:
    """The parts of a rendered LS config that the supervisor acts on."""

    instance: str  # as LS sanitises it ([a-zA-Z0-9-]); marker keys use it
    lmdbs: tuple[LmdbSpec, ...]
    storage_type: str  # s3 | azure | fs | memory
    storage_location: str  # the prefix-carrying value: global_prefix/bucket (s3/azure) or root_path (fs)
    http_address: str = ""  # LS's http.address; "" = LS serves no HTTP

    def lmdb(self, name: str) -> LmdbSpec:
        for spec in self.lmdbs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "lmdbs": [spec.to_json() for spec in self.lmdbs],
            "storage_type": self.storage_type,
            "storage_location": self.storage_location,
            "http_address": self.http_address,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LsView:
        return cls(
            instance=data["instance"],
            lmdbs=tuple(LmdbSpec.from_json(d) for d in data["lmdbs"]),
            storage_type=data["storage_type"],
            storage_location=data["storage_location"],
            http_address=data.get("http_address", ""),
        )

"""The Lightning Stream native value header (``schema_tracks_changes: true``).

Layout, big-endian (LS ``lmdbenv/header/header.go``)::

    0..7    timestamp: ns since the epoch, time of the last change
    8..15   LMDB txn id of the write (local only)
    16      header version, must be 0
    17      flags (0x01 = deleted)
    18..21  reserved, 0
    22..23  number N of 8-byte extension blocks that follow
    24..    N*8 extension bytes, then the application value

Parsing accepts what LS accepts (extension blocks are skipped, reserved bytes are not checked,
like LS). Building never writes extension blocks or reserved bytes: LS may give them a meaning later.
Errors are ``HeaderError`` with a reason; a malformed value is never parsed into a wrong header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MIN_HEADER_SIZE = 24
BLOCK_SIZE = 8
FLAG_DELETED = 0x01
# Flags LS carries across snapshots; any other bit is cleared by LS when it syncs.
FLAG_SYNC_MASK = FLAG_DELETED

_FIXED = struct.Struct(">QQBB4xH")
_MAX_U64 = (1 << 64) - 1


class HeaderError(ValueError):
    """A value does not start with a valid LS native header."""


@dataclass(frozen=True, slots=True)
class Header:
    timestamp: int  # ns since the epoch
    txn_id: int = 0
    flags: int = 0
    num_extra: int = 0  # extension blocks present on read; always 0 when we build

    @property
    def deleted(self) -> bool:
        return bool(self.flags & FLAG_DELETED)

    @property
    def size(self) -> int:
        return MIN_HEADER_SIZE + self.num_extra * BLOCK_SIZE


def build(timestamp: int, txn_id: int = 0, flags: int = 0) -> bytes:
    """The 24-byte header for a value written by us (no extension blocks)."""
    if not 0 <= timestamp <= _MAX_U64:
        raise HeaderError(f"timestamp {timestamp} out of range for uint64")
    if not 0 <= txn_id <= _MAX_U64:
        raise HeaderError(f"txn id {txn_id} out of range for uint64")
    if not 0 <= flags <= 0xFF:
        raise HeaderError(f"flags {flags} out of range for uint8")
    return _FIXED.pack(timestamp, txn_id, 0, flags, 0)


def encode(value: bytes, timestamp: int, txn_id: int = 0, deleted: bool = False) -> bytes:
    """Header + application value. A deleted entry (tombstone) must have an empty value."""
    if deleted and value:
        raise HeaderError("a deleted entry (tombstone) carries no value")
    return build(timestamp, txn_id, FLAG_DELETED if deleted else 0) + bytes(value)


def parse(raw: bytes | memoryview) -> tuple[Header, bytes]:
    """Split ``raw`` into its header and application value, as LS does."""
    n = len(raw)
    if n < MIN_HEADER_SIZE:
        raise HeaderError(f"value of {n} bytes is too short for a {MIN_HEADER_SIZE}-byte LS header")
    timestamp, txn_id, version, flags, num_extra = _FIXED.unpack_from(raw, 0)
    if version != 0:
        raise HeaderError(f"unsupported LS header version {version} (or not a header)")
    offset = MIN_HEADER_SIZE + num_extra * BLOCK_SIZE
    if n < offset:
        raise HeaderError(
            f"value of {n} bytes is too short for a header with {num_extra} extension blocks"
        )
    return Header(timestamp, txn_id, flags, num_extra), bytes(raw[offset:])


def parse_header(raw: bytes | memoryview) -> Header:
    """Only the header (cheaper when the value is not needed)."""
    n = len(raw)
    if n < MIN_HEADER_SIZE:
        raise HeaderError(f"value of {n} bytes is too short for a {MIN_HEADER_SIZE}-byte LS header")
    timestamp, txn_id, version, flags, num_extra = _FIXED.unpack_from(raw, 0)
    if version != 0:
        raise HeaderError(f"unsupported LS header version {version} (or not a header)")
    if n < MIN_HEADER_SIZE + num_extra * BLOCK_SIZE:
        raise HeaderError(
            f"value of {n} bytes is too short for a header with {num_extra} extension blocks"
        )
    return Header(timestamp, txn_id, flags, num_extra)


def timestamp_of(raw: bytes | memoryview) -> int:
    """The timestamp of a headed value (validates the header)."""
    return parse_header(raw).timestamp

"""LS snapshot files: names (``snapshot/name.go``) and content (``gogosnapshot/snapshot.proto``).

Content is the real LS format: a gzip-compressed protobuf ``Snapshot`` written field by field in
the same order as LS's hand-written marshaller (``snapshot.go``, ``meta.go``, ``dbi.go``), so a
snapshot written here loads in real LS and the other way round. Decoding skips unknown fields.

    Snapshot { 1 formatVersion varint, 4 compatVersion varint, 2 meta Meta, 3 databases DBI* }
    Meta     { 1 generationID, 2 instanceID, 3 hostname, 7 databaseName (strings),
               4 lmdbTxnID varint, 5 timestampNano fixed64, 8 fromLmdbTxnID varint }
    DBI      { 1 name, 3 flags varint, 4 transform, 2 entries KV* }
    KV       { 1 key, 2 value (application value, header stripped), 4 flags varint,
               3 timestampNano fixed64 }
"""

from __future__ import annotations

import gzip
import struct
import time
from dataclasses import dataclass, field

CURRENT_FORMAT_VERSION = 3
WRITE_COMPAT_FORMAT_VERSION = 1
COMPAT_FORMAT_VERSION = 1
DEFAULT_EXTENSION = "pb.gz"
KIND_SNAPSHOT = "snapshot"
GENERATION_ID = "GX"  # LS: "currently not used", always GX

_U64 = struct.Struct("<Q")


class SnapshotError(ValueError):
    pass


# ----------------------------------------------------------------------------- names


def name_timestamp(ts_ns: int) -> str:
    """``20060102-150405-000000000`` in UTC (LS ``NameTimestamp``)."""
    secs, nanos = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(secs)) + f"-{nanos:09d}"


def build_name(db: str, instance: str, ts_ns: int, generation: str = GENERATION_ID) -> str:
    return f"{db}__{instance}__{name_timestamp(ts_ns)}__{generation}.{DEFAULT_EXTENSION}"


@dataclass(frozen=True, slots=True)
class NameInfo:
    full_name: str
    syncer_name: str
    instance_id: str
    timestamp_string: str
    generation_id: str
    timestamp_ns: int
    extra: tuple[str, ...] = ()
    kind: str = KIND_SNAPSHOT


def parse_name(name: str) -> NameInfo:
    """LS ``ParseName``: raises SnapshotError for what LS would skip as an invalid filename."""
    basename, dot, ext = name.partition(".")
    if not dot:
        raise SnapshotError(f"invalid name: no dot: {name}")
    if ext != DEFAULT_EXTENSION:
        raise SnapshotError(f"unknown extension: {name}")
    parts = basename.split("__")
    if len(parts) < 4:
        raise SnapshotError(f"not enough name parts: {name}")
    tss = parts[2]
    if len(tss) != len("20060102-150405.000000000") or tss[15] != "-":
        raise SnapshotError(f"invalid timestamp format: {tss} in {name}")
    try:
        import calendar

        base = time.strptime(tss[:15], "%Y%m%d-%H%M%S")
        if not tss[16:].isdigit():
            raise ValueError(tss)
        ts_ns = calendar.timegm(base) * 1_000_000_000 + int(tss[16:])
    except ValueError as exc:
        raise SnapshotError(f"timestamp parse error: {exc}") from None
    return NameInfo(name, parts[0], parts[1], tss, parts[3], ts_ns, tuple(parts[4:]))


# ----------------------------------------------------------------------------- protobuf


def _varint(v: int) -> bytes:
    if v < 0x80:
        return bytes((v,))
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise SnapshotError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise SnapshotError("varint too long")


def _skip(buf: bytes | memoryview, pos: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        ln, pos = _read_varint(buf, pos)
        return pos + ln
    if wire == 5:
        return pos + 4
    raise SnapshotError(f"unsupported wire type {wire}")


@dataclass(slots=True)
class KV:
    key: bytes
    value: bytes  # application value (header stripped)
    timestamp_ns: int
    flags: int


@dataclass(slots=True)
class DBI:
    name: str
    flags: int = 0
    transform: str = ""
    entries: list[KV] = field(default_factory=list)


@dataclass(slots=True)
class Meta:
    generation_id: str = ""
    instance_id: str = ""
    hostname: str = ""
    lmdb_txn_id: int = 0
    timestamp_ns: int = 0
    database_name: str = ""
    from_lmdb_txn_id: int = 0


@dataclass(slots=True)
class Snapshot:
    format_version: int = CURRENT_FORMAT_VERSION
    compat_version: int = WRITE_COMPAT_FORMAT_VERSION
    meta: Meta = field(default_factory=Meta)
    databases: list[DBI] = field(default_factory=list)


def _ld(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(data)) + data


def encode_kv(key: bytes, value: bytes, ts: int, flags: int) -> bytes:
    """One ``DBI.entries`` element, tag included (LS ``DBI.Append``); empty message → b''."""
    parts = []
    if key:
        parts.append(b"\x0a" + _varint(len(key)) + key)
    if value:
        parts.append(b"\x12" + _varint(len(value)) + value)
    if flags:
        parts.append(b"\x20" + _varint(flags))
    if ts:
        parts.append(b"\x19" + _U64.pack(ts))
    if not parts:
        return b""
    msg = b"".join(parts)
    return b"\x12" + _varint(len(msg)) + msg


def encode_dbi_header(name: str, flags: int, transform: str) -> bytes:
    out = b""
    if name:
        out += _ld(0x0A, name.encode())
    if flags:
        out += b"\x18" + _varint(flags)
    if transform:
        out += _ld(0x22, transform.encode())
    return out


def encode_meta(m: Meta) -> bytes:
    out = b""
    for tag, s in (
        (0x0A, m.generation_id),
        (0x12, m.instance_id),
        (0x1A, m.hostname),
        (0x3A, m.database_name),
    ):
        if s:
            out += _ld(tag, s.encode())
    if m.lmdb_txn_id > 0:
        out += b"\x20" + _varint(m.lmdb_txn_id)
    if m.timestamp_ns > 0:
        out += b"\x29" + _U64.pack(m.timestamp_ns)
    if m.from_lmdb_txn_id > 0:
        out += b"\x40" + _varint(m.from_lmdb_txn_id)
    return out


def encode_snapshot(
    meta: Meta,
    dbis: list[tuple[str, int, str, bytes]],
    format_version: int = CURRENT_FORMAT_VERSION,
    compat_version: int = WRITE_COMPAT_FORMAT_VERSION,
) -> bytes:
    """Protobuf bytes of a Snapshot; ``dbis`` are (name, flags, transform, encoded entries)."""
    parts = []
    if format_version:
        parts.append(b"\x08" + _varint(format_version))
    if compat_version:
        parts.append(b"\x20" + _varint(compat_version))
    mb = encode_meta(meta)
    if mb:
        parts.append(_ld(0x12, mb))
    for name, flags, transform, entries in dbis:
        body = encode_dbi_header(name, flags, transform) + entries
        if body:
            parts.append(b"\x1a" + _varint(len(body)) + body)
    return b"".join(parts)


def compress(pb: bytes) -> bytes:
    # LS uses gzip.BestSpeed
    return gzip.compress(pb, compresslevel=1, mtime=0)


def _decode_meta(buf: bytes) -> Meta:
    m = Meta()
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _read_varint(buf, pos)
        tag, wire = key >> 3, key & 7
        if wire == 2 and tag in (1, 2, 3, 7):
            ln, pos = _read_varint(buf, pos)
            s = buf[pos : pos + ln].decode("utf-8", "replace")
            pos += ln
            if tag == 1:
                m.generation_id = s
            elif tag == 2:
                m.instance_id = s
            elif tag == 3:
                m.hostname = s
            else:
                m.database_name = s
        elif wire == 0 and tag in (4, 8):
            v, pos = _read_varint(buf, pos)
            if tag == 4:
                m.lmdb_txn_id = v
            else:
                m.from_lmdb_txn_id = v
        elif wire == 1 and tag == 5:
            m.timestamp_ns = _U64.unpack_from(buf, pos)[0]
            pos += 8
        else:
            pos = _skip(buf, pos, wire)
    return m


def _decode_dbi(buf: bytes) -> DBI:
    d = DBI(name="")
    pos = 0
    n = len(buf)
    entries = d.entries
    read_varint = _read_varint
    unpack = _U64.unpack_from
    while pos < n:
        key, pos = read_varint(buf, pos)
        tag, wire = key >> 3, key & 7
        if tag == 2 and wire == 2:
            ln, pos = read_varint(buf, pos)
            end = pos + ln
            if end > n:
                raise SnapshotError("remaining data to short for indicated size")
            k = b""
            v = b""
            ts = 0
            fl = 0
            while pos < end:
                kk = buf[pos]
                pos += 1
                if kk in {0x0A, 0x12}:
                    ln2 = buf[pos]
                    if ln2 < 0x80:
                        pos += 1
                    else:
                        ln2, pos = read_varint(buf, pos)
                    if kk == 0x0A:
                        k = buf[pos : pos + ln2]
                    else:
                        v = buf[pos : pos + ln2]
                    pos += ln2
                elif kk == 0x19:
                    ts = unpack(buf, pos)[0]
                    pos += 8
                elif kk == 0x20:
                    fl, pos = read_varint(buf, pos)
                else:
                    if kk >= 0x80:
                        kk, pos = read_varint(buf, pos - 1)
                    pos = _skip(buf, pos, kk & 7)
            if pos != end:
                raise SnapshotError("KV message overran its length")
            entries.append(KV(k, v, ts, fl))
        elif tag in (1, 4) and wire == 2:
            ln, pos = read_varint(buf, pos)
            s = buf[pos : pos + ln].decode("utf-8", "replace")
            pos += ln
            if tag == 1:
                d.name = s
            else:
                d.transform = s
        elif tag == 3 and wire == 0:
            d.flags, pos = read_varint(buf, pos)
        else:
            pos = _skip(buf, pos, wire)
    if pos > n:
        raise SnapshotError("truncated DBI message")
    return d


def decode_snapshot(pb: bytes) -> Snapshot:
    s = Snapshot(format_version=0, compat_version=0)
    pos = 0
    n = len(pb)
    while pos < n:
        key, pos = _read_varint(pb, pos)
        tag, wire = key >> 3, key & 7
        if tag in (1, 4) and wire == 0:
            v, pos = _read_varint(pb, pos)
            if tag == 1:
                s.format_version = v
            else:
                s.compat_version = v
        elif tag in (2, 3) and wire == 2:
            ln, pos = _read_varint(pb, pos)
            if pos + ln > n:
                raise SnapshotError("truncated message")
            body = pb[pos : pos + ln]
            pos += ln
            if tag == 2:
                s.meta = _decode_meta(body)
            else:
                s.databases.append(_decode_dbi(body))
        else:
            pos = _skip(pb, pos, wire)
    if pos > n:
        raise SnapshotError("truncated snapshot")
    return s


def load_data(data: bytes) -> Snapshot:
    """LS ``LoadData``: gunzip + decode. Raises SnapshotError (LS marks such a file corrupt)."""
    try:
        pb = gzip.decompress(data)
    except (OSError, EOFError, ValueError) as exc:
        raise SnapshotError(f"gzip: {exc}") from None
    try:
        return decode_snapshot(pb)
    except (IndexError, struct.error) as exc:
        raise SnapshotError(f"protobuf: {exc}") from None

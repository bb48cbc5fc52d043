"""The LS native header codec: round trips, and malformed input never parses into a wrong header."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lssupervisor.worker import lsheader
from lssupervisor.worker.lsheader import FLAG_DELETED, MIN_HEADER_SIZE, HeaderError

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
u8 = st.integers(min_value=0, max_value=0xFF)


@given(ts=u64, txn_id=u64, value=st.binary(max_size=200))
def test_encode_parse_round_trip(ts: int, txn_id: int, value: bytes) -> None:
    header, parsed = lsheader.parse(lsheader.encode(value, ts, txn_id))
    assert (header.timestamp, header.txn_id, header.flags, header.num_extra) == (ts, txn_id, 0, 0)
    assert parsed == value
    assert not header.deleted


@given(ts=u64, txn_id=u64)
def test_tombstone_round_trip(ts: int, txn_id: int) -> None:
    raw = lsheader.encode(b"", ts, txn_id, deleted=True)
    header, value = lsheader.parse(raw)
    assert header.deleted and value == b"" and header.timestamp == ts
    assert len(raw) == MIN_HEADER_SIZE


@given(ts=u64, txn_id=u64, flags=u8)
def test_build_writes_no_reserved_bytes_and_no_extension(ts: int, txn_id: int, flags: int) -> None:
    raw = lsheader.build(ts, txn_id, flags)
    assert len(raw) == MIN_HEADER_SIZE
    assert raw[16] == 0 and raw[18:22] == b"\0\0\0\0" and raw[22:24] == b"\0\0"
    assert lsheader.parse_header(memoryview(raw)) == lsheader.Header(ts, txn_id, flags, 0)


@given(ts=u64, n=st.integers(min_value=0, max_value=8), ext=st.data(), value=st.binary(max_size=50))
def test_extension_blocks_are_skipped(ts: int, n: int, ext: st.DataObject, value: bytes) -> None:
    blocks = ext.draw(st.binary(min_size=8 * n, max_size=8 * n))
    raw = struct.pack(">QQBB4xH", ts, 7, 0, 0, n) + blocks + value
    header, parsed = lsheader.parse(raw)
    assert header.num_extra == n and header.size == MIN_HEADER_SIZE + 8 * n
    assert parsed == value


@given(raw=st.binary(max_size=MIN_HEADER_SIZE - 1))
def test_too_short_is_refused_with_reason(raw: bytes) -> None:
    with pytest.raises(HeaderError, match="too short"):
        lsheader.parse(raw)
    with pytest.raises(HeaderError, match="too short"):
        lsheader.parse_header(raw)


@given(version=st.integers(min_value=1, max_value=255), rest=st.binary(max_size=40))
def test_unknown_version_is_refused_with_reason(version: int, rest: bytes) -> None:
    raw = struct.pack(">QQBB4xH", 1, 1, version, 0, 0) + rest
    with pytest.raises(HeaderError, match="version"):
        lsheader.parse(raw)
    with pytest.raises(HeaderError, match="version"):
        lsheader.parse_header(raw)


@given(n=st.integers(min_value=1, max_value=0xFFFF), data=st.data())
def test_missing_extension_bytes_are_refused_with_reason(n: int, data: st.DataObject) -> None:
    have = data.draw(st.integers(min_value=0, max_value=8 * n - 1))
    raw = struct.pack(">QQBB4xH", 1, 1, 0, 0, n) + b"\xaa" * have
    with pytest.raises(HeaderError, match="extension blocks"):
        lsheader.parse(raw)
    with pytest.raises(HeaderError, match="extension blocks"):
        lsheader.parse_header(raw)


@given(raw=st.binary(max_size=120))
def test_arbitrary_bytes_parse_correctly_or_raise(raw: bytes) -> None:
    """Never a wrong parse: either HeaderError, or exactly the fields LS would read."""
    try:
        header, value = lsheader.parse(raw)
    except HeaderError as exc:
        assert str(exc)  # a reason a person can read
        return
    ts, txn_id, version, flags, n = struct.unpack_from(">QQBB4xH", raw)
    assert version == 0
    assert header == lsheader.Header(ts, txn_id, flags, n)
    assert value == raw[MIN_HEADER_SIZE + 8 * n :]
    assert lsheader.parse_header(raw) == header
    assert lsheader.timestamp_of(raw) == ts


def test_reserved_bytes_are_accepted_on_read_like_ls() -> None:
    raw = bytearray(lsheader.encode(b"v", 5))
    raw[18] = 1
    header, value = lsheader.parse(bytes(raw))
    assert header.timestamp == 5 and value == b"v"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"timestamp": -1}, "timestamp"),
        ({"timestamp": 1 << 64}, "timestamp"),
        ({"timestamp": 1, "txn_id": -1}, "txn id"),
        ({"timestamp": 1, "flags": 256}, "flags"),
    ],
)
def test_build_refuses_out_of_range_fields(kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(HeaderError, match=reason):
        lsheader.build(**kwargs)


def test_tombstone_with_value_is_refused() -> None:
    with pytest.raises(HeaderError, match="tombstone"):
        lsheader.encode(b"x", 1, deleted=True)


def test_deleted_flag_constant_matches_ls() -> None:
    assert FLAG_DELETED == 0x01
    assert lsheader.parse_header(lsheader.build(1, flags=FLAG_DELETED)).deleted

"""The host side of the agent framing against hostile input: bounded memory, typed errors."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from forkyard.errors import AgentProtocolError, PayloadTooLarge
from forkyard.guest import protocol as p
from forkyard.guest.protocol import (
    HEADER,
    MAGIC,
    Fields,
    Flag,
    Frame,
    FrameDecoder,
    Limit,
    Op,
    Oversized,
    Tag,
)

MiB = 1024 * 1024
RESP = int(Flag.RESPONSE)


def frame(op: Op, rid: int, payload: bytes, flags: int = RESP) -> bytes:
    return p.encode_frame(op, rid, payload, flags)


@contextmanager
def peak_alloc() -> Iterator[Callable[[], int]]:
    """Peak bytes Python allocated inside the block (above what was live at its start)."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    peak = [0]
    try:
        yield lambda: peak[0]
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()


def test_round_trip_split_at_every_byte():
    payload = p.encode_fields([(Tag.STDOUT, b"hello"), (Tag.EXIT_CODE, 3), (Tag.MESSAGE, "x")])
    stream = frame(Op.EXEC, 7, payload) + frame(Op.ACK, 8, b"")
    for cut in range(len(stream) + 1):
        dec = FrameDecoder(Limit(1024, 16))
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert [(f.op, f.id) for f in got] == [(Op.EXEC, 7), (Op.ACK, 8)]
        assert isinstance(got[0], Frame)
        f = Fields.decode(got[0].payload)
        assert (f.bytes(Tag.STDOUT), f.int(Tag.EXIT_CODE), f.str(Tag.MESSAGE)) == (b"hello", 3, "x")


def test_huge_field_count_is_refused_without_materialising_fields():
    # 8 MiB of empty fields: ~1.4 million of them (this used to become ~97 MB of objects)
    payload = struct.pack("<HI", Tag.ENTRY, 0) * (8 * MiB // 6)
    with peak_alloc() as peak, pytest.raises(PayloadTooLarge) as e:
        Fields.decode(payload, max_fields=1000)
    assert e.value.unit == "fields"
    assert e.value.limit == 1000 and e.value.size == 8 * MiB // 6
    assert peak() < 256 * 1024, f"decoding the refused fields allocated {peak()} bytes"


def test_fields_within_the_count_are_indexed_compactly():
    payload = struct.pack("<HI", Tag.ENTRY, 0) * 100_000
    with peak_alloc() as peak:
        f = Fields.decode(payload, max_fields=100_000)
    assert len(f) == 100_000 and f.count(Tag.ENTRY) == 100_000
    # three arrays of 100k integers, not 100k tuples of bytes (~7 MB)
    assert peak() < 3 * 1024 * 1024


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x00\x05", "truncated field header"),
    (struct.pack("<HI", Tag.DATA, 100) + b"short", "overruns"),
])
def test_malformed_fields_are_typed_errors(payload: bytes, message: str):
    with pytest.raises(AgentProtocolError, match=message):
        Fields.decode(payload)


def test_oversized_length_is_skipped_unbuffered_and_the_stream_goes_on():
    dec = FrameDecoder(Limit(1 * MiB, 16))
    header = HEADER.pack(MAGIC, Op.READ_FILE, RESP, 5, 80 * MiB)
    events = dec.feed(header)
    # refused from the header alone, before a byte of the payload arrived
    assert events == [Oversized(Op.READ_FILE, RESP, 5, 80 * MiB, 1 * MiB)]
    chunk = b"\xaa" * MiB
    with peak_alloc() as peak:
        for _ in range(80):
            assert dec.feed(chunk) == []
            assert dec.buffered == 0
    assert peak() < 512 * 1024
    # framing survived: the next frame decodes
    nxt = dec.feed(frame(Op.HELLO, 6, p.encode_fields([(Tag.VERSION, "v")])))
    assert len(nxt) == 1 and isinstance(nxt[0], Frame) and nxt[0].id == 6


def test_frames_nobody_waits_for_are_skipped_unbuffered():
    def limit(op: int, flags: int, rid: int) -> Limit | None:
        return Limit(10 * MiB, 16) if rid == 1 else None

    dec = FrameDecoder(limit)
    stale = frame(Op.EXEC, 99, b"\0" * (4 * MiB))
    with peak_alloc() as peak:
        for i in range(0, len(stale), 65536):
            assert dec.feed(stale[i : i + 65536]) == []
            assert dec.buffered <= HEADER.size
    assert peak() < 512 * 1024
    got = dec.feed(frame(Op.EXEC, 1, b""))
    assert [f.id for f in got] == [1]


def test_truncated_frame_holds_no_more_than_arrived():
    dec = FrameDecoder(Limit(64 * MiB, 16))
    assert dec.feed(HEADER.pack(MAGIC, Op.READ_FILE, RESP, 1, 64 * MiB)[:9]) == []
    assert dec.buffered == 9
    assert dec.feed(HEADER.pack(MAGIC, Op.READ_FILE, RESP, 1, 64 * MiB)[9:]) == []
    with peak_alloc() as peak:
        assert dec.feed(b"x" * 1000) == []
    # a header promising 64 MiB does not reserve 64 MiB: only what came is held
    assert dec.buffered == 1000
    assert peak() < 64 * 1024


def test_bad_magic_is_a_protocol_error():
    dec = FrameDecoder(Limit(1024, 16))
    with pytest.raises(AgentProtocolError, match="magic"):
        dec.feed(HEADER.pack(0xDEADBEEF, Op.EXEC, RESP, 1, 0))


def test_ack_with_a_payload_is_over_its_limit():
    calls: list[tuple[int, int]] = []

    def limit(op: int, flags: int, rid: int) -> Limit | None:
        calls.append((op, rid))
        return Limit(0, 0) if op == Op.ACK else Limit(1024, 16)

    dec = FrameDecoder(limit)
    got = dec.feed(frame(Op.ACK, 3, b"junk"))
    assert got == [Oversized(Op.ACK, RESP, 3, 4, 0)]
    assert calls == [(Op.ACK, 3)]


def test_sync_skips_an_earlier_session_in_bounded_memory():
    dec = FrameDecoder(Limit(1024, 16))
    dec.sync_on(Op.HELLO, RESP, 42)
    with peak_alloc() as peak:
        for _ in range(64):
            # replies of an earlier session, garbage, anything: never a frame
            assert dec.feed(frame(Op.EXEC, 41, b"\0" * 60000) + b"\x46\x4b") == []
            assert dec.buffered < HEADER.size
    assert peak() < 512 * 1024
    hello = frame(Op.HELLO, 42, p.encode_fields([(Tag.NONCE, b"n")]))
    got = dec.feed(hello[:5]) + dec.feed(hello[5:])
    assert [f.id for f in got] == [42]


def test_entry_names_are_bounded():
    ok = struct.pack("<IQq", 0o100644, 1, 0) + b"a" * p.NAME_MAX
    assert p.decode_entry(ok)[3] == "a" * p.NAME_MAX
    with pytest.raises(AgentProtocolError):
        p.decode_entry(ok + b"a")
    with pytest.raises(AgentProtocolError):
        p.decode_entry(b"short")
    long_path = struct.pack("<IQq", 0o40755, 0, 0) + b"/d" * 1000
    assert p.decode_entry(long_path, max_name=p.PATH_MAX)[3] == "/d" * 1000

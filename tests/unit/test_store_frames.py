"""``whole_frames`` (a buffer held whole) judges zstd frames exactly as ``FrameTracker`` does."""

from __future__ import annotations

import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from forkyard.store._frames import FrameTracker, whole_frames


def tracker(data: bytes) -> bool | str:
    """FrameTracker's verdict: complete, incomplete, or the error it raised."""
    t = FrameTracker()
    try:
        t.feed(data)
    except zstandard.ZstdError:
        return "error"
    return t.complete


def whole(data: bytes) -> bool | str:
    try:
        return whole_frames(data)
    except zstandard.ZstdError:
        return "error"


def frame(payload: bytes, *, checksum: bool, size: bool, level: int = 3) -> bytes:
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum,
                                    write_content_size=size)
    return cctx.compress(payload)


def skippable(body: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A53, len(body)) + body


payloads = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 40000)),
)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.tuples(payloads, st.booleans(), st.booleans(), st.booleans()),
                      min_size=1, max_size=3))
def test_every_cut_of_a_stream_gets_the_trackers_verdict(
        parts: list[tuple[bytes, bool, bool, bool]]) -> None:
    data = b"".join(skippable(p[:7]) if skip else frame(p, checksum=c, size=s)
                    for p, c, s, skip in parts)
    assert whole(data) == tracker(data)
    for cut in range(len(data)):
        assert whole(data[:cut]) == tracker(data[:cut]), cut


@settings(max_examples=60, deadline=None)
@given(payload=payloads, at=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_a_flipped_bit_gets_the_trackers_verdict(payload: bytes, at: int, bit: int) -> None:
    raw = bytearray(frame(payload, checksum=True, size=True))
    raw[at % len(raw)] ^= 1 << bit
    assert whole(bytes(raw)) == tracker(bytes(raw))


def test_verdicts_that_matter() -> None:
    one = frame(b"x" * 70000, checksum=True, size=True)
    assert whole_frames(one) and whole_frames(one + one)
    assert not whole_frames(b"")
    assert not whole_frames(one[:-1])  # the checksum cut: the decoder alone would not say
    assert not whole_frames(skippable(b"abc"))  # no data frame at all
    with pytest.raises(zstandard.ZstdError, match="no zstd frame"):
        whole_frames(one + b"junk")

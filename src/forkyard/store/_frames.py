"""Following zstd frames (RFC 8878) as compressed bytes stream past.

The decoder happily stops at end of input when a frame lacks only its
checksum, or ends mid-frame; :class:`FrameTracker` tells a complete stream
from a truncated one without decoding anything, and :class:`CountingReader`
puts it in the path of a download.  :func:`whole_frames` does the same for a
buffer held whole (a RAM chunk), in one pass by offsets.
"""

from __future__ import annotations

from typing import BinaryIO

import zstandard

__all__ = ["CountingReader", "FrameTracker", "whole_frames"]


class CountingReader:
    """Counts the compressed bytes a download consumes and follows their frames."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.count = 0
        self.frames = FrameTracker()

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        self.count += len(data)
        self.frames.feed(data)
        return data


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGICS = range(0x184D2A50, 0x184D2A60)
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # the first is 1 for single-segment frames


class FrameTracker:
    """Walks zstd frame/block headers (RFC 8878) as the bytes pass, without decoding.

    The decoder happily stops at end of input when a frame lacks only its
    checksum, or ends mid-frame; this tells a complete stream from a
    truncated one. Costs one small parse per block (at most 128 KiB each).
    """

    def __init__(self) -> None:
        self.frames = 0
        self._field = bytearray()
        self._want = 4
        self._state = "magic"
        self._skip = 0
        self._checksum = False

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._field and not self._skip

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._skip:
                step = min(self._skip, len(view) - i)
                self._skip -= step
                i += step
                continue
            step = min(self._want - len(self._field), len(view) - i)
            self._field += view[i : i + step]
            i += step
            if len(self._field) == self._want:
                field = bytes(self._field)
                self._field.clear()
                self._advance(field)

    def _expect(self, state: str, want: int) -> None:
        self._state = state
        self._want = want

    def _advance(self, field: bytes) -> None:
        value = int.from_bytes(field, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif value in _SKIPPABLE_MAGICS:
                self._expect("skippable", 4)
            else:
                raise zstandard.ZstdError(f"no zstd frame at a frame boundary ({value:#x})")
        elif self._state == "skippable":
            self._skip = value
            self._expect("magic", 4)
        elif self._state == "descriptor":
            self._start_frame(value)
        elif self._state == "header":
            self._expect("block", 3)
        elif self._state == "block":
            self._end_block(value)
        else:  # checksum
            self.frames += 1
            self._expect("magic", 4)

    def _start_frame(self, descriptor: int) -> None:
        single_segment = bool(descriptor & 0x20)
        if descriptor & 0x08:
            raise zstandard.ZstdError("reserved bit set in a zstd frame header")
        self._checksum = bool(descriptor & 0x04)
        content_size = _CONTENT_SIZE_BYTES[descriptor >> 6] or int(single_segment)
        rest = int(not single_segment) + _DICT_ID_BYTES[descriptor & 0x03] + content_size
        if rest:
            self._expect("header", rest)
        else:
            self._expect("block", 3)

    def _end_block(self, header: int) -> None:
        block_type = (header >> 1) & 0x03
        if block_type == 3:
            raise zstandard.ZstdError("reserved zstd block type")
        self._skip = 1 if block_type == 1 else header >> 3  # RLE blocks hold one byte
        if not header & 0x01:
            self._expect("block", 3)
        elif self._checksum:
            self._expect("checksum", 4)
        else:
            self.frames += 1
            self._expect("magic", 4)


def whole_frames(data: bytes) -> bool:
    """Whether ``data`` is one or more complete zstd frames and nothing else.

    :class:`FrameTracker`'s walk over a buffer held whole: the same checks,
    without its per-field state machine (a fork checks a thousand RAM chunks).
    Raises ``zstandard.ZstdError`` for what no encoder writes.
    """
    end = len(data)
    i = frames = 0
    while i < end:
        if i + 4 > end:
            return False
        magic = int.from_bytes(data[i:i + 4], "little")
        i += 4
        if magic in _SKIPPABLE_MAGICS:
            if i + 4 > end:
                return False
            i += 4 + int.from_bytes(data[i:i + 4], "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise zstandard.ZstdError(f"no zstd frame at a frame boundary ({magic:#x})")
        if i >= end:
            return False
        descriptor = data[i]
        if descriptor & 0x08:
            raise zstandard.ZstdError("reserved bit set in a zstd frame header")
        single_segment = bool(descriptor & 0x20)
        i += 1 + int(not single_segment) + _DICT_ID_BYTES[descriptor & 0x03] + (
            _CONTENT_SIZE_BYTES[descriptor >> 6] or int(single_segment))
        while True:
            if i + 3 > end:
                return False
            header = int.from_bytes(data[i:i + 3], "little")
            block_type = (header >> 1) & 0x03
            if block_type == 3:
                raise zstandard.ZstdError("reserved zstd block type")
            i += 3 + (1 if block_type == 1 else header >> 3)
            if header & 0x01:
                break
        if descriptor & 0x04:
            i += 4
        if i > end:
            return False
        frames += 1
    return frames > 0 and i == end

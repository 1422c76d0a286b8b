"""The forkyard agent protocol: framing and field encoding (host side).

This module is the reference description; ``agent.c`` implements the guest
side and must agree with every constant here.

Frame (all integers little endian)::

    magic u32 = 0x31594B46 ("FKY1")   op u16   flags u16   id u32   length u32
    payload: `length` bytes = a sequence of fields  tag u16, len u32, value

``flags``: bit 0 = response, bit 1 = error.  Every request is answered first
by an ``ACK`` frame (op 0x7FFF, same id) as soon as the guest has read it
completely, then by exactly one response with the request's op and id (or an
error response carrying ``KIND``/``ERRNO``/``MESSAGE``).  The ACK lets the host
pause the VM for a checkpoint only when the guest holds no partial request.

Sessions: a fresh host connection starts with ``HELLO`` carrying a random
``NONCE`` (and the real time, which a fork needs because it resumes with the
checkpoint's clock).  After a restore the guest may still be sending replies
to the previous host; the host discards every byte until it sees the HELLO
reply with its nonce.

Integers are u64 fields; strings are UTF-8 bytes without NUL.  A directory
entry (``ENTRY``) is ``mode u32, size u64, mtime_ns i64, name bytes``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "Fields",
    "Flag",
    "Frame",
    "FrameDecoder",
    "Op",
    "Tag",
    "decode_entry",
    "encode_fields",
    "encode_frame",
]

MAGIC = 0x31594B46
HEADER = struct.Struct("<IHHII")
MAX_PAYLOAD = 80 * 1024 * 1024


class Op(enum.IntEnum):
    HELLO = 1
    EXEC = 2
    WRITE_FILE = 3
    READ_FILE = 4
    STAT = 5
    LIST = 6
    REMOVE = 7
    MKDIR = 8
    SYNC = 9
    KILL = 10
    POWEROFF = 11
    ACK = 0x7FFF


class Flag(enum.IntFlag):
    RESPONSE = 1
    ERROR = 2


class Tag(enum.IntEnum):
    ARGV = 1
    SHELL = 2
    ENV = 3
    CWD = 4
    TIMEOUT_MS = 5
    STDIN = 6
    PATH = 7
    DATA = 8
    MODE = 9
    EXIT_CODE = 10
    STDOUT = 11
    STDERR = 12
    SIGNAL = 13
    TIMED_OUT = 14
    ERRNO = 15
    MESSAGE = 16
    KIND = 17
    TIME_NS = 18
    VERSION = 19
    FLAGS = 20
    PID = 21
    ENTRY = 22
    SIZE = 23
    MAX_OUTPUT = 24
    UPTIME_MS = 25
    OFFSET = 26
    LENGTH = 27
    TRUNCATED = 28
    NONCE = 29


# T_FLAGS bits, per operation
EXEC_BACKGROUND = 1
WRITE_MKDIRS = 1
WRITE_APPEND = 2
REMOVE_RECURSIVE = 1
MKDIR_PARENTS = 1
SYNC_DROP_CACHES = 1

_FIELD = struct.Struct("<HI")
_U64 = struct.Struct("<Q")
_ENTRY = struct.Struct("<IQq")

FieldValue = bytes | str | int


def encode_fields(fields: Iterable[tuple[Tag, FieldValue]]) -> bytes:
    out = bytearray()
    for tag, value in fields:
        if isinstance(value, int):
            raw = _U64.pack(value & 0xFFFFFFFFFFFFFFFF)
        elif isinstance(value, str):
            raw = value.encode()
            if b"\0" in raw:
                raise ValueError(f"field {tag.name} contains a NUL byte")
        else:
            raw = bytes(value)
        out += _FIELD.pack(int(tag), len(raw))
        out += raw
    return bytes(out)


def encode_frame(op: Op, request_id: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, int(op), flags, request_id, len(payload)) + payload


@dataclass(slots=True)
class Fields:
    """Decoded payload fields, in order; tags may repeat."""

    items: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def decode(cls, payload: bytes) -> Fields:
        items: list[tuple[int, bytes]] = []
        off = 0
        while off < len(payload):
            if len(payload) - off < _FIELD.size:
                raise ValueError("truncated field header")
            tag, n = _FIELD.unpack_from(payload, off)
            off += _FIELD.size
            if n > len(payload) - off:
                raise ValueError("field overruns payload")
            items.append((tag, payload[off : off + n]))
            off += n
        return cls(items)

    def raw(self, tag: Tag) -> bytes | None:
        for t, v in self.items:
            if t == tag:
                return v
        return None

    def all(self, tag: Tag) -> Iterator[bytes]:
        return (v for t, v in self.items if t == tag)

    def bytes(self, tag: Tag, default: bytes = b"") -> bytes:
        v = self.raw(tag)
        return default if v is None else v

    def str(self, tag: Tag, default: str = "") -> str:
        v = self.raw(tag)
        return default if v is None else v.decode("utf-8", "replace")

    def int(self, tag: Tag, default: int = 0, *, signed: bool = False) -> int:
        v = self.raw(tag)
        if v is None or len(v) != 8:
            return default
        n: int = _U64.unpack(v)[0]
        if signed and n >= 1 << 63:
            n -= 1 << 64
        return n


@dataclass(frozen=True, slots=True)
class Frame:
    op: int
    flags: int
    id: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flag.ERROR)


def decode_entry(raw: bytes) -> tuple[int, int, int, str]:
    """``(mode, size, mtime_ns, name)`` of an ENTRY field."""
    if len(raw) < _ENTRY.size:
        raise ValueError("truncated directory entry")
    mode, size, mtime_ns = _ENTRY.unpack_from(raw)
    return mode, size, mtime_ns, raw[_ENTRY.size :].decode("utf-8", "surrogateescape")


class FrameDecoder:
    """Incremental frame parser for the host side of the channel.

    ``sync_on`` makes the decoder drop everything before the first frame whose
    first 12 header bytes equal it (see "Sessions" above); until then no frame
    is produced.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload
        self._sync: bytes | None = None

    def sync_on(self, op: Op, flags: int, request_id: int) -> None:
        self._sync = HEADER.pack(MAGIC, int(op), flags, request_id, 0)[:12]

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        if self._sync is not None:
            at = self._buf.find(self._sync)
            if at < 0:
                # keep a tail that may hold the start of the marker
                del self._buf[: max(0, len(self._buf) - len(self._sync) + 1)]
                return frames
            del self._buf[:at]
            self._sync = None
        while len(self._buf) >= HEADER.size:
            magic, op, flags, rid, n = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ValueError("bad frame magic from the guest agent")
            if n > self._max:
                raise ValueError(f"guest agent frame of {n} bytes exceeds {self._max}")
            if len(self._buf) < HEADER.size + n:
                break
            payload = bytes(self._buf[HEADER.size : HEADER.size + n])
            del self._buf[: HEADER.size + n]
            frames.append(Frame(op, flags, rid, payload))
        return frames

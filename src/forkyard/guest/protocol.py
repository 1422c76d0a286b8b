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
entry (``ENTRY``) is ``mode u32, size u64, mtime_ns i64, name bytes``.  A
``LIST`` request carries ``MAX_ENTRIES``; the reply holds at most that many
entries and ``TRUNCATED`` = 1 when the directory has more.

Network (``NET``): the host sends eth0's address, prefix, gateway and
nameserver after every boot and restore; the agent sets them with ioctls
(no tool in the image needed), writes ``/etc/resolv.conf`` and, with
``NET_RESET_TCP``, aborts the TCP connections of that address through
``sock_diag`` (``SOCK_DESTROY``), since after a restore their peers are
gone.  A guest without ``eth0`` answers with an error.

Processes (``SPAWN``): the guest keeps each spawned command's stdout and
stderr in a ring of scrollback addressed by absolute byte offsets.
``PROC_READ(PID, OFFSET, ERR_OFFSET, LENGTH, WAIT_MS)`` answers with the
bytes at those offsets (``STDOUT``/``STDERR``, at most ``LENGTH`` each, and
the offsets they really start at: later than asked when the ring dropped
them), waiting up to ``WAIT_MS`` for some; ``EXITED`` + ``EXIT_CODE``
(+ ``SIGNAL``) once the host has every byte.  Asking from an offset
acknowledges what lies before it: a ``SPAWN_LOSSLESS`` process stops being
read (blocks in write) while a ring holds a full ring of unacknowledged
output, the others overwrite their oldest output.  So live output costs the
host one bounded reply per read, and a reader that stops costs nothing.
A ``PROC`` entry is ``pid u32, flags u32, exit_code i32, 0 u32,
start_ns u64, command bytes`` (flags: ``PROC_*``).

Bounds (the guest is hostile): every reply is held to a
:class:`Limit` chosen by the request it answers *before* its payload is
buffered.  The decoder reads a header, asks for the limit of that (op, id),
and a payload over it is skipped without being stored (the call fails with
``PayloadTooLarge``; framing stays intact, so the channel stays usable).  A
frame nobody waits for (an earlier session's reply) is skipped the same way.
Fields are then indexed (not copied) under a field-count limit.  So the host
holds at most one payload per pending call, each within its call's limit,
whatever the guest sends.
"""

from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from forkyard.errors import AgentProtocolError, PayloadTooLarge

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_PAYLOAD",
    "NAME_MAX",
    "PATH_MAX",
    "SMALL_REPLY",
    "Fields",
    "Flag",
    "Frame",
    "FrameDecoder",
    "Limit",
    "Op",
    "Oversized",
    "Tag",
    "decode_entry",
    "encode_fields",
    "encode_frame",
]

MAGIC = 0x31594B46
HEADER = struct.Struct("<IHHII")
# the largest request the agent accepts (a 64 MiB file plus its fields)
MAX_PAYLOAD = 80 * 1024 * 1024
NAME_MAX = 255  # bytes of a file name in the guest (Linux)
PATH_MAX = 4096


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
    SPAWN = 12
    PROC_READ = 13
    PROC_INPUT = 14
    PROC_LIST = 15
    PTY_RESIZE = 16
    RENAME = 17
    SYMLINK = 18
    READLINK = 19
    # fresh after a restore (numbered apart from the core ops)
    IDENTITY = 64
    GROW_FS = 65
    NET = 66
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
    MAX_ENTRIES = 30
    ERR_OFFSET = 31
    WAIT_MS = 32
    EXITED = 33
    PROC = 34
    ROWS = 35
    COLS = 36
    USER = 37
    TARGET = 38
    # HELLO: host randomness the guest reseeds its RNG with; RESEEDED = 1 if it did
    SEED = 64
    HOSTNAME = 65
    MACHINE_ID = 66
    RESEEDED = 67
    # NET: eth0's IPv4 address/prefix, gateway and nameserver (dotted strings, prefix
    # u64); FLAGS NET_RESET_TCP aborts the guest's TCP connections of that address
    # (after a restore their peers are gone); the reply's NET_RESET counts them
    NET_ADDRESS = 68
    NET_PREFIX = 69
    NET_GATEWAY = 70
    NET_DNS = 71
    NET_RESET = 72


# T_FLAGS bits, per operation
EXEC_BACKGROUND = 1
WRITE_MKDIRS = 1
WRITE_APPEND = 2
WRITE_AT = 4  # one chunk at OFFSET, in place (a streamed upload's temp file)
REMOVE_RECURSIVE = 1
MKDIR_PARENTS = 1
MKDIR_CHMOD = 2
RENAME_SYNC = 1  # fsync the file first and its new directory after
RENAME_NOREPLACE = 2
SYNC_DROP_CACHES = 1
SPAWN_LOSSLESS = 1
SPAWN_PTY = 2
SPAWN_KEEP_STDIN = 4
INPUT_EOF = 1
# PROC field flags
PROC_EXITED = 1
PROC_PTY = 2
PROC_TIMED_OUT = 4
IDENTITY_MACHINE_ID = 1  # in the reply: /etc/machine-id was rewritten
SEED_BYTES = 64  # the agent accepts up to 512
NET_RESET_TCP = 1  # NET request
NET_RESOLV_CONF = 1  # NET reply: /etc/resolv.conf was written

_FIELD = struct.Struct("<HI")
_U64 = struct.Struct("<Q")
_ENTRY = struct.Struct("<IQq")
ENTRY_FIELD_MAX = _FIELD.size + _ENTRY.size + NAME_MAX  # one ENTRY field, at most

FieldValue = bytes | str | int


@dataclass(frozen=True, slots=True)
class Limit:
    """What one reply may hold: payload bytes and number of fields."""

    payload: int
    fields: int


# HELLO, STAT, errors, ...: short strings and integers (a path is < 4 KiB)
SMALL_REPLY = Limit(64 * 1024, 64)


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


class Fields:
    """Decoded payload fields, in order; tags may repeat.

    An index into the payload (three compact arrays), not a list of copies:
    a frame of a million empty fields would otherwise cost ~100 bytes of
    Python objects per 6 bytes received.  Values are copied out on access.
    """

    __slots__ = ("_lens", "_offs", "_tags", "_view")

    def __init__(self, payload: bytes | bytearray | memoryview = b"") -> None:
        self._view = memoryview(payload).cast("B")
        self._tags = array("H")
        self._offs = array("Q")
        self._lens = array("Q")

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview, *,
               max_fields: int = SMALL_REPLY.fields) -> Fields:
        """Index ``payload``; over ``max_fields`` fields raises before indexing more."""
        f = cls(payload)
        view, size, off = f._view, len(f._view), 0
        while off < size:
            if len(f._tags) >= max_fields:
                raise PayloadTooLarge("guest agent reply", _count_fields(view, off, max_fields),
                                      max_fields, unit="fields")
            if size - off < _FIELD.size:
                raise AgentProtocolError("guest agent reply: truncated field header")
            tag, n = _FIELD.unpack_from(view, off)
            off += _FIELD.size
            if n > size - off:
                raise AgentProtocolError("guest agent reply: a field overruns its frame")
            f._tags.append(tag)
            f._offs.append(off)
            f._lens.append(n)
            off += n
        return f

    def __len__(self) -> int:
        return len(self._tags)

    def view(self, tag: Tag) -> memoryview | None:
        """The first ``tag`` field, without copying it."""
        for i, t in enumerate(self._tags):
            if t == tag:
                return self._view[self._offs[i] : self._offs[i] + self._lens[i]]
        return None

    def views(self, tag: Tag) -> Iterator[memoryview]:
        for i, t in enumerate(self._tags):
            if t == tag:
                yield self._view[self._offs[i] : self._offs[i] + self._lens[i]]

    def count(self, tag: Tag) -> int:
        return sum(1 for t in self._tags if t == tag)

    def raw(self, tag: Tag) -> bytes | None:
        v = self.view(tag)
        return None if v is None else bytes(v)

    def all(self, tag: Tag) -> Iterator[bytes]:
        return (bytes(v) for v in self.views(tag))

    def bytes(self, tag: Tag, default: bytes = b"") -> bytes:
        v = self.view(tag)
        return default if v is None else bytes(v)

    def str(self, tag: Tag, default: str = "") -> str:
        v = self.view(tag)
        return default if v is None else bytes(v).decode("utf-8", "replace")

    def int(self, tag: Tag, default: int = 0, *, signed: bool = False) -> int:
        v = self.view(tag)
        if v is None or len(v) != 8:
            return default
        n: int = _U64.unpack(v)[0]
        if signed and n >= 1 << 63:
            n -= 1 << 64
        return n


def _count_fields(view: memoryview, off: int, seen: int) -> int:
    """How many fields the rest of a too-full payload holds (for the error message)."""
    while len(view) - off >= _FIELD.size:
        _, n = _FIELD.unpack_from(view, off)
        off += _FIELD.size + n
        seen += 1
    return seen


@dataclass(frozen=True, slots=True)
class Frame:
    op: int
    flags: int
    id: int
    payload: bytes | bytearray

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flag.ERROR)


@dataclass(frozen=True, slots=True)
class Oversized:
    """A frame whose payload was over its limit: skipped, never stored."""

    op: int
    flags: int
    id: int
    length: int
    limit: int


def decode_entry(raw: bytes | memoryview, *, max_name: int = NAME_MAX) -> tuple[int, int, int, str]:
    """``(mode, size, mtime_ns, name)`` of an ENTRY field (a STAT's name is its path)."""
    if len(raw) < _ENTRY.size:
        raise AgentProtocolError("guest agent reply: truncated directory entry")
    if len(raw) > _ENTRY.size + max_name:
        raise AgentProtocolError(f"guest agent reply: entry name over {max_name} bytes")
    mode, size, mtime_ns = _ENTRY.unpack_from(raw)
    return mode, size, mtime_ns, bytes(raw[_ENTRY.size :]).decode("utf-8", "surrogateescape")


# (op, flags, id) -> the limit of that frame, or None: nobody waits for it, skip it
LimitFor = Callable[[int, int, int], Limit | None]


class FrameDecoder:
    """Incremental frame parser for the host side of the channel.

    ``limit`` is a fixed :class:`Limit` or a function of each frame's header
    (see the module docstring).  Memory held: a header, at most one payload
    within its limit, and while syncing a tail shorter than a header.

    ``sync_on`` makes the decoder drop everything before the first frame whose
    first 12 header bytes equal it (see "Sessions" above); until then no frame
    is produced.
    """

    def __init__(self, limit: Limit | LimitFor = Limit(MAX_PAYLOAD, 1 << 20)) -> None:
        self._limit_for: LimitFor = (lambda _o, _f, _i: limit) if isinstance(limit, Limit) \
            else limit
        self._sync: bytes | None = None
        self._scan = bytearray()  # while syncing: bytes that may start the marker
        self._hdr = bytearray()
        self._head: tuple[int, int, int, int] | None = None  # op, flags, id, length
        self._payload = bytearray()
        self._skip = 0

    def sync_on(self, op: Op, flags: int, request_id: int) -> None:
        self._sync = HEADER.pack(MAGIC, int(op), flags, request_id, 0)[:12]
        self._scan.clear()

    @property
    def buffered(self) -> int:
        """Bytes held right now (for tests of the bounds)."""
        return len(self._scan) + len(self._hdr) + len(self._payload)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | Oversized]:
        """Consume ``data``; raises ``AgentProtocolError`` on a bad magic (stream lost)."""
        out: list[Frame | Oversized] = []
        view = memoryview(data).cast("B")
        if self._sync is not None:
            self._scan += view
            at = self._scan.find(self._sync)
            if at < 0:
                # keep a tail that may hold the start of the marker
                del self._scan[: max(0, len(self._scan) - len(self._sync) + 1)]
                return out
            view = memoryview(bytes(self._scan[at:]))
            self._scan.clear()
            self._sync = None
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                k = min(self._skip, end - pos)
                self._skip -= k
                pos += k
            elif self._head is None:
                k = min(HEADER.size - len(self._hdr), end - pos)
                self._hdr += view[pos : pos + k]
                pos += k
                if len(self._hdr) == HEADER.size:
                    self._start_frame(out)
            else:
                n = self._head[3]
                k = min(n - len(self._payload), end - pos)
                self._payload += view[pos : pos + k]
                pos += k
                if len(self._payload) == n:
                    self._end_frame(out)
        return out

    def _start_frame(self, out: list[Frame | Oversized]) -> None:
        magic, op, flags, rid, n = HEADER.unpack(self._hdr)
        self._hdr.clear()
        if magic != MAGIC:
            raise AgentProtocolError("bad frame magic from the guest agent")
        limit = self._limit_for(op, flags, rid)
        if limit is None:
            self._skip = n
            return
        if n > limit.payload:
            out.append(Oversized(op, flags, rid, n, limit.payload))
            self._skip = n
            return
        self._head = (op, flags, rid, n)
        if n == 0:
            self._end_frame(out)

    def _end_frame(self, out: list[Frame | Oversized]) -> None:
        assert self._head is not None
        op, flags, rid, _ = self._head
        # the bytearray itself: copying 64 MiB into a bytes object would double the peak
        out.append(Frame(op, flags, rid, self._payload))
        self._payload = bytearray()
        self._head = None

"""Split a QEMU 7.2 migration stream into guest RAM pages and a device-state-only stream.

Why: a VM that maps a frozen RAM image (``share=off``, ``vm/ram.py``) cannot
save a device-state-only stream, because ``x-ignore-shared`` leaves out only
``share=on`` RAM.  So its checkpoint migrates with ``x-ignore-shared`` on
(every RAM page of its ``pc.ram`` block is still sent), and this filter,
reading the stream from a pipe while QEMU writes it, puts every ``pc.ram``
page into a new RAM image and passes everything else through: the output is
byte for byte what a VM on a ``share=on`` RAM file would have saved (its
``ram`` section lists the blocks but carries no ``pc.ram`` page), so it loads
exactly like any format v3 device state.

Only the framing QEMU 7.2 writes for forkyard's machines is understood:
the file header, the configuration section, and the ``ram`` section's
START/PART/END parts with plain pages (``ZERO``/``PAGE`` records; no
compression, XBZRLE, multifd or postcopy, which forkyard never enables).
Everything after the ``ram`` END part (device sections, EOF, the JSON
description) is copied verbatim.  Anything else raises
:class:`StreamFormatError`, and the caller falls back to storing the whole
stream (format v2): unknown input is never guessed at.  The input is QEMU's
own output for this checkpoint, but a guest that owns QEMU could shape it, so
every length and offset is bounded: a page outside the image is an error.
"""

from __future__ import annotations

import io
import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from forkyard.errors import VMError

__all__ = ["StreamEnded", "StreamFormatError", "saved_ignore_shared", "split_stream"]

_MAGIC = 0x5145564D
_VERSION = 3
_EOF, _START, _PART, _END, _FULL, _SUB, _DESC, _CONFIG, _CMD = 0, 1, 2, 3, 4, 5, 6, 7, 8
_FOOTER = 0x7E
_F_ZERO, _F_MEM_SIZE, _F_PAGE, _F_EOS, _F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
_PAGE = 4096
_FLAG_MASK = _PAGE - 1
_KNOWN_FLAGS = _F_ZERO | _F_MEM_SIZE | _F_PAGE | _F_EOS | _F_CONTINUE
_COPY = 1 << 20
_ZERO_PAGE = bytes(_PAGE)
_BE64 = struct.Struct(">Q")
Put = Callable[[bytes], object]


class StreamFormatError(VMError):
    """The stream holds something this filter does not understand."""


class StreamEnded(StreamFormatError):
    """The stream stopped short: usually because its writer (QEMU) failed."""


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def exact(self, n: int) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            raise StreamEnded(f"migration stream ended early ({len(data)} of {n} bytes)")
        return data

    def byte(self) -> int:
        return self.exact(1)[0]

    def be32(self) -> int:
        return int(struct.unpack(">I", self.exact(4))[0])

    def be64(self) -> int:
        return int(struct.unpack(">Q", self.exact(8))[0])

    def name(self) -> bytes:
        return self.exact(self.byte())


def split_stream(src: BinaryIO, out: BinaryIO, image: mmap.mmap, *,
                 block: bytes = b"pc.ram") -> int:
    """Copy ``src`` to ``out`` without ``block``'s pages, which go into ``image``.

    ``image`` starts all zero (a page sent as ZERO stays a hole).  Returns the
    number of pages written into it.
    """
    r = _Reader(src)
    w = out.write
    head = r.exact(8)
    magic, version = struct.unpack(">II", head)
    if magic != _MAGIC or version != _VERSION:
        raise StreamFormatError(f"not a QEMU migration stream v3 (magic {magic:#x}, "
                                f"version {version})")
    w(head)
    caps = _configuration(r, w)
    ignore_shared = b"x-ignore-shared" in caps
    ram_section: int | None = None
    pages = 0
    current: bytes | None = None  # the block of the previous page record (CONTINUE)
    written = bytearray(len(image) // _PAGE)
    while True:
        kind = r.byte()
        if kind == _START:
            raw = r.exact(4)
            sid = struct.unpack(">I", raw)[0]
            idstr = r.name()
            rest = r.exact(8)
            if idstr != b"ram" or ram_section is not None:
                raise StreamFormatError(f"unexpected iterable section {idstr!r}")
            ram_section = sid
            w(bytes([kind]) + raw + bytes([len(idstr)]) + idstr + rest)
            _ram_setup(r, w, block, image, ignore_shared)
            _footer(r, w, sid)
        elif kind in (_PART, _END):
            raw = r.exact(4)
            sid = struct.unpack(">I", raw)[0]
            if sid != ram_section:
                raise StreamFormatError(f"part of section {sid}, not of ram ({ram_section})")
            w(bytes([kind]) + raw)
            n, current = _ram_pages(r, w, block, image, current, written)
            pages += n
            _footer(r, w, sid)
            if kind == _END:
                break
        elif kind in (_FULL, _EOF) and ram_section is not None:
            # a background snapshot ends RAM with a PART and no END: the device
            # state follows (QEMU saved it before the RAM, at the snapshot's instant)
            w(bytes([kind]))
            break
        else:
            raise StreamFormatError(f"section type {kind} before the end of RAM")
    while data := src.read(_COPY):  # device state, EOF, description: as they are
        w(data)
    return pages


def saved_ignore_shared(path: Path) -> bool:
    """Whether the stream at ``path`` was saved with ``x-ignore-shared`` on.

    Its configuration section lists the capability (QEMU refuses to load a
    stream whose validated capabilities differ from the loader's).  A format
    v3 state is device state only either way: saved with the capability (RAM
    in a ``share=on`` file left out), or live without it (RAM split off).
    """
    with open(path, "rb") as f:
        r = _Reader(f)
        magic, version = struct.unpack(">II", r.exact(8))
        if magic != _MAGIC or version != _VERSION:
            raise StreamFormatError(f"{path}: not a QEMU migration stream v3")
        return b"x-ignore-shared" in _configuration(r, lambda _data: None)


def _configuration(r: _Reader, put: Put) -> set[bytes]:
    """The configuration section (copied); returns the capabilities it validates."""
    if r.byte() != _CONFIG:
        raise StreamFormatError("migration stream has no configuration section")
    n = r.be32()
    if n > 256:
        raise StreamFormatError("machine name too long")
    put(bytes([_CONFIG]) + struct.pack(">I", n) + r.exact(n))
    caps: set[bytes] = set()
    while _peek(r) == _SUB:
        r.byte()
        name = r.name()
        version = r.exact(4)
        put(bytes([_SUB, len(name)]) + name + version)
        if name == b"configuration/capabilities":
            count = r.be32()
            if count > 64:
                raise StreamFormatError("too many capabilities")
            put(struct.pack(">I", count))
            for _ in range(count):
                cap = r.name()
                caps.add(cap)
                put(bytes([len(cap)]) + cap)
        elif name == b"configuration/target-page-bits":
            put(r.exact(4))
        elif name == b"configuration/uuid":
            put(r.exact(16))
        else:
            raise StreamFormatError(f"unknown configuration subsection {name!r}")
    return caps


def _peek(r: _Reader) -> int:
    f = r._f
    if not isinstance(f, io.BufferedReader):
        raise StreamFormatError("the stream must be buffered")
    head = f.peek(1)
    if not head:
        raise StreamFormatError("migration stream ended early")
    return head[0]


def _ram_setup(r: _Reader, put: Put, block: bytes, image: mmap.mmap,
               ignore_shared: bool) -> None:
    total = r.be64()
    if total & _FLAG_MASK != _F_MEM_SIZE:
        raise StreamFormatError("ram section does not start with its block list")
    put(struct.pack(">Q", total))
    remaining = total & ~_FLAG_MASK
    found = False
    while remaining > 0:
        name = r.name()
        used = r.be64()
        put(bytes([len(name)]) + name + struct.pack(">Q", used))
        if ignore_shared:
            put(r.exact(8))
        if name == block:
            if used != len(image):
                raise StreamFormatError(f"block {name!r} holds {used} bytes, the image "
                                        f"{len(image)}")
            found = True
        if used > remaining:
            raise StreamFormatError("ram block list overruns its total")
        remaining -= used
    if not found:
        raise StreamFormatError(f"no RAM block {block!r} in the stream")
    if r.be64() != _F_EOS:
        raise StreamFormatError("ram setup does not end with EOS")
    put(struct.pack(">Q", _F_EOS))


def _ram_pages(r: _Reader, put: Put, block: bytes, image: mmap.mmap,
               current: bytes | None, written: bytearray) -> tuple[int, bytes | None]:
    """One ram part's page records up to EOS; ``block``'s go into ``image``.

    ``written[i]`` is set once page ``i`` of the image holds data from this
    stream (a later ZERO record for it must clear it; others leave the hole).
    The loop is the filter's hot path (a record per guest page): local names.
    """
    size = len(image)
    pages = 0
    read = r.exact
    unpack = _BE64.unpack
    while True:
        header = unpack(read(8))[0]
        flags = header & _FLAG_MASK
        addr = header & ~_FLAG_MASK
        name: bytes | None = current
        if not flags & _F_CONTINUE and flags & (_F_ZERO | _F_PAGE):
            name = read(read(1)[0])
        if flags & ~_KNOWN_FLAGS or flags & _F_MEM_SIZE:
            raise StreamFormatError(f"unsupported RAM record flags {flags:#x}")
        if flags & _F_EOS:
            if flags != _F_EOS:
                raise StreamFormatError("EOS combined with other flags")
            put(_BE64.pack(header))
            return pages, current
        if not flags & (_F_ZERO | _F_PAGE) or (flags & _F_ZERO and flags & _F_PAGE):
            raise StreamFormatError(f"RAM record without exactly one page ({flags:#x})")
        if name is None:
            raise StreamFormatError("CONTINUE record before any block")
        current = name
        body = read(1) if flags & _F_ZERO else read(_PAGE)
        if name != block:
            prefix = b"" if flags & _F_CONTINUE else bytes([len(name)]) + name
            put(_BE64.pack(header) + prefix + body)
            continue
        if addr + _PAGE > size:
            raise StreamFormatError(f"page at {addr:#x} is outside the {size}-byte image")
        page = addr >> 12
        if flags & _F_ZERO:
            if body != b"\0":
                raise StreamFormatError("a ZERO record with a fill byte other than 0")
            if written[page]:  # sent earlier in this stream; else the hole stays
                image[addr:addr + _PAGE] = _ZERO_PAGE
                written[page] = 0
            continue
        image[addr:addr + _PAGE] = body
        written[page] = 1
        pages += 1


def _footer(r: _Reader, put: Put, sid: int) -> None:
    if _peek(r) != _FOOTER:
        return  # machines without section footers
    raw = r.exact(5)
    if struct.unpack(">I", raw[1:])[0] != sid:
        raise StreamFormatError("section footer names another section")
    put(raw)

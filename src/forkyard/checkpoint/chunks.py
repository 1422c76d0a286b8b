"""A large part as fixed-size, content-addressed chunks (archive format v2).

A chunk list names the bytes of one file as ``(offset, size, digest)``
triples covering ``[0, size)`` in order, without gaps or overlaps; each chunk
travels as its own blob, named by the sha256 of its bytes.  A reader can then
verify each chunk *before* using any of its bytes (the VM state is fed to QEMU
chunk by chunk, each checked first: QEMU trusts its migration stream), holding
a few chunks at most, and identical chunks are stored once.

The list is general on purpose: nothing in it says "VM state".  Issue 14 wants
guest RAM as a page-aligned image in fixed-size chunks mapped by offset; the
same :class:`ChunkRef` list (with all-zero chunks left out, which is why every
entry carries its offset rather than relying on position) describes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkyard.errors import ManifestError

__all__ = [
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "RAM_CHUNK_SIZE",
    "STATE_CHUNK_SIZE",
    "ChunkRef",
    "RamImageRef",
    "check_cover",
    "check_ram",
    "ram_chunk_size",
    "split_file",
]

# 4 MiB: QEMU waits for one verified chunk before its first byte, and a reader holds
# a few of them; still few objects for a large state (per-object store overhead
# stays small next to the transfer)
STATE_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024  # what a reader accepts from a manifest
# RAM chunks: as small as keeps an image within RAM_MAX_CHUNKS objects.  The
# guest kernel scatters what it writes over physical memory (tmpfs pages, page
# tables, slab), so the chunk size is what a small change costs.  Measured on a
# 256 MiB guest: between two idle checkpoints 84-372 KiB of 4 KiB pages changed,
# i.e. 1-4 MB of 64 KiB chunks, 2.5-10 MB of 256 KiB ones, 14-30 MB of 2 MiB
# ones; 1 MiB written to a guest tmpfs cost ~15 MB of 256 KiB chunks.  Smaller
# chunks cost more objects (store requests, cache files) and manifest bytes
# (~100 per chunk: 4096 chunks keep a manifest well under its 1 MiB limit).
RAM_MAX_CHUNKS = 4096
_MIN_RAM_CHUNK = 64 * 1024
RAM_CHUNK_SIZE = _MIN_RAM_CHUNK  # a guest of up to 256 MiB's


def ram_chunk_size(memory_bytes: int) -> int:
    """The smallest power of two >= 64 KiB cutting ``memory_bytes`` into <= 4096 chunks."""
    size = RAM_CHUNK_SIZE
    while memory_bytes > size * RAM_MAX_CHUNKS:
        size *= 2
    return size
MAX_CHUNKS = 1 << 16  # keeps a manifest well under its 1 MiB limit
_READ = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Bytes ``[offset, offset + size)`` of a part, whose sha256 is ``digest``."""

    offset: int
    size: int
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "digest": self.digest}


def split_file(path: Path, chunk_size: int = STATE_CHUNK_SIZE
               ) -> tuple[str, int, tuple[ChunkRef, ...]]:
    """(sha256 of the whole file, its size, its chunks), in one pass over it."""
    whole = hashlib.sha256()
    chunks: list[ChunkRef] = []
    offset = 0
    with open(path, "rb") as f:
        while True:
            h = hashlib.sha256()
            n = 0
            while n < chunk_size:
                data = f.read(min(_READ, chunk_size - n))
                if not data:
                    break
                h.update(data)
                whole.update(data)
                n += len(data)
            if n == 0:
                break
            chunks.append(ChunkRef(offset, n, h.hexdigest()))
            offset += n
        size = os.fstat(f.fileno()).st_size
    if size != offset:
        raise ManifestError(f"{path} changed while it was split ({offset} of {size} bytes)")
    return whole.hexdigest(), offset, tuple(chunks)


def check_cover(chunks: tuple[ChunkRef, ...], size: int, where: str) -> None:
    """``chunks`` tile ``[0, size)`` exactly, each within the reader's limits."""
    if len(chunks) > MAX_CHUNKS:
        raise ManifestError(f"manifest {where} has more than {MAX_CHUNKS} chunks")
    offset = 0
    for i, c in enumerate(chunks):
        if c.offset != offset or not 0 < c.size <= MAX_CHUNK_SIZE:
            raise ManifestError(
                f"manifest {where}[{i}] must start at {offset} and hold 1 to "
                f"{MAX_CHUNK_SIZE} bytes (got offset {c.offset}, size {c.size})")
        offset += c.size
    if offset != size:
        raise ManifestError(f"manifest {where} covers {offset} bytes of {size}")


@dataclass(frozen=True, slots=True)
class RamImageRef:
    """Guest RAM as a page-aligned image of ``size`` bytes (format v3).

    ``chunks`` are the chunk-aligned spans holding any non-zero byte, by offset;
    every other byte of the image is zero.
    """

    size: int
    chunk_size: int
    chunks: tuple[ChunkRef, ...]

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "chunk_size": self.chunk_size,
                "chunks": [c.to_json() for c in self.chunks]}

    @property
    def id(self) -> str:
        """The image's identity: the sha256 of its canonical JSON (a local image's key)."""
        raw = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()

    @property
    def stored_bytes(self) -> int:
        return sum(c.size for c in self.chunks)


def check_ram(ram: RamImageRef, memory_bytes: int) -> None:
    """An image of exactly the VM's RAM, in aligned, ordered, non-overlapping chunks."""
    cs = ram.chunk_size
    if not _MIN_RAM_CHUNK <= cs <= MAX_CHUNK_SIZE or cs & (cs - 1):
        raise ManifestError(f"manifest ram.chunk_size must be a power of two in "
                            f"[{_MIN_RAM_CHUNK}, {MAX_CHUNK_SIZE}], not {cs}")
    if ram.size != memory_bytes:
        raise ManifestError(f"manifest ram.size is {ram.size}, the VM has {memory_bytes} bytes")
    if len(ram.chunks) > MAX_CHUNKS:
        raise ManifestError(f"manifest ram has more than {MAX_CHUNKS} chunks")
    end = 0
    for i, c in enumerate(ram.chunks):
        if c.offset % cs or c.offset < end or c.size != min(cs, ram.size - c.offset) \
                or c.offset >= ram.size:
            raise ManifestError(
                f"manifest ram.chunks[{i}] must start on a {cs}-byte boundary at or after "
                f"{end}, inside the image, and hold one chunk (got offset {c.offset}, "
                f"size {c.size})")
        end = c.offset + c.size

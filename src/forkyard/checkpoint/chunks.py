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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkyard.errors import ManifestError

__all__ = ["MAX_CHUNKS", "MAX_CHUNK_SIZE", "STATE_CHUNK_SIZE", "ChunkRef", "check_cover",
           "split_file"]

# 4 MiB: QEMU waits for one verified chunk before its first byte, and a reader holds
# a few of them; still few objects for a large state (per-object store overhead
# stays small next to the transfer)
STATE_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024  # what a reader accepts from a manifest
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

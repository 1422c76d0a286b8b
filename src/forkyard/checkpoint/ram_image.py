"""Guest RAM images of format v3: chunked, content-addressed, verified, mapped by forks.

A checkpoint saves a *device-state-only* migration stream (~300 KB for a
256 MiB guest) and the guest's RAM as a new memfd, the frozen image: that
instant's RAM copied while the guest runs on (a background snapshot split on
the fly, ``vm/ram_capture.py``), or while it is paused where QEMU cannot
snapshot in the background.  After the VM resumed, :func:`file_image` cuts
the image into fixed-size chunks (64 KiB up to a 256 MiB guest, at most 4096
chunks: ``chunks.ram_chunk_size`` says why), leaves all-zero chunks out (and
punches them out of the image, so they cost no memory), files every chunk the
blob cache does not hold yet under its sha256 and seals the image.  A chunk an earlier
checkpoint (of any sandbox) already stored is referenced by digest, not
written again: a checkpoint stores and uploads what changed.

Decisions, and why:

- **The source never touches a frozen image.**  The source keeps running on
  its own working file; the image is a *copy* made while it was paused, and it
  is sealed (``F_SEAL_WRITE``: see ``vm/ram.py``) before any fork maps it.
  Forks map it ``share=off``: their writes land in private copy-on-write pages.
  Copying while paused costs one in-kernel copy of the guest's touched memory
  (``copy_file_range`` between memfds, holes skipped: ~0.13 s per 256 MiB
  here); the alternatives cost more on these guest sizes: moving the source
  onto the image copy-on-write needs a QEMU restart, and QEMU's UFFD
  write-protected ``background-snapshot`` streams the whole RAM.
- **A mapped fork that is itself checkpointed** (its RAM is a ``share=off``
  mapping, which ``x-ignore-shared`` does not leave out) streams every page, and
  ``vm/migstream.py`` splits the stream on the fly: ``pc.ram`` pages into a new
  image, the rest out as a device-state-only stream (``vm/ram_capture.py``).
  Its pause costs one pass over the guest's RAM (like today's v2 save, minus the
  disk), not a QEMU restart; a stream the splitter does not understand is
  stored whole (format v2), and a fork of that loads it into a working file of
  its own, whose next checkpoint is v3 again.
- **Pause.**  A checkpoint stops the guest only while QEMU saves its device
  state: its RAM of that instant is copied afterwards, while the guest runs
  (a background snapshot, userfaultfd write-protection; ``vm/ram_capture.py``,
  ``save_live_with_image``), and the disk layer is frozen in that stop.
  Where QEMU gets no userfaultfd (``Sandbox.live_checkpoints`` turns off), the
  guest's touched RAM is copied (or split) while paused: that pause grows with
  the memory the guest touched, at in-kernel copy speed (~0.1 s per 256 MiB here).
- **Filing.**  New chunks are written to staging files and filed in one batch
  (``BlobCache.add_batch``: one ``syncfs``, not two fsyncs per chunk).

How forks get an image (built from these chunks, on any worker):
``checkpoint/ram_images.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from forkyard.checkpoint.chunks import ChunkRef, RamImageRef, ram_chunk_size
from forkyard.errors import StoreError
from forkyard.store import BlobCache
from forkyard.vm.ram import RamFile

__all__ = ["FiledImage", "discard_staged", "file_image", "staging_file"]


@dataclass(frozen=True, slots=True)
class FiledImage:
    ref: RamImageRef
    new_bytes: int  # chunks this checkpoint added to the blob cache
    shared_bytes: int  # chunks some earlier checkpoint had stored already


def file_image(image: RamFile, blobs: BlobCache, *,
               chunk_size: int | None = None) -> FiledImage:
    """Chunk, hash and file an unsealed frozen image; seal it.  Zero chunks are dropped.

    New chunks are written to staging files and filed in one batch
    (:meth:`BlobCache.add_batch`: one ``syncfs``, not an fsync per chunk).
    """
    chunk_size = chunk_size or ram_chunk_size(image.size)
    zero = bytes(chunk_size)
    chunks: list[ChunkRef] = []
    staged: dict[str, Path] = {}
    new = shared = 0
    staging = blobs.staging()
    try:
        for offset in _chunks_with_data(image, chunk_size):
            size = min(chunk_size, image.size - offset)
            data = os.pread(image.fd, size, offset)
            if len(data) != size:
                raise StoreError(f"guest RAM image ended at {offset + len(data)} of {image.size}")
            if data == zero[:size]:
                image.punch(offset, size)
                continue
            digest = hashlib.sha256(data).hexdigest()
            chunks.append(ChunkRef(offset, size, digest))
            if digest in staged or blobs.path_if_present(digest) is not None:
                shared += size
                continue
            tmp = staging_file(staging, digest)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            staged[digest] = tmp
            new += size
    except BaseException:
        discard_staged(staged)
        raise
    blobs.add_batch(staged)
    image.seal()
    return FiledImage(RamImageRef(image.size, chunk_size, tuple(chunks)), new, shared)


def staging_file(staging: Path, digest: str) -> Path:
    # the pid lets BlobCache.staging() sweep what a crashed process left
    return staging / f"{digest}.{os.getpid()}.{threading.get_ident():x}"


def discard_staged(staged: dict[str, Path]) -> None:
    for tmp in staged.values():
        with contextlib.suppress(OSError):
            tmp.unlink()


def _chunks_with_data(image: RamFile, chunk_size: int) -> list[int]:
    """Offsets of the chunks that overlap any data span of ``image`` (holes are zero)."""
    out: list[int] = []
    for start, length in image.data_spans():
        first = start - start % chunk_size
        for offset in range(first, start + length, chunk_size):
            if not out or out[-1] < offset:
                out.append(offset)
    return out

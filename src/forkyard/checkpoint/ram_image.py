"""Guest RAM images of format v3: chunked, content-addressed, verified, mapped by forks.

A checkpoint of a VM running on its own working RAM file (``vm.ram``: a
``share=on`` memfd; every booted VM, and every VM that loaded a v1/v2 stream)
saves a *device-state-only* migration stream (``x-ignore-shared``: 288 KB
for a 256 MiB guest) and copies the RAM file, while the VM is paused, into a
new memfd: the frozen image.  After the VM resumed, :func:`file_image` cuts
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
- **Pause.**  A checkpoint copies (or splits) the guest's touched RAM while
  paused: it grows with the memory the guest touched, at in-kernel copy speed
  (~0.1 s per 256 MiB here).  Soft-dirty tracking could limit it to what
  changed since the previous checkpoint; not done (a missed write would be a
  silently wrong image, and these guest sizes do not need it yet).
- **Assembled images are memfds, not files** (``vm/ram.py`` says why: QEMU
  7.2 opens its RAM file read-write).  A worker keeps the images in use, and
  a few recent ones (:data:`_KEEP_BYTES`), in :class:`RamImages`, keyed by
  the image's identity (the sha256 of its chunk list); an image is built only
  from chunks verified against their digests (the blob cache verifies what it
  fetches, and every chunk is hashed again as it is written into the image),
  so QEMU never maps a byte whose digest was not checked.  A missing or corrupt chunk is an
  ``IntegrityError`` naming the chunk, and no VM starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from forkyard.checkpoint.chunks import ChunkRef, RamImageRef, ram_chunk_size
from forkyard.errors import IntegrityError, ObjectNotFound, StoreError
from forkyard.store import BlobCache, BlobStore
from forkyard.vm.ram import RamFile

__all__ = ["FiledImage", "RamImages", "file_image"]

_KEEP_BYTES = 1 << 30  # images no VM maps, kept for the next fork (most recent first)
_FETCHERS = 4


@dataclass(frozen=True, slots=True)
class FiledImage:
    ref: RamImageRef
    new_bytes: int  # chunks this checkpoint added to the blob cache
    shared_bytes: int  # chunks some earlier checkpoint had stored already


def file_image(image: RamFile, blobs: BlobCache, *,
               chunk_size: int | None = None) -> FiledImage:
    """Chunk, hash and file an unsealed frozen image; seal it.  Zero chunks are dropped.

    New chunks are written to staging files and made durable with one
    ``syncfs`` before any is filed (a cache entry is trusted once filed).
    """
    chunk_size = chunk_size or ram_chunk_size(image.size)
    zero = bytes(chunk_size)
    chunks: list[ChunkRef] = []
    staged: dict[str, Path] = {}
    new = shared = 0
    staging = blobs.root / ".ram"
    staging.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        tmp = staging / f"{digest[:16]}.{os.getpid()}.{threading.get_ident():x}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        staged[digest] = tmp
        new += size
    try:
        if staged:
            _syncfs(staging)
        for digest, tmp in staged.items():
            blobs.add_local(digest, tmp, verify=False, link=True)
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
    image.seal()
    return FiledImage(RamImageRef(image.size, chunk_size, tuple(chunks)), new, shared)


def _syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise StoreError(f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _chunks_with_data(image: RamFile, chunk_size: int) -> list[int]:
    """Offsets of the chunks that overlap any data span of ``image`` (holes are zero)."""
    out: list[int] = []
    for start, length in image.data_spans():
        first = start - start % chunk_size
        for offset in range(first, start + length, chunk_size):
            if not out or out[-1] < offset:
                out.append(offset)
    return out


class RamImages:
    """This worker's assembled, sealed RAM images, by image id (single-flight builds)."""

    def __init__(self, blobs: BlobCache, blobstore: BlobStore | None,
                 keep_bytes: int = _KEEP_BYTES) -> None:
        self._blobs = blobs
        self._blobstore = blobstore
        self._keep = keep_bytes
        self._lock = threading.Lock()
        self._images: OrderedDict[str, RamFile] = OrderedDict()  # most recent last
        self._building: dict[str, threading.Lock] = {}

    def add(self, ref: RamImageRef, image: RamFile) -> None:
        """Keep a sealed image just made by a checkpoint (the registry takes this hold)."""
        with self._lock:
            old = self._images.pop(ref.id, None)
            self._images[ref.id] = image
        if old is not None:
            old.release()
        self._trim()

    def forget(self, ref: RamImageRef) -> None:
        """Drop the registry's hold (VMs mapping it keep theirs), e.g. on hibernate."""
        with self._lock:
            old = self._images.pop(ref.id, None)
        if old is not None:
            old.release()

    def get(self, ref: RamImageRef, *, what: str) -> RamFile:
        """The image of ``ref``, held for the caller (``release()`` it), built if need be."""
        key = ref.id
        with self._lock:
            found = self._images.get(key)
            if found is not None:
                self._images.move_to_end(key)
                return found.hold()
            gate = self._building.setdefault(key, threading.Lock())
        with gate:  # concurrent forks of one checkpoint build it once
            with self._lock:
                found = self._images.get(key)
                if found is not None:
                    return found.hold()
            image = self.assemble(ref, what=what)
            with self._lock:
                self._images[key] = image
                self._building.pop(key, None)
                held = image.hold()
        self._trim()
        return held

    def fetch_chunks(self, ref: RamImageRef, *, what: str) -> dict[int, Path]:
        """Every chunk of ``ref`` as a verified local file, fetching what is missing."""
        def one(i: int, chunk: ChunkRef) -> Path:
            name = (f"{what} RAM chunk {i} (bytes {chunk.offset}+{chunk.size}, "
                    f"sha256:{chunk.digest})")
            try:
                found = self._blobs.path_if_present(chunk.digest)
                if found is not None:
                    return found
                if self._blobstore is None:
                    raise ObjectNotFound(f"blob {chunk.digest} (no store)")
                return self._blobs.fetch(chunk.digest, self._blobstore, size=chunk.size)
            except IntegrityError as exc:
                raise IntegrityError(name, expected=exc.expected, actual=exc.actual) from exc
            except ObjectNotFound as exc:
                where = self._blobstore.store.url if self._blobstore else "this worker"
                raise IntegrityError(name, expected=f"blob sha256:{chunk.digest} in {where}",
                                     actual="no such blob") from exc

        with ThreadPoolExecutor(max_workers=_FETCHERS, thread_name_prefix="ram") as pool:
            futures = [(c.offset, pool.submit(one, i, c)) for i, c in enumerate(ref.chunks)]
            try:
                return {offset: f.result() for offset, f in futures}
            except BaseException:
                for _, f in futures:
                    f.cancel()
                raise

    def assemble(self, ref: RamImageRef, *, what: str,
                 read: Callable[[Path], bytes] | None = None) -> RamFile:
        # ``read``: how a chunk file is read (tests inject damage after the fetch)
        """A new sealed image of ``ref`` from verified chunk files."""
        paths = self.fetch_chunks(ref, what=what)
        image = RamFile.blank_image(ref.size)
        try:
            for i, chunk in enumerate(ref.chunks):
                data = (read or Path.read_bytes)(paths[chunk.offset])
                # checked again as it goes in (once per image and worker): the bytes
                # QEMU maps are the bytes the digest names, whatever the disk did
                actual = hashlib.sha256(data).hexdigest()
                if actual != chunk.digest or len(data) != chunk.size:
                    raise IntegrityError(
                        f"{what} RAM chunk {i} (bytes {chunk.offset}+{chunk.size}, "
                        f"sha256:{chunk.digest}) in the local cache",
                        expected=chunk.digest, actual=f"{actual} ({len(data)} bytes)")
                os.pwrite(image.fd, data, chunk.offset)
            image.seal()
        except BaseException:
            image.release()
            raise
        return image

    def close(self) -> None:
        """Release every image (VMs still mapping one keep their own hold)."""
        with self._lock:
            images = list(self._images.values())
            self._images.clear()
        for image in images:
            image.release()

    def _trim(self) -> None:
        """Release the oldest images past the budget (the newest one always stays)."""
        drop: list[RamFile] = []
        with self._lock:
            total = sum(i.size for i in self._images.values())
            while total > self._keep and len(self._images) > 1:
                _, old = self._images.popitem(last=False)
                total -= old.size
                drop.append(old)
        for old in drop:
            old.release()

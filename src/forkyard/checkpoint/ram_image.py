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
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from forkyard.checkpoint.chunks import ChunkRef, RamImageRef, ram_chunk_size
from forkyard.errors import IntegrityError, ObjectNotFound, StoreError
from forkyard.store import BlobCache, BlobStore
from forkyard.store.blobs import SMALL_BLOB_MAX
from forkyard.vm.ram import RamFile

__all__ = ["FiledImage", "ImageBuild", "RamImages", "file_image"]

_KEEP_BYTES = 1 << 30  # images no VM maps, kept for the next fork (most recent first)
_FETCHERS = 4
_T = TypeVar("_T")
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageBuild:
    """An image held for one VM (``image``: the caller's hold), and its build."""

    image: RamFile
    _done: Future[None] | None

    def ready(self, timeout: float | None = None) -> None:
        """Return once the image is complete, verified and sealed; raise why it is not."""
        if self._done is not None:
            self._done.result(timeout)


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
            tmp = _staging_file(staging, digest)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            staged[digest] = tmp
            new += size
    except BaseException:
        _discard(staged)
        raise
    blobs.add_batch(staged)
    image.seal()
    return FiledImage(RamImageRef(image.size, chunk_size, tuple(chunks)), new, shared)


def _staging_file(staging: Path, digest: str) -> Path:
    # the pid lets BlobCache.staging() sweep what a crashed process left
    return staging / f"{digest}.{os.getpid()}.{threading.get_ident():x}"


class _Tee:
    """A write-only sink copying every write into a file and into an image at an offset."""

    def __init__(self, f: BinaryIO, fd: int, offset: int) -> None:
        self._f = f
        self._fd = fd
        self._offset = offset

    def write(self, data: bytes) -> int:
        self._f.write(data)
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self._offset)
            self._offset += n
            view = view[n:]
        return len(data)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _translated(name: str, chunk: ChunkRef, blobstore: BlobStore | None,
                fn: Callable[[], _T]) -> _T:
    """``fn()``, its integrity and not-found errors naming the chunk ``name``."""
    try:
        return fn()
    except IntegrityError as exc:
        raise IntegrityError(name, expected=exc.expected, actual=exc.actual) from exc
    except ObjectNotFound as exc:
        where = blobstore.store.url if blobstore else "this worker"
        raise IntegrityError(name, expected=f"blob sha256:{chunk.digest} in {where}",
                             actual="no such blob") from exc


def _discard(staged: dict[str, Path]) -> None:
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


class RamImages:
    """This worker's assembled, sealed RAM images, by image id (single-flight builds).

    Chunks a build fetched are filed into the blob cache afterwards, by one
    background thread, from the sealed image (a fork does not wait for a
    few hundred cache files); until then they are *pending*: another build
    copies them from that image, and :meth:`drain` waits for them.
    """

    def __init__(self, blobs: BlobCache, blobstore: BlobStore | None,
                 keep_bytes: int = _KEEP_BYTES) -> None:
        self._blobs = blobs
        self._blobstore = blobstore
        self._keep = keep_bytes
        self._lock = threading.Lock()
        self._images: OrderedDict[str, RamFile] = OrderedDict()  # most recent last
        self._building: dict[str, Future[None]] = {}
        self._pending: dict[str, tuple[RamFile, int]] = {}  # digest -> (image, offset)
        self._filer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ram-file")

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
        """The sealed image of ``ref``, held for the caller (``release()`` it)."""
        build = self.open(ref, what=what)
        try:
            build.ready()
        except BaseException:
            build.image.release()
            raise
        return build.image

    def open(self, ref: RamImageRef, *, what: str) -> ImageBuild:
        """The image of ``ref``, held for the caller, possibly still being filled.

        A VM may map it at once: QEMU maps guest RAM when it starts, but reads
        and writes none of it before it loads its state (checked: no page of
        the mapping is even present until then; ``QemuVM`` checks again that
        none was written).  ``ready()`` must return before the VM loads its
        state: it waits until the image is complete, verified and sealed, and
        raises what the build ran into.  Concurrent forks of one checkpoint
        build it once: the others wait for it here.
        """
        key = ref.id
        while True:
            with self._lock:
                found = self._images.get(key)
                if found is not None:
                    self._images.move_to_end(key)
                    return ImageBuild(found.hold(), None)
                ahead = self._building.get(key)
                if ahead is None:
                    done: Future[None] = Future()
                    self._building[key] = done
                    break
            ahead.result()  # then take the image it registered (raises its error)
        image = RamFile.blank_image(ref.size)
        threading.Thread(target=self._build, args=(key, ref, what, image, done),
                         name="ram-build", daemon=True).start()
        return ImageBuild(image.hold(), done)

    def _build(self, key: str, ref: RamImageRef, what: str, image: RamFile,
               done: Future[None]) -> None:
        try:
            fetched = self._gather(ref, what, image)
            image.seal()
        except BaseException as exc:
            with self._lock:
                self._building.pop(key, None)
            image.release()
            done.set_exception(exc)
            return
        with self._lock:
            self._images[key] = image  # the registry takes the builder's hold
            self._building.pop(key, None)
        self._file_later(image, fetched)
        done.set_result(None)
        self._trim()

    def fetch_chunks(self, ref: RamImageRef, *, what: str) -> None:
        """Every chunk of ``ref`` in the local cache, verified, fetching what is missing."""
        self.drain()
        self._gather(ref, what, None)

    def drain(self) -> None:
        """Wait until every fetched chunk is filed in the blob cache."""
        self._filer.submit(lambda: None).result()

    def _gather(self, ref: RamImageRef, what: str, image: RamFile | None
                ) -> dict[str, ChunkRef]:
        """Put every chunk of ``ref`` into ``image`` (or, without one, the local cache).

        Each chunk is verified before its bytes go anywhere, and nothing in
        the image is used before it is sealed (``ImageBuild.ready``).  Returns the
        chunks fetched into ``image`` only (by digest), for the filer.
        """
        uses: dict[str, list[tuple[int, ChunkRef]]] = {}
        for i, chunk in enumerate(ref.chunks):
            uses.setdefault(chunk.digest, []).append((i, chunk))
        staging = self._blobs.staging()
        staged: dict[str, Path] = {}
        fetched: dict[str, ChunkRef] = {}
        mu = threading.Lock()

        def one(same: list[tuple[int, ChunkRef]]) -> None:
            i, chunk = same[0]
            name = (f"{what} RAM chunk {i} (bytes {chunk.offset}+{chunk.size}, "
                    f"sha256:{chunk.digest})")
            if image is None:
                if self._blobs.path_if_present(chunk.digest) is None:
                    tmp = _staging_file(staging, chunk.digest)
                    _translated(name, chunk, self._blobstore, lambda: self._fetch(chunk, tmp, None))
                    with mu:
                        staged[chunk.digest] = tmp
                return
            data = self._local_bytes(chunk, name)
            if data is None and chunk.size <= SMALL_BLOB_MAX:
                data = _translated(name, chunk, self._blobstore, lambda: self._get(chunk))
                with mu:
                    fetched[chunk.digest] = chunk
            elif data is None:  # a chunk too large to hold: streamed into both
                tmp = _staging_file(staging, chunk.digest)
                _translated(name, chunk, self._blobstore, lambda: self._fetch(chunk, tmp, image))
                with mu:
                    staged[chunk.digest] = tmp
                data = os.pread(image.fd, chunk.size, chunk.offset)
            for _, c in same:
                os.pwrite(image.fd, data, c.offset)

        try:
            with ThreadPoolExecutor(max_workers=_FETCHERS, thread_name_prefix="ram") as pool:
                futures = [pool.submit(one, same) for same in uses.values()]
                try:
                    for f in futures:
                        f.result()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        except BaseException:
            with mu:
                _discard(staged)
            raise
        self._blobs.add_batch(staged)
        return fetched

    def _local_bytes(self, chunk: ChunkRef, name: str) -> bytes | None:
        """The chunk's bytes from this worker, verified, or None if it has no copy."""
        found = self._blobs.path_if_present(chunk.digest)
        if found is not None:
            data = found.read_bytes()
            # checked again as it goes in: the bytes QEMU maps are the bytes
            # the digest names, whatever the disk did since
            actual = hashlib.sha256(data).hexdigest()
            if actual != chunk.digest or len(data) != chunk.size:
                raise IntegrityError(f"{name} in the local cache", expected=chunk.digest,
                                     actual=f"{actual} ({len(data)} bytes)")
            return data
        with self._lock:
            pending = self._pending.get(chunk.digest)
            source = None if pending is None else pending[0].hold()
        if source is None or pending is None:
            return None
        try:  # a sealed image this worker verified: it cannot have changed
            return os.pread(source.fd, chunk.size, pending[1])
        finally:
            source.release()

    def _get(self, chunk: ChunkRef) -> bytes:
        if self._blobstore is None:
            raise ObjectNotFound(f"blob {chunk.digest} (no store)")
        return self._blobstore.get_small_blob(chunk.digest, size=chunk.size)

    def _fetch(self, chunk: ChunkRef, tmp: Path, image: RamFile | None) -> None:
        """Stream one chunk from the store into ``tmp`` (and ``image``), verified."""
        if self._blobstore is None:
            raise ObjectNotFound(f"blob {chunk.digest} (no store)")
        try:
            with open(tmp, "wb", opener=_private_opener) as f:
                sink = f if image is None else _Tee(f, image.fd, chunk.offset)
                self._blobstore.read_blob_into(chunk.digest, sink,  # type: ignore[arg-type]
                                               size=chunk.size)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _file_later(self, image: RamFile, fetched: dict[str, ChunkRef]) -> None:
        """File ``fetched`` chunks of the sealed ``image`` into the cache, in the background."""
        if not fetched:
            return
        with self._lock:
            for digest, chunk in fetched.items():
                self._pending.setdefault(digest, (image, chunk.offset))
        image.hold()  # the filer's own, released when it is done

        def file() -> None:
            staged: dict[str, Path] = {}
            try:
                staging = self._blobs.staging()
                for digest, chunk in fetched.items():
                    if self._blobs.path_if_present(digest) is not None:
                        continue
                    tmp = _staging_file(staging, digest)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o600)
                    try:
                        os.write(fd, os.pread(image.fd, chunk.size, chunk.offset))
                    finally:
                        os.close(fd)
                    staged[digest] = tmp
                self._blobs.add_batch(staged)
            except Exception:  # a cache is an optimization: the image stays correct
                _discard(staged)
                _log.exception("filing %d fetched RAM chunks in the blob cache failed",
                               len(fetched))
            finally:
                with self._lock:
                    for digest in fetched:
                        if self._pending.get(digest, (None, 0))[0] is image:
                            del self._pending[digest]
                image.release()

        self._filer.submit(file)

    def close(self) -> None:
        """Finish builds and filing, then release every image (VMs mapping one keep theirs)."""
        with self._lock:
            building = list(self._building.values())
        for done in building:
            with contextlib.suppress(Exception):
                done.result()
        self._filer.shutdown(wait=True)
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

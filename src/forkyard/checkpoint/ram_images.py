"""A worker's assembled RAM images (format v3): built from verified chunks, shared by forks.

Decisions, and why:

- **Assembled images are memfds, not files** (``vm/ram.py`` says why: QEMU
  7.2 opens its RAM file read-write).  A worker keeps the images in use, and
  a few recent ones (:data:`_KEEP_BYTES`), in :class:`RamImages`, keyed by
  the image's identity (the sha256 of its chunk list).  An image is built only
  from verified chunks: a chunk in the blob cache is hashed again as it is
  written into the image; a missing one is read from the store in one
  bounded read (``BlobStore.get_small_blob``), decompressed and hashed in
  memory, then written.  A missing or corrupt chunk is an ``IntegrityError``
  naming the chunk, and no VM runs.
- **A fork on another worker costs what it fetches, not what it files.**
  The cross-worker target (at most 1.5 times a same-worker fork) is tight when a
  fork must fetch ~1000 chunks first, so: (1) fetched chunks go straight
  into the image, and are filed in the blob cache *after* the image is
  sealed, by one background thread (one ``syncfs`` for all of them, not
  two fsyncs each); until then they are "pending", and another build takes
  them from that image; (2) QEMU starts while the image fills
  (:meth:`RamImages.open`): it maps guest RAM at start but touches none of
  it before it loads its state, which it is given only after
  ``ImageBuild.ready()``; ``QemuVM`` then checks in ``/proc/PID/smaps``
  that it wrote no page of the image meanwhile; (3) per chunk, only C work
  is left (read, decompress, hash, write): each fetch thread walks its own
  slice of the chunk list, since a pool future per chunk cost about what
  hashing the chunk does.
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

from forkyard.checkpoint.chunks import ChunkRef, RamImageRef
from forkyard.checkpoint.ram_image import discard_staged, staging_file
from forkyard.errors import IntegrityError, ObjectNotFound
from forkyard.store import BlobCache, BlobStore
from forkyard.store.blobs import SMALL_BLOB_MAX
from forkyard.vm.ram import RamFile

__all__ = ["ImageBuild", "RamImages"]

_KEEP_BYTES = 1 << 30  # images no VM maps, kept for the next fork (most recent first)
# a chunk's fetch is C calls (read, decompress, hash, write) between bits of Python:
# threads past the cores only contend for the GIL (measured: 2 beat 4 on 2 cores)
_FETCHERS = max(2, min(4, os.cpu_count() or 2))
_T = TypeVar("_T")
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ImageBuild:
    """An image held for one VM (``image``: the caller's hold), and its build."""

    image: RamFile
    _done: Future[None] | None

    @property
    def filling(self) -> bool:
        """Whether the image may still be filling (else it is sealed already)."""
        return self._done is not None

    def ready(self, timeout: float | None = None) -> None:
        """Return once the image is complete, verified and sealed; raise why it is not."""
        if self._done is not None:
            self._done.result(timeout)


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

            def name() -> str:  # only an error needs it: a fork passes a thousand chunks
                return (f"{what} RAM chunk {i} (bytes {chunk.offset}+{chunk.size}, "
                        f"sha256:{chunk.digest})")

            if image is None:
                if self._blobs.path_if_present(chunk.digest) is None:
                    tmp = staging_file(staging, chunk.digest)
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
                tmp = staging_file(staging, chunk.digest)
                _translated(name, chunk, self._blobstore, lambda: self._fetch(chunk, tmp, image))
                with mu:
                    staged[chunk.digest] = tmp
                data = os.pread(image.fd, chunk.size, chunk.offset)
            for _, c in same:
                os.pwrite(image.fd, data, c.offset)

        groups = list(uses.values())
        failed = threading.Event()

        def share(k: int) -> None:
            # a slice per thread, not a future per chunk: the pool's bookkeeping cost
            # as much as a chunk's hashing
            for same in groups[k::_FETCHERS]:
                if failed.is_set():
                    return
                try:
                    one(same)
                except BaseException:
                    failed.set()
                    raise

        try:
            with ThreadPoolExecutor(max_workers=_FETCHERS, thread_name_prefix="ram") as pool:
                for f in [pool.submit(share, k) for k in range(_FETCHERS)]:
                    f.result()
        except BaseException:
            with mu:
                discard_staged(staged)
            raise
        self._blobs.add_batch(staged)
        return fetched

    def _local_bytes(self, chunk: ChunkRef, name: Callable[[], str]) -> bytes | None:
        """The chunk's bytes from this worker, verified, or None if it has no copy."""
        found = self._blobs.path_if_present(chunk.digest)
        if found is not None:
            data = found.read_bytes()
            # checked again as it goes in: the bytes QEMU maps are the bytes
            # the digest names, whatever the disk did since
            actual = hashlib.sha256(data).hexdigest()
            if actual != chunk.digest or len(data) != chunk.size:
                raise IntegrityError(f"{name()} in the local cache", expected=chunk.digest,
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
                    tmp = staging_file(staging, digest)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o600)
                    try:
                        os.write(fd, os.pread(image.fd, chunk.size, chunk.offset))
                    finally:
                        os.close(fd)
                    staged[digest] = tmp
                self._blobs.add_batch(staged)
            except Exception:  # a cache is an optimization: the image stays correct
                discard_staged(staged)
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


def _translated(name: Callable[[], str], chunk: ChunkRef, blobstore: BlobStore | None,
                fn: Callable[[], _T]) -> _T:
    """``fn()``, its integrity and not-found errors naming the chunk ``name()``."""
    try:
        return fn()
    except IntegrityError as exc:
        raise IntegrityError(name(), expected=exc.expected, actual=exc.actual) from exc
    except ObjectNotFound as exc:
        where = blobstore.store.url if blobstore else "this worker"
        raise IntegrityError(name(), expected=f"blob sha256:{chunk.digest} in {where}",
                             actual="no such blob") from exc

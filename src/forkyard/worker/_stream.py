"""Load a chunked VM state into QEMU while it downloads, each chunk verified first.

A fork on a worker that lacks the checkpoint's VM state would otherwise
download it, then have QEMU read it back: two sequential passes over the
largest part.  Here the state's chunks (archive format v2,
:mod:`forkyard.checkpoint.chunks`) are downloaded one after the other into a
file beside the blob cache; a chunk is handed to the feeder only once its
bytes matched its digest, and the feeder copies it from that file into the
pipe of a *paused* QEMU.  So:

- QEMU never parses a byte whose digest was not checked first (it trusts its
  migration stream); a corrupt or missing chunk stops the feed before it;
- the state travels through disk (page cache), never whole in RAM: memory
  stays at the store reader's buffers plus the feeder's one read;
- the whole state is checked against the manifest's ``state`` digest too
  before the VM may run (:meth:`StateStream.finish`) and before the file is
  filed in the cache under that digest (cache entries are trusted later).

v1 checkpoints (one whole state blob) are not streamed: their state is
fetched and verified whole into the cache first, then loaded from the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from forkyard._fs import atomic_write
from forkyard.checkpoint import ChunkRef, PartRef
from forkyard.errors import ForkyardError, IntegrityError, ObjectNotFound
from forkyard.store import BlobCache, BlobStore

__all__ = ["StateStream", "fetch_chunked"]

_FEED = 1024 * 1024  # bytes per copy into the pipe


def fetch_chunked(cache: BlobCache, blobs: BlobStore, ref: PartRef,
                  chunks: tuple[ChunkRef, ...], *, what: str,
                  feed: _Feed | None = None) -> Path:
    """Assemble ``chunks`` into the cache entry of ``ref``, verifying each chunk and the whole.

    With ``feed``, each chunk is offered to it once verified (see :class:`_Feed`).
    Nothing is filed in the cache unless every check passed.
    """
    tmp = cache.root / ".streams" / f"{ref.digest[:16]}.{os.getpid()}.{threading.get_ident():x}"
    try:
        with atomic_write(tmp) as f:  # fsync'd: cache entries are trusted without re-hashing
            whole = hashlib.sha256()
            sink = _Hashing(f, whole)
            # a read-only fd of the same (still unnamed) temp file, for the feeder's preads
            read_fd = os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for i, chunk in enumerate(chunks):
                    _fetch_chunk(blobs, i, chunk, cast(BinaryIO, sink), what)
                    f.flush()
                    if feed is not None:
                        feed.chunk(read_fd, chunk)
            finally:
                if feed is not None:
                    feed.end()  # the feeder is done with read_fd
                os.close(read_fd)
            actual = whole.hexdigest()
            if actual != ref.digest or sink.size != ref.size:
                raise IntegrityError(f"{what} (its chunks put together)",
                                     expected=f"sha256 {ref.digest}, {ref.size} bytes",
                                     actual=f"sha256 {actual}, {sink.size} bytes")
            if feed is not None:
                feed.verified()  # before the fsync: the VM need not wait for the disk
        return cache.add_local(ref.digest, tmp, verify=False, link=True)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class _Feed(Protocol):
    def chunk(self, fd: int, chunk: ChunkRef) -> None:
        """Bytes ``chunk`` of the file open at ``fd`` are verified: they may be used."""

    def end(self) -> None:
        """No more chunks; return only once ``fd`` is no longer read."""

    def verified(self) -> None:
        """The whole state matched its digest."""


def _fetch_chunk(blobs: BlobStore, i: int, chunk: ChunkRef, sink: BinaryIO, what: str) -> None:
    name = f"{what} chunk {i} (bytes {chunk.offset}+{chunk.size}, sha256:{chunk.digest})"
    try:
        blobs.read_blob_into(chunk.digest, sink, size=chunk.size)
    except IntegrityError as exc:
        raise IntegrityError(name, expected=exc.expected, actual=exc.actual) from exc
    except ObjectNotFound as exc:
        raise IntegrityError(name, expected=f"blob sha256:{chunk.digest} in "
                             f"{blobs.store.url}", actual="no such blob") from exc


class StateStream:
    """A chunked state on its way into the cache and, verified chunk by chunk, into a pipe."""

    def __init__(self, cache: BlobCache, blobs: BlobStore, ref: PartRef,
                 chunks: tuple[ChunkRef, ...], *, what: str = "VM state",
                 on_done: Callable[[], None] | None = None) -> None:
        self._cache = cache
        self._blobs = blobs
        self._ref = ref
        self._chunks = chunks
        self._what = what
        self._on_done = on_done
        self._done = threading.Event()  # set once the bytes are filed in the cache (or failed)
        # verified spans for the feeder: (fd, offset, size); None ends the feed
        self._ready: queue.Queue[tuple[int, int, int] | None] = queue.Queue(maxsize=2)
        self._fed_done = threading.Event()
        self._error: BaseException | None = None
        self._verdict = threading.Event()  # set once the bytes are verified (or failed)
        self.fed: list[int] = []  # offsets of the chunks QEMU was given, in order
        read_fd, self._write_fd = os.pipe()
        with contextlib.suppress(OSError):  # fewer wake-ups of QEMU and of us
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.read_fd: int | None = read_fd
        self._download = threading.Thread(target=self._run_download, daemon=True,
                                          name=f"fetch-{ref.digest[:12]}")
        self._feeder = threading.Thread(target=self._run_feeder, daemon=True,
                                        name=f"feed-{ref.digest[:12]}")

    def start(self) -> None:
        self._download.start()
        self._feeder.start()

    def take_fd(self) -> int:
        """The pipe's read end; the caller (QEMU's launcher) now owns and closes it."""
        fd = self.read_fd
        if fd is None:
            raise ForkyardError("state stream already handed over")
        self.read_fd = None
        return fd

    def finish(self, timeout: float) -> None:
        """Wait for the verdict on the downloaded bytes; a failure is raised here."""
        if not self._verdict.wait(timeout):
            raise ForkyardError(f"VM state {self._ref.digest[:12]} still downloading "
                                f"after {timeout:g}s")
        if self._error is not None:
            raise self._error

    def wait_done(self, timeout: float) -> bool:
        """Wait until the download is over: filed in the cache, or failed."""
        return self._done.wait(timeout)

    def close(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    # --- _Feed, called by fetch_chunked on the download thread ---------------
    def chunk(self, fd: int, chunk: ChunkRef) -> None:
        self._ready.put((fd, chunk.offset, chunk.size))

    def end(self) -> None:
        self._ready.put(None)
        self._fed_done.wait()

    def verified(self) -> None:
        self._verdict.set()  # every chunk and the whole checked: the paused VM may run

    def _run_download(self) -> None:
        try:
            fetch_chunked(self._cache, self._blobs, self._ref, self._chunks,
                          what=self._what, feed=self)
        except BaseException as exc:
            if not self._verdict.is_set():
                self._error = exc
            self._verdict.set()
        finally:
            if self._on_done is not None:
                self._on_done()
            self._done.set()

    def _run_feeder(self) -> None:
        broken = False
        try:
            while (item := self._ready.get()) is not None:
                fd, offset, size = item
                if broken:
                    continue
                try:
                    _copy(fd, offset, size, self._write_fd)
                    self.fed.append(offset)
                except OSError:
                    broken = True  # QEMU stopped reading (it failed); the launcher says why
        finally:
            # EOF for QEMU: after the last verified chunk, or early on a failure (QEMU then
            # fails to load, and the launcher reports this stream's verdict instead)
            with contextlib.suppress(OSError):
                os.close(self._write_fd)
            self._fed_done.set()


def _copy(src_fd: int, offset: int, size: int, dst_fd: int) -> None:
    end = offset + size
    while offset < end:
        data = os.pread(src_fd, min(_FEED, end - offset), offset)
        if not data:
            raise OSError("state file shorter than its verified chunk")
        _write_all(dst_fd, data)
        offset += len(data)


class _Hashing:
    """A write-only "file": appends to the assembling file and the whole-state hash."""

    def __init__(self, f: BinaryIO, h: hashlib._Hash) -> None:
        self._f = f
        self._h = h
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)
        return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

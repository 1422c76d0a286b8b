"""Load a chunked VM state into QEMU while it downloads, each chunk verified first.

A fork on a worker that lacks the checkpoint's VM state would otherwise
download it, then have QEMU read it back: two sequential passes over the
largest part.  Here the state's chunks (archive format v2,
:mod:`forkyard.checkpoint.chunks`) are downloaded a few at once
(:data:`_FETCHERS`: a chunk's read, zstd and sha256 are the slow step and
release the GIL), each into a buffer of its own size, and taken strictly in
order; a chunk goes on only once its bytes matched its digest, to two
consumers at once: the feeder, which writes it into the pipe
of a *paused* QEMU, and the cache writer, which appends it to the file that
becomes the state's cache entry.  So:

- QEMU never parses a byte whose digest was not checked first (it trusts its
  migration stream); a corrupt or missing chunk stops the feed before it, and
  the fork fails with an IntegrityError naming that chunk;
- memory is bounded by a few chunks (:data:`_FETCH_AHEAD` + :data:`_FEED_AHEAD`
  + :data:`_DISK_AHEAD` + the ones being fed and written), never the whole
  state: the state travels on into the blob cache on disk, and the disk is off
  the path to a running VM (writes here are slower than the network of a
  directory store);
- the chunks put together must hash to the manifest's ``state`` digest before
  the file is filed in the cache under that digest (cache entries are trusted
  later without re-hashing).  This second hash is not redundant: the manifest
  names ``state`` and ``state_chunks`` separately, and a crafted manifest could
  pair another checkpoint's state digest with chunks of other (each verified)
  bytes; filing those under that digest would poison the cache for the real one.
  It runs in the cache writer, off the path to a running VM.

:func:`fetch_chunked` is the same without QEMU: the state assembled into the
cache (a fork that waited for another's download, ``materialize``).  v1
checkpoints (one whole state blob) are not streamed at all: their state is
fetched and verified whole into the cache first, then loaded from the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from forkyard._fs import atomic_write
from forkyard.checkpoint import ChunkRef, PartRef
from forkyard.errors import ForkyardError, IntegrityError, ObjectNotFound
from forkyard.store import BlobCache, BlobStore

__all__ = ["StateStream", "fetch_chunked"]

log = logging.getLogger("forkyard.worker")

_FETCHERS = 2  # chunks downloaded and verified at once: QEMU needs a core too
_FETCH_AHEAD = 3  # chunks being fetched (or fetched, waiting for their turn)

def fetch_chunked(cache: BlobCache, blobs: BlobStore, ref: PartRef,
                  chunks: tuple[ChunkRef, ...], *, what: str) -> Path:
    """Assemble ``chunks`` into the cache entry of ``ref``, verifying each chunk and the whole.

    Nothing is filed in the cache unless every check passed.
    """
    with _CacheFile(cache, ref, what) as out, \
            contextlib.closing(_verified(blobs, chunks, what)) as verified:
        for _chunk, data in verified:
            out.write(data)
    assert out.path is not None
    return out.path


def _verified(blobs: BlobStore, chunks: tuple[ChunkRef, ...], what: str
              ) -> Generator[tuple[ChunkRef, bytes]]:
    """Each chunk with its verified bytes, in order; the first bad one raises.

    A chunk's fetch (read, zstd, sha256: all release the GIL) is the slow
    step, so a few run at once (:data:`_FETCHERS`, at most :data:`_FETCH_AHEAD`
    chunks in hand); yet chunk i comes out only after every chunk before it,
    so a bad chunk stops the consumer right at it.
    """
    pool = ThreadPoolExecutor(max_workers=_FETCHERS, thread_name_prefix="chunk")
    pending: deque[tuple[ChunkRef, Future[bytes]]] = deque()
    todo = iter(enumerate(chunks))
    try:
        while True:
            while len(pending) < _FETCH_AHEAD and (nxt := next(todo, None)) is not None:
                i, chunk = nxt
                pending.append((chunk, pool.submit(_fetch_chunk, blobs, i, chunk, what)))
            if not pending:
                return
            chunk, fut = pending.popleft()
            yield chunk, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=False)


def _fetch_chunk(blobs: BlobStore, i: int, chunk: ChunkRef, what: str) -> bytes:
    """The bytes of chunk ``i``, verified (IntegrityError naming the chunk otherwise)."""
    name = f"{what} chunk {i} (bytes {chunk.offset}+{chunk.size}, sha256:{chunk.digest})"
    buf = _Buffer(chunk.size)
    try:
        blobs.read_blob_into(chunk.digest, cast(BinaryIO, buf), size=chunk.size)
    except IntegrityError as exc:
        raise IntegrityError(name, expected=exc.expected, actual=exc.actual) from exc
    except ObjectNotFound as exc:
        raise IntegrityError(name, expected=f"blob sha256:{chunk.digest} in "
                             f"{blobs.store.url}", actual="no such blob") from exc
    return buf.take()


class _Buffer:
    """A write-only "file" of at most ``limit`` bytes (the store reader stops beyond).

    Allocated once at the chunk's size, so the bytes are copied into it once
    and never moved again while it fills.
    """

    def __init__(self, limit: int) -> None:
        self._data = bytearray(limit)
        self._view = memoryview(self._data)
        self._pos = 0
        self._limit = limit

    def write(self, data: bytes) -> int:
        end = self._pos + len(data)
        if end > self._limit:
            raise IntegrityError("state chunk", expected=f"{self._limit} bytes",
                                 actual=f"more than {self._limit} bytes")
        self._view[self._pos:end] = data
        self._pos = end
        return len(data)

    def take(self) -> bytes:
        # handed over as is (no copy): the feeder and the cache writer only read it; the
        # store reader checked the size, so a verified chunk filled the buffer exactly
        self._view.release()
        out, self._data = self._data, bytearray()
        if self._pos != self._limit:
            del out[self._pos:]
        return cast(bytes, out)


class _CacheFile:
    """The file that becomes the state's cache entry: hashed as it is appended to, filed
    under ``ref.digest`` on a clean exit only if the whole matches."""

    def __init__(self, cache: BlobCache, ref: PartRef, what: str) -> None:
        self._cache = cache
        self._ref = ref
        self._what = what
        self._hash = hashlib.sha256()
        self._size = 0
        self._tmp = cache.root / ".streams" / (
            f"{ref.digest[:16]}.{os.getpid()}.{threading.get_ident():x}")
        self._cm = atomic_write(self._tmp)  # fsync'd on commit: cache entries are trusted
        self._file: BinaryIO | None = None
        self.path: Path | None = None

    def __enter__(self) -> _CacheFile:
        self._file = self._cm.__enter__()
        return self

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                self._cm.__exit__(exc_type, exc, tb)  # the temp file goes
                return
            actual = self._hash.hexdigest()
            if actual != self._ref.digest or self._size != self._ref.size:
                problem = IntegrityError(
                    f"{self._what} (its chunks put together)",
                    expected=f"sha256 {self._ref.digest}, {self._ref.size} bytes",
                    actual=f"sha256 {actual}, {self._size} bytes")
                self._cm.__exit__(IntegrityError, problem, None)
                raise problem
            self._cm.__exit__(None, None, None)
            self.path = self._cache.add_local(self._ref.digest, self._tmp, verify=False,
                                              link=True)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)


_FEED_AHEAD = 1  # verified chunks waiting for QEMU to read
_DISK_AHEAD = 8  # verified chunks (32 MiB) waiting for the disk: it is slower than the feed


class StateStream:
    """A chunked state on its way, verified chunk by chunk, into a pipe and the cache."""

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
        # verified chunks for the feeder and for the cache writer; None ends each
        self._ready: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=_FEED_AHEAD)
        self._disk: queue.Queue[bytes | None] = queue.Queue(maxsize=_DISK_AHEAD)
        self._error: BaseException | None = None
        self._verdict = threading.Event()  # set once the bytes are verified (or failed)
        self.fed: list[int] = []  # offsets of the chunks QEMU was given, in order
        read_fd, self._write_fd = os.pipe()
        with contextlib.suppress(OSError):  # fewer wake-ups of QEMU and of us
            fcntl.fcntl(self._write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        self.read_fd: int | None = read_fd
        name = ref.digest[:12]
        self._threads = [
            threading.Thread(target=self._run_download, daemon=True, name=f"fetch-{name}"),
            threading.Thread(target=self._run_feeder, daemon=True, name=f"feed-{name}"),
            threading.Thread(target=self._run_writer, daemon=True, name=f"file-{name}"),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def take_fd(self) -> int:
        """The pipe's read end; the caller (QEMU's launcher) now owns and closes it."""
        fd = self.read_fd
        if fd is None:
            raise ForkyardError("state stream already handed over")
        self.read_fd = None
        return fd

    def finish(self, timeout: float) -> None:
        """Wait for the verdict on the downloaded bytes; a failure is raised here.

        Filing the bytes in the blob cache (fsync, link) continues in the
        background: the VM need not wait for the disk.
        """
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

    def _run_download(self) -> None:
        failed: BaseException | None = None
        try:
            for chunk, data in _verified(self._blobs, self._chunks, self._what):
                self._ready.put((chunk.offset, data))  # verified: QEMU may have it
                self._disk.put(data)
        except BaseException as exc:
            failed = exc
            self._error = exc
        finally:
            self._ready.put(None)
            # a failed download must not be filed: the writer sees it as an abort
            self._disk.put(None if failed is None else b"")
            self._verdict.set()  # every chunk verified (or the failure): the VM may run

    def _run_feeder(self) -> None:
        broken = False
        try:
            while (item := self._ready.get()) is not None:
                offset, data = item
                if broken:
                    continue
                try:
                    _write_all(self._write_fd, data)
                    self.fed.append(offset)
                except OSError:
                    broken = True  # QEMU stopped reading (it failed); the launcher says why
        finally:
            # EOF for QEMU: after the last verified chunk, or early on a failure (QEMU then
            # fails to load, and the launcher reports this stream's verdict instead)
            with contextlib.suppress(OSError):
                os.close(self._write_fd)

    def _run_writer(self) -> None:
        ended = False  # the download's terminator was taken off the queue
        try:
            with _CacheFile(self._cache, self._ref, self._what) as out:
                while data := self._disk.get():
                    out.write(data)
                ended = True
                if data is not None:
                    raise _Aborted  # the download failed: nothing to file
        except _Aborted:
            pass
        except Exception as exc:  # the VM runs on verified chunks; only the cache misses out
            log.warning("not caching %s: %s", self._what, exc)
            while not ended:  # let the download finish
                ended = not self._disk.get()
        finally:
            if self._on_done is not None:
                self._on_done()
            self._done.set()


class _Aborted(Exception):
    pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

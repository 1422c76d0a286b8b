"""The streaming stages a blob passes through on its way in and out of the store.

Upload: file -> sha256 + zstd -> the store (:class:`CompressingReader`).
Download: decompressed chunks -> sha256 + write in a second thread
(:class:`HashWriteThread`), holes kept holes (:class:`SparseWriter`).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from forkyard.errors import IntegrityError
from forkyard.store._base import CHUNK_SIZE, ProgressFn

__all__ = ["CompressingReader", "HashWriteThread", "SparseWriter"]

_ZEROS = bytes(CHUNK_SIZE)
_HOLE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(_HOLE_BLOCK)


class CompressingReader:
    """A ``read()``-able pipe: file -> sha256 + zstd -> the store's upload.

    The digest is checked when the file hits EOF, *before* the last bytes are
    handed over, so the upload fails (and is discarded) on a mismatch.
    """

    def __init__(
        self,
        src: BinaryIO,
        compressor: zstandard.ZstdCompressor,
        size: int,
        digest: str,
        key: str,
        progress: ProgressFn | None,
    ) -> None:
        self._src = src
        self._comp = compressor.compressobj(size=size)
        self._expected_size = size
        self._digest = digest
        self._key = key
        self._progress = progress
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self.finished = False
        self.size = 0
        self.compressed_size = 0

    def read(self, n: int = -1, /) -> bytes:
        want = n if n >= 0 else 1 << 62
        while len(self._buf) < want and not self.finished:
            self._fill()
        out = bytes(self._buf[:want])
        del self._buf[:want]
        self.compressed_size += len(out)
        return out

    def _fill(self) -> None:
        chunk = self._src.read(CHUNK_SIZE)
        try:
            if chunk:
                self._hash.update(chunk)
                self.size += len(chunk)
                self._buf += self._comp.compress(chunk)
                if self._progress is not None:
                    self._progress(self.size, self._expected_size)
                return
            self._buf += self._comp.flush()
        except zstandard.ZstdError as exc:  # pledged size broken: the file is changing
            raise IntegrityError(
                f"source for {self._key}",
                expected=f"{self._expected_size} bytes",
                actual=f"a file that changed while it was read ({exc})",
            ) from exc
        self.finished = True
        actual = self._hash.hexdigest()
        if actual != self._digest:
            raise IntegrityError(
                f"source for {self._key}", expected=f"sha256 {self._digest}", actual=actual
            )



class HashWriteThread:
    """Hash and write chunks in a second thread while the caller decompresses.

    zstd, sha256 and file writes all release the GIL, so on a multi-core
    worker a download costs max(decompress, hash + write), not their sum —
    this is on the critical path of every fork on a worker that lacks a part.
    """

    def __init__(self, h: hashlib._Hash, write: Callable[[bytes], object]) -> None:
        self._h = h
        self._write = write
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="blob-hash-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            if self._error is not None:
                continue  # drain so the producer never blocks on a dead consumer
            try:
                self._h.update(chunk)
                self._write(chunk)
            except BaseException as exc:
                self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(chunk)

    def close(self) -> None:
        """Wait for the last chunk; raise what the consumer ran into."""
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after an error of the producer's, whose exception wins."""
        self._error = self._error or RuntimeError("aborted")
        self._q.put(None)
        self._thread.join()


class SparseWriter:
    """Writes data and seeks over all-zero blocks (disk images are mostly holes)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hole = 0

    def write(self, chunk: bytes) -> None:
        if chunk == _ZEROS:  # fast path for whole empty chunks
            self._hole += len(chunk)
            return
        view = memoryview(chunk)
        run = -1  # start of the pending data run
        for off in range(0, len(chunk), _HOLE_BLOCK):
            end = min(off + _HOLE_BLOCK, len(chunk))
            # bytes == bytes is a memcmp; memoryview == bytes is ~50x slower.
            if chunk[off:end] == (_ZERO_BLOCK if end - off == _HOLE_BLOCK else bytes(end - off)):
                if run >= 0:
                    self._emit(view[run:off])
                    run = -1
                self._hole += end - off
            elif run < 0:
                run = off
        if run >= 0:
            self._emit(view[run:])

    def finish(self) -> None:
        if self._hole:
            self._out.seek(self._hole, os.SEEK_CUR)
            self._out.truncate()  # extends the file to here without allocating blocks
            self._hole = 0

    def _emit(self, data: memoryview) -> None:
        if self._hole:
            self._out.seek(self._hole, os.SEEK_CUR)
            self._hole = 0
        self._out.write(data)

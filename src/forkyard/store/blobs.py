"""Content-addressed blobs on top of any :class:`~forkyard.store.ObjectStore`.

A blob is stored zstd-compressed at ``blobs/<ab>/<sha256>`` where the digest is
of the *uncompressed* bytes: an id is known before any upload, a base image
keeps the digest of its raw file, and a blob that is already stored is never
uploaded again ("bases travel once"). Every download is decompressed and
hashed on the fly, so nothing unverified ever reaches its destination.

Small JSON documents (manifests) live beside the blobs under other prefixes
and go through :meth:`BlobStore.put_json_once` / :meth:`BlobStore.get_json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from forkyard._digest import DIGEST_RE, sha256_bytes
from forkyard.errors import IntegrityError, StoreError, UnsafePath
from forkyard.store._base import CHUNK_SIZE, ObjectStore, ProgressFn, atomic_write

__all__ = [
    "BLOB_PREFIX",
    "DEFAULT_JSON_MAX_SIZE",
    "BlobRef",
    "BlobStore",
    "blob_key",
    "canonical_json",
    "hash_file",
    "validate_digest",
]

BLOB_PREFIX = "blobs/"
DEFAULT_LEVEL = 3
DEFAULT_JSON_MAX_SIZE = 16 * 1024 * 1024
_ZEROS = bytes(CHUNK_SIZE)
_HOLE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(_HOLE_BLOCK)


@dataclass(frozen=True, slots=True)
class BlobRef:
    digest: str  # sha256 of the uncompressed content
    size: int  # uncompressed bytes
    stored_size: int  # compressed bytes in the store


def validate_digest(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex characters; it becomes part of a key."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise UnsafePath(str(digest))
    return digest


def blob_key(digest: str) -> str:
    validate_digest(digest)
    return f"{BLOB_PREFIX}{digest[:2]}/{digest}"


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex, size) of a local file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise StoreError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
    return h.hexdigest(), size


def canonical_json(obj: object) -> bytes:
    """One byte encoding per value, so a document's sha256 is stable."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def _default_threads() -> int:
    # Compression shares the worker with running VMs; a few threads saturate a NIC.
    cpus = os.cpu_count() or 1
    return 0 if cpus == 1 else min(4, cpus)


class BlobStore:
    """Thread-safe: every call makes its own (de)compressor."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        level: int = DEFAULT_LEVEL,
        threads: int | None = None,
    ) -> None:
        self._store = store
        self._level = level
        self._threads = _default_threads() if threads is None else threads

    @property
    def store(self) -> ObjectStore:
        return self._store

    def __repr__(self) -> str:
        return f"BlobStore({self._store!r})"

    # --- blobs ----------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self._store.exists(blob_key(digest))

    def list_blobs(self) -> Iterator[str]:
        """Digests of all stored blobs (for garbage collection)."""
        for key in self._store.list(BLOB_PREFIX):
            digest = key.rpartition("/")[2]
            if DIGEST_RE.match(digest) and key == blob_key(digest):
                yield digest

    def put_blob(
        self,
        path: str | os.PathLike[str],
        *,
        digest: str | None = None,
        progress: ProgressFn | None = None,
    ) -> BlobRef:
        """Store a local file as a blob unless it is already stored.

        Without ``digest`` the file is hashed first (the key must be known
        before uploading). With ``digest``, an already-stored blob is not read
        again at all; otherwise the file is checked against it while it
        streams, and a mismatch raises IntegrityError with nothing stored.
        ``progress`` reports uncompressed bytes of the upload pass.
        """
        if digest is None:
            digest, _ = hash_file(path)
        key = blob_key(digest)
        if self._store.exists(key):
            return BlobRef(digest, _file_size(path), self._store.size(key))
        try:
            with open(path, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                pipe = _CompressingReader(src, self._compressor(), size, digest, key, progress)
                written = self._store.put_stream(key, pipe)
        except OSError as exc:  # store errors are StoreErrors by now; this is the file
            raise StoreError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
        stored = self._store.size(key)
        if written and stored != pipe.compressed_size:
            self._store.delete(key)  # ours (write-once), and wrong: don't let it be deduped
            raise IntegrityError(
                f"stored blob {key} in {self._store.url}",
                expected=f"{pipe.compressed_size} bytes",
                actual=f"{stored} bytes",
            )
        return BlobRef(digest, pipe.size if pipe.finished else size, stored)

    def get_blob(
        self,
        digest: str,
        dest: str | os.PathLike[str],
        *,
        size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> BlobRef:
        """Download, decompress and verify into ``dest`` (atomically, sparse)."""
        with atomic_write(Path(dest)) as out:
            return self.read_blob_into(digest, out, size=size, progress=progress, sparse=True)

    def read_blob_into(
        self,
        digest: str,
        out: BinaryIO,
        *,
        size: int | None = None,
        progress: ProgressFn | None = None,
        sparse: bool = False,
    ) -> BlobRef:
        """Decompress a blob into ``out``, raising IntegrityError if it is not ``digest``.

        ``out`` receives the bytes before they are verified: it must be a temp
        file that the caller discards on error. ``sparse=True`` seeks over
        zero runs instead of writing them; only valid for a new, empty file.
        ``progress`` reports uncompressed bytes, against ``size`` if given.
        """
        key = blob_key(digest)
        with self._store.open_read(key) as raw:
            counted = _CountingReader(raw)
            actual, n = self._decompress(key, counted, out, size, progress, sparse)
        if not counted.frames.complete:
            raise IntegrityError(
                f"blob {key} in {self._store.url}",
                expected="complete zstd frames",
                actual=f"a stream truncated after {counted.count} bytes",
            )
        if size is not None and n != size:
            raise IntegrityError(
                f"blob {key} in {self._store.url}", expected=f"{size} bytes", actual=f"{n} bytes"
            )
        if actual != digest:
            raise IntegrityError(
                f"blob {key} in {self._store.url}", expected=f"sha256 {digest}", actual=actual
            )
        return BlobRef(digest, n, counted.count)

    # --- small JSON documents -------------------------------------------
    def put_json_once(
        self,
        key: str,
        obj: object,
        *,
        expect_digest: str | None = None,
        max_size: int = DEFAULT_JSON_MAX_SIZE,
    ) -> bool:
        """Store ``canonical_json(obj)`` at ``key`` unless the key exists (write-once).

        ``expect_digest`` is for content-addressed keys: the encoding must hash
        to it. Returns False when the key already existed.
        """
        if key.startswith(BLOB_PREFIX):
            raise StoreError(f"{key!r}: the {BLOB_PREFIX} prefix is reserved for blobs")
        data = canonical_json(obj)
        if len(data) > max_size:
            raise StoreError(f"JSON for {key!r} is {len(data)} bytes, over {max_size}")
        if expect_digest is not None:
            _check_digest(f"JSON for {key}", data, expect_digest)
        return self._store.put_bytes(key, data)

    def get_json(
        self, key: str, *, max_size: int = DEFAULT_JSON_MAX_SIZE, expect_digest: str | None = None
    ) -> object:
        data = self._store.get_bytes(key, max_size=max_size)
        if expect_digest is not None:
            _check_digest(f"object {key} in {self._store.url}", data, expect_digest)
        try:
            return json.loads(data)
        except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
            raise StoreError(f"{key!r} in {self._store.url} is not valid JSON: {exc}") from exc

    # --- internals ------------------------------------------------------
    def _compressor(self) -> zstandard.ZstdCompressor:
        return zstandard.ZstdCompressor(
            level=self._level, threads=self._threads, write_checksum=True
        )

    def _decompress(
        self,
        key: str,
        src: _CountingReader,
        out: BinaryIO,
        size: int | None,
        progress: ProgressFn | None,
        sparse: bool,
    ) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        writer = _SparseWriter(out) if sparse else None
        sink = _HashWriteThread(h, writer.write if writer is not None else out.write)
        reader = zstandard.ZstdDecompressor().stream_reader(
            # zstandard only ever calls read(); its stub insists on a full IO.
            cast("BinaryIO", src),
            read_size=1024 * 1024,
            read_across_frames=True,
            closefd=False,
        )
        try:
            try:
                while chunk := reader.read(CHUNK_SIZE):
                    n += len(chunk)
                    if size is not None and n > size:  # stop early: don't fill the disk
                        raise IntegrityError(
                            f"blob {key}", expected=f"{size} bytes",
                            actual=f"more than {size} bytes",
                        )
                    sink.put(chunk)
                    if progress is not None:
                        progress(n, size)
            except BaseException:
                sink.abort()
                raise
            sink.close()
            if writer is not None:
                writer.finish()
        except zstandard.ZstdError as exc:
            raise IntegrityError(
                f"blob {key} in {self._store.url}", expected="a valid zstd stream", actual=str(exc)
            ) from exc
        except OSError as exc:  # the source raises StoreError, so this is ``out``
            raise StoreError(f"writing blob {key} failed: {exc}") from exc
        return h.hexdigest(), n


class _CompressingReader:
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


class _CountingReader:
    """Counts the compressed bytes a download consumes and follows their frames."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.count = 0
        self.frames = _FrameTracker()

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        self.count += len(data)
        self.frames.feed(data)
        return data


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGICS = range(0x184D2A50, 0x184D2A60)
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # the first is 1 for single-segment frames


class _FrameTracker:
    """Walks zstd frame/block headers (RFC 8878) as the bytes pass, without decoding.

    The decoder happily stops at end of input when a frame lacks only its
    checksum, or ends mid-frame; this tells a complete stream from a
    truncated one. Costs one small parse per block (at most 128 KiB each).
    """

    def __init__(self) -> None:
        self.frames = 0
        self._field = bytearray()
        self._want = 4
        self._state = "magic"
        self._skip = 0
        self._checksum = False

    @property
    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._field and not self._skip

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._skip:
                step = min(self._skip, len(view) - i)
                self._skip -= step
                i += step
                continue
            step = min(self._want - len(self._field), len(view) - i)
            self._field += view[i : i + step]
            i += step
            if len(self._field) == self._want:
                field = bytes(self._field)
                self._field.clear()
                self._advance(field)

    def _expect(self, state: str, want: int) -> None:
        self._state = state
        self._want = want

    def _advance(self, field: bytes) -> None:
        value = int.from_bytes(field, "little")
        if self._state == "magic":
            if value == _ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif value in _SKIPPABLE_MAGICS:
                self._expect("skippable", 4)
            else:
                raise zstandard.ZstdError(f"no zstd frame at a frame boundary ({value:#x})")
        elif self._state == "skippable":
            self._skip = value
            self._expect("magic", 4)
        elif self._state == "descriptor":
            self._start_frame(value)
        elif self._state == "header":
            self._expect("block", 3)
        elif self._state == "block":
            self._end_block(value)
        else:  # checksum
            self.frames += 1
            self._expect("magic", 4)

    def _start_frame(self, descriptor: int) -> None:
        single_segment = bool(descriptor & 0x20)
        if descriptor & 0x08:
            raise zstandard.ZstdError("reserved bit set in a zstd frame header")
        self._checksum = bool(descriptor & 0x04)
        content_size = _CONTENT_SIZE_BYTES[descriptor >> 6] or int(single_segment)
        rest = int(not single_segment) + _DICT_ID_BYTES[descriptor & 0x03] + content_size
        if rest:
            self._expect("header", rest)
        else:
            self._expect("block", 3)

    def _end_block(self, header: int) -> None:
        block_type = (header >> 1) & 0x03
        if block_type == 3:
            raise zstandard.ZstdError("reserved zstd block type")
        self._skip = 1 if block_type == 1 else header >> 3  # RLE blocks hold one byte
        if not header & 0x01:
            self._expect("block", 3)
        elif self._checksum:
            self._expect("checksum", 4)
        else:
            self.frames += 1
            self._expect("magic", 4)


class _HashWriteThread:
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


class _SparseWriter:
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


def _check_digest(what: str, data: bytes, expected: str) -> None:
    validate_digest(expected)
    actual = sha256_bytes(data)
    if actual != expected:
        raise IntegrityError(what, expected=f"sha256 {expected}", actual=actual)


def _file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise StoreError(f"cannot stat {os.fspath(path)!r}: {exc}") from exc

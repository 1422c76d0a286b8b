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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from forkyard._digest import DIGEST_RE, sha256_bytes
from forkyard.errors import IntegrityError, StoreError, UnsafePath
from forkyard.store._base import CHUNK_SIZE, ObjectStore, ProgressFn, atomic_write
from forkyard.store._frames import CountingReader, whole_frames
from forkyard.store._pipes import CompressingReader, HashWriteThread, SparseWriter

__all__ = [
    "BLOB_PREFIX",
    "DEFAULT_JSON_MAX_SIZE",
    "SMALL_BLOB_MAX",
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
SMALL_BLOB_MAX = 4 * 1024 * 1024  # get_small_blob holds it (and its compressed form) whole


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
        # bytes that crossed to and from the store (compressed), for /metrics
        self._moved = threading.Lock()
        self.uploaded_bytes = 0
        self.downloaded_bytes = 0
        self._local = threading.local()

    def _dctx(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor: making one per RAM chunk costs a tenth of its fetch."""
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def _count(self, *, up: int = 0, down: int = 0) -> None:
        with self._moved:
            self.uploaded_bytes += up
            self.downloaded_bytes += down

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
        span: tuple[int, int] | None = None,
    ) -> BlobRef:
        """Store a local file (or its bytes ``span`` = (offset, size)) as a blob unless
        it is already stored.

        Without ``digest`` the file is hashed first (the key must be known
        before uploading). With ``digest``, an already-stored blob is not read
        again at all; otherwise the file is checked against it while it
        streams, and a mismatch raises IntegrityError with nothing stored.
        ``progress`` reports uncompressed bytes of the upload pass.
        """
        if digest is None:
            if span is not None:
                raise ValueError("a span needs its digest")
            digest, _ = hash_file(path)
        key = blob_key(digest)
        if self._store.exists(key):
            size = span[1] if span is not None else _file_size(path)
            return BlobRef(digest, size, self._store.size(key))
        try:
            with open(path, "rb") as f:
                src: BinaryIO = f
                if span is not None:
                    f.seek(span[0])
                    src = cast("BinaryIO", _Span(f, span[1]))
                size = span[1] if span is not None else os.fstat(f.fileno()).st_size
                pipe = CompressingReader(src, self._compressor(), size, digest, key, progress)
                written = self._store.put_stream(key, pipe)
        except OSError as exc:  # store errors are StoreErrors by now; this is the file
            raise StoreError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
        if written:
            self._count(up=pipe.compressed_size)
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
            counted = CountingReader(raw)
            try:
                actual, n = self._decompress(key, counted, out, size, progress, sparse)
            finally:
                self._count(down=counted.count)  # what crossed, verified or not
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

    def get_small_blob(self, digest: str, *, size: int) -> bytes:
        """A blob of ``size`` bytes (at most :data:`SMALL_BLOB_MAX`), in memory, verified.

        For many small objects (RAM chunks): one bounded read, one hash, no
        thread per object (what :meth:`read_blob_into` costs is most of a 64 KiB
        chunk's fetch).  Anything that is not exactly ``size`` bytes hashing to
        ``digest`` in complete zstd frames is an IntegrityError.
        """
        if not 0 <= size <= SMALL_BLOB_MAX:
            raise ValueError(f"get_small_blob is for blobs of at most {SMALL_BLOB_MAX} bytes")
        key = blob_key(digest)
        where = f"blob {key} in {self._store.url}"
        limit = 2 * size + 65536  # far above zstd's worst case for incompressible bytes
        raw = self._store.read_head(key, limit + 1)
        self._count(down=len(raw))
        if len(raw) > limit:
            raise IntegrityError(where, expected=f"at most {limit} compressed bytes",
                                 actual="more")
        try:
            complete = whole_frames(raw)
            reader = self._dctx().stream_reader(raw, read_across_frames=True)
            data = reader.read(size + 1)  # bounded: a small frame can expand a million-fold
            while len(data) <= size and (piece := reader.read(size + 1 - len(data))):
                data += piece
        except zstandard.ZstdError as exc:
            raise IntegrityError(where, expected="a valid zstd stream", actual=str(exc)) from exc
        if not complete:
            raise IntegrityError(where, expected="complete zstd frames",
                                 actual=f"a stream truncated after {len(raw)} bytes")
        if len(data) != size:
            raise IntegrityError(where, expected=f"{size} bytes",
                                 actual=f"{len(data)}{'+' if len(data) > size else ''} bytes")
        _check_digest(where, data, digest)
        return data

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
        src: CountingReader,
        out: BinaryIO,
        size: int | None,
        progress: ProgressFn | None,
        sparse: bool,
    ) -> tuple[str, int]:
        h = hashlib.sha256()
        n = 0
        writer = SparseWriter(out) if sparse else None
        sink = HashWriteThread(h, writer.write if writer is not None else out.write)
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


class _Span:
    """The next ``left`` bytes of an open file, as a ``read()``-able stream."""

    def __init__(self, f: BinaryIO, left: int) -> None:
        self._f = f
        self._left = left

    def read(self, n: int = -1, /) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._f.read(want) if want else b""
        self._left -= len(data)
        return data


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

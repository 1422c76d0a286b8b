"""The object-store interface and the helpers every backend shares.

Objects are immutable: a key is written once and never replaced (checkpoint
archives are named by content, so a second writer of the same key always
carries the same bytes). Keys are ``/``-separated relative names checked by
:func:`validate_key` before any backend turns them into a path or a URL.
"""

from __future__ import annotations

import io
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from forkyard import _fs
from forkyard._fs import fsync_dir
from forkyard.errors import StoreError, UnsafePath

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "CHUNK_SIZE",
    "MAX_KEY_BYTES",
    "ObjectStore",
    "ProgressFn",
    "Readable",
    "atomic_write",
    "copy_stream",
    "fsync_dir",
    "guarded_reader",
    "is_valid_key",
    "refuse_existing",
    "validate_key",
    "validate_prefix",
]

ProgressFn = Callable[[int, int | None], None]
"""``progress(bytes_done, bytes_total)``; always called from the calling thread."""

CHUNK_SIZE = 4 * 1024 * 1024
MAX_KEY_BYTES = 1024  # S3's own limit, applied everywhere so backends agree
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # one scan per key (a fork checks thousands)


class Readable(Protocol):
    """Anything with a binary ``read`` (files, sockets' makefile, our pipes)."""

    def read(self, n: int = -1, /) -> bytes: ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object name, else raise UnsafePath.

    The rules are the intersection of what a POSIX directory tree and S3 can
    both represent without aliasing: no empty/``.``/``..`` components (which a
    filesystem would collapse), no backslash (a separator elsewhere), no
    control characters (log/terminal injection) and at most 1024 UTF-8 bytes.
    """
    if not isinstance(key, str) or not key:
        raise UnsafePath(str(key))
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise UnsafePath(key) from exc
    if len(encoded) > MAX_KEY_BYTES or key.startswith("/") or "\\" in key:
        raise UnsafePath(key)
    if _CONTROL.search(key):
        raise UnsafePath(key)
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsafePath(key)
    return key


def is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except UnsafePath:
        return False
    return True


def refuse_existing(key: str, if_absent: bool) -> bool:
    """The result of a put that found ``key`` already stored (write-once)."""
    if if_absent:
        return False
    raise StoreError(f"object {key!r} already exists (objects are write-once)")


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key, or a key followed by ``/``."""
    if prefix == "":
        return prefix
    validate_key(prefix.removesuffix("/"))
    return prefix


def copy_stream(
    src: Readable,
    dst: BinaryIO,
    *,
    total: int | None = None,
    progress: ProgressFn | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Copy until EOF, reporting progress after every chunk; returns bytes copied."""
    done = 0
    while chunk := src.read(chunk_size):
        dst.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    return done


@contextmanager
def atomic_write(dest: Path, *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """:func:`forkyard._fs.atomic_write` at the store boundary.

    Errors of the mechanism itself (temp file, fsync, rename) surface as
    StoreError; the body's own errors pass through unchanged. Files are
    private (0600) unless asked otherwise: store contents may be guest memory.
    """
    in_body = False
    try:
        with _fs.atomic_write(dest, mode=mode) as f:
            try:
                yield f
            except BaseException:
                in_body = True
                raise
    except OSError as exc:
        if in_body:
            raise
        raise StoreError(f"cannot write {dest}: {exc}") from exc


class _GuardedRaw(io.RawIOBase):
    """Raw reader that turns a backend's transport errors into StoreError.

    Callers stream objects with plain ``read`` calls long after ``open_read``
    returned, so the error boundary has to travel with the stream.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        close: Callable[[], None],
        errors: tuple[type[BaseException], ...],
        what: str,
    ) -> None:
        super().__init__()
        self._read = read
        self._close = close
        self._errors = errors
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._read(len(view))
        except self._errors as exc:
            raise StoreError(f"reading {self._what} failed: {exc}") from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            # A reader failing to close has nothing left to lose; don't mask the real error.
            with suppress(*self._errors):
                self._close()
        super().close()


def guarded_reader(
    read: Callable[[int], bytes],
    close: Callable[[], None],
    *,
    errors: tuple[type[BaseException], ...],
    what: str,
    buffer_size: int = 1024 * 1024,
) -> BinaryIO:
    """A buffered binary reader over ``read`` whose errors become StoreError."""
    return io.BufferedReader(_GuardedRaw(read, close, errors, what), buffer_size)


class ObjectStore(ABC):
    """A flat namespace of immutable objects; every method is thread-safe.

    ``put_*`` never replace an existing object. With ``if_absent=True`` (the
    default) they return ``False`` without writing when the key exists, and
    ``True`` when they stored the object; with ``if_absent=False`` an existing
    key is an error (StoreError). Readers never observe a partially written
    object. Missing keys raise ObjectNotFound; ``delete`` of a missing key is
    a no-op so garbage collection can race with itself.
    """

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL that :func:`forkyard.store.open_store` maps back to this store."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    def put_stream(
        self,
        key: str,
        fileobj: Readable,
        *,
        progress: ProgressFn | None = None,
        if_absent: bool = True,
    ) -> bool:
        """Store the stream's bytes under ``key`` (write-once; see the module docstring)."""
        return self._put(key, fileobj, None, progress, if_absent)

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        if_absent: bool = True,
    ) -> bool:
        try:
            with open(path, "rb") as src:
                total = os.fstat(src.fileno()).st_size
                return self._put(key, src, total, progress, if_absent)
        except OSError as exc:  # store errors are StoreErrors by now; this is the source
            raise StoreError(f"cannot read {os.fspath(path)!r}: {exc}") from exc

    @abstractmethod
    def _put(
        self,
        key: str,
        src: Readable,
        total: int | None,
        progress: ProgressFn | None,
        if_absent: bool,
    ) -> bool:
        """Write ``src`` atomically under ``key``; ``total`` is its size when known."""

    @abstractmethod
    def get_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
    ) -> int:
        """Download to ``dest`` atomically; returns the object's size."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming reader; close it (or use ``with``) to release the connection."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = True) -> bool:
        return self.put_stream(key, io.BytesIO(data), if_absent=if_absent)

    def read_head(self, key: str, n: int) -> bytes:
        """The first ``n`` bytes of the object (all of it, if it is shorter)."""
        out = bytearray()
        with self.open_read(key) as reader:
            while len(out) < n and (piece := reader.read(n - len(out))):
                out += piece
        return bytes(out)

    def get_bytes(self, key: str, *, max_size: int) -> bytes:
        """The whole object, refusing (StoreError) anything over ``max_size`` bytes."""
        chunks: list[bytes] = []
        total = 0
        with self.open_read(key) as reader:
            # Chunked, so a huge max_size is a limit and not an up-front allocation.
            while chunk := reader.read(min(CHUNK_SIZE, max_size + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_size:
                    raise StoreError(
                        f"object {key!r} in {self.url} is larger than {max_size} bytes"
                    )
        return b"".join(chunks)

    def own_uploads(self, journal: Path) -> int:
        """Note this process's uploads under ``journal`` from now on, and clean up what
        uploads an earlier process with the same journal left half done; how many.

        ``journal`` is private to one writer at a time (a worker's home), so what
        it names at start is nobody's upload in flight.  Default: nothing to do.
        """
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

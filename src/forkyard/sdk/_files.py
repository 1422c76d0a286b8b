"""``sandbox.files`` of the sync and async SDK: files of any size, directories as tar streams.

``write`` takes bytes, str, a binary file object or an iterable of byte chunks
(async: also an async iterable) and streams anything but bytes/str as it is
read; ``read_stream`` yields the file as it arrives, so neither end holds a
whole file.  ``write_dir``/``read_dir`` move a local directory tree as a tar
stream, checked entry by entry on the way in (``forkyard._tarstream``).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from forkyard.sdk import _ops
from forkyard.sdk._http import AsyncHTTP, Progress, SyncHTTP
from forkyard.sdk.models import EntryInfo


class _Owner(Protocol):
    """The sandbox a ``files`` belongs to (protocols: no import cycle with its modules)."""

    @property
    def id(self) -> str: ...

    @property
    def _http(self) -> SyncHTTP: ...


class _AsyncOwner(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def _http(self) -> AsyncHTTP: ...

__all__ = ["AsyncFiles", "FileData", "Files"]

_CHUNK = 1 << 20
FileData = bytes | bytearray | memoryview | str | IO[bytes] | Iterable[bytes]
AsyncFileData = FileData | AsyncIterable[bytes]


def body(data: FileData) -> bytes | Iterator[bytes]:
    """Bytes as they are; a file object or an iterable as a stream of chunks."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(data, "read"):
        return _read_chunks(data)  # type: ignore[arg-type]
    return (bytes(c) for c in data)


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


async def _aiter(it: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in it:
        yield chunk


def abody(data: AsyncFileData) -> bytes | AsyncIterator[bytes]:
    if isinstance(data, AsyncIterable):
        return _anorm(data)
    b = body(data)
    return b if isinstance(b, bytes) else _aiter(b)


async def _anorm(data: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for chunk in data:
        yield bytes(chunk)


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


class Files:
    """``sandbox.files``: the guest filesystem (paths are absolute guest paths)."""

    def __init__(self, sandbox: _Owner) -> None:
        self._sb = sandbox

    def write(self, path: str, data: FileData, *, mode: int = 0o644,
              append: bool = False, progress: Progress | None = None) -> int:
        """Write (or append to) a file of any size, creating parent directories; its size.

        The file appears whole when the upload ends, never half-written.
        """
        return self._sb._http.upload(_ops.write_file(self._sb.id, path, None, mode, append),
                                     body(data), progress)

    def read(self, path: str, *, progress: Progress | None = None) -> bytes:
        return self._sb._http.download(_ops.read_file(self._sb.id, path), progress)

    def read_stream(self, path: str, *, progress: Progress | None = None) -> Iterator[bytes]:
        """The file in chunks as they arrive (a missing file raises here, at once)."""
        return self._sb._http.stream(_ops.read_file(self._sb.id, path), progress)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def list(self, path: str) -> builtins.list[EntryInfo]:
        return self._sb._http.call(_ops.list_entries(self._sb.id, path))

    def stat(self, path: str) -> EntryInfo:
        return self._sb._http.call(_ops.stat(self._sb.id, path))

    def exists(self, path: str) -> bool:
        return self._sb._http.call(_ops.exists(self._sb.id, path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._sb._http.call(_ops.remove(self._sb.id, path, recursive))

    def make_dir(self, path: str, *, mode: int = 0o755, parents: bool = True) -> None:
        """``mkdir`` (``-p`` by default) with exactly ``mode``."""
        self._sb._http.call(_ops.mkdir(self._sb.id, path, mode, parents))

    mkdir = make_dir

    def rename(self, path: str, to: str, *, overwrite: bool = True) -> None:
        self._sb._http.call(_ops.rename(self._sb.id, path, to, overwrite))

    def write_dir(self, local: str | os.PathLike[str], path: str, *,
                  progress: Progress | None = None) -> int:
        """Copy a local directory tree under the guest directory ``path``; entries copied."""
        from forkyard import _tarstream

        return self._sb._http.upload(_ops.write_tree(self._sb.id, path),
                                     _tarstream.pack_dir(Path(local)), progress)

    def read_dir(self, path: str, local: str | os.PathLike[str], *,
                 progress: Progress | None = None) -> int:
        """Copy the guest directory ``path`` into a local directory; entries copied."""
        from forkyard import _tarstream

        chunks = self._sb._http.stream(_ops.read_tree(self._sb.id, path), progress)
        reader: Any = _tarstream.IterReader(chunks)
        return _tarstream.extract_dir(reader, Path(local))


class AsyncFiles:
    def __init__(self, sandbox: _AsyncOwner) -> None:
        self._sb = sandbox

    async def write(self, path: str, data: AsyncFileData, *, mode: int = 0o644,
                    append: bool = False, progress: Progress | None = None) -> int:
        return await self._sb._http.upload(
            _ops.write_file(self._sb.id, path, None, mode, append), abody(data), progress)

    async def read(self, path: str, *, progress: Progress | None = None) -> bytes:
        return await self._sb._http.download(_ops.read_file(self._sb.id, path), progress)

    async def read_stream(self, path: str, *,
                          progress: Progress | None = None) -> AsyncIterator[bytes]:
        return await self._sb._http.stream(_ops.read_file(self._sb.id, path), progress)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def list(self, path: str) -> builtins.list[EntryInfo]:
        return await self._sb._http.call(_ops.list_entries(self._sb.id, path))

    async def stat(self, path: str) -> EntryInfo:
        return await self._sb._http.call(_ops.stat(self._sb.id, path))

    async def exists(self, path: str) -> bool:
        return await self._sb._http.call(_ops.exists(self._sb.id, path))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._sb._http.call(_ops.remove(self._sb.id, path, recursive))

    async def make_dir(self, path: str, *, mode: int = 0o755, parents: bool = True) -> None:
        await self._sb._http.call(_ops.mkdir(self._sb.id, path, mode, parents))

    mkdir = make_dir

    async def rename(self, path: str, to: str, *, overwrite: bool = True) -> None:
        await self._sb._http.call(_ops.rename(self._sb.id, path, to, overwrite))

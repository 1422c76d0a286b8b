"""``sandbox.files``: the guest filesystem through the agent (E2B-style).

Files of any size stream in chunks of :data:`CHUNK`, one agent call each, so
a transfer holds one chunk in memory whatever its size.  An upload goes to a
temp file next to its target and is committed by one rename after an fsync:
a cut upload (caller gone, guest error, worker restart) never replaces or
truncates the target; the temp file is removed when the upload fails here.
"""

from __future__ import annotations

import contextlib
import itertools
import posixpath
import secrets
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Protocol, TypeVar

from forkyard.guest.client import AgentClient, EntryInfo

__all__ = ["CHUNK", "Files"]

T = TypeVar("T")
CHUNK = 4 * 1024 * 1024  # per agent call: a few round trips per second under TCG


class AgentCall(Protocol):
    """Runs one call on a sandbox's agent, with the sandbox's state checks."""

    def __call__(self, fn: Callable[[AgentClient], T], /) -> T: ...


def temp_path(path: str) -> str:
    head, tail = posixpath.split(path)
    # NAME_MAX is 255: a long name is cut, the random part keeps it unique
    return posixpath.join(head, f".{tail[:200]}.fy-up-{secrets.token_hex(6)}")


def rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Chunks of exactly ``size`` bytes (the last one shorter), whatever came in."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            with memoryview(buf) as view:
                part = bytes(view[:size])  # one copy (a slice of the bytearray would be two)
            del buf[:size]
            yield part
    if buf:
        yield bytes(buf)


class Files:
    """File operations in one sandbox's guest."""

    def __init__(self, call: AgentCall) -> None:
        self._call = call

    def read(self, path: str) -> bytes:
        """The whole file (memory grows with it: use :meth:`read_stream` for big ones)."""
        return b"".join(self.read_stream(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def read_stream(self, path: str, *, chunk: int = CHUNK) -> Iterator[bytes]:
        """The file's bytes in chunks, up to the size it had at the first read.

        The first chunk is read before this returns, so a missing file or a
        directory fails here, not in the middle of the caller's loop.  A guest
        cannot make a chunk bigger than asked (see ``AgentClient.read_at``) nor
        the stream longer than the size it first reported.
        """
        first, size = self._call(lambda a: a.read_at(path, 0, chunk))
        return itertools.chain([first], self._rest(path, len(first), size, chunk)
                               if len(first) == chunk else ())

    def _rest(self, path: str, offset: int, size: int, chunk: int) -> Iterator[bytes]:
        while offset < size:
            want = min(chunk, size - offset)
            data, _ = self._call(partial(AgentClient.read_at, path=path, offset=offset,
                                         length=want))
            if not data:
                return  # shrank meanwhile
            offset += len(data)
            yield data

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
              append: bool = False) -> int:
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) <= CHUNK:
            return self._call(lambda a: a.write_file(path, raw, mode=mode, append=append))
        return self.write_stream(path, [raw], mode=mode, append=append)

    def write_stream(self, path: str, chunks: Iterable[bytes], *, mode: int = 0o644,
                     append: bool = False) -> int:
        """Write a file from an iterable of byte chunks; its size.

        Not appending, the file appears whole at the end or not at all.
        """
        if append:
            total = 0
            for part in rechunk(chunks, CHUNK):
                self._call(partial(AgentClient.write_file, path=path, data=part, mode=mode,
                                   append=True))
                total += len(part)
            if total == 0:  # still created, as a one-frame append of nothing is
                self._call(lambda a: a.write_file(path, b"", mode=mode, append=True))
            return total
        parent = posixpath.dirname(path)
        if parent != "/":
            self._call(lambda a: a.mkdir(parent, parents=True))
        tmp = temp_path(path)
        offset = 0
        try:
            for part in itertools.chain(rechunk(chunks, CHUNK), [b""]):
                if part or offset == 0:
                    self._call(partial(AgentClient.write_at, path=tmp, offset=offset,
                                       data=part, mode=mode))
                offset += len(part)
            self._call(lambda a: a.rename(tmp, path, sync=True))
        except BaseException:
            with contextlib.suppress(Exception):
                self._call(lambda a: a.remove(tmp))
            raise
        return offset

    def list(self, path: str) -> list[EntryInfo]:
        return self._call(lambda a: a.list(path))

    def stat(self, path: str) -> EntryInfo:
        return self._call(lambda a: a.stat(path))

    def exists(self, path: str) -> bool:
        return self._call(lambda a: a.exists(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._call(lambda a: a.remove(path, recursive=recursive))

    def make_dir(self, path: str, *, mode: int = 0o755, parents: bool = True,
                 exact_mode: bool = False) -> None:
        self._call(lambda a: a.mkdir(path, mode=mode, parents=parents, exact_mode=exact_mode))

    mkdir = make_dir

    def rename(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        self._call(lambda a: a.rename(src, dst, replace=overwrite))

    def symlink(self, path: str, target: str) -> None:
        self._call(lambda a: a.symlink(path, target))

    def readlink(self, path: str) -> str:
        return self._call(lambda a: a.readlink(path))

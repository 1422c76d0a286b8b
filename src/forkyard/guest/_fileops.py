"""The agent's file operations, as a part of :class:`~forkyard.guest.client.AgentClient`.

Single-frame reads and writes stay within :data:`MAX_FILE_SIZE`; files of any
size go through ``write_at``/``read_at`` in chunks (the worker's
``forkyard.worker._files``) and are committed with ``rename(sync=True)``.
Every reply is held to its call's limit, as all agent replies are.
"""

from __future__ import annotations

import stat as stat_mod
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from forkyard.errors import AgentError, AgentProtocolError, GuestFileNotFound, PayloadTooLarge
from forkyard.guest import protocol as p
from forkyard.guest.protocol import SMALL_REPLY, Fields, Limit, Op, Tag

__all__ = [
    "DEFAULT_LIST_ENTRIES",
    "MAX_FILE_SIZE",
    "MAX_LIST_ENTRIES",
    "REPLY_SLACK",
    "EntryInfo",
    "FileOps",
    "Listing",
    "check_abs",
]

MAX_FILE_SIZE = 64 * 1024 * 1024
DEFAULT_LIST_ENTRIES = 10_000
MAX_LIST_ENTRIES = 100_000
# room in a reply for the small fields around its data (exit code, pid, flags, ...)
REPLY_SLACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class EntryInfo:
    name: str
    mode: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)


class Listing(list[EntryInfo]):
    """A directory listing; ``truncated`` when the directory held more entries than asked."""

    def __init__(self, entries: list[EntryInfo], *, truncated: bool = False) -> None:
        super().__init__(entries)
        self.truncated = truncated



class FileOps(ABC):
    """File calls over the client's ``_call`` (bounded replies, timeouts, errors)."""

    _name: str

    @abstractmethod
    def _call(self, op: Op, fields: Sequence[tuple[Tag, p.FieldValue]], *, timeout: float,
              request_id: int | None = None, reply_limit: Limit = SMALL_REPLY) -> Fields:
        ...

    def write_file(
        self,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        make_parents: bool = True,
        append: bool = False,
        timeout: float = 120.0,
    ) -> int:
        check_abs(path)
        if len(data) > MAX_FILE_SIZE:
            raise PayloadTooLarge(f"file {path}", len(data), MAX_FILE_SIZE)
        flags = (p.WRITE_MKDIRS if make_parents else 0) | (p.WRITE_APPEND if append else 0)
        r = self._call(
            Op.WRITE_FILE,
            [(Tag.PATH, path), (Tag.MODE, mode), (Tag.FLAGS, flags), (Tag.DATA, data)],
            timeout=timeout,
        )
        return r.int(Tag.SIZE)

    def read_file(self, path: str, *, timeout: float = 120.0) -> bytes:
        check_abs(path)
        r = self._call(
            Op.READ_FILE, [(Tag.PATH, path), (Tag.LENGTH, MAX_FILE_SIZE)], timeout=timeout,
            reply_limit=Limit(MAX_FILE_SIZE + REPLY_SLACK, 16),
        )
        data = r.view(Tag.DATA)
        if r.int(Tag.TRUNCATED) or (data is not None and len(data) > MAX_FILE_SIZE):
            size = max(r.int(Tag.SIZE), 0 if data is None else len(data))
            raise PayloadTooLarge(f"file {path}", size, MAX_FILE_SIZE)
        return b"" if data is None else bytes(data)

    def write_at(self, path: str, offset: int, data: bytes, *, mode: int = 0o644,
                 timeout: float = 120.0) -> int:
        """One chunk of a streamed upload, written in place at ``offset``.

        Offset 0 truncates (and gives the file ``mode``); no temp file, no
        rename: the caller writes a temp path and commits it with :meth:`rename`.
        """
        check_abs(path)
        if len(data) > MAX_FILE_SIZE:
            raise PayloadTooLarge(f"chunk of {path}", len(data), MAX_FILE_SIZE)
        r = self._call(
            Op.WRITE_FILE,
            [(Tag.PATH, path), (Tag.MODE, mode), (Tag.FLAGS, p.WRITE_AT), (Tag.OFFSET, offset),
             (Tag.DATA, data)],
            timeout=timeout,
        )
        return r.int(Tag.SIZE)

    def read_at(self, path: str, offset: int, length: int, *,
                timeout: float = 120.0) -> tuple[bytes, int]:
        """Up to ``length`` bytes at ``offset`` and the file's size then.

        A reply with more than ``length`` bytes is refused unread (its call's
        limit), so a lying guest costs at most one chunk.
        """
        check_abs(path)
        if not 0 < length <= MAX_FILE_SIZE or offset < 0:
            raise ValueError(f"read_at needs 0 < length <= {MAX_FILE_SIZE} and offset >= 0")
        r = self._call(
            Op.READ_FILE, [(Tag.PATH, path), (Tag.OFFSET, offset), (Tag.LENGTH, length)],
            timeout=timeout, reply_limit=Limit(length + REPLY_SLACK, 16),
        )
        data = r.view(Tag.DATA)
        if data is not None and len(data) > length:
            raise AgentProtocolError(f"{self._name}: read of {path} answered more than asked")
        return (b"" if data is None else bytes(data)), r.int(Tag.SIZE)

    def rename(self, src: str, dst: str, *, sync: bool = False, replace: bool = True,
               timeout: float = 60.0) -> None:
        """``sync``: fsync the file before and its directory after (a durable commit)."""
        check_abs(src)
        check_abs(dst)
        flags = (p.RENAME_SYNC if sync else 0) | (0 if replace else p.RENAME_NOREPLACE)
        self._call(Op.RENAME, [(Tag.PATH, src), (Tag.TARGET, dst), (Tag.FLAGS, flags)],
                   timeout=timeout)

    def symlink(self, path: str, target: str, *, timeout: float = 30.0) -> None:
        check_abs(path)
        if not target or "\0" in target:
            raise ValueError("a symlink needs a target without NUL")
        self._call(Op.SYMLINK, [(Tag.PATH, path), (Tag.TARGET, target)], timeout=timeout)

    def readlink(self, path: str, *, timeout: float = 30.0) -> str:
        check_abs(path)
        r = self._call(Op.READLINK, [(Tag.PATH, path)], timeout=timeout)
        target = r.str(Tag.TARGET)
        if not target or len(target) > p.PATH_MAX:
            raise AgentProtocolError(f"{self._name}: bad readlink reply for {path}")
        return target

    def stat(self, path: str, *, timeout: float = 30.0) -> EntryInfo:
        check_abs(path)
        r = self._call(Op.STAT, [(Tag.PATH, path)], timeout=timeout)
        raw = r.raw(Tag.ENTRY)
        if raw is None:
            raise AgentError("stat reply without an entry")
        mode, size, mtime, name = p.decode_entry(raw, max_name=p.PATH_MAX)
        return EntryInfo(name, mode, size, mtime)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except GuestFileNotFound:
            return False
        return True

    def list(self, path: str, *, limit: int = DEFAULT_LIST_ENTRIES,
             timeout: float = 30.0) -> Listing:
        """Up to ``limit`` entries of a directory, sorted by name.

        A larger directory gives the first ``limit`` entries the guest's
        ``readdir`` returns (not the first by name) and ``truncated=True``.
        """
        check_abs(path)
        if not 1 <= limit <= MAX_LIST_ENTRIES:
            raise ValueError(f"limit must be within 1..{MAX_LIST_ENTRIES}")
        reply_limit = Limit(limit * p.ENTRY_FIELD_MAX + REPLY_SLACK, limit + 16)
        r = self._call(Op.LIST, [(Tag.PATH, path), (Tag.MAX_ENTRIES, limit)], timeout=timeout,
                       reply_limit=reply_limit)
        entries: list[EntryInfo] = []
        truncated = bool(r.int(Tag.TRUNCATED))
        for raw in r.views(Tag.ENTRY):
            if len(entries) == limit:  # a guest that ignored MAX_ENTRIES
                truncated = True
                break
            entries.append(EntryInfo(*_reorder(p.decode_entry(raw))))
        entries.sort(key=lambda e: e.name)
        return Listing(entries, truncated=truncated)

    def remove(self, path: str, *, recursive: bool = False, timeout: float = 60.0) -> None:
        check_abs(path)
        flags = p.REMOVE_RECURSIVE if recursive else 0
        self._call(Op.REMOVE, [(Tag.PATH, path), (Tag.FLAGS, flags)], timeout=timeout)

    def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = True,
              exact_mode: bool = False) -> None:
        """``exact_mode`` sets ``mode`` past the guest's umask (also on an existing directory)."""
        check_abs(path)
        flags = (p.MKDIR_PARENTS if parents else 0) | (p.MKDIR_CHMOD if exact_mode else 0)
        self._call(
            Op.MKDIR, [(Tag.PATH, path), (Tag.MODE, mode), (Tag.FLAGS, flags)], timeout=30.0
        )



def _reorder(entry: tuple[int, int, int, str]) -> tuple[str, int, int, int]:
    mode, size, mtime, name = entry
    return name, mode, size, mtime


def check_abs(path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"guest paths must be absolute: {path!r}")

"""Directory trees as tar streams (``files put -r`` / ``get -r``).

The same entry rules hold at both ends, whoever wrote the stream (a caller's
upload, a hostile guest's tree): only regular files, directories and symlinks;
names relative, without ``..``, NUL or over-long components; nothing below a
symlink the archive itself made; at most :data:`MAX_ENTRIES` entries.  Symlinks
are stored as symlinks and never followed; modes are kept (permission bits
only: no setuid/setgid/sticky from an untrusted stream).  Anything else is an
:class:`~forkyard.errors.UnsafeArchive` naming the entry, raised before that
entry touches a disk.

Writing a stream needs no buffering beyond one chunk: a header, the file's
bytes as they are read, padding.  Extracting locally walks one component at a
time from directory descriptors opened with ``O_NOFOLLOW`` (as
``forkyard.image._tarsafe`` does), so a symlink already on the disk is never
followed either.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from forkyard.errors import UnsafeArchive

__all__ = [
    "BLOCK",
    "CHUNK",
    "MAX_ENTRIES",
    "Entry",
    "EntryRules",
    "IterReader",
    "extract_dir",
    "file_header",
    "open_stream",
    "pack_dir",
    "tar_end",
]

MAX_ENTRIES = 100_000
MAX_PATH = 4096  # bytes of an entry's whole name
MAX_COMPONENT = 255
CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


@dataclass(frozen=True, slots=True)
class Entry:
    """One checked entry: its path components below the root, kind and what it needs."""

    parts: tuple[str, ...]
    kind: str  # "file" | "dir" | "symlink"
    mode: int
    size: int = 0
    target: str = ""

    @property
    def name(self) -> str:
        return "/".join(self.parts)


@dataclass(slots=True)
class EntryRules:
    """Checks a stream's entries in order (the symlink rule needs the ones before)."""

    max_entries: int = MAX_ENTRIES
    count: int = 0
    links: set[tuple[str, ...]] = field(default_factory=set)

    def check(self, m: tarfile.TarInfo) -> Entry | None:
        """The entry, or None for the root itself (``.``)."""
        self.count += 1
        if self.count > self.max_entries:
            raise UnsafeArchive(f"archive has more than {self.max_entries} entries",
                                entry=m.name[:200])
        parts = split_name(m.name)
        if not parts:
            return None
        for i in range(1, len(parts)):
            if parts[:i] in self.links:
                raise UnsafeArchive("archive entry below a symlink of the archive", entry=m.name)
        mode = stat.S_IMODE(m.mode) & 0o777
        if m.isdir():
            return Entry(parts, "dir", mode)
        if m.type in _REGULAR:
            return Entry(parts, "file", mode, m.size)
        if m.issym():
            if not m.linkname or "\0" in m.linkname or len(m.linkname.encode()) > MAX_PATH:
                raise UnsafeArchive("symlink with an empty, NUL or over-long target",
                                    entry=m.name)
            self.links.add(parts)
            return Entry(parts, "symlink", 0o777, target=m.linkname)
        what = ("device node" if m.ischr() or m.isblk() else "hardlink" if m.islnk()
                else "fifo" if m.isfifo() else f"member type {m.type!r}")
        raise UnsafeArchive(f"archive holds a {what}, which is not copied", entry=m.name)


def split_name(name: str) -> tuple[str, ...]:
    if "\0" in name or len(name.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise UnsafeArchive("archive entry name has NUL or is too long", entry=name[:200])
    if name.startswith("/"):
        raise UnsafeArchive("absolute name in archive", entry=name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive("'..' in archive entry name", entry=name)
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in parts):
        raise UnsafeArchive("archive entry name component over 255 bytes", entry=name[:200])
    return parts


# --- writing ----------------------------------------------------------------------------
def file_header(name: str, kind: str, *, mode: int, size: int = 0, mtime: float = 0,
                target: str = "") -> bytes:
    """The header block(s) of one entry (PAX, so long names and big files fit)."""
    info = tarfile.TarInfo(name or ".")
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                 "symlink": tarfile.SYMTYPE}[kind]
    info.mode = mode & 0o7777
    info.size = size if kind == "file" else 0
    info.mtime = int(mtime)
    info.linkname = target
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def tar_end() -> bytes:
    return b"\0" * (2 * BLOCK)


def exactly(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``size`` bytes from ``chunks``: cut if they run longer, zero-filled if shorter.

    A header promised ``size`` (the file changed while it was read): the stream
    must keep its framing whatever the file did meanwhile.
    """
    left = size
    for chunk in chunks:
        if left <= 0:
            break
        part = chunk[:left]
        left -= len(part)
        yield part
    while left > 0:
        n = min(left, CHUNK)
        left -= n
        yield b"\0" * n
    yield padding(size)


def pack_dir(root: Path) -> Iterator[bytes]:
    """A local directory as a tar stream, symlinks as symlinks; other special files skipped."""
    root_st = os.lstat(root)
    if not stat.S_ISDIR(root_st.st_mode):
        raise NotADirectoryError(f"{root} is not a directory")
    yield file_header(".", "dir", mode=stat.S_IMODE(root_st.st_mode), mtime=root_st.st_mtime)
    count = 1
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            count += 1
            if count > MAX_ENTRIES:
                raise UnsafeArchive(f"directory has more than {MAX_ENTRIES} entries",
                                    entry=str(root))
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                yield file_header(rel, "dir", mode=mode, mtime=st.st_mtime)
            elif stat.S_ISLNK(st.st_mode):
                yield file_header(rel, "symlink", mode=0o777, mtime=st.st_mtime,
                                  target=os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                yield file_header(rel, "file", mode=mode, size=st.st_size, mtime=st.st_mtime)
                yield from exactly(_read_chunks(path), st.st_size)
    yield tar_end()


def _read_chunks(path: str) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            yield chunk


# --- reading ----------------------------------------------------------------------------
class IterReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (what tarfile's stream mode reads)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._buf))
        buffer[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def open_stream(stream: IO[bytes]) -> tarfile.TarFile:
    """An uncompressed tar read front to back (no seeking: it comes off the network)."""
    try:
        return tarfile.open(fileobj=stream, mode="r|")
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"not a tar stream: {exc}") from exc


def members(tf: tarfile.TarFile, rules: EntryRules) -> Iterator[tuple[Entry, tarfile.TarInfo]]:
    try:
        for m in tf:
            entry = rules.check(m)
            if entry is not None:
                yield entry, m
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"broken tar stream: {exc}") from exc


def file_chunks(tf: tarfile.TarFile, m: tarfile.TarInfo) -> Iterator[bytes]:
    src = tf.extractfile(m)
    if src is None:
        return
    while chunk := src.read(CHUNK):
        yield chunk


def extract_dir(stream: IO[bytes], root: Path, *, max_entries: int = MAX_ENTRIES) -> int:
    """Extract a tar stream into ``root`` (created if missing); the number of entries.

    Existing files of the same names are replaced (a symlink there is replaced,
    not followed); an existing symlink or file where a parent directory should
    be is refused.
    """
    root.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(root, _DIR_FLAGS)
    dirs: list[tuple[tuple[str, ...], int]] = []
    count = 0
    try:
        with open_stream(stream) as tf:
            for entry, m in members(tf, EntryRules(max_entries)):
                count += 1
                with _parent(root_fd, entry) as pfd:
                    _extract_one(tf, m, entry, pfd)
                if entry.kind == "dir":
                    dirs.append((entry.parts, entry.mode))
        # last, deepest first: a read-only directory must not stop its own filling
        for parts, mode in sorted(dirs, key=lambda d: len(d[0]), reverse=True):
            with _parent(root_fd, Entry(parts, "dir", mode)) as pfd:
                os.chmod(parts[-1], mode, dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(root_fd)
    return count


@contextlib.contextmanager
def _parent(root_fd: int, entry: Entry) -> Iterator[int]:
    fd = os.dup(root_fd)
    try:
        for comp in entry.parts[:-1]:
            try:
                st = os.lstat(comp, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(comp, 0o755, dir_fd=fd)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise UnsafeArchive("archive entry below a symlink or a file",
                                        entry=entry.name)
            nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _extract_one(tf: tarfile.TarFile, m: tarfile.TarInfo, entry: Entry, pfd: int) -> None:
    name = entry.parts[-1]
    try:
        existing: os.stat_result | None = os.lstat(name, dir_fd=pfd)
    except FileNotFoundError:
        existing = None
    if entry.kind == "dir":
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            return
        if existing is not None:
            os.unlink(name, dir_fd=pfd)
        os.mkdir(name, 0o700, dir_fd=pfd)
        return
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            raise UnsafeArchive("archive file would replace a directory", entry=entry.name)
        os.unlink(name, dir_fd=pfd)
    if entry.kind == "symlink":
        os.symlink(entry.target, name, dir_fd=pfd)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=pfd)
    try:
        for chunk in file_chunks(tf, m):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fchmod(fd, entry.mode)
    finally:
        os.close(fd)

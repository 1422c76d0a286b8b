"""Extract an untrusted root-filesystem tarball into a staging directory.

``tarfile.extractall`` is not used: even with its 3.12 filters it resolves
paths rather than refusing them, and it follows links we want stored. Here
every entry is created relative to directory file descriptors opened with
``O_NOFOLLOW`` one component at a time, so nothing can be written outside the
staging root whatever the archive contains. Refused (``UnsafeInput`` naming the
entry): absolute names, ``..`` components, entries below a symlink or a
non-directory, hardlinks to anything but an already extracted regular file,
duplicate non-directory entries, unknown member types, and archives over the
size or entry-count caps. Symlinks are stored verbatim (absolute or relative)
and never followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from forkyard.errors import ImageBuildError, UnsafeInput
from forkyard.image._tree import clamp_mtime

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "TarResult", "extract_tar"]

DEFAULT_MAX_BYTES = 8 * 1024**3
DEFAULT_MAX_ENTRIES = 2_000_000

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)


@dataclass(slots=True)
class TarResult:
    sha256: str
    entries: int = 0
    content_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class _HashingReader(io.RawIOBase):
    """Raw stream that hashes (and counts) every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.count += n
        return n


@dataclass(slots=True)
class _DirAttrs:
    mode: int
    uid: int
    gid: int
    mtime: int


@dataclass(slots=True)
class _Extractor:
    root_fd: int
    epoch: int
    max_bytes: int
    max_entries: int
    result: TarResult
    is_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    regular: set[tuple[str, ...]] = field(default_factory=set)
    dirs: dict[tuple[str, ...], _DirAttrs] = field(default_factory=dict)

    # --- paths ------------------------------------------------------------
    def parts(self, name: str, entry: str) -> tuple[str, ...]:
        if name.startswith("/"):
            raise UnsafeInput("absolute member name in tarball", entry=entry)
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise UnsafeInput("'..' component in tarball member", entry=entry)
        return parts

    @contextlib.contextmanager
    def parent(self, parts: tuple[str, ...], entry: str, *, create: bool) -> Iterator[int]:
        """fd of the directory holding ``parts[-1]``, walked without following links."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts[:-1]):
                fd = self._step(fd, comp, parts[: i + 1], entry, create=create)
            yield fd
        finally:
            os.close(fd)

    def _step(self, fd: int, comp: str, sub: tuple[str, ...], entry: str, *, create: bool) -> int:
        try:
            st = os.lstat(comp, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise UnsafeInput("tarball path does not exist", entry=entry) from None
            os.mkdir(comp, 0o755, dir_fd=fd)
            self.dirs[sub] = _DirAttrs(0o755, 0, 0, self.epoch)
        else:
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeInput("tarball member would be written through a symlink", entry=entry)
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeInput("tarball member is below a non-directory", entry=entry)
        # O_NOFOLLOW makes the walk safe even if the check above were raced.
        nxt = os.open(comp, _DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        return nxt

    # --- members ----------------------------------------------------------
    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        entry = member.name
        self.result.entries += 1
        if self.result.entries > self.max_entries:
            raise UnsafeInput(f"tarball has more than {self.max_entries} entries", entry=entry)
        parts = self.parts(member.name, entry)
        if not parts:
            return  # "./": the root's metadata is normalized by the builder
        with self.parent(parts, entry, create=True) as pfd:
            name = parts[-1]
            existing = _lstat_or_none(name, pfd)
            if member.isdir():
                self._dir(pfd, name, parts, existing, member, entry)
                return
            if existing is not None:
                raise UnsafeInput("duplicate tarball entry", entry=entry)
            self._non_dir(tf, pfd, name, parts, member, entry)

    def _dir(
        self,
        pfd: int,
        name: str,
        parts: tuple[str, ...],
        existing: os.stat_result | None,
        member: tarfile.TarInfo,
        entry: str,
    ) -> None:
        if existing is None:
            os.mkdir(name, 0o700, dir_fd=pfd)
        elif not stat.S_ISDIR(existing.st_mode):
            raise UnsafeInput(
                "tarball directory clashes with an earlier non-directory", entry=entry
            )
        # Applied at the end: children would change the mtime, and a read-only
        # mode would stop us from filling the directory when not root.
        self.dirs[parts] = _DirAttrs(
            stat.S_IMODE(member.mode), member.uid, member.gid, clamp_mtime(member.mtime)
        )

    def _non_dir(
        self,
        tf: tarfile.TarFile,
        pfd: int,
        name: str,
        parts: tuple[str, ...],
        member: tarfile.TarInfo,
        entry: str,
    ) -> None:
        if member.type in _REGULAR_TYPES:
            self._file(tf, pfd, name, member, entry)
            self.regular.add(parts)
        elif member.issym():
            self._symlink(pfd, name, member, entry)
        elif member.islnk():
            self._hardlink(pfd, name, member, entry)
        elif member.ischr() or member.isblk():
            self._device(pfd, name, member, entry)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self._attrs_by_name(pfd, name, member)
        else:
            raise UnsafeInput(f"unsupported tarball member type {member.type!r}", entry=entry)

    def _file(
        self, tf: tarfile.TarFile, pfd: int, name: str, member: tarfile.TarInfo, entry: str
    ) -> None:
        if self.result.content_bytes + member.size > self.max_bytes:
            raise UnsafeInput(
                f"tarball content exceeds the cap of {self.max_bytes} bytes", entry=entry
            )
        src = tf.extractfile(member)
        if src is None:
            raise ImageBuildError(f"tarball member {entry!r} has no data")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=pfd)
        try:
            written = 0
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > member.size:
                    raise UnsafeInput("tarball member is larger than its header", entry=entry)
                _write_all(fd, chunk)
            self.result.content_bytes += written
            # chown before chmod: chown clears setuid/setgid bits.
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))
            mtime = clamp_mtime(member.mtime)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)

    def _symlink(self, pfd: int, name: str, member: tarfile.TarInfo, entry: str) -> None:
        if not member.linkname:
            raise UnsafeInput("symlink with an empty target", entry=entry)
        os.symlink(member.linkname, name, dir_fd=pfd)
        os.chown(name, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        mtime = clamp_mtime(member.mtime)
        os.utime(name, (mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, name: str, member: tarfile.TarInfo, entry: str) -> None:
        target = self.parts(member.linkname, entry)
        if target not in self.regular:
            raise UnsafeInput(
                f"hardlink target {member.linkname!r} is not an extracted regular file",
                entry=entry,
            )
        with self.parent(target, entry, create=False) as tfd:
            st = _lstat_or_none(target[-1], tfd)
            if st is None or not stat.S_ISREG(st.st_mode):
                raise UnsafeInput("hardlink target is no longer a regular file", entry=entry)
            os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _device(self, pfd: int, name: str, member: tarfile.TarInfo, entry: str) -> None:
        if not self.is_root:
            self.result.notes.append(f"skipped device node {entry} (not running as root)")
            return
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=pfd)
        self._attrs_by_name(pfd, name, member)

    def _attrs_by_name(self, pfd: int, name: str, member: tarfile.TarInfo) -> None:
        # The node was just created by us in a directory we hold open; it is
        # not a symlink, so the path-based calls cannot be redirected.
        os.chown(name, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(member.mode), dir_fd=pfd)
        mtime = clamp_mtime(member.mtime)
        os.utime(name, (mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    # --- end ----------------------------------------------------------------
    def finish_dirs(self) -> None:
        for parts in sorted(self.dirs, key=len, reverse=True):
            attrs = self.dirs[parts]
            entry = "/".join(parts)
            with self.parent((*parts, ""), entry, create=False) as fd:
                os.fchown(fd, attrs.uid, attrs.gid)
                os.fchmod(fd, attrs.mode)
                os.utime(fd, (attrs.mtime, attrs.mtime))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _lstat_or_none(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _open_tar(buffered: io.BufferedReader[Any]) -> tarfile.TarFile:
    if buffered.peek(4)[:4] == _ZSTD_MAGIC:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return tarfile.open(fileobj=reader, mode="r|")
    return tarfile.open(fileobj=buffered, mode="r|*")


def extract_tar(
    stream: IO[bytes],
    root: Path,
    *,
    epoch: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    progress: Callable[[str], None] | None = None,
) -> TarResult:
    """Extract ``stream`` (plain/gz/bz2/xz/zstd tar) into the existing empty dir ``root``.

    Directories the archive implies but does not list get mode 0755, owner
    0:0 and mtime ``epoch``. The result's ``sha256`` is over the input bytes
    exactly as read (compressed), so it names the tarball the user gave.
    """
    hashing = _HashingReader(stream)
    buffered = io.BufferedReader(hashing, buffer_size=_CHUNK)
    root_fd = os.open(root, _DIR_FLAGS)
    ex = _Extractor(root_fd, epoch, max_bytes, max_entries, TarResult(sha256=""))
    try:
        try:
            with _open_tar(buffered) as tf:
                for member in tf:
                    _add_one(ex, tf, member)
                    if progress is not None and ex.result.entries % 20000 == 0:
                        progress(f"extracted {ex.result.entries} entries")
        except (tarfile.TarError, EOFError, _zstd_error()) as exc:
            raise ImageBuildError(f"cannot read tarball: {exc}") from exc
        ex.finish_dirs()
        _drain(buffered, max_bytes)
    finally:
        os.close(root_fd)
    ex.result.sha256 = hashing.sha.hexdigest()
    return ex.result


def _add_one(ex: _Extractor, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    try:
        ex.add(tf, member)
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL, errno.EEXIST):
            raise UnsafeInput(
                f"cannot extract tarball member ({exc.strerror})", entry=member.name
            ) from exc
        raise ImageBuildError(f"extracting tarball member {member.name!r}: {exc}") from exc


def _drain(buffered: io.BufferedReader[Any], cap: int) -> None:
    # Read the trailing padding too so the digest covers the whole input.
    left = cap
    while left > 0 and (chunk := buffered.read(min(_CHUNK, left))):
        left -= len(chunk)


def _zstd_error() -> type[Exception]:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        return tarfile.TarError
    error: type[Exception] = zstandard.ZstdError
    return error

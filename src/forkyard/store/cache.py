"""A local cache of verified blobs, shared by every process of one worker.

Layout: ``<root>/<ab>/<sha256>`` (files holding the *uncompressed* content)
and ``<root>/.locks/<sha256>.lock``. A file appears under its digest only
after it was fully written, fsynced and verified.

The cache holds guest memory (VM state files), so it is private to the
worker: directories 0700, entries 0400, owned by the worker's uid, whatever
the umask. An entry is used without re-hashing only while it still looks
exactly as it was filed: a regular file of ours, mode 0400, with the seal
(an extended attribute naming its digest, inode, size and mtime) written
when it was verified. Anything else -- a file planted or modified behind the
cache's back, or an entry of an older forkyard -- is re-hashed under the
digest's lock: kept (and resealed) if the bytes are right, removed if not.
On a filesystem without extended attributes the owner, mode and size checks
remain.

Fetches are single-flight: threads of one process asking for the same digest
share one download (and its outcome, success or error), and processes
serialize on a per-digest ``flock`` so they do not download the same blob
twice either.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from forkyard import _fs
from forkyard._fs import fsync_dir, private_dir, syncfs
from forkyard.errors import IntegrityError, StoreError
from forkyard.store._base import CHUNK_SIZE, ProgressFn
from forkyard.store.blobs import BlobStore, hash_file, validate_digest

__all__ = ["BlobCache"]

_ENTRY_MODE = 0o400
_LOCK_DIR = ".locks"
_SEAL = "user.forkyard.seal"
# link(2) failures that mean "this filesystem pair cannot share an inode": copy instead.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
_NO_XATTR = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})

# What _check finds at an entry's path.
_ABSENT, _TRUSTED, _SUSPECT = "absent", "trusted", "suspect"


class _Flight:
    """One in-process download that other threads wait on."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def resolve(self) -> None:
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> None:
        """Return once the download is over; raise its error if it failed."""
        self._done.wait()
        if self._error is not None:
            raise self._error


class BlobCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        self._root_str = str(self._root)
        self._mu = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._swept = False

    @property
    def root(self) -> Path:
        return self._root

    def path_for(self, digest: str) -> Path:
        validate_digest(digest)
        # one parse, not two joins: a fork looks up a thousand RAM chunks
        return Path(f"{self._root_str}/{digest[:2]}/{digest}")

    def path_if_present(self, digest: str) -> Path | None:
        path = self.path_for(digest)
        return path if self._usable(digest, path, None) else None

    def fetch(
        self,
        digest: str,
        blobs: BlobStore,
        *,
        size: int | None = None,
        progress: ProgressFn | None = None,
    ) -> Path:
        """The cached file for ``digest``, downloading it first if needed.

        Concurrent callers share one download; only the caller that performs
        it sees ``progress``. If it fails, every waiter gets the error and the
        cache is left without the entry (a later call tries again).
        """
        path = self.path_for(digest)
        while True:
            if self._usable(digest, path, size):
                return path
            flight, leader = self._join(digest)
            if leader:
                break
            # Raises the leader's error; on success, loop to re-check the entry
            # with our own ``size``.
            flight.wait()
        try:
            self._download(digest, path, blobs, size, progress)
        except BaseException as exc:
            self._land(digest)
            flight.fail(exc if isinstance(exc, Exception) else _interrupted(digest))
            raise
        self._land(digest)
        flight.resolve()
        return path

    def add_local(
        self,
        digest: str,
        src: str | os.PathLike[str],
        *,
        verify: bool = True,
        link: bool = True,
        durable: bool = True,
    ) -> Path:
        """Put a locally produced file into the cache under ``digest``.

        With ``link`` the cache entry is a hard link to ``src`` when both are
        on one filesystem: ``src`` is then made read-only (0400) and must never
        be modified again. Otherwise (or across filesystems) the file is copied.
        ``verify`` hashes the content first (IntegrityError on a mismatch).
        ``durable=False``: the caller already made ``src``'s bytes durable
        (:meth:`add_batch`), so a link skips its fsyncs.
        """
        path = self.path_for(digest)
        if self._check(digest, path, None) == _TRUSTED:
            return path
        with self._locked(digest):
            if self._settle(digest, path, None):
                return path
            if link and self._link(digest, Path(src), path, verify, durable):
                return path
            self._copy_in(digest, Path(src), path, verify)
        return path

    def add_batch(self, staged: Mapping[str, Path]) -> None:
        """File many verified local files at once (``digest -> file``), then remove them.

        The files must be complete, of the right digest, and on the cache's
        filesystem (e.g. in :meth:`staging`).  One ``syncfs`` makes their bytes
        durable before any is filed, instead of two fsyncs per entry (a
        checkpoint or a fork files hundreds of RAM chunks): a seal or a link
        that a crash loses afterwards only costs a re-hash or a refetch, never
        a trusted entry over unwritten bytes.
        """
        try:
            if staged:
                try:
                    syncfs(self._root)
                except OSError as exc:
                    raise StoreError(f"blob cache {self._root}: {exc}") from exc
            for digest, src in staged.items():
                self.add_local(digest, src, verify=False, link=True, durable=False)
        finally:
            for src in staged.values():
                with suppress(OSError):
                    src.unlink()

    def staging(self) -> Path:
        """A private directory on the cache's filesystem for files about to be filed.

        Names there are ``<digest>.<pid>.<thread>``; the first call of a process
        removes the files of processes that are gone (a crash mid-batch).
        """
        path = self._root / ".staging"
        try:
            private_dir(path)
            with self._mu:
                swept, self._swept = self._swept, True
            if not swept:
                for stale in path.iterdir():
                    if not _pid_alive(stale.name):
                        with suppress(FileNotFoundError):
                            stale.unlink()
        except OSError as exc:
            raise StoreError(f"blob cache {self._root}: cannot use {path}: {exc}") from exc
        return path

    # --- internals: trust -------------------------------------------------
    def _check(self, digest: str, path: Path, size: int | None) -> str:
        """Whether ``path`` can be used as is, without reading it."""
        try:
            st = path.lstat()  # a planted symlink is not an entry: never follow it
        except FileNotFoundError:
            return _ABSENT
        except OSError as exc:
            raise StoreError(f"blob cache {self._root}: cannot stat {path.name}: {exc}") from exc
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.geteuid()
            or stat.S_IMODE(st.st_mode) != _ENTRY_MODE
            or not _sealed(path, digest, st)
        ):
            return _SUSPECT
        if size is not None and st.st_size != size:
            raise IntegrityError(
                f"cached blob {path}", expected=f"{size} bytes", actual=f"{st.st_size} bytes"
            )
        return _TRUSTED

    def _usable(self, digest: str, path: Path, size: int | None) -> bool:
        state = self._check(digest, path, size)
        if state == _SUSPECT:
            with self._locked(digest):
                return self._settle(digest, path, size)
        return state == _TRUSTED

    def _settle(self, digest: str, path: Path, size: int | None) -> bool:
        """Under the digest's lock: is there a usable entry? Re-verify a suspect one.

        A suspect entry of ours whose bytes hash right is resealed and kept
        (an entry of an older forkyard, or one whose seal a copy lost); any
        other suspect is removed so the caller can file the entry again.
        """
        state = self._check(digest, path, size)
        if state != _SUSPECT:
            return state == _TRUSTED
        try:
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                actual, _ = hash_file(path)
                if actual == digest:
                    _reseal(path, digest)
                    return self._check(digest, path, size) == _TRUSTED
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"blob cache {self._root}: cannot drop {path.name}: {exc}") from exc
        return False

    # --- internals: filing ------------------------------------------------
    def _join(self, digest: str) -> tuple[_Flight, bool]:
        with self._mu:
            flight = self._flights.get(digest)
            if flight is not None:
                return flight, False
            flight = self._flights[digest] = _Flight()
            return flight, True

    def _land(self, digest: str) -> None:
        # Removed before waking the waiters, so a caller arriving after a
        # failure starts a fresh attempt instead of inheriting the old error.
        with self._mu:
            del self._flights[digest]

    def _download(
        self,
        digest: str,
        path: Path,
        blobs: BlobStore,
        size: int | None,
        progress: ProgressFn | None,
    ) -> None:
        with self._locked(digest):
            if self._settle(digest, path, size):  # another process fetched it meanwhile
                return
            with self._staged(digest, path) as out:
                blobs.read_blob_into(digest, out, size=size, progress=progress, sparse=True)

    @contextmanager
    def _staged(self, digest: str, path: Path) -> Iterator[BinaryIO]:
        """A temp file beside ``path`` that becomes ``path`` only if the body succeeds."""
        try:
            # fsync'd before the rename: the entry is used without re-hashing after a crash
            with _fs.atomic_write(path, mode=_ENTRY_MODE) as f:
                yield f
                f.flush()
                _seal(f.fileno(), digest)
        except OSError as exc:
            raise StoreError(f"blob cache {self._root}: cannot store {digest}: {exc}") from exc

    def _link(self, digest: str, src: Path, path: Path, verify: bool, durable: bool) -> bool:
        if verify:
            _check(digest, hash_file(src)[0], src)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _seal(fd, digest)  # and 0400, before the link: the entry never has another mode
                if durable:
                    os.fsync(fd)  # the entry is used without re-hashing after a crash
            finally:
                os.close(fd)
            os.link(src, path)
            if durable:
                fsync_dir(path.parent)
        except OSError as exc:
            if exc.errno in _NO_LINK:
                return False
            raise StoreError(f"blob cache {self._root}: cannot link {src}: {exc}") from exc
        return True

    def _copy_in(self, digest: str, src: Path, path: Path, verify: bool) -> None:
        h = hashlib.sha256()
        try:
            with open(src, "rb") as f_in, self._staged(digest, path) as out:
                while chunk := f_in.read(CHUNK_SIZE):
                    h.update(chunk)
                    out.write(chunk)
                if verify:  # checked on the copied bytes, before the entry appears
                    _check(digest, h.hexdigest(), src)
        except OSError as exc:
            raise StoreError(f"blob cache {self._root}: cannot copy {src}: {exc}") from exc

    @contextmanager
    def _locked(self, digest: str) -> Iterator[None]:
        """Exclusive per-digest lock, across threads and processes (flock)."""
        locks = self._root / _LOCK_DIR
        try:
            private_dir(self._root)
            private_dir(self.path_for(digest).parent)
            private_dir(locks)
            fd = _lock_file(locks / f"{digest}.lock")
        except OSError as exc:
            raise StoreError(f"blob cache {self._root}: cannot lock {digest}: {exc}") from exc
        try:
            yield
        finally:
            self._sweep(digest)
            with suppress(OSError):
                os.unlink(locks / f"{digest}.lock")
            os.close(fd)

    def _sweep(self, digest: str) -> None:
        """Drop temp files a crashed process left behind (only we write them now)."""
        prefix = f".{digest}."
        with suppress(OSError), os.scandir(self.path_for(digest).parent) as entries:
            for entry in entries:  # not glob: it compiles a pattern per call
                if entry.name.startswith(prefix) and entry.name.endswith(".part"):
                    with suppress(OSError):
                        os.unlink(entry.path)


def _seal_value(digest: str, st: os.stat_result) -> bytes:
    # The inode, size and mtime change with any rewrite or replacement of the
    # bytes (a write through an fd opened before the entry became 0400, say).
    return f"{digest}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()


def _seal(fd: int, digest: str) -> None:
    """Seal the open entry ``fd`` and leave it 0400."""
    os.fchmod(fd, 0o600)  # user xattrs need write permission, even for the owner
    try:
        os.setxattr(fd, _SEAL, _seal_value(digest, os.fstat(fd)))
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
    os.fchmod(fd, _ENTRY_MODE)


def _sealed(path: Path, digest: str, st: os.stat_result) -> bool:
    try:
        return os.getxattr(path, _SEAL, follow_symlinks=False) == _seal_value(digest, st)
    except OSError as exc:
        # No xattrs here: owner, mode and size are all there is to check.
        return exc.errno in _NO_XATTR


def _reseal(path: Path, digest: str) -> None:
    """Seal an entry whose bytes were just re-verified, and make it 0400."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _seal(fd, digest)
    finally:
        os.close(fd)


def _pid_alive(name: str) -> bool:
    """Whether the process named by a staging file's ``<digest>.<pid>.<x>`` still runs."""
    parts = name.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_file(path: Path) -> int:
    """Open and flock ``path``, retrying if its holder unlinked it meanwhile.

    Holders unlink the lock file before closing it (so lock files do not pile
    up); whoever then gets the lock on the old inode must start over.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _check(digest: str, actual: str, src: Path) -> None:
    if actual != digest:
        raise IntegrityError(f"local file {src}", expected=f"sha256 {digest}", actual=actual)


def _interrupted(digest: str) -> StoreError:
    return StoreError(f"the download of blob {digest} was interrupted")

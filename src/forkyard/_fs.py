"""The one way forkyard writes a file that must be either old or complete, never half.

Every file another process (or this one after a crash) may read while it is
being replaced -- metadata JSON, manifests, cache entries, settings -- is
written through :func:`atomic_write`: a temp file in the same directory,
flushed and fsync'd, renamed over the destination, and the directory fsync'd
so the rename itself survives a power cut.  A file that is complete before it
is published (a download streamed to a temp name, a tool's output) goes
through :func:`commit_file`, a tree through :func:`commit_dir`: the same
fsync-rename-fsync, without copying the bytes again.

Private directories (stores, caches, catalogs that may hold guest memory) are
made with :func:`private_dir`, whose modes do not depend on the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PRIVATE_DIR_MODE",
    "atomic_write",
    "atomic_write_bytes",
    "commit_dir",
    "commit_file",
    "fsync_dir",
    "private_dir",
    "syncfs",
]

PRIVATE_DIR_MODE = 0o700


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Make everything written to ``path``'s filesystem durable: one flush for many files.

    Cheaper than an fsync per file when a batch of files is filed at once
    (a checkpoint's or a fetch's RAM chunks), since each fsync is a journal commit.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {os.fspath(path)}: {os.strerror(err)}")
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike[str], *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Yield a temp file next to ``dest``; when the body succeeds it replaces ``dest``.

    If the body raises, the temp file is removed and ``dest`` (new or
    pre-existing) is left exactly as it was.  ``OSError`` of the mechanism
    passes through for the caller to translate at its boundary.
    """
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            # fsync before the rename: after a crash, dest is old or complete, never empty
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes | str, *,
                       mode: int = 0o600) -> None:
    with atomic_write(dest, mode=mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def commit_file(tmp: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                mode: int | None = None) -> None:
    """Publish the complete file ``tmp`` as ``dest``: fsync, set ``mode``, rename, fsync dir.

    ``tmp`` must be on dest's filesystem (normally in the same directory).
    The mode is set on the open file before the rename, so ``dest`` never
    appears with any other mode.
    """
    target = Path(dest)
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)  # before the rename: after a crash, dest is absent or complete
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def commit_dir(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Publish the finished directory tree ``tmp`` as the (absent) ``dest``.

    Every file and directory in the tree is fsync'd first, so a crash leaves
    ``dest`` absent or whole, never holding empty files.
    """
    root = Path(tmp)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
    target = Path(dest)
    os.rename(root, target)
    fsync_dir(target.parent)


def private_dir(path: str | os.PathLike[str], *, mode: int = PRIVATE_DIR_MODE) -> Path:
    """``mkdir -p path``; every directory this call creates gets exactly ``mode``.

    The mode is set with chmod after mkdir rather than through the umask
    (which is per process, so changing it would race other threads); until
    the chmod the directory is at most ``mode``, since mkdir only drops bits.
    An existing ``path`` of ours with another mode is tightened to ``mode``
    (a directory made before it had to be private); existing parents are left
    as they are.
    """
    target = Path(path)
    with contextlib.suppress(FileNotFoundError):
        st = target.stat()
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(target, mode)
    missing: list[Path] = []
    p = target
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made by a concurrent caller, with the same mode
        os.chmod(d, mode)
    return target

"""The one way forkyard writes a file that must be either old or complete, never half.

Every file another process (or this one after a crash) may read while it is
being replaced -- metadata JSON, manifests, cache entries, settings -- is
written through :func:`atomic_write`: a temp file in the same directory,
flushed and fsync'd, renamed over the destination, and the directory fsync'd
so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

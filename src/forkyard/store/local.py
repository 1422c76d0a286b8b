"""An object store in a local directory (``file:///path``).

Objects are plain read-only files at ``<root>/<key>``. Uploads are staged in
``<root>/.forkyard-staging/`` (same filesystem) and published with
``os.link``, which fails instead of replacing: that single syscall is what
makes puts both atomic and write-once, even between processes.

Objects may be guest memory, so the store is private to its owner (the
worker): objects are 0400 and every directory the store makes is 0700,
whatever the umask.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from forkyard._fs import private_dir
from forkyard.errors import ObjectNotFound, StoreError, UnsafePath
from forkyard.store._base import (
    ObjectStore,
    ProgressFn,
    Readable,
    atomic_write,
    copy_stream,
    fsync_dir,
    guarded_reader,
    is_valid_key,
    refuse_existing,
    validate_key,
    validate_prefix,
)

__all__ = ["LocalStore"]

STAGING_DIR = ".forkyard-staging"
_OBJECT_MODE = 0o400  # immutable (accidental writes fail loudly) and private
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class LocalStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        path = Path(root)
        if not path.is_absolute():
            raise StoreError(f"local store root must be an absolute path, not {str(root)!r}")
        self._root = path
        self._staging = path / STAGING_DIR
        self._stage_prefix = "put-"  # own_uploads makes it this owner's
        if create:
            try:
                private_dir(path)
                private_dir(self._staging)
            except OSError as exc:
                raise StoreError(f"cannot create local store at {path}: {exc}") from exc

    @property
    def url(self) -> str:
        return self._root.as_uri()

    @property
    def root(self) -> Path:
        return self._root

    def own_uploads(self, journal: Path) -> int:
        """Staged uploads are named after ``journal``: those of an earlier process
        with it are removed (other writers' staged files are not touched)."""
        tag = hashlib.sha256(str(journal.resolve()).encode()).hexdigest()[:16]
        self._stage_prefix = f"put-{tag}-"
        removed = 0
        with suppress(OSError):
            for p in self._staging.glob(f"{self._stage_prefix}*.part"):
                with suppress(OSError):
                    p.unlink()
                    removed += 1
        return removed

    # --- reading --------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    def size(self, key: str) -> int:
        st = self._stat(key)
        if st is None:
            raise ObjectNotFound(key)
        return st.st_size

    def open_read(self, key: str) -> BinaryIO:
        f = self._open(key)
        return guarded_reader(f.read, f.close, errors=(OSError,), what=f"{key!r} in {self.url}")

    def read_head(self, key: str, n: int) -> bytes:
        # an fd, no file object: a fork reads a thousand small RAM chunks this way
        path = self._path(key)
        try:
            # O_NONBLOCK: a FIFO planted in the store reads empty, it does not hang
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StoreError(f"cannot open {key!r} in {self.url}: {exc}") from exc
        try:
            out = os.read(fd, n)
            while len(out) < n and (piece := os.read(fd, n - len(out))):
                out += piece
        except IsADirectoryError as exc:  # opens, as a directory does, but is no object
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StoreError(f"reading {key!r} from {self.url} failed: {exc}") from exc
        finally:
            os.close(fd)
        return out

    def get_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
    ) -> int:
        with self._open(key) as src:
            total = os.fstat(src.fileno()).st_size
            with atomic_write(Path(dest)) as out:
                try:
                    return copy_stream(src, out, total=total, progress=progress)
                except OSError as exc:
                    raise StoreError(f"copying {key!r} from {self.url} failed: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        head = prefix.rpartition("/")[0]
        start = self._root.joinpath(*head.split("/")) if head else self._root
        yield from self._walk(start, f"{head}/" if head else "", prefix)

    # --- writing --------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except _MISSING:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete {key!r} from {self.url}: {exc}") from exc

    # --- internals ------------------------------------------------------
    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.partition("/")[0] == STAGING_DIR:
            raise UnsafePath(key, str(self._root))
        return self._root / key

    def _stat(self, key: str) -> os.stat_result | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {key!r} in {self.url}: {exc}") from exc
        return st if stat.S_ISREG(st.st_mode) else None

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb", buffering=0)
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StoreError(f"cannot open {key!r} in {self.url}: {exc}") from exc

    def _put(
        self,
        key: str,
        src: Readable,
        total: int | None,
        progress: ProgressFn | None,
        if_absent: bool,
    ) -> bool:
        final = self._path(key)
        if self._stat(key) is not None:  # cheap early exit; os.link below is the real guard
            return refuse_existing(key, if_absent)
        try:
            private_dir(self._staging)
            fd, tmp_name = tempfile.mkstemp(dir=self._staging, prefix=self._stage_prefix,
                                            suffix=".part")
        except OSError as exc:
            raise StoreError(f"cannot stage an upload in {self._staging}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                copy_stream(src, f, total=total, progress=progress)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), _OBJECT_MODE)
            return self._publish(key, Path(tmp_name), final, if_absent)
        except OSError as exc:
            raise StoreError(f"cannot store {key!r} in {self.url}: {exc}") from exc
        finally:
            with suppress(OSError):
                os.unlink(tmp_name)

    def _publish(self, key: str, tmp: Path, final: Path, if_absent: bool) -> bool:
        private_dir(final.parent)
        try:
            os.link(tmp, final)
        except FileExistsError:
            if self._stat(key) is None:
                raise StoreError(
                    f"cannot store {key!r} in {self.url}: a directory has that name"
                ) from None
            return refuse_existing(key, if_absent)
        fsync_dir(final.parent)
        return True

    def _walk(self, directory: Path, rel: str, prefix: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as it:
                entries = [(e.name + "/" if _is_dir(e) else e.name, e) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot list {directory}: {exc}") from exc
        # Sorting directories as "name/" yields keys in plain string order,
        # which is what S3 listings return.
        for name, entry in sorted(entries, key=lambda pair: pair[0]):
            key = rel + name
            if not rel and entry.name == STAGING_DIR:
                continue
            if name.endswith("/"):
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(Path(entry.path), key, prefix)
            elif (
                key.startswith(prefix)
                and entry.is_file(follow_symlinks=False)
                and is_valid_key(key)
            ):
                yield key


def _is_dir(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir(follow_symlinks=False)

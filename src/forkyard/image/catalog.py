"""Content-addressed catalog of base images.

Layout under ``home.images_dir`` (every directory 0700: the worker is the
only reader, whatever the umask)::

    blobs/<sha256>.ext4       raw ext4 image, mode 0400, never modified
    blobs/.tmp-*.part         in-flight writes (renamed into place or deleted)
    meta/<sha256>.json        ImageMeta without the file list (cheap to list), 0600
    meta/<sha256>.files.json  {guest path: sha256} of the test tree's files, 0600
    names.json                {"format": 1, "names": {name: sha256}}, 0600
    .lock                     flock(2) lock serialising commits

A blob's presence is what makes an image exist: its meta is written first and
the blob renamed into place last, so a crash leaves at worst an orphan meta
file or a ``.tmp-*`` file, never a partial blob under a digest name.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from forkyard._digest import sha256_file
from forkyard._fs import atomic_write_bytes, commit_file, private_dir
from forkyard.config import Home
from forkyard.errors import ImageError, ImageNotFound, IntegrityError
from forkyard.image._meta import (
    DIGEST_RE,
    PREFIX_RE,
    AmbiguousImageRef,
    ImageInfo,
    ImageMeta,
    check_name,
    normalize_digest,
    now,
    opt_int,
    opt_str,
)

__all__ = [
    "AmbiguousImageRef",
    "ImageCatalog",
    "ImageInfo",
    "ImageMeta",
    "check_name",
    "normalize_digest",
]

_FORMAT = 1
_BLOB_MODE = 0o400  # immutable and content-addressed; only the worker reads it
_RECORD_MODE = 0o600
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class ImageCatalog:
    """The images of one home. Safe to use from several threads and processes."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.root = home.images_dir
        self.blobs_dir = self.root / "blobs"
        self.meta_dir = self.root / "meta"
        self.names_file = self.root / "names.json"
        self._lock_file = self.root / ".lock"

    # --- lookup -------------------------------------------------------------
    def get(self, ref: str) -> ImageInfo:
        """Resolve a name, digest, ``sha256:<digest>`` or unique ≥8-hex prefix."""
        return self._info(self.resolve(ref))

    def resolve(self, ref: str) -> str:
        """Like :meth:`get` but only returns the digest."""
        ref = ref.strip()
        names = self._read_names()
        if ref in names:
            digest = names[ref]
            if not self.has(digest):
                raise ImageNotFound(ref)
            return digest
        wanted = ref.lower().removeprefix("sha256:")
        if DIGEST_RE.fullmatch(wanted):
            if not self.has(wanted):
                raise ImageNotFound(ref)
            return wanted
        if not PREFIX_RE.fullmatch(wanted):
            raise ImageNotFound(ref)
        matches = [d for d in self._digests() if d.startswith(wanted)]
        if not matches:
            raise ImageNotFound(ref)
        if len(matches) > 1:
            raise AmbiguousImageRef(ref, matches)
        return matches[0]

    def has(self, digest: str) -> bool:
        try:
            return self._blob(normalize_digest(digest)).is_file()
        except ImageError:
            return False

    def path(self, ref: str) -> Path:
        """Path of the blob; the file is read-only and must never be modified."""
        return self._blob(self.resolve(ref))

    def list(self) -> builtins.list[ImageInfo]:
        infos = [self._info(d) for d in self._digests()]
        return sorted(infos, key=lambda i: (i.created, i.digest))

    def meta(self, ref: str) -> ImageMeta:
        """Full recorded metadata, including the file checksums."""
        digest = self.resolve(ref)
        data = self._read_meta(digest)
        data["files"] = self.file_checksums(digest)
        return ImageMeta.from_json(data)

    def file_checksums(self, ref: str) -> dict[str, str]:
        """{guest absolute path: sha256} recorded for the image's test tree."""
        digest = self.resolve(ref)
        path = self._files_path(digest)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ImageError(f"{path}: unreadable file checksums: {exc}") from exc
        if not isinstance(data, dict):
            raise ImageError(f"{path}: expected a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def verify(self, ref: str) -> None:
        """Re-hash the blob; raise IntegrityError if its bytes no longer match."""
        digest = self.resolve(ref)
        actual = sha256_file(self._blob(digest))
        if actual != digest:
            raise IntegrityError(f"image blob {digest}", expected=digest, actual=actual)

    # --- names --------------------------------------------------------------
    def tag(self, name: str, ref: str) -> ImageInfo:
        """Point ``name`` at the image ``ref`` resolves to (moving it if it existed)."""
        check_name(name)
        digest = self.resolve(ref)
        with self._locked():
            names = self._read_names()
            names[name] = digest
            self._write_names(names)
        return self._info(digest)

    def untag(self, name: str) -> None:
        with self._locked():
            names = self._read_names()
            if names.pop(name, None) is None:
                raise ImageNotFound(name)
            self._write_names(names)

    # --- adding -------------------------------------------------------------
    def add_file(
        self,
        path: Path,
        meta: ImageMeta | None = None,
        *,
        name: str | None = None,
        move: bool = True,
    ) -> ImageInfo:
        """Catalogue a built image file. With ``move`` the file is consumed.

        The digest is computed from the catalog's own copy (the bytes that end
        up under the digest name), not from the caller's file.
        """
        if name is not None:
            check_name(name)
        self._ensure()
        tmp = self._tmp_blob()
        try:
            digest = self._move_in(path, tmp) if move else _copy_hashing(path, tmp)
            return self._commit(tmp, digest, meta or ImageMeta(partial=True), name)
        finally:
            tmp.unlink(missing_ok=True)

    def import_blob(
        self,
        digest: str,
        src_path: Path,
        *,
        meta: ImageMeta | None = None,
        name: str | None = None,
    ) -> ImageInfo:
        """Add a base that arrived from elsewhere; its bytes must hash to ``digest``.

        On mismatch raise IntegrityError and leave nothing behind. ``src_path``
        is copied, never moved.
        """
        digest = normalize_digest(digest)
        if name is not None:
            check_name(name)
        self._ensure()
        if self.has(digest):
            return self._commit(None, digest, meta or ImageMeta(partial=True), name)
        tmp = self._tmp_blob()
        try:
            actual = _copy_hashing(src_path, tmp)
            if actual != digest:
                raise IntegrityError(f"image blob {src_path}", expected=digest, actual=actual)
            return self._commit(tmp, digest, meta or ImageMeta(partial=True), name)
        finally:
            tmp.unlink(missing_ok=True)

    def _move_in(self, src: Path, tmp: Path) -> str:
        try:
            os.rename(src, tmp)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            digest = _copy_hashing(src, tmp)
            src.unlink()
            return digest
        return sha256_file(tmp)

    def _commit(
        self, tmp: Path | None, digest: str, meta: ImageMeta, name: str | None
    ) -> ImageInfo:
        with self._locked():
            blob = self._blob(digest)
            if blob.is_file():
                self._maybe_upgrade_meta(digest, meta)
            else:
                if tmp is None:
                    raise ImageNotFound(digest)
                self._write_meta(digest, meta, size=tmp.stat().st_size)
                commit_file(tmp, blob, mode=_BLOB_MODE)
            if name is not None:
                names = self._read_names()
                names[name] = digest
                self._write_names(names)
        return self._info(digest)

    def _maybe_upgrade_meta(self, digest: str, meta: ImageMeta) -> None:
        # First writer wins, except that a blob imported without metadata
        # takes the full record of a later build or import of the same bytes.
        if meta.partial:
            return
        try:
            current = self._read_meta(digest)
        except ImageError:
            current = {"partial": True}
        if current.get("partial", False):
            self._write_meta(digest, meta, size=self._blob(digest).stat().st_size)

    # --- on-disk records ------------------------------------------------------
    def _ensure(self) -> None:
        for d in (self.root, self.blobs_dir, self.meta_dir):
            private_dir(d)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure()
        # flock locks belong to the open file description, so this serialises
        # threads of one process as well as separate processes.
        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _blob(self, digest: str) -> Path:
        return self.blobs_dir / f"{digest}.ext4"

    def _meta_path(self, digest: str) -> Path:
        return self.meta_dir / f"{digest}.json"

    def _files_path(self, digest: str) -> Path:
        return self.meta_dir / f"{digest}.files.json"

    def _tmp_blob(self) -> Path:
        return self.blobs_dir / f".tmp-{os.getpid()}-{secrets.token_hex(8)}.part"

    def _digests(self) -> builtins.list[str]:
        try:
            names = os.listdir(self.blobs_dir)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            stem, dot, ext = n.partition(".")
            if dot and ext == "ext4" and DIGEST_RE.fullmatch(stem):
                out.append(stem)
        return sorted(out)

    def _write_meta(self, digest: str, meta: ImageMeta, *, size: int) -> None:
        record = meta.to_json()
        files = record.pop("files")
        record.update(
            format=_FORMAT,
            digest=digest,
            size=size,
            created=meta.created or now(),
            file_count=len(files),
        )
        atomic_write_bytes(self._files_path(digest), _dumps(files), mode=_RECORD_MODE)
        atomic_write_bytes(self._meta_path(digest), _dumps(record), mode=_RECORD_MODE)

    def _read_meta(self, digest: str) -> dict[str, Any]:
        path = self._meta_path(digest)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ImageError(f"{path}: unreadable image meta: {exc}") from exc
        if not isinstance(data, dict):
            raise ImageError(f"{path}: expected a JSON object")
        return data

    def _info(self, digest: str) -> ImageInfo:
        blob = self._blob(digest)
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            raise ImageNotFound(digest) from None
        try:
            data = self._read_meta(digest)
        except ImageError:
            # A blob without meta (crash between writes, or copied in by
            # hand) is still a valid image: its bytes are its identity.
            data = {"partial": True}
        names = tuple(sorted(n for n, d in self._read_names().items() if d == digest))
        return ImageInfo(
            digest=digest,
            size=size,
            path=blob,
            names=names,
            e2fsprogs=opt_str(data.get("e2fsprogs")),
            source=str(data.get("source", "unknown")),
            reproducible=bool(data.get("reproducible", False)),
            tree_digest=opt_str(data.get("tree_digest")),
            created=str(data.get("created", "")),
            test_tree=opt_str(data.get("test_tree")),
            epoch=opt_int(data.get("epoch")),
            fs_uuid=opt_str(data.get("fs_uuid")),
            file_count=int(data.get("file_count", 0)),
        )

    def _read_names(self) -> dict[str, str]:
        try:
            data = json.loads(self.names_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ImageError(f"{self.names_file}: unreadable: {exc}") from exc
        names = data.get("names") if isinstance(data, dict) else None
        if not isinstance(names, dict):
            raise ImageError(f"{self.names_file}: missing 'names' object")
        return {str(k): str(v) for k, v in names.items()}

    def _write_names(self, names: Mapping[str, str]) -> None:
        atomic_write_bytes(
            self.names_file, _dumps({"format": _FORMAT, "names": dict(names)}), mode=_RECORD_MODE
        )


def _dumps(data: object) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy ``src`` to the new file ``dst``, hashing the bytes written; fsync.

    All-zero chunks become holes: an ext4 image is mostly free space, and
    blobs should stay as sparse as the mkfs output they came from.
    """
    h = hashlib.sha256()
    # 0600 from creation on: the umask must not open the copy up, even briefly
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _RECORD_MODE)
    with open(src, "rb") as fin, open(fd, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            if chunk == _ZEROS[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()
    return h.hexdigest()  # fsync'd when committed


"""Content-addressed catalog of base images.

Layout under ``home.images_dir``::

    blobs/<sha256>.ext4       raw ext4 image, mode 0444, never modified
    blobs/.tmp-*.part         in-flight writes (renamed into place or deleted)
    meta/<sha256>.json        ImageMeta without the file list (cheap to list)
    meta/<sha256>.files.json  {guest path: sha256} of the test tree's files
    names.json                {"format": 1, "names": {name: sha256}}
    .lock                     flock(2) lock serialising commits

A blob's presence is what makes an image exist: its meta is written first and
the blob renamed into place last, so a crash leaves at worst an orphan meta
file or a ``.tmp-*`` file, never a partial blob under a digest name.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkyard._digest import sha256_file
from forkyard.config import Home
from forkyard.errors import ImageError, ImageNotFound, IntegrityError

__all__ = [
    "AmbiguousImageRef",
    "ImageCatalog",
    "ImageInfo",
    "ImageMeta",
    "check_name",
    "normalize_digest",
]

_FORMAT = 1
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_PREFIX_RE = re.compile(r"[0-9a-f]{8,64}")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A name that looks like a digest prefix would make `get` ambiguous.
_HEXISH_RE = re.compile(r"[0-9a-f]{8,}")
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


class AmbiguousImageRef(ImageNotFound):
    """A digest prefix matches more than one image."""

    def __init__(self, ref: str, matches: list[str]) -> None:
        super().__init__(ref)
        self.matches = matches
        shown = ", ".join(m[:16] for m in matches[:5])
        self.args = (f"image reference {ref!r} is ambiguous: it matches {shown}",)


def normalize_digest(value: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` → lowercase hex; anything else raises ImageError."""
    digest = value.strip().lower().removeprefix("sha256:")
    if not _DIGEST_RE.fullmatch(digest):
        raise ImageError(f"not a sha256 digest: {value!r}")
    return digest


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """What is known about an image besides its bytes (all optional for imports)."""

    source: str = "unknown"
    reproducible: bool = False
    e2fsprogs: str | None = None
    tree_digest: str | None = None
    test_tree: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    epoch: int | None = None
    fs_uuid: str | None = None
    created: str | None = None
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["files"] = dict(self.files)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        files = kwargs.get("files", {})
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise ImageError("image meta: 'files' must map guest paths to sha256 strings")
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """One catalogued base image. Identity is ``digest`` (sha256 of the bytes)."""

    digest: str
    size: int
    path: Path
    names: tuple[str, ...]
    e2fsprogs: str | None
    source: str
    reproducible: bool
    tree_digest: str | None
    created: str
    test_tree: str | None
    epoch: int | None = None
    fs_uuid: str | None = None
    file_count: int = 0

    @property
    def ref(self) -> str:
        return f"sha256:{self.digest}"


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
        if _DIGEST_RE.fullmatch(wanted):
            if not self.has(wanted):
                raise ImageNotFound(ref)
            return wanted
        if not _PREFIX_RE.fullmatch(wanted):
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
        _fsync_path(tmp)
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
                os.chmod(tmp, 0o444)
                os.replace(tmp, blob)
                _fsync_dir(self.blobs_dir)
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
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure()
        # flock locks belong to the open file description, so this serialises
        # threads of one process as well as separate processes.
        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
            if dot and ext == "ext4" and _DIGEST_RE.fullmatch(stem):
                out.append(stem)
        return sorted(out)

    def _write_meta(self, digest: str, meta: ImageMeta, *, size: int) -> None:
        record = meta.to_json()
        files = record.pop("files")
        record.update(
            format=_FORMAT,
            digest=digest,
            size=size,
            created=meta.created or _now(),
            file_count=len(files),
        )
        _atomic_write(self._files_path(digest), _dumps(files))
        _atomic_write(self._meta_path(digest), _dumps(record))

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
            e2fsprogs=_opt_str(data.get("e2fsprogs")),
            source=str(data.get("source", "unknown")),
            reproducible=bool(data.get("reproducible", False)),
            tree_digest=_opt_str(data.get("tree_digest")),
            created=str(data.get("created", "")),
            test_tree=_opt_str(data.get("test_tree")),
            epoch=_opt_int(data.get("epoch")),
            fs_uuid=_opt_str(data.get("fs_uuid")),
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
        _atomic_write(self.names_file, _dumps({"format": _FORMAT, "names": dict(names)}))


def check_name(name: str) -> None:
    """Raise ImageError unless ``name`` is a valid image name."""
    if not _NAME_RE.fullmatch(name) or _HEXISH_RE.fullmatch(name):
        raise ImageError(
            f"invalid image name {name!r}: use 1-64 of [a-z0-9._-], starting with a letter "
            "or digit, and not something that looks like a digest"
        )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _dumps(data: object) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy ``src`` to the new file ``dst``, hashing the bytes written; fsync.

    All-zero chunks become holes: an ext4 image is mostly free space, and
    blobs should stay as sparse as the mkfs output they came from.
    """
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            if chunk == _ZEROS[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


"""Content-addressed blobs (zstd, named by the sha256 of the raw bytes), on both backends."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pytest
import zstandard

from forkyard.errors import IntegrityError, ObjectNotFound, StoreError, UnsafePath
from forkyard.store import (
    BlobRef,
    BlobStore,
    ObjectStore,
    ProgressFn,
    Readable,
    blob_key,
)
from forkyard.store.blobs import canonical_json
from tests.fixtures.store_backends import Backend, MiB

if TYPE_CHECKING:
    pass


class CountingStore(ObjectStore):
    """Delegates to a real store and counts uploads and downloads."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.puts = 0
        self.reads = 0

    @property
    def url(self) -> str:
        return self.inner.url

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def _put(
        self,
        key: str,
        src: Readable,
        total: int | None,
        progress: ProgressFn | None,
        if_absent: bool,
    ) -> bool:
        self.puts += 1
        return self.inner._put(key, src, total, progress, if_absent)

    def get_file(
        self, key: str, dest: str | os.PathLike[str], *, progress: ProgressFn | None = None
    ) -> int:
        self.reads += 1
        return self.inner.get_file(key, dest, progress=progress)

    def open_read(self, key: str) -> BinaryIO:
        self.reads += 1
        return self.inner.open_read(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sample(size: int = 3 * MiB) -> bytes:
    """Half text-like (compressible), half random (not)."""
    text = (b"forkyard checkpoint layer " * (size // 52 + 1))[: size // 2]
    return text + os.urandom(size - len(text))


# --- naming and format ---------------------------------------------------------------
def test_blob_is_named_by_uncompressed_digest_and_stored_compressed(
    backend: Backend, tmp_path: Path
) -> None:
    data = sample()
    blobs = BlobStore(backend.store)
    ref = blobs.put_blob(write(tmp_path / "f", data))
    assert ref == BlobRef(sha(data), len(data), ref.stored_size)
    raw = backend.store.get_bytes(blob_key(ref.digest), max_size=len(data))
    assert raw[:4] == b"\x28\xb5\x2f\xfd"  # zstd magic
    assert len(raw) == ref.stored_size < len(data)
    assert zstandard.ZstdDecompressor().decompress(raw) == data
    assert list(backend.store.list()) == [f"blobs/{ref.digest[:2]}/{ref.digest}"]
    assert blobs.has_blob(ref.digest)
    assert list(blobs.list_blobs()) == [ref.digest]


def test_get_blob_roundtrip_with_progress(backend: Backend, tmp_path: Path) -> None:
    data = sample(9 * MiB)
    blobs = BlobStore(backend.store)
    up: list[tuple[int, int | None]] = []
    ref = blobs.put_blob(write(tmp_path / "f", data), progress=lambda d, t: up.append((d, t)))
    assert len(up) > 1 and up[-1] == (len(data), len(data))
    down: list[tuple[int, int | None]] = []
    dest = tmp_path / "out" / "f"
    got = blobs.get_blob(
        ref.digest, dest, size=len(data), progress=lambda d, t: down.append((d, t))
    )
    assert got == ref
    assert dest.read_bytes() == data
    assert len(down) > 1 and down[-1] == (len(data), len(data))


def test_empty_blob_roundtrip(backend: Backend, tmp_path: Path) -> None:
    blobs = BlobStore(backend.store)
    ref = blobs.put_blob(write(tmp_path / "empty", b""))
    assert ref.digest == sha(b"") and ref.size == 0 and ref.stored_size > 0
    assert blobs.get_blob(ref.digest, tmp_path / "out") == ref
    assert (tmp_path / "out").read_bytes() == b""


def test_get_blob_writes_zero_runs_as_holes(backend: Backend, tmp_path: Path) -> None:
    data = bytes(16 * MiB) + os.urandom(MiB) + bytes(16 * MiB)  # like a mostly empty disk
    blobs = BlobStore(backend.store)
    ref = blobs.put_blob(write(tmp_path / "disk.img", data))
    assert ref.stored_size < MiB + 64 * 1024
    dest = tmp_path / "restored.img"
    blobs.get_blob(ref.digest, dest)
    assert sha(dest.read_bytes()) == ref.digest
    assert dest.stat().st_size == len(data)
    assert dest.stat().st_blocks * 512 <= MiB + 128 * 1024  # the 32 MiB of zeros take no space


# --- dedup ----------------------------------------------------------------------------
def test_stored_blob_is_not_uploaded_again(backend: Backend, tmp_path: Path) -> None:
    counting = CountingStore(backend.store)
    blobs = BlobStore(counting)
    path = write(tmp_path / "base.img", sample())
    first = blobs.put_blob(path)
    assert counting.puts == 1
    assert blobs.put_blob(path) == first
    assert blobs.put_blob(path, digest=first.digest) == first
    # Another worker with its own BlobStore over the same store: bases travel once.
    other = CountingStore(backend.store)
    assert BlobStore(other).put_blob(write(tmp_path / "copy.img", path.read_bytes())) == first
    assert (counting.puts, other.puts) == (1, 0)


# --- integrity ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["magic", "middle", "checksum"])
def test_corrupt_byte_is_an_integrity_error(backend: Backend, tmp_path: Path, where: str) -> None:
    blobs = BlobStore(backend.store)
    ref = blobs.put_blob(write(tmp_path / "f", sample()))
    key = blob_key(ref.digest)
    raw = bytearray(backend.store.get_bytes(key, max_size=ref.stored_size))
    pos = {"magic": 0, "middle": len(raw) // 2, "checksum": len(raw) - 1}[where]
    raw[pos] ^= 0x40
    backend.tamper(key, bytes(raw))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(IntegrityError) as info:
        blobs.get_blob(ref.digest, out_dir / "f")
    assert key in str(info.value)
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("cut", [1, 4, 5, "half", "all"])
def test_truncated_object_is_an_integrity_error(
    backend: Backend, tmp_path: Path, cut: int | str
) -> None:
    blobs = BlobStore(backend.store)
    ref = blobs.put_blob(write(tmp_path / "f", sample()))
    key = blob_key(ref.digest)
    raw = backend.store.get_bytes(key, max_size=ref.stored_size)
    keep = len(raw) // 2 if cut == "half" else 0 if cut == "all" else len(raw) - int(cut)
    backend.tamper(key, raw[:keep])
    dest = tmp_path / "out"
    with pytest.raises(IntegrityError) as info:
        blobs.get_blob(ref.digest, dest)
    assert key in str(info.value)
    assert not dest.exists()


def test_wrong_size_is_an_integrity_error(backend: Backend, tmp_path: Path) -> None:
    blobs = BlobStore(backend.store)
    data = sample()
    ref = blobs.put_blob(write(tmp_path / "f", data))
    for size in (len(data) - 1, len(data) + 1):
        with pytest.raises(IntegrityError, match=f"expected {size} bytes"):
            blobs.get_blob(ref.digest, tmp_path / "out", size=size)
        assert not (tmp_path / "out").exists()


def test_object_under_another_digest_is_an_integrity_error(
    backend: Backend, tmp_path: Path
) -> None:
    """A valid blob stored under the wrong name (e.g. a buggy writer) is caught by the hash."""
    blobs = BlobStore(backend.store)
    ref = blobs.put_blob(write(tmp_path / "f", b"real content"))
    wrong = sha(b"something else")
    backend.tamper(blob_key(wrong), backend.store.get_bytes(blob_key(ref.digest), max_size=MiB))
    with pytest.raises(IntegrityError) as info:
        blobs.get_blob(wrong, tmp_path / "out")
    assert info.value.expected == f"sha256 {wrong}" and info.value.actual == ref.digest


@pytest.mark.parametrize("size", [100_000, 13 * MiB], ids=["single", "multipart"])
def test_wrong_digest_on_put_stores_nothing(backend: Backend, tmp_path: Path, size: int) -> None:
    blobs = BlobStore(backend.store)
    data = os.urandom(size)  # incompressible: the multipart path is really taken on S3
    claimed = sha(b"not this file")
    with pytest.raises(IntegrityError) as info:
        blobs.put_blob(write(tmp_path / "f", data), digest=claimed)
    assert info.value.actual == sha(data)
    assert not blobs.has_blob(claimed)
    assert list(backend.store.list()) == []
    assert backend.leftovers() == []


def test_put_blob_with_correct_digest(backend: Backend, tmp_path: Path) -> None:
    data = sample()
    ref = BlobStore(backend.store).put_blob(write(tmp_path / "f", data), digest=sha(data))
    assert ref.digest == sha(data) and ref.size == len(data)


def test_missing_blob_and_bad_digests(backend: Backend, tmp_path: Path) -> None:
    blobs = BlobStore(backend.store)
    with pytest.raises(ObjectNotFound):
        blobs.get_blob(sha(b"never stored"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for bad in ("../../etc/passwd", "A" * 64, sha(b"x")[:-1]):
        with pytest.raises(UnsafePath):
            blobs.get_blob(bad, tmp_path / "out")
        with pytest.raises(UnsafePath):
            blobs.has_blob(bad)
        with pytest.raises(UnsafePath):
            blobs.put_blob(write(tmp_path / "f", b"x"), digest=bad)


# --- JSON documents ------------------------------------------------------------------
def test_json_roundtrip_is_write_once_and_canonical(backend: Backend) -> None:
    blobs = BlobStore(backend.store)
    doc = {"b": [1, 2], "a": "é"}
    assert blobs.put_json_once("checkpoints/c1.json", doc) is True
    assert backend.store.get_bytes("checkpoints/c1.json", max_size=100) == canonical_json(doc)
    assert canonical_json(doc) == '{"a":"é","b":[1,2]}'.encode()
    assert blobs.put_json_once("checkpoints/c1.json", {"other": True}) is False
    assert blobs.get_json("checkpoints/c1.json") == doc


def test_json_content_addressed_digest_is_verified(backend: Backend) -> None:
    blobs = BlobStore(backend.store)
    doc = {"layer": "x"}
    digest = sha(canonical_json(doc))
    key = f"manifests/{digest}.json"
    with pytest.raises(IntegrityError):
        blobs.put_json_once(key, {"layer": "y"}, expect_digest=digest)
    assert not backend.store.exists(key)
    assert blobs.put_json_once(key, doc, expect_digest=digest)
    assert blobs.get_json(key, expect_digest=digest) == doc
    backend.tamper(key, b'{"layer":"z"}')
    with pytest.raises(IntegrityError):
        blobs.get_json(key, expect_digest=digest)


def test_json_size_caps_and_garbage(backend: Backend) -> None:
    blobs = BlobStore(backend.store)
    with pytest.raises(StoreError, match="over 10"):
        blobs.put_json_once("doc.json", {"x": "a long value"}, max_size=10)
    assert not backend.store.exists("doc.json")
    assert blobs.put_json_once("doc.json", {"x": "a long value"})
    with pytest.raises(StoreError, match="larger than 10 bytes"):
        blobs.get_json("doc.json", max_size=10)
    backend.store.put_bytes("garbage.json", b"\xff{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        blobs.get_json("garbage.json")
    with pytest.raises(StoreError, match="reserved"):
        blobs.put_json_once(f"blobs/ab/{'a' * 64}", {})


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_put_blob_source_read_errors_are_store_errors(backend: Backend, tmp_path: Path) -> None:
    blobs = BlobStore(backend.store)
    with pytest.raises(StoreError):
        blobs.put_blob(tmp_path / "does-not-exist")
    with pytest.raises(StoreError):
        blobs.put_blob(tmp_path)  # a directory
    assert list(backend.store.list()) == []


def test_bytes_moved_to_and_from_the_store_are_counted(tmp_path):
    # what /metrics of a worker reports: compressed bytes that crossed, once each
    from forkyard.store import open_store
    from forkyard.store.blobs import BlobStore

    blobs = BlobStore(open_store((tmp_path / "s").as_uri()))
    src = tmp_path / "f"
    src.write_bytes(os.urandom(100_000))
    ref = blobs.put_blob(src)
    assert blobs.uploaded_bytes == ref.stored_size > 0
    blobs.put_blob(src)  # already stored: nothing moves
    assert blobs.uploaded_bytes == ref.stored_size
    got = blobs.get_blob(ref.digest, tmp_path / "g")
    assert blobs.downloaded_bytes == got.stored_size == ref.stored_size


@pytest.mark.parametrize("planted", ["fifo", "directory"])
def test_a_small_blob_planted_as_no_regular_file_fails_at_once(tmp_path: Path,
                                                               planted: str) -> None:
    """A FIFO at a blob's key reads empty (an open that waited for a writer would hang
    the fork); a directory is no object."""
    from forkyard.store import open_store

    store = open_store(f"file://{tmp_path}/store")
    blobs = BlobStore(store)
    data = b"chunk" * 1000
    ref = blobs.put_blob(write(tmp_path / "f", data))
    path = tmp_path / "store" / blob_key(ref.digest)
    path.unlink()
    if planted == "fifo":
        os.mkfifo(path)
        with pytest.raises(IntegrityError, match="complete zstd frames"):
            blobs.get_small_blob(ref.digest, size=len(data))
    else:
        path.mkdir()
        with pytest.raises(ObjectNotFound):
            blobs.get_small_blob(ref.digest, size=len(data))

"""Private files: the local store, the blob cache and the image catalog hold guest disks and
memory, so only the worker may read them -- whatever the umask of the process that made them.

Every test runs under umask 000: a mode that came from the umask instead of an explicit
chmod would show up as world-readable here.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from forkyard.config import Home
from forkyard.image import ImageCatalog, ImageMeta
from forkyard.store import BlobCache, BlobStore, LocalStore

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CountingStore(LocalStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0

    def open_read(self, key: str) -> BinaryIO:
        self.reads += 1
        return super().open_read(key)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


@pytest.fixture
def blob(store: CountingStore, tmp_path: Path) -> tuple[str, bytes]:
    data = os.urandom(MiB) + bytes(MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    return BlobStore(store).put_blob(src).digest, data


# --- the local store ----------------------------------------------------------------
def test_local_store_objects_and_directories_are_private(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "deep" / "store")
    store.put_bytes("checkpoints/ab/manifest.json", b"{}")
    root = tmp_path / "deep" / "store"
    for d in (tmp_path / "deep", root, root / ".forkyard-staging", root / "checkpoints",
              root / "checkpoints" / "ab"):
        assert mode(d) == 0o700, d
    obj = root / "checkpoints" / "ab" / "manifest.json"
    assert mode(obj) == 0o400
    assert obj.stat().st_uid == os.geteuid()
    store.get_file("checkpoints/ab/manifest.json", tmp_path / "copy")
    assert mode(tmp_path / "copy") == 0o600  # a download may be guest memory too


def test_local_store_tightens_a_root_made_before_it_was_private(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    LocalStore(root)
    assert mode(root) == 0o700


# --- the blob cache -------------------------------------------------------------------
def test_fetched_cache_entry_and_its_directories_are_private(
    store: CountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache" / "blobs")
    path = cache.fetch(digest, BlobStore(store))
    assert path.read_bytes() == data
    assert mode(path) == 0o400 and path.stat().st_uid == os.geteuid()
    for d in (tmp_path / "cache", cache.root, path.parent, cache.root / ".locks"):
        assert mode(d) == 0o700, d


@pytest.mark.parametrize("link", [True, False])
def test_added_cache_entry_is_private(tmp_path: Path, link: bool) -> None:
    data = os.urandom(50_000)
    src = tmp_path / "layer.qcow2"
    src.write_bytes(data)
    assert mode(src) == 0o666  # the umask really is permissive
    cache = BlobCache(tmp_path / "cache")
    path = cache.add_local(sha(data), src, link=link)
    assert mode(path) == 0o400
    assert mode(cache.root) == 0o700 and mode(path.parent) == 0o700
    assert cache.path_if_present(sha(data)) == path


def test_a_planted_entry_with_wrong_bytes_is_dropped_not_used(
    store: CountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    entry = cache.path_for(digest)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"\0" * len(data))  # right name, right size, right mode: wrong bytes
    os.chmod(entry, 0o400)
    assert cache.path_if_present(digest) is None
    assert not entry.exists()
    assert cache.fetch(digest, BlobStore(store), size=len(data)).read_bytes() == data
    assert store.reads == 1


def test_an_entry_modified_after_it_was_filed_is_not_trusted(
    store: CountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    blobs = BlobStore(store)
    path = cache.fetch(digest, blobs)
    time.sleep(0.05)  # a new tick of the file-time clock
    # what a process holding a writable fd from before the entry became 0400 could do
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"evil")
    os.chmod(path, 0o400)
    assert cache.path_if_present(digest) is None  # re-hashed, found wrong, removed
    assert cache.fetch(digest, blobs).read_bytes() == data
    assert store.reads == 2


def test_an_entry_of_another_owner_is_not_trusted_even_with_the_right_bytes(
    store: CountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to plant a file owned by another uid")
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    entry = cache.path_for(digest)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(data)
    os.chmod(entry, 0o400)
    os.chown(entry, 65534, 65534)  # its owner could rewrite it at any time
    path = cache.fetch(digest, BlobStore(store))
    assert store.reads == 1
    assert path.stat().st_uid == 0 and mode(path) == 0o400 and path.read_bytes() == data


def test_an_entry_of_an_older_forkyard_is_rehashed_once_and_kept(
    store: CountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    entry = cache.path_for(digest)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(data)  # the right bytes, but 0444 and never sealed
    os.chmod(entry, 0o444)
    assert cache.path_if_present(digest) == entry
    assert mode(entry) == 0o400
    assert cache.fetch(digest, BlobStore(store)) == entry
    assert store.reads == 0  # no download: the bytes were verified in place


def test_add_local_replaces_a_planted_entry(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    src = tmp_path / "state"
    src.write_bytes(data)
    cache = BlobCache(tmp_path / "cache")
    entry = cache.path_for(sha(data))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"planted")
    path = cache.add_local(sha(data), src, verify=True)
    assert path.read_bytes() == data and mode(path) == 0o400


# --- the image catalog ------------------------------------------------------------------
def test_catalog_blobs_records_and_directories_are_private(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home")
    catalog = ImageCatalog(home)
    src = tmp_path / "img"
    src.write_bytes(b"image bytes")
    info = catalog.add_file(src, ImageMeta(source="test"), name="img")
    for d in (catalog.root, catalog.blobs_dir, catalog.meta_dir):
        assert mode(d) == 0o700, d
    assert mode(info.path) == 0o400
    for f in (catalog.names_file, catalog.meta_dir / f"{info.digest}.json",
              catalog.meta_dir / f"{info.digest}.files.json", catalog.root / ".lock"):
        assert mode(f) == 0o600, f


def test_catalog_import_is_private(tmp_path: Path) -> None:
    catalog = ImageCatalog(Home.at(tmp_path / "home"))
    src = tmp_path / "img"
    src.write_bytes(b"imported" * 1000)
    info = catalog.import_blob(sha(src.read_bytes()), src)
    assert mode(info.path) == 0o400
    assert mode(src) == 0o666  # copied, not moved or changed


def test_home_keeps_guest_data_directories_private(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home").ensure()
    for d in (home.images_dir, home.cache_dir, home.tmp_dir):
        assert mode(d) == 0o700, d

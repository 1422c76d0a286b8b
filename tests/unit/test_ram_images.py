"""A worker's RAM images without a VM: built from store chunks, verified, filed later.

What a fork on another worker relies on (issue 9's cross-worker target, issue
14's "fetch only what they lack"): chunks come from the store verified before
any byte lands in an image, a chunk is fetched once per worker (a build
copies the chunks of an earlier build that are not filed yet), a bad chunk
leaves nothing behind, and QEMU's early mapping of an image still filling is
checked for writes (``written_kb``).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from forkyard.checkpoint.chunks import ChunkRef, RamImageRef
from forkyard.checkpoint.ram_images import RamImages
from forkyard.errors import IntegrityError
from forkyard.store import BlobCache, BlobStore, LocalStore, blob_key
from forkyard.vm.ram import RamFile, written_kb

CHUNK = 64 * 1024
SIZE = 64 * CHUNK  # a 4 MiB "guest"


def _image(store: BlobStore, tmp: Path, pattern: dict[int, bytes]) -> RamImageRef:
    """An image with ``pattern[i]`` (one byte, repeated) in chunk i, stored chunk by chunk."""
    chunks = []
    for i, byte in sorted(pattern.items()):
        data = byte * CHUNK
        src = tmp / f"chunk-{i}"
        src.write_bytes(data)
        store.put_blob(src)
        chunks.append(ChunkRef(i * CHUNK, CHUNK, hashlib.sha256(data).hexdigest()))
    return RamImageRef(SIZE, CHUNK, tuple(chunks))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[RamImages, BlobStore, BlobCache]]:
    store = BlobStore(LocalStore(tmp_path / "store"))
    cache = BlobCache(tmp_path / "cache")
    images = RamImages(cache, store)
    yield images, store, cache
    images.close()


def _read(image: RamFile) -> bytes:
    return os.pread(image.fd, image.size, 0)


def test_an_image_is_built_from_store_chunks_then_its_chunks_are_cached(world, tmp_path: Path
                                                                        ) -> None:
    images, store, cache = world
    ref = _image(store, tmp_path, {0: b"a", 5: b"b", 6: b"a", 63: b"c"})
    image = images.get(ref, what="test")
    try:
        assert image.sealed
        data = _read(image)
        assert data[:CHUNK] == b"a" * CHUNK and data[6 * CHUNK:7 * CHUNK] == b"a" * CHUNK
        assert data[5 * CHUNK:6 * CHUNK] == b"b" * CHUNK and data[-CHUNK:] == b"c" * CHUNK
        assert data[CHUNK:5 * CHUNK] == bytes(4 * CHUNK)  # chunks not listed are zero
    finally:
        image.release()
    images.drain()
    assert all(cache.path_if_present(c.digest) for c in ref.chunks)
    # the repeated chunk travelled once
    assert store.downloaded_bytes == sum(store.store.size(blob_key(d))
                                         for d in {c.digest for c in ref.chunks})


def test_a_second_image_takes_unfiled_chunks_from_the_first(world, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    images, store, cache = world
    first = _image(store, tmp_path, {0: b"a", 1: b"b"})
    second = _image(store, tmp_path, {0: b"a", 1: b"b", 2: b"z"})
    gate = threading.Event()
    images._filer.submit(gate.wait)  # the filer is busy: nothing gets filed yet
    try:
        images.get(first, what="k").release()
        before = store.downloaded_bytes
        image = images.get(second, what="k+1")
        try:
            assert _read(image)[:3 * CHUNK] == b"a" * CHUNK + b"b" * CHUNK + b"z" * CHUNK
        finally:
            image.release()
        assert cache.path_if_present(first.chunks[0].digest) is None  # still pending
        assert store.downloaded_bytes - before == store.store.size(
            blob_key(second.chunks[2].digest))  # only the chunk it lacked
    finally:
        gate.set()
    images.drain()
    assert all(cache.path_if_present(c.digest) for c in second.chunks)


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap", "longer", "huge", "bomb",
                                    "missing"])
def test_a_bad_chunk_fails_the_build_and_leaves_nothing(world, tmp_path: Path, damage: str
                                                        ) -> None:
    images, store, cache = world
    ref = _image(store, tmp_path, {i: bytes([65 + i]) for i in range(8)})
    bad = ref.chunks[3]
    key = blob_key(bad.digest)
    good = store.store.get_bytes(key, max_size=1 << 20)
    damaged = {
        "flip": good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0x40])
        + good[len(good) // 2 + 1:],
        "truncate": good[:-7],
        # a valid blob, of other bytes
        "swap": store.store.get_bytes(blob_key(ref.chunks[4].digest), max_size=1 << 20),
        # the right bytes and then more: refused without reading past one extra byte
        "longer": zstandard.ZstdCompressor().compress(bytes([68]) * CHUNK + b"!" * (8 << 20)),
        # more compressed bytes than any chunk of this size needs: not read whole
        "huge": good + os.urandom(2 * CHUNK + 65536),
        # a few KiB that expand to 256 MiB: never decompressed past the chunk's size
        "bomb": zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20)),
        "missing": None,
    }[damage]
    store.store.delete(key)
    if damaged is not None:
        store.store.put_bytes(key, damaged)
    tracemalloc.start()
    try:
        build = images.open(ref, what="checkpoint x")
        with pytest.raises(IntegrityError) as e:
            build.ready()
        build.image.release()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * CHUNK + (len(damaged or b"") * 3)  # O(chunk), whatever the blob says
    assert "checkpoint x RAM chunk 3 " in str(e.value) and bad.digest in str(e.value)
    if damage == "missing":
        assert e.value.actual == "no such blob"
    images.drain()
    assert cache.path_if_present(bad.digest) is None
    assert not list(cache.staging().iterdir())  # nothing half-filed left behind
    # the failed build is forgotten: once the store is repaired, it builds
    store.store.delete(key)
    store.store.put_bytes(key, good)
    image = images.get(ref, what="again")
    try:
        assert _read(image)[3 * CHUNK:4 * CHUNK] == bytes([68]) * CHUNK
    finally:
        image.release()


def test_concurrent_opens_build_one_image(world, tmp_path: Path) -> None:
    images, store, _ = world
    ref = _image(store, tmp_path, {i: bytes([97 + i % 20]) for i in range(40)})
    got: list[RamFile] = []
    mu = threading.Lock()

    def fork() -> None:
        image = images.get(ref, what="t")
        with mu:
            got.append(image)

    threads = [threading.Thread(target=fork) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len({id(i) for i in got}) == 1
        assert store.downloaded_bytes == sum(store.store.size(blob_key(d))
                                             for d in {c.digest for c in ref.chunks})
    finally:
        for image in got:
            image.release()


def test_written_kb_sees_writes_to_a_private_image_mapping_not_reads() -> None:
    image = RamFile.blank_image(16 * 4096)
    try:
        os.pwrite(image.fd, b"x" * 4096, 0)
        m = mmap.mmap(image.fd, image.size, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            assert m[:1] == b"x" and m[4096 * 5] == 0  # read faults: still the file's pages
            assert written_kb(os.getpid()) == 0
            m[4096 * 3] = 1  # a write: a private copy
            m[4096 * 9] = 1
            assert written_kb(os.getpid()) == 8
        finally:
            m.close()
    finally:
        image.release()

"""The worker-local blob cache: verified entries, single-flight across threads and processes."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from forkyard.errors import IntegrityError, ObjectNotFound
from forkyard.store import BlobCache, BlobStore, LocalStore, blob_key

MiB = 1024 * 1024


class SlowCountingStore(LocalStore):
    """A real local store whose downloads are counted and slow enough to overlap."""

    def __init__(self, root: Path, delay: float = 0.3) -> None:
        super().__init__(root)
        self.delay = delay
        self.reads = 0
        self._lock = threading.Lock()

    def open_read(self, key: str) -> BinaryIO:
        with self._lock:
            self.reads += 1
        time.sleep(self.delay)
        return super().open_read(key)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@pytest.fixture
def store(tmp_path: Path) -> SlowCountingStore:
    return SlowCountingStore(tmp_path / "store")


@pytest.fixture
def blob(store: SlowCountingStore, tmp_path: Path) -> tuple[str, bytes]:
    data = os.urandom(2 * MiB) + bytes(MiB)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    ref = BlobStore(store).put_blob(src)
    return ref.digest, data


def fetch_concurrently(
    cache: BlobCache, blobs: BlobStore, digest: str, n: int = 8
) -> list[Path | BaseException]:
    barrier = threading.Barrier(n)
    results: list[Path | BaseException] = [Path()] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = cache.fetch(digest, blobs)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_concurrent_fetches_share_one_download(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    results = fetch_concurrently(cache, BlobStore(store), digest)
    expected = tmp_path / "cache" / digest[:2] / digest
    assert results == [expected] * 8
    assert store.reads == 1
    assert expected.read_bytes() == data
    assert stat.S_IMODE(expected.stat().st_mode) == 0o400
    assert files_under(tmp_path / "cache") == [f"{digest[:2]}/{digest}"]  # no temp or lock files


def test_second_fetch_hits_the_cache(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    blobs = BlobStore(store)
    assert cache.path_if_present(digest) is None
    first = cache.fetch(digest, blobs, size=len(data))
    assert cache.fetch(digest, blobs) == first
    assert cache.fetch(digest, blobs, size=len(data)) == first
    assert BlobCache(tmp_path / "cache").fetch(digest, blobs) == first  # a new process, too
    assert store.reads == 1
    assert cache.path_if_present(digest) == first


def test_failed_download_fails_every_waiter_and_caches_nothing(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    key = blob_key(digest)
    stored = store.root / key
    raw = bytearray(stored.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    stored.unlink()
    stored.write_bytes(bytes(raw))

    cache = BlobCache(tmp_path / "cache")
    blobs = BlobStore(store)
    results = fetch_concurrently(cache, blobs, digest)
    assert all(isinstance(r, IntegrityError) for r in results), results
    assert store.reads == 1
    assert files_under(tmp_path / "cache") == []
    assert cache.path_if_present(digest) is None

    # Once the store is repaired, the next fetch tries again (the failure is not cached).
    store.delete(key)
    src = tmp_path / "again.bin"
    src.write_bytes(data)
    blobs.put_blob(src)
    assert cache.fetch(digest, blobs).read_bytes() == data
    assert store.reads == 2


def test_missing_blob_raises_object_not_found(store: SlowCountingStore, tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(ObjectNotFound):
        cache.fetch(sha(b"never stored"), BlobStore(store))
    assert files_under(tmp_path / "cache") == []


def test_size_is_checked_on_download_and_on_hits(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    cache = BlobCache(tmp_path / "cache")
    blobs = BlobStore(store)
    with pytest.raises(IntegrityError):
        cache.fetch(digest, blobs, size=len(data) - 1)
    assert files_under(tmp_path / "cache") == []
    cache.fetch(digest, blobs, size=len(data))
    with pytest.raises(IntegrityError):
        cache.fetch(digest, blobs, size=len(data) + 1)


def test_stale_temp_files_of_a_crashed_fetch_are_removed(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, _ = blob
    stale = tmp_path / "cache" / digest[:2] / f".{digest}.crashed.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a download")
    BlobCache(tmp_path / "cache").fetch(digest, BlobStore(store))
    assert not stale.exists()


def test_fetch_is_single_flight_across_processes(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    counter = tmp_path / "downloads.log"
    ready = tmp_path / "ready"
    ready.mkdir()
    n = 4
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from forkyard.store import BlobCache, BlobStore, LocalStore

        store_root, cache_root, digest, counter, ready, n = sys.argv[1:]

        class Counting(LocalStore):
            def open_read(self, key):
                with open(counter, "a") as f:
                    f.write(f"{os.getpid()}\\n")
                time.sleep(1.0)  # hold the lock long enough for everyone to queue up
                return super().open_read(key)

        Path(ready, str(os.getpid())).touch()
        deadline = time.monotonic() + 30
        while len(os.listdir(ready)) < int(n) and time.monotonic() < deadline:
            time.sleep(0.005)
        print(BlobCache(cache_root).fetch(digest, BlobStore(Counting(store_root))))
        """
    )
    argv = [
        sys.executable,
        "-c",
        script,
        str(store.root),
        str(tmp_path / "cache"),
        digest,
        str(counter),
        str(ready),
        str(n),
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err.decode() for _, err in outputs]
    paths = {out.decode().strip() for out, _ in outputs}
    assert paths == {str(tmp_path / "cache" / digest[:2] / digest)}
    assert len(counter.read_text().splitlines()) == 1
    assert Path(paths.pop()).read_bytes() == data


# --- add_local ----------------------------------------------------------------------
def test_add_local_hard_links_when_it_can(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = tmp_path / "layer.qcow2"
    src.write_bytes(data)
    cache = BlobCache(tmp_path / "cache")
    path = cache.add_local(sha(data), src)
    assert path == cache.path_if_present(sha(data))
    assert path.stat().st_ino == src.stat().st_ino
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert cache.add_local(sha(data), src) == path  # already there: nothing to do


def test_add_local_copies_when_asked(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = tmp_path / "layer.qcow2"
    src.write_bytes(data)
    path = BlobCache(tmp_path / "cache").add_local(sha(data), src, link=False)
    assert path.stat().st_ino != src.stat().st_ino
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert stat.S_IMODE(src.stat().st_mode) != 0o400  # the source was left alone


@pytest.mark.parametrize("link", [True, False])
def test_add_local_refuses_content_that_does_not_match(tmp_path: Path, link: bool) -> None:
    src = tmp_path / "layer.qcow2"
    src.write_bytes(b"actual content")
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(IntegrityError):
        cache.add_local(sha(b"claimed content"), src, link=link)
    assert files_under(tmp_path / "cache") == []


def test_add_local_copies_across_filesystems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to force a cross-device link")
    data = os.urandom(10_000)
    src = shm / f"forkyard-test-{os.getpid()}"
    src.write_bytes(data)
    try:
        path = BlobCache(tmp_path / "cache").add_local(sha(data), src)
        assert path.read_bytes() == data
        assert path.stat().st_dev != src.stat().st_dev
    finally:
        src.unlink()


def test_a_planted_symlink_is_neither_trusted_nor_written_through(
    store: SlowCountingStore, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    cache = BlobCache(tmp_path / "cache")
    entry = cache.path_for(digest)
    entry.parent.mkdir(parents=True)
    entry.symlink_to(outside)
    assert cache.path_if_present(digest) is None  # a link is not a verified entry
    path = cache.fetch(digest, BlobStore(store))
    assert not path.is_symlink() and path.read_bytes() == data
    assert outside.read_bytes() == b"not yours"

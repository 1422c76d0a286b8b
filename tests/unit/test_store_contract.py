"""The ObjectStore contract, run against every backend (local dir, S3 over HTTP)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from forkyard.errors import ObjectNotFound, StoreError, UnsafePath
from tests.fixtures.store_backends import Backend, MiB

if TYPE_CHECKING:
    pass


class Progress:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[int, int | None]] = []
        self._fail_after = fail_after

    def __call__(self, done: int, total: int | None) -> None:
        self.calls.append((done, total))
        if self._fail_after is not None and len(self.calls) >= self._fail_after:
            raise RuntimeError("simulated failure mid-transfer")


class FailingStream:
    """Yields ``good`` bytes, then raises like a broken source would."""

    def __init__(self, good: bytes) -> None:
        self._src = io.BytesIO(good)

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        if not data:
            raise OSError(5, "simulated I/O error in the source")
        return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- basic operations ---------------------------------------------------------
def test_put_get_exists_size_roundtrip(backend: Backend) -> None:
    store = backend.store
    assert not store.exists("a/b.json")
    assert store.put_bytes("a/b.json", b'{"x": 1}') is True
    assert store.exists("a/b.json")
    assert store.size("a/b.json") == 8
    assert store.get_bytes("a/b.json", max_size=8) == b'{"x": 1}'
    with store.open_read("a/b.json") as reader:
        assert reader.read(3) == b'{"x'
        assert reader.read() == b'": 1}'


def test_empty_object_roundtrip(backend: Backend, tmp_path: Path) -> None:
    assert backend.store.put_bytes("empty", b"")
    assert backend.store.size("empty") == 0
    assert backend.store.get_file("empty", tmp_path / "out") == 0
    assert (tmp_path / "out").read_bytes() == b""


def test_put_file_get_file_roundtrip(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert backend.store.put_file("layers/one", src)
    dest = tmp_path / "deep" / "dir" / "dest.bin"
    assert backend.store.get_file("layers/one", dest) == len(data)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["dest.bin"]  # no temp files left


def test_missing_object_raises_object_not_found(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    assert not store.exists("nope/missing")
    with pytest.raises(ObjectNotFound) as info:
        store.size("nope/missing")
    assert info.value.key == "nope/missing"
    with pytest.raises(ObjectNotFound):
        store.get_bytes("nope/missing", max_size=10)
    with pytest.raises(ObjectNotFound):
        store.open_read("nope/missing")
    with pytest.raises(ObjectNotFound):
        store.get_file("nope/missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_list_is_sorted_and_filters_by_prefix(backend: Backend) -> None:
    keys = ["b", "a/c/d", "ab", "a-c", "a/b"]
    for key in keys:
        backend.store.put_bytes(key, key.encode())
    assert list(backend.store.list()) == sorted(keys)
    assert list(backend.store.list("a/")) == ["a/b", "a/c/d"]
    assert list(backend.store.list("a")) == ["a-c", "a/b", "a/c/d", "ab"]
    assert list(backend.store.list("a/c")) == ["a/c/d"]
    assert list(backend.store.list("zzz/")) == []


def test_delete_removes_and_is_idempotent(backend: Backend) -> None:
    backend.store.put_bytes("x/y", b"1")
    backend.store.delete("x/y")
    assert not backend.store.exists("x/y")
    backend.store.delete("x/y")  # deleting what is gone is not an error
    assert list(backend.store.list()) == []


def test_get_bytes_refuses_objects_over_max_size(backend: Backend) -> None:
    backend.store.put_bytes("big", b"x" * 101)
    assert backend.store.get_bytes("big", max_size=101) == b"x" * 101
    with pytest.raises(StoreError, match="larger than 100 bytes"):
        backend.store.get_bytes("big", max_size=100)


# --- write-once ---------------------------------------------------------------
def test_second_put_does_not_replace_content(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    assert store.put_bytes("obj", b"first") is True
    assert store.put_bytes("obj", b"second!") is False
    other = tmp_path / "other"
    other.write_bytes(b"third")
    assert store.put_file("obj", other) is False
    assert store.put_stream("obj", io.BytesIO(b"fourth")) is False
    assert store.get_bytes("obj", max_size=100) == b"first"
    with pytest.raises(StoreError, match="already exists"):
        store.put_bytes("obj", b"fifth", if_absent=False)
    assert store.get_bytes("obj", max_size=100) == b"first"


def test_racing_writer_wins_and_is_not_overwritten(backend: Backend) -> None:
    """Another writer stores the key after our existence check but before we publish."""
    store = backend.store
    raced = False

    class Racing:
        def __init__(self) -> None:
            self._src = io.BytesIO(b"ours")

        def read(self, n: int = -1, /) -> bytes:
            nonlocal raced
            if not raced:
                raced = True
                assert store.put_bytes("contended", b"theirs")
            return self._src.read(n)

    assert store.put_stream("contended", Racing()) is False
    assert raced
    assert store.get_bytes("contended", max_size=100) == b"theirs"
    assert backend.leftovers() == []


# --- atomicity ----------------------------------------------------------------
def test_failed_get_file_leaves_no_partial_dest(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(10 * MiB)  # several chunks, so the failure is mid-download
    backend.store.put_bytes("big", data)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    progress = Progress(fail_after=1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        backend.store.get_file("big", out_dir / "dest", progress=progress)
    assert progress.calls and progress.calls[0][0] < len(data)
    assert list(out_dir.iterdir()) == []


def test_failed_get_file_keeps_previous_dest(backend: Backend, tmp_path: Path) -> None:
    backend.store.put_bytes("big", os.urandom(10 * MiB))
    dest = tmp_path / "dest"
    dest.write_bytes(b"previous content")
    with pytest.raises(RuntimeError):
        backend.store.get_file("big", dest, progress=Progress(fail_after=1))
    assert dest.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["dest"]


@pytest.mark.parametrize("size", [100, 13 * MiB], ids=["single", "multipart"])
def test_failed_source_stores_nothing(backend: Backend, size: int) -> None:
    with pytest.raises(StoreError, match="simulated I/O error"):
        backend.store.put_stream("broken", FailingStream(os.urandom(size)))
    assert not backend.store.exists("broken")
    assert list(backend.store.list()) == []
    assert backend.leftovers() == []


# --- key validation -----------------------------------------------------------
@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "a//b", "a\\b", ""])
def test_every_method_refuses_unsafe_keys(backend: Backend, tmp_path: Path, key: str) -> None:
    store = backend.store
    src = tmp_path / "src"
    src.write_bytes(b"x")
    calls: list[Callable[[], object]] = [
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, src),
        lambda: store.put_stream(key, io.BytesIO(b"x")),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.get_bytes(key, max_size=10),
        lambda: store.open_read(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(UnsafePath):
            call()
    assert list(store.list()) == []
    assert os.listdir(tmp_path) == ["src"]


def test_list_refuses_unsafe_prefix(backend: Backend) -> None:
    with pytest.raises(UnsafePath):
        list(backend.store.list("../"))


# --- large objects --------------------------------------------------------------
def test_large_object_streams_with_progress(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(40 * MiB)
    src = tmp_path / "large.bin"
    src.write_bytes(data)
    up = Progress()
    assert backend.store.put_file("large", src, progress=up)
    assert len(up.calls) > 1, "progress must be reported while streaming, not just at the end"
    assert [done for done, _ in up.calls] == sorted(done for done, _ in up.calls)
    assert up.calls[-1] == (len(data), len(data))
    assert backend.store.size("large") == len(data)

    down = Progress()
    dest = tmp_path / "large.out"
    assert backend.store.get_file("large", dest, progress=down) == len(data)
    assert len(down.calls) > 1
    assert down.calls[-1] == (len(data), len(data))
    assert sha(dest.read_bytes()) == sha(data)

    with backend.store.open_read("large") as reader:
        h = hashlib.sha256()
        while chunk := reader.read(1 * MiB):
            assert len(chunk) <= 1 * MiB
            h.update(chunk)
    assert h.hexdigest() == sha(data)


def test_large_stream_of_unknown_length(backend: Backend) -> None:
    data = os.urandom(17 * MiB)

    class Pipe:  # like a socket: no size, short reads
        def __init__(self) -> None:
            self._src = io.BytesIO(data)

        def read(self, n: int = -1, /) -> bytes:
            return self._src.read(min(n, 100_000) if n >= 0 else n)

    assert backend.store.put_stream("piped", Pipe())
    assert backend.store.get_bytes("piped", max_size=len(data)) == data

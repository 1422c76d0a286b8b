"""Archive format v2: the VM state as verified chunks, fed to QEMU only once checked.

The reader end of the pipe stands in for QEMU here: what it received is
compared byte for byte with what was verified (the VM tests are in
tests/integration/test_state_chunks_vm.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from forkyard.checkpoint import archive
from forkyard.checkpoint.chunks import ChunkRef, split_file
from forkyard.checkpoint.manifest import FORMAT_V1, FORMAT_V2, BootRef, Manifest, PartRef
from forkyard.errors import IntegrityError, ManifestError
from forkyard.store import BlobCache, BlobStore, blob_key, open_store
from forkyard.vm.shape import VMShape
from forkyard.worker._stream import StateStream, fetch_chunked

CHUNK = 64 * 1024
D = "d" * 64


def _state(tmp_path: Path, chunks: int = 5, tail: int = 1000) -> tuple[Path, bytes]:
    data = os.urandom(chunks * CHUNK + tail)
    path = tmp_path / "state.bin"
    path.write_bytes(data)
    return path, data


def _manifest(ref: PartRef, chunks: tuple[ChunkRef, ...]) -> Manifest:
    part = PartRef(D, 4096)
    return Manifest(created="2026-01-01T00:00:00.000Z", base=part, layers=(part,), state=ref,
                    boot=BootRef(part, part, "console=ttyS0"),
                    vm=VMShape(256, 1, "q35", "tcg", qemu="7.2", disk_size=1 << 30),
                    sandbox="sb-x", state_chunks=chunks)


def test_split_file_tiles_the_file_and_names_each_chunk(tmp_path: Path) -> None:
    path, data = _state(tmp_path)
    digest, size, chunks = split_file(path, CHUNK)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert [c.offset for c in chunks] == [i * CHUNK for i in range(6)]
    assert chunks[-1].size == 1000
    for c in chunks:
        assert c.digest == hashlib.sha256(data[c.offset:c.offset + c.size]).hexdigest()


def test_v2_round_trips_and_v1_keeps_its_bytes(tmp_path: Path) -> None:
    path, _ = _state(tmp_path)
    digest, size, chunks = split_file(path, CHUNK)
    v2 = _manifest(PartRef(digest, size), chunks)
    assert json.loads(v2.canonical())["format"] == FORMAT_V2
    again = Manifest.parse(v2.canonical(), expect_id=v2.id)
    assert again == v2 and again.state_chunks == chunks
    assert [r for r, _ in v2.own_parts()] == ["layer0"] + [f"state.{i}" for i in range(6)]
    v1 = replace(v2, state_chunks=())
    raw = v1.canonical()
    assert json.loads(raw)["format"] == FORMAT_V1 and b"state_chunks" not in raw
    assert Manifest.parse(raw, expect_id=v1.id) == v1
    assert [r for r, _ in v1.own_parts()] == ["layer0", "state"]


@pytest.mark.parametrize("edit", ["gap", "overlap", "short", "long", "empty", "huge", "v1_keys",
                                  "missing", "extra_key"])
def test_chunk_lists_that_do_not_tile_the_state_are_refused(tmp_path: Path, edit: str) -> None:
    path, _ = _state(tmp_path)
    digest, size, chunks = split_file(path, CHUNK)
    d = _manifest(PartRef(digest, size), chunks).to_json()
    cs = d["state_chunks"]
    if edit == "gap":
        cs[2]["offset"] += 1
    elif edit == "overlap":
        cs[2]["offset"] -= 1
    elif edit == "short":
        del cs[-1]
    elif edit == "long":
        cs.append({"offset": size, "size": 1, "digest": D})
    elif edit == "empty":
        d["state_chunks"] = []
    elif edit == "huge":  # one chunk claiming the whole of a large state: over the limit
        d["state"]["size"] = 1 << 30
        d["state_chunks"] = [{"offset": 0, "size": 1 << 30, "digest": D}]
    elif edit == "v1_keys":
        d["format"] = FORMAT_V1
    elif edit == "missing":
        del d["state_chunks"]
    elif edit == "extra_key":
        cs[0]["path"] = "../../etc/passwd"
    with pytest.raises(ManifestError):
        Manifest.from_json(d)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[BlobCache, BlobStore, PartRef, tuple[ChunkRef, ...], bytes]:
    path, data = _state(tmp_path)
    digest, size, chunks = split_file(path, CHUNK)
    blobs = BlobStore(open_store(f"file://{tmp_path / 'store'}"))
    for c in chunks:
        blobs.put_blob(path, digest=c.digest, span=(c.offset, c.size))
    return BlobCache(tmp_path / "cache"), blobs, PartRef(digest, size), chunks, data


def _corrupt(blobs: BlobStore, chunk: ChunkRef) -> None:
    key = blob_key(chunk.digest)
    raw = bytearray(blobs.store.get_bytes(key, max_size=1 << 30))
    raw[len(raw) // 2] ^= 0x40
    blobs.store.delete(key)
    blobs.store.put_bytes(key, bytes(raw))


def _qemu(fd: int, out: bytearray) -> threading.Thread:
    """Stands in for QEMU: reads the pipe to EOF."""
    def run() -> None:
        with os.fdopen(fd, "rb") as f:
            while data := f.read(65536):
                out.extend(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_good_stream_feeds_every_byte_and_files_the_state(stored) -> None:
    cache, blobs, ref, chunks, data = stored
    stream = StateStream(cache, blobs, ref, chunks)
    got = bytearray()
    reader = _qemu(stream.take_fd(), got)
    stream.start()
    stream.finish(60)
    reader.join(60)
    assert bytes(got) == data
    assert stream.fed == [c.offset for c in chunks]
    assert stream.wait_done(60)
    path = cache.path_if_present(ref.digest)
    assert path is not None and path.read_bytes() == data


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_chunk_is_never_fed_and_names_itself(stored, damage: str) -> None:
    cache, blobs, ref, chunks, data = stored
    bad = 3
    if damage == "corrupt":
        _corrupt(blobs, chunks[bad])
    else:
        blobs.store.delete(blob_key(chunks[bad].digest))
    stream = StateStream(cache, blobs, ref, chunks)
    got = bytearray()
    reader = _qemu(stream.take_fd(), got)
    stream.start()
    with pytest.raises(IntegrityError) as e:
        stream.finish(60)
    reader.join(60)
    assert f"chunk {bad}" in str(e.value) and chunks[bad].digest in str(e.value)
    # QEMU got exactly the verified chunks before the bad one, then EOF
    assert bytes(got) == data[:chunks[bad].offset]
    assert stream.fed == [c.offset for c in chunks[:bad]]
    assert stream.wait_done(60)
    assert cache.path_if_present(ref.digest) is None
    assert not list((cache.root / ".streams").iterdir())  # nothing half-written left


def test_chunks_that_do_not_make_the_state_are_refused_before_the_cache(stored) -> None:
    cache, blobs, ref, chunks, _ = stored
    # each chunk is good, but the list names a state they do not make up
    wrong = PartRef("e" * 64, ref.size)
    with pytest.raises(IntegrityError) as e:
        fetch_chunked(cache, blobs, wrong, chunks, what="VM state")
    assert "put together" in str(e.value)
    assert cache.path_if_present(wrong.digest) is None


def test_publish_uploads_spans_of_the_local_state_once_each(tmp_path: Path) -> None:
    half = os.urandom(CHUNK)
    path = tmp_path / "state.bin"
    path.write_bytes(half * 3 + b"tail")  # three identical chunks and a short one
    digest, size, chunks = split_file(path, CHUNK)
    m = _manifest(PartRef(digest, size), chunks)
    blobs = BlobStore(open_store(f"file://{tmp_path / 'store'}"))
    for ref in (m.base, m.boot.kernel):
        blobs.store.put_bytes(blob_key(ref.digest), b"x")  # shared parts: already there
    local = {m.state.digest: path}
    report = archive.publish(m, blobs, lambda _role, ref: local[ref.digest])
    keys = [k for k in blobs.store.list("blobs/")]
    assert sorted(keys) == sorted({blob_key(D), blob_key(chunks[0].digest),
                                   blob_key(chunks[-1].digest)})
    assert report.uploaded_parts == 2  # dedup: the same chunk travels once
    assert archive.fetch_manifest(blobs.store, m.id) == m
    cache = BlobCache(tmp_path / "cache")
    assert fetch_chunked(cache, blobs, m.state, chunks, what="s").read_bytes() == path.read_bytes()

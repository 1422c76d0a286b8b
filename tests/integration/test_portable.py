"""Portable checkpoints: two workers with independently built bases, one store.

Worker A and worker B each build the minimal image the way a fleet of
independent workers would (``stock=True``: random UUID and hash seed), so the
two bases have the same files but different bytes — the setting of the
upstream EBADMSG bug.  A checkpoint made on A must fork on B exactly, via a
local directory store and via S3 (a real S3 server on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from forkyard.checkpoint import Checkpoint, Manifest
from forkyard.checkpoint.archive import manifest_key
from forkyard.errors import (
    CheckpointNotFound,
    IntegrityError,
    ManifestError,
    ObjectNotFound,
)
from forkyard.guest.client import AgentClient
from forkyard.image import MinimalSource, build_image
from forkyard.store import BlobStore, blob_key, open_store
from forkyard.tools import qemu_img
from forkyard.verify import verify_files
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape
from forkyard.worker import Worker, _parts, _stream
from forkyard.worker._stream import StateStream, fetch_chunked
from tests.conftest import qemu_pids
from tests.fixtures.s3server import s3_server_fixture

pytestmark = pytest.mark.vm

s3_server = s3_server_fixture(scope="module")


@dataclass
class Pair:
    a: Worker
    b: Worker
    cp: Checkpoint  # format v3 (RAM image), the default
    cp2: Checkpoint  # the same instant's state as one whole stream (format v2)
    sleeper: int
    expected: dict[str, str]  # test-tree checksums of A's base
    root: Path
    store_url: str
    open_worker: Callable[[str], Worker]


@pytest.fixture(scope="module", params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp(f"pair-{request.param}")
    if request.param == "file":
        settings = None
        store_url = f"file://{root}/store"
    else:
        s3 = request.getfixturevalue("s3_server")
        settings = s3.settings()
        store_url = s3.store_url(f"pair-{uuid.uuid4().hex[:8]}")
    workers: list[Worker] = []

    def open_worker(name: str, url: str = store_url) -> Worker:
        w = Worker(root / name, name=name, store=open_store(url, settings))
        workers.append(w)
        return w

    a, b = open_worker("a"), open_worker("b")
    base_a = build_image(a.home, MinimalSource(), name="minimal", stock=True)
    base_b = build_image(b.home, MinimalSource(), name="minimal", stock=True)
    assert base_a.digest != base_b.digest  # independently built: different bytes
    src = a.create("minimal")
    src.files.write("/root/marker", "from A\n")
    sleeper = int(src.exec("sleep 1000 & echo $!").stdout)
    src.exec("ls /srv/testtree/d01 > /dev/null")
    cp = src.checkpoint()
    src.ram_images = False  # what a VM mapping a frozen image saves: the whole stream
    cp2 = src.checkpoint()
    src.ram_images = True
    assert cp.manifest.format.endswith("/v3") and cp2.manifest.format.endswith("/v2")
    src.files.write("/root/after", "not in the checkpoint")
    a.publish(cp)
    a.publish(cp2)
    yield Pair(a, b, cp, cp2, sleeper, a.images.file_checksums(base_a.digest), root, store_url,
               open_worker)
    for w in workers:
        w.close()
    assert not qemu_pids(root)


def test_fork_on_another_worker_with_a_different_base(pair: Pair) -> None:
    fork = pair.b.fork(pair.cp.id)
    try:
        assert fork.files.read_text("/root/marker") == "from A\n"
        assert not fork.files.exists("/root/after")
        assert fork.exec(f"kill -0 {pair.sleeper}").exit_code == 0
        report = verify_files(fork, pair.expected)
        assert report.ok, report.summary()
        # B ran it on A's base bytes (fetched by digest), not on its own base
        base = pair.cp.manifest.base.digest
        assert fork.vm is not None
        assert fork.vm.disk.base == pair.b.blobs.path_if_present(base)
        assert not pair.b.images.has(base)
    finally:
        fork.destroy()


def test_naive_thin_archive_on_the_other_base_is_corrupt(pair: Pair) -> None:
    """Negative control: the check above can fail.  This is the upstream bug."""
    b, m = pair.b, pair.cp2.manifest
    layers = tuple(b.blobs.fetch(ref.digest, b.blobstore) for ref in m.layers)
    state = fetch_chunked(b.blobs, b.blobstore, m.state, m.state_chunks, what="VM state")
    own_base = b.images.get("minimal")
    assert own_base.digest != m.base.digest
    work = pair.root / "naive"
    work.mkdir(exist_ok=True)
    qemu_img.create(work / "top.qcow2", own_base.size)
    vm = QemuVM("naive", work, b.home.run_dir / "naive.agent",
                VMShape(m.vm.memory_mb, m.vm.cpus, m.vm.machine, m.vm.accel,
                        devices=m.vm.devices),
                BootSpec(b.host.kernel.path, b.host.initrd.path),
                DiskChain(own_base.path, layers, work / "top.qcow2"))
    try:
        vm.launch(incoming_state=state)
        agent = AgentClient(vm.agent_socket)
        agent.connect()
        report = verify_files(agent, pair.expected)
        assert not report.ok
        assert "Bad message" in report.summary()
    finally:
        vm.kill()


def test_local_fork_never_goes_through_the_store(pair: Pair, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the store was used for a local fork")

    monkeypatch.setattr(pair.a.store, "open_read", refuse)
    monkeypatch.setattr(pair.a.store, "get_bytes", refuse)
    monkeypatch.setattr(pair.a.store, "exists", refuse)
    fork = pair.a.fork(pair.cp.id)
    assert fork.files.read_text("/root/marker") == "from A\n"
    fork.destroy()


def test_second_fork_reuses_the_fetched_base(pair: Pair, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    pair.b.fetch_checkpoint(pair.cp.id)  # first time: everything comes over
    reads: list[str] = []
    real = pair.b.store.open_read
    monkeypatch.setattr(pair.b.store, "open_read", lambda key: reads.append(key) or real(key))
    fork = pair.b.fork(pair.cp.id)
    fork.destroy()
    assert reads == []


def test_concurrent_forks_download_the_state_once(pair: Pair, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    c = pair.open_worker(f"c-{uuid.uuid4().hex[:6]}")
    reads: list[str] = []
    real = c.store.open_read
    monkeypatch.setattr(c.store, "open_read", lambda key: reads.append(key) or real(key))
    forks = c.fork_many(pair.cp.id, 3)
    try:
        for fork in forks:
            assert fork.files.read_text("/root/marker") == "from A\n"
            assert fork.exec(f"kill -0 {pair.sleeper}").exit_code == 0
    finally:
        for fork in forks:
            fork.destroy()
    m = pair.cp.manifest
    for _role, ref in m.parts():
        assert reads.count(blob_key(ref.digest)) <= 1, (_role, reads)
    for _role, ref in m.state_parts():  # every chunk of the state came over once
        assert reads.count(blob_key(ref.digest)) == 1, (_role, reads)


def test_hibernate_on_a_wake_on_b(pair: Pair) -> None:
    sb = pair.a.create("minimal")
    pid = int(sb.exec("sleep 1000 & echo $!").stdout)
    sb.files.write("/root/h", "hibernated on A")
    cp = sb.hibernate()
    pair.a.publish(cp)
    woken = pair.b.wake(sb.id, checkpoint=cp.id)
    try:
        assert woken.id == sb.id
        assert woken.files.read_text("/root/h") == "hibernated on A"
        assert woken.exec(f"kill -0 {pid}").exit_code == 0
    finally:
        woken.destroy()
        sb.destroy()


# --- damaged stores ----------------------------------------------------------
@pytest.fixture
def damaged(pair: Pair) -> Iterator[tuple[Worker, BlobStore, Manifest]]:
    """A fresh worker C (empty cache) reading a private copy of the published checkpoint."""
    yield from _damaged(pair, pair.cp.manifest)


@pytest.fixture
def damaged_v2(pair: Pair) -> Iterator[tuple[Worker, BlobStore, Manifest]]:
    """The same for the whole-stream (v2) checkpoint."""
    yield from _damaged(pair, pair.cp2.manifest)


_COPIES: dict[tuple[str, str], str] = {}  # (store, checkpoint) -> a pristine private copy


def _damaged(pair: Pair, m: Manifest) -> Iterator[tuple[Worker, BlobStore, Manifest]]:
    # Copying a checkpoint's hundreds of RAM chunks costs ~25 s on the S3 server, so one
    # copy per checkpoint serves the module: every key a test writes or deletes in it is
    # put back from the original after the test, and each test gets a fresh worker.
    src = pair.a.store
    url = _COPIES.get((pair.store_url, m.id))
    if url is None:
        url = f"{pair.store_url}-copy-{uuid.uuid4().hex[:6]}" if pair.store_url.startswith(
            "s3://") else f"file://{pair.root}/copy-{uuid.uuid4().hex[:6]}"
        copy = pair.open_worker(f"copy-{uuid.uuid4().hex[:6]}", url).store
        for _role, ref in m.parts():
            with src.open_read(blob_key(ref.digest)) as f:
                copy.put_stream(blob_key(ref.digest), f)
        copy.put_bytes(manifest_key(m.id), m.canonical())
        _COPIES[(pair.store_url, m.id)] = url
    c = pair.open_worker(f"c-{uuid.uuid4().hex[:6]}", url)
    assert c.blobstore.store is c.store
    touched: set[str] = set()

    def recording(real: Any) -> Any:
        def call(key: str, *args: Any, **kwargs: Any) -> Any:
            touched.add(key)
            return real(key, *args, **kwargs)
        return call

    for name in ("put_stream", "put_file", "put_bytes", "delete"):
        setattr(c.store, name, recording(getattr(c.store, name)))
    try:
        yield c, c.blobstore, m
        assert not qemu_pids(c.home.root)
    finally:
        for name in ("put_stream", "put_file", "put_bytes", "delete"):
            delattr(c.store, name)
        for key in touched:
            if c.store.exists(key):
                c.store.delete(key)
            if src.exists(key):
                with src.open_read(key) as f:
                    c.store.put_stream(key, f)


def _rewrite(store: BlobStore, key: str, data: bytes) -> None:
    store.store.delete(key)
    store.store.put_bytes(key, data)


def _assert_clean_failure(c: Worker, digest: str) -> None:
    assert c.blobs.path_if_present(digest) is None  # nothing half-written cached
    assert not c.list()
    assert not qemu_pids(c.home.root)


def test_corrupt_byte_in_a_layer(damaged) -> None:
    c, store, m = damaged
    key = blob_key(m.layers[-1].digest)
    raw = bytearray(store.store.get_bytes(key, max_size=1 << 31))
    raw[len(raw) // 2] ^= 0x40
    _rewrite(store, key, bytes(raw))
    with pytest.raises(IntegrityError) as e:
        c.fork(m.id)
    assert m.layers[-1].digest in str(e.value)
    _assert_clean_failure(c, m.layers[-1].digest)


def test_truncated_state_then_repaired(damaged, pair: Pair) -> None:
    c, store, m = damaged
    key = blob_key(m.state_parts()[len(m.state_parts()) // 2][1].digest)
    good = store.store.get_bytes(key, max_size=1 << 31)
    _rewrite(store, key, good[: len(good) // 3])
    with pytest.raises(IntegrityError):
        c.fork(m.id)
    _assert_clean_failure(c, m.state.digest)
    # the worker stayed healthy: once the store is repaired the same fork works
    _rewrite(store, key, good)
    fork = c.fork(m.id)
    assert fork.files.read_text("/root/marker") == "from A\n"
    fork.destroy()


@pytest.fixture
def fed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[StateStream, list[bytes]]]:
    """Every state stream the workers open, with the bytes it wrote into QEMU's pipe."""
    streams: list[tuple[StateStream, list[bytes]]] = []
    by_thread: dict[int, list[bytes]] = {}
    real_write = _stream._write_all

    class Recording(StateStream):
        def __init__(self, *a: object, **k: object) -> None:
            super().__init__(*a, **k)  # type: ignore[arg-type]
            streams.append((self, []))

        def _run_feeder(self) -> None:
            by_thread[threading.get_ident()] = next(b for s, b in streams if s is self)
            super()._run_feeder()

    def write_all(fd: int, data: bytes) -> None:
        by_thread[threading.get_ident()].append(bytes(data))
        real_write(fd, data)

    monkeypatch.setattr(_parts, "StateStream", Recording)
    monkeypatch.setattr(_stream, "_write_all", write_all)
    return streams


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_state_chunk_is_never_fed_to_qemu(damaged_v2, pair: Pair, fed, damage: str
                                                ) -> None:
    c, store, m = damaged_v2
    bad = len(m.state_chunks) // 2
    chunk = m.state_chunks[bad]
    key = blob_key(chunk.digest)
    if damage == "corrupt":
        raw = bytearray(store.store.get_bytes(key, max_size=1 << 31))
        raw[len(raw) // 2] ^= 0x40
        _rewrite(store, key, bytes(raw))
    else:
        store.store.delete(key)
    with pytest.raises(IntegrityError) as e:
        c.fork(m.id)
    assert f"chunk {bad} " in str(e.value) and chunk.digest in str(e.value)
    if damage == "missing":
        assert e.value.actual == "no such blob"
    # what QEMU received: exactly the verified chunks before the bad one, nothing of it
    [(stream, wrote)] = fed
    assert stream.fed == [ch.offset for ch in m.state_chunks[:bad]]
    got = b"".join(wrote)
    assert len(got) == chunk.offset
    source = pair.a.blobs.path_if_present(m.state.digest)
    assert source is not None
    with open(source, "rb") as f:
        assert hashlib.sha256(got).digest() == hashlib.sha256(f.read(chunk.offset)).digest()
    _assert_clean_failure(c, m.state.digest)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_ram_chunk_is_an_integrity_error_and_nothing_runs(
        damaged, damage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c, store, m = damaged
    # QEMU starts while the image fills: it must never get a state to load
    loads: list[str] = []
    real_load = QemuVM._load_state

    def load(vm: QemuVM, *args: Any, **kwargs: Any) -> None:
        loads.append(vm.name)
        real_load(vm, *args, **kwargs)

    monkeypatch.setattr(QemuVM, "_load_state", load)
    assert m.ram is not None
    bad = len(m.ram.chunks) // 2
    chunk = m.ram.chunks[bad]
    key = blob_key(chunk.digest)
    if damage == "corrupt":
        raw = bytearray(store.store.get_bytes(key, max_size=1 << 31))
        raw[len(raw) // 2] ^= 0x40
        _rewrite(store, key, bytes(raw))
    else:
        store.store.delete(key)
    with pytest.raises(IntegrityError) as e:
        c.fork(m.id)
    assert f"RAM chunk {bad} " in str(e.value) and chunk.digest in str(e.value)
    if damage == "missing":
        assert e.value.actual == "no such blob"
    assert loads == []
    _assert_clean_failure(c, chunk.digest)


def test_a_v2_checkpoint_still_forks_on_another_worker(pair: Pair) -> None:
    fork = pair.b.fork(pair.cp2.id)
    try:
        assert fork.files.read_text("/root/marker") == "from A\n"
        assert fork.exec(f"kill -0 {pair.sleeper}").exit_code == 0
    finally:
        fork.destroy()


def test_a_v1_checkpoint_with_one_state_part_still_forks(damaged_v2, pair: Pair, fed
                                                         ) -> None:
    c, store, m = damaged_v2
    assert m.state_chunks  # written as v2
    v1 = replace(m, state_chunks=())
    source = pair.a.blobs.path_if_present(m.state.digest)
    assert source is not None
    store.put_blob(source, digest=m.state.digest)
    store.store.put_bytes(manifest_key(v1.id), v1.canonical())
    fork = c.fork(v1.id)
    try:
        assert fork.files.read_text("/root/marker") == "from A\n"
        assert fork.exec(f"kill -0 {pair.sleeper}").exit_code == 0
    finally:
        fork.destroy()
    assert fed == []  # not streamed: fetched and verified whole before QEMU read it


def test_deleted_base(damaged) -> None:
    c, store, m = damaged
    store.store.delete(blob_key(m.base.digest))
    with pytest.raises(ObjectNotFound) as e:
        c.fork(m.id)
    assert m.base.digest in str(e.value)
    _assert_clean_failure(c, m.base.digest)


def test_manifest_edited_in_place_to_another_base(damaged, pair: Pair) -> None:
    c, store, m = damaged
    other = pair.b.images.get("minimal")
    store.put_blob(other.path, digest=other.digest)
    data = m.canonical().replace(m.base.digest.encode(), other.digest.encode())
    _rewrite(store, manifest_key(m.id), data)
    with pytest.raises(IntegrityError):
        c.fork(m.id)
    _assert_clean_failure(c, m.state.digest)


def test_forged_manifest_putting_layers_on_another_base(damaged, pair: Pair) -> None:
    """Even a well-formed manifest under its own id cannot move a layer to other bytes."""
    c, store, m = damaged
    other = pair.b.images.get("minimal")
    store.put_blob(other.path, digest=other.digest)
    data = m.canonical().replace(m.base.digest.encode(), other.digest.encode())
    forged = Manifest.parse(data)
    store.store.put_bytes(manifest_key(forged.id), forged.canonical())
    with pytest.raises(IntegrityError) as e:
        c.fork(forged.id)
    assert "written over other bytes" in str(e.value)
    assert not c.list() and not qemu_pids(c.home.root)


def test_malformed_manifests_are_refused(damaged) -> None:
    c, store, m = damaged
    evil = m.canonical().replace(m.state.digest.encode(), b"../../../../etc/passwd")
    with pytest.raises(ManifestError):
        Manifest.parse(evil)
    import hashlib

    evil_id = hashlib.sha256(evil).hexdigest()
    store.store.put_bytes(manifest_key(evil_id), evil)
    with pytest.raises(ManifestError):
        c.fork(evil_id)
    with pytest.raises(CheckpointNotFound):
        c.fork("0" * 64)
    assert not qemu_pids(c.home.root)


def test_store_holds_only_content_addressed_objects(pair: Pair) -> None:
    import re

    keys = list(pair.a.store.list())
    assert keys
    # the one exception by design: a template pointer (issue 13), named by the digest
    # of what the template depends on, holding the id of a published checkpoint
    pointers = [k for k in keys if k.startswith("templates/")]
    assert all(re.fullmatch(r"templates/[0-9a-f]{64}", k) for k in pointers), pointers
    for k in pointers:
        assert manifest_key(pair.a.store.get_bytes(k, max_size=128).decode()) in keys
    rest = [k for k in keys if k not in pointers]
    assert all(k.startswith(("blobs/", "checkpoints/")) for k in rest), keys
    assert manifest_key(pair.cp.id) in keys

"""From a capture to a catalogued checkpoint, and the stored-bytes count."""

from __future__ import annotations

from pathlib import Path

from forkyard._digest import sha256_bytes
from forkyard.checkpoint import BootRef, LocalCheckpoints, Manifest, PartRef
from forkyard.checkpoint.archive import publish, stored_bytes
from forkyard.checkpoint.recorder import Capture, Recorder
from forkyard.store import BlobCache, BlobStore
from forkyard.store.local import LocalStore
from forkyard.vm.shape import VMShape

SHAPE = VMShape(256, 1, "pc-q35-7.2", "tcg", qemu="7.2.22", disk_size=4096)


def _setup(tmp_path: Path) -> tuple[Recorder, BlobCache, LocalCheckpoints]:
    blobs = BlobCache(tmp_path / "blobs")
    catalog = LocalCheckpoints(tmp_path / "checkpoints")
    return Recorder(blobs, catalog, worker="w1"), blobs, catalog


def test_record_files_the_parts_and_writes_the_manifest(tmp_path: Path) -> None:
    recorder, blobs, catalog = _setup(tmp_path)
    layer = tmp_path / "disk-1.qcow2"
    layer.write_bytes(b"L" * 1000)
    ref = recorder.file_layer(layer)
    assert ref == PartRef(sha256_bytes(b"L" * 1000), 1000)
    assert blobs.path_if_present(ref.digest) is not None
    state = tmp_path / "state-2.tmp"
    state.write_bytes(b"S" * 300)
    boot = BootRef(PartRef("d" * 64, 10), PartRef("e" * 64, 20), "console=ttyS0")
    cp = recorder.record(Capture(
        sandbox="sb-1", parent=None, name="x", base=PartRef("a" * 64, 4096), layers=(ref,),
        state_file=state, pause_seconds=0.1234, shape=SHAPE, boot=boot, agent="agent 1"))
    m = cp.manifest
    assert not state.exists()  # filed in the cache, the temp is gone
    assert m.state == PartRef(sha256_bytes(b"S" * 300), 300)
    assert blobs.path_if_present(m.state.digest) is not None
    assert m.layers == (ref,) and m.vm == SHAPE and m.boot == boot and m.name == "x"
    assert m.extra == {"worker": "w1", "pause_ms": "123.4"}
    assert catalog.get(cp.id).manifest == m
    assert cp.changed_bytes == 1300


def test_stored_bytes_counts_only_the_checkpoints_own_parts(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    parts = {name: tmp_path / name for name in ("base", "layer", "state", "k", "i")}
    for i, path in enumerate(parts.values()):
        path.write_bytes(bytes([i]) * (5000 * (i + 1)))

    def ref(name: str) -> PartRef:
        data = parts[name].read_bytes()
        return PartRef(sha256_bytes(data), len(data))

    m = Manifest(created="2026-11-28T23:59:00.123Z", base=ref("base"), layers=(ref("layer"),),
                 state=ref("state"), boot=BootRef(ref("k"), ref("i"), "c"),
                 vm=VMShape(256, 1, "pc-q35-7.2", "tcg", disk_size=5000), sandbox="sb-1")
    by_digest = {ref(n).digest: p for n, p in parts.items()}
    report = publish(m, BlobStore(store), lambda _role, r: by_digest[r.digest])
    assert stored_bytes(store, m) == report.stored_bytes > 0
    assert report.shared_bytes > 0

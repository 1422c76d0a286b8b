"""Guest RAM as a shared, sealed, chunked image (format v3), with real guests.

One booted source sandbox holds 24 MiB of random data in a guest tmpfs (so
the data lives in guest RAM, not on its disk); its checkpoints are forked,
written over, checkpointed again, and their images inspected from the host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from forkyard.checkpoint import Checkpoint
from forkyard.vm.ram import SEALS
from forkyard.worker import Worker
from forkyard.worker._sandbox import Sandbox

pytestmark = pytest.mark.vm

_MOUNT = "mkdir -p /mnt/ram && mount -t tmpfs -o size=160m tmpfs /mnt/ram"


def _write_random(sb: Sandbox, path: str, mib: int) -> str:
    """``mib`` MiB of fresh random bytes at ``path`` in the guest; their md5."""
    r = sb.exec(f"dd if=/dev/urandom of={path} bs=1M count={mib} 2>/dev/null && "
                f"md5sum {path}", check=True)
    return r.stdout.split()[0]


def _md5(sb: Sandbox, path: str) -> str:
    return sb.exec(f"md5sum {path}", check=True).stdout.split()[0]


@dataclass
class Scene:
    w: Worker
    src: Sandbox
    cp: Checkpoint
    data_md5: str


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    w = Worker(tmp_path_factory.mktemp("ram") / "home", name="ram")
    src = w.create("minimal", cold=True)  # booted: its RAM is its own working file
    src.exec(_MOUNT, check=True)
    data = _write_random(src, "/mnt/ram/data", 24)
    cp = src.checkpoint(name="data")
    yield Scene(w, src, cp, data)
    w.close()


def _ram_fd(pid: int, name: str) -> Path:
    """The /proc link of the memfd ``name`` QEMU ``pid`` holds (its guest RAM)."""
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(link).startswith(f"/memfd:{name} "):
                return link
    raise AssertionError(f"QEMU {pid} holds no memfd {name}")


def test_checkpoint_is_v3_with_a_small_device_state(scene: Scene) -> None:
    m = scene.cp.manifest
    assert m.format == "forkyard.checkpoint/v3" and m.ram is not None
    assert m.state.size < 2 * 1024 * 1024  # device state only, no RAM pages in it
    assert m.ram.size == m.vm.memory_mb * 1024 * 1024
    # the 24 MiB of random data are in the image, zero chunks are not stored
    assert 24 * 1024 * 1024 <= m.ram.stored_bytes < m.ram.size


def test_forks_map_one_sealed_image_they_cannot_write(scene: Scene) -> None:
    a, b = scene.w.fork(scene.cp), scene.w.fork(scene.cp)
    try:
        assert a.vm is not None and b.vm is not None and a.vm.pid and b.vm.pid
        links = [_ram_fd(a.vm.pid, "forkyard-ram-image"), _ram_fd(b.vm.pid, "forkyard-ram-image")]
        inodes = {os.stat(link).st_ino for link in links}
        assert len(inodes) == 1  # the same pages for both: shared page cache
        maps = Path(f"/proc/{a.vm.pid}/maps").read_text()
        assert "/memfd:forkyard-ram-image" in maps
        fd = os.open(links[0], os.O_RDWR)  # QEMU may open it read-write (7.2 does) ...
        try:
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
            with pytest.raises(OSError) as e:  # ... but nobody can write it, not even root
                os.pwrite(fd, b"x", 0)
            assert e.value.errno == errno.EPERM
            with pytest.raises(OSError):
                os.ftruncate(fd, 4096)
        finally:
            os.close(fd)
        assert _md5(a, "/mnt/ram/data") == scene.data_md5
    finally:
        a.destroy()
        b.destroy()


def test_two_forks_writing_the_same_pages_do_not_see_each_other(scene: Scene) -> None:
    a, b = scene.w.fork(scene.cp), scene.w.fork(scene.cp)
    try:
        # the same file, hence the same guest pages, overwritten in place in each fork
        a.exec("dd if=/dev/zero of=/mnt/ram/data bs=1M count=8 conv=notrunc 2>/dev/null",
               check=True)
        b.exec("head -c 8388608 /dev/zero | tr '\\0' 'b' | dd of=/mnt/ram/data bs=1M "
               "conv=notrunc 2>/dev/null", check=True)
        a_md5, b_md5 = _md5(a, "/mnt/ram/data"), _md5(b, "/mnt/ram/data")
        assert len({a_md5, b_md5, scene.data_md5}) == 3
        assert a.exec("head -c 1 /mnt/ram/data | od -An -c").stdout.strip() == "\\0"
        assert b.exec("head -c 1 /mnt/ram/data").stdout == "b"
        c = scene.w.fork(scene.cp)  # and the image itself is as it was
        try:
            assert _md5(c, "/mnt/ram/data") == scene.data_md5
        finally:
            c.destroy()
    finally:
        a.destroy()
        b.destroy()


def test_the_source_writing_after_its_checkpoint_never_reaches_later_forks(scene: Scene
                                                                            ) -> None:
    src = scene.src
    early = scene.w.fork(scene.cp)
    try:
        _write_random(src, "/mnt/ram/data", 24)  # the source rewrites every page of it
        src.exec("dd if=/dev/urandom of=/mnt/ram/more bs=1M count=16 2>/dev/null", check=True)
        late = scene.w.fork(scene.cp)
        try:
            for fork in (early, late):
                assert _md5(fork, "/mnt/ram/data") == scene.data_md5
                assert not fork.files.exists("/mnt/ram/more")
        finally:
            late.destroy()
    finally:
        early.destroy()
        src.exec("rm -f /mnt/ram/more")


def test_a_forks_checkpoint_is_v3_and_chains(scene: Scene) -> None:
    """A mapped fork's RAM is split out of QEMU's stream (vm/migstream.py)."""
    a = scene.w.fork(scene.cp)
    try:
        own = _write_random(a, "/mnt/ram/fork", 4)
        cp = a.checkpoint(name="fork")
        assert cp.manifest.format == "forkyard.checkpoint/v3"
        assert cp.manifest.state.size < 2 * 1024 * 1024
        b = scene.w.fork(cp)
        try:
            assert _md5(b, "/mnt/ram/fork") == own
            assert _md5(b, "/mnt/ram/data") == scene.data_md5
            cp2 = b.checkpoint(name="fork-of-fork")  # and again from that one
            c = scene.w.fork(cp2)
            try:
                assert _md5(c, "/mnt/ram/fork") == own
            finally:
                c.destroy()
        finally:
            b.destroy()
    finally:
        a.destroy()


@pytest.mark.slow
def test_ten_checkpoints_with_small_changes_store_little_and_all_fork(scene: Scene) -> None:
    src = scene.src
    full = src.checkpoint(name="baseline").manifest.ram  # whatever earlier tests changed
    assert full is not None
    cps: list[tuple[Checkpoint, list[str]]] = []
    sums: list[str] = []
    for i in range(10):
        sums.append(_write_random(src, f"/mnt/ram/step{i}", 1))
        cp = src.checkpoint(name=f"step{i}")
        m = cp.manifest
        assert m.ram is not None
        new = int(m.extra["ram_new_bytes"])
        # 1 MiB of changes (plus the guest kernel's own scattered writes): a small part
        # of the image, never the whole of it again
        assert new < full.stored_bytes // 4, (i, new, full.stored_bytes)
        assert new + int(m.extra["ram_shared_bytes"]) == m.ram.stored_bytes
        print(f"checkpoint {i}: RAM new {new >> 10} KiB of {m.ram.stored_bytes >> 10} KiB")
        cps.append((cp, list(sums)))
    for i, (cp, expected) in enumerate(cps):
        fork = scene.w.fork(cp)
        try:
            for j, md5 in enumerate(expected):
                assert _md5(fork, f"/mnt/ram/step{j}") == md5
            assert not fork.files.exists(f"/mnt/ram/step{i + 1}")
            assert _md5(fork, "/mnt/ram/data") != ""  # the guest is whole
        finally:
            fork.destroy()
    src.exec("rm -f /mnt/ram/step*")


def _poke(pid: int, address: int) -> None:
    """Write one byte into process ``pid`` at ``address`` (process_vm_writev, as root)."""
    import ctypes

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    byte = ctypes.create_string_buffer(b"\x01")
    local = IoVec(ctypes.cast(byte, ctypes.c_void_p), 1)
    remote = IoVec(address, 1)
    if libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != 1:
        raise OSError(ctypes.get_errno(), "process_vm_writev")


def test_a_fork_whose_qemu_wrote_its_image_before_it_was_ready_never_runs(
        scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU starts while a RAM image fills (RamImages.open); had it written a page of
    the image meanwhile, that page would hide the image's bytes: the fork fails."""
    from forkyard.errors import VMError
    from forkyard.vm.machine import QemuVM
    from forkyard.vm.ram import IMAGE_NAME

    m = scene.cp.manifest
    assert m.ram is not None
    scene.w.ram_images.forget(m.ram)  # the next fork builds the image while QEMU starts
    real = QemuVM._image_ready
    loads: list[str] = []

    def early_write(vm: QemuVM) -> None:
        assert vm.ram_ready is not None and vm.pid is not None  # a build in flight
        maps = Path(f"/proc/{vm.pid}/maps").read_text().splitlines()
        [start] = [int(line.split("-")[0], 16) for line in maps if f"/memfd:{IMAGE_NAME}" in line]
        _poke(vm.pid, start + 4096 * 10)  # as a QEMU writing guest RAM early would
        real(vm)

    monkeypatch.setattr(QemuVM, "_image_ready", early_write)
    monkeypatch.setattr(QemuVM, "_load_state",
                        lambda vm, *a, **k: loads.append(vm.name))  # never reached
    before = {sb.id for sb in scene.w.list()}
    with pytest.raises(VMError, match="wrote 4 kB of guest RAM before loading"):
        scene.w.fork(scene.cp)
    assert loads == []
    assert {sb.id for sb in scene.w.list()} == before
    monkeypatch.undo()
    fork = scene.w.fork(scene.cp)  # the image itself was never touched
    try:
        assert _md5(fork, "/mnt/ram/data") == scene.data_md5
    finally:
        fork.destroy()


_SWEEPER = """
i=0
while :; do
  c=$(printf "\\\\$(printf %03o $((65 + i % 26)))")
  b=0
  while [ $b -lt 16 ]; do
    head -c 1048576 /dev/zero | tr '\\0' "$c" |
      dd of=/mnt/ram/sweep bs=1M seek=$b conv=notrunc 2>/dev/null
    b=$((b + 1))
  done
  i=$((i + 1))
done
"""


def test_a_live_checkpoint_captures_one_instant_of_a_guest_writing_all_along(
        scene: Scene) -> None:
    """RAM is copied while the guest runs (a precopy migration); pages it dirties
    meanwhile are sent again.  A guest sweeps a 16 MiB tmpfs file over and over,
    one letter per pass: at any single instant the file reads as one letter, then
    (the sweep in progress) the previous one.  A capture mixing instants shows more."""
    from forkyard.vm.migstream import saved_ignore_shared

    src = scene.w.create("minimal", cold=True)
    src.live_checkpoints = True  # opt-in for now (worker/_sandbox.py says why)
    try:
        src.exec("mkdir -p /mnt/ram && mount -t tmpfs -o size=40m tmpfs /mnt/ram && "
                 "head -c 16777216 /dev/zero | tr '\\0' Z > /mnt/ram/sweep", check=True)
        sweeper = src.exec(_SWEEPER, background=True).pid
        src.exec("sleep 1")
        cps = [src.checkpoint() for _ in range(2)]
        assert src.exec("md5sum /mnt/ram/sweep").exit_code == 0  # the source runs on
        for cp in cps:
            state = scene.w.blobs.path_if_present(cp.manifest.state.digest)
            assert state is not None and not saved_ignore_shared(state)  # saved live
            fork = scene.w.fork(cp)
            try:
                # stopped (its last block written) before the file is read: the fork
                # continues the sweep from the captured instant, so it stays one sweep
                fork.exec(f"kill -STOP {sweeper} && sleep 0.3", check=True)
                runs = fork.exec("tr -s 'A-Z' < /mnt/ram/sweep", check=True).stdout
                assert 1 <= len(runs) <= 2, runs
                if len(runs) == 2:
                    assert (ord(runs[0]) - ord(runs[1])) % 26 == 1, runs
            finally:
                fork.destroy()
    finally:
        src.destroy()

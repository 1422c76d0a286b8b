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


# Rewrites a tmpfs file page after page, as fast as the guest runs, each page headed
# by its index and the pass number: RAM of one instant holds pass P up to some page
# and P - 1 from there on.  One process, so SIGSTOP freezes the file at once.
_SWEEPER_C = r"""
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
struct head { char magic[8]; uint32_t index, pass; };
int main(void) {
  size_t size = 16 << 20;
  int fd = open("/mnt/sweep/file", O_RDWR | O_CREAT, 0600);
  if (fd < 0 || ftruncate(fd, size)) return 1;
  char *m = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) return 2;
  for (uint32_t pass = 1;; pass++)
    for (uint32_t i = 0; i < size / 4096; i++) {
      struct head h = {"FKSWEEP!", i, pass};
      memcpy(m + (size_t)i * 4096, &h, sizeof h);
    }
}
"""
_SWEEP_PAGES = 4096


@pytest.fixture(scope="module")
def sweeper(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import subprocess

    d = tmp_path_factory.mktemp("sweeper")
    (d / "sweep.c").write_text(_SWEEPER_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "sweep"), str(d / "sweep.c")],
                   check=True, timeout=120)
    return (d / "sweep").read_bytes()


def _sweep_passes(w: Worker, cp: Checkpoint) -> list[int]:
    """The pass each page of the sweep holds in ``cp``'s RAM image, read on the host."""
    import mmap
    import struct

    assert cp.manifest.ram is not None
    image = w.ram_images.get(cp.manifest.ram, what="the test")
    passes: dict[int, int] = {}
    try:
        with mmap.mmap(image.fd, image.size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            pos = mm.find(b"FKSWEEP!")
            while pos >= 0:
                if pos % 4096 == 0:
                    _, index, n = struct.unpack_from("<8sII", mm, pos)
                    passes[index] = n
                pos = mm.find(b"FKSWEEP!", pos + 8)
    finally:
        image.release()
    assert sorted(passes) == list(range(_SWEEP_PAGES))  # each page once (a fresh tmpfs)
    return [passes[i] for i in range(_SWEEP_PAGES)]


def _saved_live(w: Worker, cp: Checkpoint) -> bool:
    """Whether ``cp``'s device state was saved live (its stream records no x-ignore-shared)."""
    from forkyard.vm.migstream import saved_ignore_shared

    state = w.blobs.path_if_present(cp.manifest.state.digest)
    assert state is not None
    return not saved_ignore_shared(state)


def _one_instant(passes: list[int]) -> bool:
    top = max(passes)
    k = next((i for i, n in enumerate(passes) if n != top), len(passes))
    return all(n == top for n in passes[:k]) and all(n == top - 1 for n in passes[k:])


def test_one_instant_checker_sees_a_mixed_capture() -> None:
    assert _one_instant([5, 5, 5, 4, 4]) and _one_instant([5, 5, 5])
    assert not _one_instant([5, 4, 5, 4]) and not _one_instant([5, 5, 3])


def test_a_live_checkpoint_holds_one_instant_of_a_guest_writing_all_along(
        scene: Scene, sweeper: bytes) -> None:
    """Checkpoints copy RAM while the guest runs (a background snapshot).  The
    sweeper writes every page of its file thousands of times a second; every
    capture, of a booted sandbox and of a fork (whose RAM maps an image
    copy-on-write), must hold one instant of it.  The precopy migration this
    replaced failed here on its first capture (``vm/_migration.py`` says why)."""

    src = scene.w.create("minimal", cold=True)
    assert src.live_checkpoints
    try:
        src.files.write("/sweep", sweeper, mode=0o755)
        src.exec("mkdir -p /mnt/sweep && mount -t tmpfs -o size=20m tmpfs /mnt/sweep",
                 check=True)
        sweeper_pid = src.exec("/sweep", background=True).pid
        src.exec("sleep 0.5")
        cps = [src.checkpoint() for _ in range(3)]
        fork = scene.w.fork(cps[-1])
        try:
            cps += [fork.checkpoint() for _ in range(2)]
            # the fork's sweeper ran on from the captured instant
            fork.exec(f"kill -STOP {sweeper_pid}", check=True)
            assert fork.exec(f"cat /proc/{sweeper_pid}/stat", check=True).stdout.split()[2] == "T"
        finally:
            fork.destroy()
        assert src.exec("echo on").stdout == "on\n"  # the source runs on
        tops = []
        for cp in cps:
            assert _saved_live(scene.w, cp)
            passes = _sweep_passes(scene.w, cp)
            assert _one_instant(passes), (cp.short_id, sorted(set(passes))[:8])
            tops.append(max(passes))
        assert tops[:3] == sorted(tops[:3]) and tops[3:] == sorted(tops[3:])
        assert min(tops[3:]) >= tops[2]  # the fork went on from its checkpoint's instant
    finally:
        src.destroy()


@pytest.mark.parametrize("seen_dead", [True, False], ids=["seen-dead", "still-exiting"])
def test_qemu_killed_while_it_copies_ram_live_leaves_no_checkpoint(
        scene: Scene, monkeypatch: pytest.MonkeyPatch, seen_dead: bool) -> None:
    """A QEMU that dies while a live checkpoint copies its RAM (a guest that crashed it,
    say): the checkpoint fails with a typed error, nothing of it is recorded, the
    sandbox is failed, its state files are gone, and earlier checkpoints still fork.
    ``still-exiting``: the worker still sees the process (a large QEMU takes a while
    to exit) once its QMP is gone, as a loaded suite run once did."""
    import signal

    import forkyard.vm.ram_capture as ram_capture
    from forkyard.errors import ForkyardError

    sb = scene.w.create("minimal", cold=True)
    assert sb.vm is not None
    vm = sb.vm
    real = ram_capture.split_stream
    killed: list[int] = []
    if not seen_dead:
        real_kill = vm.kill
        reaped: list[bool] = []

        def kill() -> None:
            reaped.append(True)
            real_kill()

        monkeypatch.setattr(vm, "alive", lambda: not reaped)
        monkeypatch.setattr(vm, "kill", kill)

    def dying(src, out, image, **kw):  # type: ignore[no-untyped-def]
        src.peek(1)  # the stream flows: the guest was stopped, its layer frozen
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        killed.append(vm.pid)
        return real(src, out, image, **kw)

    try:
        before = {cp.id for cp in scene.w.checkpoints.list()}
        monkeypatch.setattr(ram_capture, "split_stream", dying)
        with pytest.raises(ForkyardError):
            sb.checkpoint()
        monkeypatch.setattr(ram_capture, "split_stream", real)
        assert killed
        assert {cp.id for cp in scene.w.checkpoints.list()} == before
        assert sb.state.value == "failed"
        assert not list(sb.dir.glob("state-*.tmp"))  # no half-written state left
    finally:
        sb.destroy()
    fork = scene.w.fork(scene.cp)
    try:
        assert _md5(fork, "/mnt/ram/data") == scene.data_md5
    finally:
        fork.destroy()


def test_a_host_without_userfaultfd_checkpoints_paused(
        scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU refusing the background snapshot (``vm.unprivileged_userfaultfd = 0``):
    the checkpoint is taken paused instead, and so are the sandbox's later ones."""
    from forkyard.vm.ram_capture import LiveSaveUnavailable

    sb = scene.w.create("minimal", cold=True)
    try:
        assert sb.vm is not None
        asked: list[int] = []

        def refuse(fd: int, at_stop: object, **_kw: object) -> tuple[float, float]:
            os.close(fd)
            asked.append(fd)
            raise LiveSaveUnavailable("Background-snapshot is not supported by host kernel")

        monkeypatch.setattr(sb.vm, "save_background", refuse)
        sb.files.write("/root/note", "paused")
        cps = [sb.checkpoint(), sb.checkpoint()]
        assert len(asked) == 1 and not sb.live_checkpoints  # asked once, then not again
        for cp in cps:
            assert not _saved_live(scene.w, cp)  # the paused save
        fork = scene.w.fork(cps[-1])
        try:
            assert fork.files.read_text("/root/note") == "paused"
        finally:
            fork.destroy()
    finally:
        sb.destroy()


def test_a_live_stream_the_splitter_refuses_fails_that_checkpoint_only(
        scene: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream the splitter does not understand (a QEMU that writes something else):
    that checkpoint fails typed, the sandbox runs on, its next checkpoints are paused
    and fork right, with the files of before and after."""
    import forkyard.vm.ram_capture as ram_capture
    from forkyard.errors import CheckpointError
    from forkyard.vm.migstream import StreamFormatError

    def refuse(src, out, image, **kw):  # type: ignore[no-untyped-def]
        src.peek(1)
        raise StreamFormatError("section type 9 before the end of RAM (simulated)")

    sb = scene.w.create("minimal", cold=True)
    try:
        sb.files.write("/root/before", "before")
        with monkeypatch.context() as m:
            m.setattr(ram_capture, "split_stream", refuse)
            with pytest.raises(CheckpointError, match="section type 9"):
                sb.checkpoint()
        assert sb.state.value == "running" and not sb.live_checkpoints
        sb.files.write("/root/after", "after")
        cp = sb.checkpoint()
        assert not _saved_live(scene.w, cp)  # taken paused
        fork = scene.w.fork(cp)
        try:
            assert fork.files.read_text("/root/before") == "before"
            assert fork.files.read_text("/root/after") == "after"
        finally:
            fork.destroy()
    finally:
        sb.destroy()

"""Checkpoint, fork, restore, hibernate on one worker, with real guests."""

from __future__ import annotations

import pytest

from forkyard.errors import SandboxStateError
from forkyard.verify import verify_files

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """A source sandbox checkpointed mid-flight, shared by the tests of this module."""
    from forkyard.worker import Worker

    w = Worker(tmp_path_factory.mktemp("cpfork") / "home", name="cpfork")
    src = w.create("minimal")
    src.files.write("/root/before.txt", "written before\n")
    r = src.exec("sleep 1000 & echo $!")
    sleeper = int(r.stdout.strip())
    src.exec("ls -R /srv/testtree/d00 > /dev/null")  # some metadata cached in RAM
    cp = src.checkpoint(name="t1")
    src.files.write("/root/after.txt", "written after\n")
    src.files.write("/root/before.txt", "changed after\n")
    yield w, src, cp, sleeper
    w.close()


def test_fork_continues_from_the_checkpoint_instant(scenario):
    w, _src, cp, sleeper = scenario
    fork = w.fork(cp)
    try:
        assert fork.files.read_text("/root/before.txt") == "written before\n"
        assert not fork.files.exists("/root/after.txt")
        # the process started before the checkpoint is alive in the fork
        assert fork.exec(f"kill -0 {sleeper}").exit_code == 0
        assert fork.exec(f"cat /proc/{sleeper}/cmdline").stdout.startswith("sleep")
        # the fork's clock was set to now, not left at the checkpoint's time
        import time

        guest_now = int(fork.exec("date +%s").stdout)
        assert abs(guest_now - time.time()) < 30
    finally:
        fork.destroy()


def test_forks_diverge_independently(scenario):
    w, src, cp, _ = scenario
    a, b = w.fork_many(cp, 2)
    try:
        a.files.write("/root/who", "a")
        b.files.write("/root/who", "b")
        a.exec("rm /root/before.txt")
        assert a.files.read_text("/root/who") == "a"
        assert b.files.read_text("/root/who") == "b"
        assert not a.files.exists("/root/before.txt")
        assert b.files.read_text("/root/before.txt") == "written before\n"
        assert src.files.read_text("/root/before.txt") == "changed after\n"
        assert not src.files.exists("/root/who")
    finally:
        a.destroy()
        b.destroy()


def test_fork_reads_every_base_file_after_drop_caches(scenario):
    w, _src, cp, _ = scenario
    fork = w.fork(cp)
    try:
        expected = w.images.file_checksums(cp.manifest.base.digest)
        assert len(expected) >= 1000
        report = verify_files(fork, expected)
        assert report.ok, report.summary()
    finally:
        fork.destroy()


def test_fork_shares_base_and_layers_without_copying(scenario):
    w, _src, cp, _ = scenario
    fork = w.fork(cp)
    try:
        chain = fork.vm.disk
        assert chain.base == w.images.path(cp.manifest.base.digest)
        assert [p.name for p in chain.layers] == [layer.digest for layer in cp.manifest.layers]
        # the fork's own files are only a thin overlay plus logs
        own = sum(p.stat().st_size for p in fork.dir.iterdir() if p.is_file())
        assert own < 8 * 1024 * 1024
    finally:
        fork.destroy()


def test_checkpoint_of_a_fork_stacks_layers(scenario):
    w, _src, cp, _ = scenario
    fork = w.fork(cp)
    try:
        fork.files.write("/root/gen2", "second generation")
        cp2 = fork.checkpoint()
        assert cp2.manifest.parent == cp.id
        assert cp2.manifest.layers[: len(cp.manifest.layers)] == cp.manifest.layers
        grandchild = w.fork(cp2)
        assert grandchild.files.read_text("/root/gen2") == "second generation"
        assert grandchild.files.read_text("/root/before.txt") == "written before\n"
        grandchild.destroy()
    finally:
        fork.destroy()


def test_restore_reverts_in_place(worker_factory):
    w = worker_factory()
    sb = w.create("minimal")
    sb.files.write("/root/v", "1")
    cp = sb.checkpoint()
    sb.files.write("/root/v", "2")
    sb.restore(cp)
    assert sb.state.value == "running"
    assert sb.files.read_text("/root/v") == "1"
    assert w.get(sb.id) is sb


def test_hibernate_and_wake_on_the_same_worker(worker_factory):
    w = worker_factory()
    sb = w.create("minimal")
    pid = int(sb.exec("sleep 1000 & echo $!").stdout)
    sb.files.write("/root/state", "kept")
    cp = sb.hibernate()
    assert sb.state.value == "hibernated" and sb.vm is None
    with pytest.raises(SandboxStateError):
        sb.exec("true")
    woken = w.wake(sb.id)
    assert woken.id == sb.id and woken.last_checkpoint is not None
    assert woken.files.read_text("/root/state") == "kept"
    assert woken.exec(f"kill -0 {pid}").exit_code == 0
    assert cp.id == woken.parent_checkpoint


def test_readme_worker_example_runs_unchanged(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import qemu_pids
    from tests.fixtures.cli import readme_example

    env = {**os.environ, "FORKYARD_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", readme_example("worker")], env=env,
                          capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().strip().isdigit()  # the pid of the sleep, in the fork
    assert not qemu_pids(tmp_path)


def test_a_failed_state_save_leaves_later_checkpoints_consistent(worker_factory, monkeypatch):
    import os

    from forkyard.errors import VMError

    w = worker_factory()
    sb = w.create("minimal", cold=True)  # a plain boot: no template layer under its disk
    sb.files.write("/root/a", "before the failed checkpoint")

    def broken_save(dest, **_kw):
        raise VMError("disk full (simulated)")

    def broken_live(fd, at_stop, **_kw):
        # as a live save that fails once the guest stopped and the layer froze
        os.close(fd)
        sb.vm.pause()
        at_stop()
        raise VMError("disk full (simulated)")

    for live in (False, True):  # a paused capture, then a live one
        sb.live_checkpoints = live
        with monkeypatch.context() as m:
            m.setattr(sb.vm, "save_state", broken_save)
            m.setattr(sb.vm, "save_background", broken_live)
            with pytest.raises(VMError):
                sb.checkpoint()
    sb.live_checkpoints = False
    assert sb.state.value == "running"  # the sandbox carries on, on a new layer
    sb.files.write("/root/b", "after it")
    cp = sb.checkpoint()
    assert len(cp.manifest.layers) == 3  # the layers frozen by the failed attempts are kept
    fork = w.fork(cp)
    assert fork.files.read_text("/root/a") == "before the failed checkpoint"
    assert fork.files.read_text("/root/b") == "after it"


def test_fork_of_a_checkpoint_taken_while_the_guest_was_sending(worker_factory):
    """A checkpoint taken while a 24 MiB reply streams out of the guest.

    The source's reply must arrive whole, and every fork must still talk to
    its agent although the saved channel state holds part of that reply.
    """
    import hashlib
    import os
    import threading
    import time

    w = worker_factory()
    sb = w.create("minimal")
    data = os.urandom(24 * 1024 * 1024)
    sb.files.write("/root/big", data)
    forks = []
    for _ in range(3):
        got: list[bytes] = []
        reader = threading.Thread(target=lambda got=got: got.append(sb.files.read("/root/big")))
        reader.start()
        time.sleep(0.3)  # the reply is streaming out of the guest now
        cp = sb.checkpoint()
        reader.join(120)
        assert got and hashlib.sha256(got[0]).digest() == hashlib.sha256(data).digest()
        fork = w.fork(cp, timeout=90)
        forks.append(fork)
        assert fork.exec("echo fork-alive").stdout == "fork-alive\n"
    for fork in forks:
        fork.destroy()


def test_checkpoint_leaves_clean_page_cache_out_of_the_state(worker_factory):
    """Cached file pages are copies of disk blocks: a checkpoint drops them first.

    The same guest checkpointed with ``keep_page_cache=True`` carries the
    16 MiB file twice (layer and RAM); by default only the layer has it, and a
    fork reads it back whole from disk.
    """
    import hashlib
    import os

    w = worker_factory()
    sb = w.create("minimal")
    data = os.urandom(16 * 1024 * 1024)
    sb.files.write("/root/big", data)
    assert sb.files.read("/root/big") == data  # cached in guest RAM now
    kept = sb.checkpoint(keep_page_cache=True)
    dropped = sb.checkpoint()

    def memory(m):  # v3: RAM is the image's non-zero chunks, the state is device state
        return m.state.size + (m.ram.stored_bytes if m.ram is not None else 0)

    saved = memory(kept.manifest) - memory(dropped.manifest)
    assert saved > 12 * 1024 * 1024, (memory(kept.manifest), memory(dropped.manifest))
    fork = w.fork(dropped)
    got = fork.exec("sha256sum /root/big").stdout.split()[0]
    assert got == hashlib.sha256(data).hexdigest()
    # the source keeps running normally after its cache was dropped
    assert sb.files.read("/root/big") == data

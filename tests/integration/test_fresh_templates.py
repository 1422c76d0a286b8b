"""Fresh after every restore, grown disks and template creates, with real guests."""

from __future__ import annotations

import time

import pytest

from forkyard.errors import GuestError
from forkyard.store import open_store
from forkyard.wire.network import NetworkMode, NetworkSpec

pytestmark = pytest.mark.vm

GIB = 1 << 30
RANDOM = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
# the kernel's boot log with its microsecond timestamps: a machine that booted
# again never writes the same one, a fork of a template keeps the template's
# (past the lines stamped 0.000000, which every boot shares)
BOOT_LOG = "dmesg | grep -v '^\\[    0\\.000000\\]' | head -n 60"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Worker ``a`` (made the template) and ``b`` (never booted), sharing one store."""
    from forkyard.worker import Worker

    root = tmp_path_factory.mktemp("fresh")
    url = f"file://{root}/store"
    a = Worker(root / "a", name="a", store=open_store(url))
    b = None
    try:
        t0 = time.monotonic()
        first = a.create("minimal")  # boots and leaves the template behind
        first_s = time.monotonic() - t0
        a.wait_background()  # the template's publish
        b = Worker(root / "b", name="b", store=open_store(url))
        yield a, b, first, first_s
    finally:
        for w in (a, b):
            if w is not None:
                w.close()


def _df_kib(sb) -> int:
    return int(sb.exec("df -k / | tail -n 1").stdout.split()[1])


def test_forks_of_one_checkpoint_get_their_own_rng(pair):
    a, _b, first, _ = pair
    cp = first.checkpoint(name="rng")
    forks = a.fork_many(cp, 2)
    try:
        # the agent says RESEEDED only when the guest kernel took the host's bytes
        # (RNDADDENTROPY) and rekeyed its crng (RNDRESEEDCRNG); under TCG the
        # forks' outputs also drift apart by timing alone, so the bytes below
        # are necessary but not sufficient
        assert all(f._agent.reseeded for f in forks)
        out = [f.exec(RANDOM).stdout for f in forks]
        assert len(out[0]) == 64 and out[0] != out[1]
        assert first.exec(RANDOM).stdout not in out
    finally:
        for f in forks:
            f.destroy()


def test_a_woken_sandbox_has_the_host_clock(pair):
    a, _b, _first, _ = pair
    sb = a.create("minimal")
    try:
        # the 30 s hibernated wait of the issue is in test_lifecycle_timers, where it
        # overlaps other timers' waits; here the wake itself must set the clock
        sb.hibernate()
        a.wake(sb.id)
        assert sb._agent.reseeded
        before = time.time()
        guest = int(sb.exec("date +%s").stdout)  # busybox: whole seconds (truncated)
        after = time.time()
        assert before - 2 <= guest + 0.5 <= after + 2
    finally:
        sb.destroy()


def test_create_disk_grows_the_root_filesystem_and_forks_keep_it(pair):
    a, _b, _first, _ = pair
    sb = a.create("minimal", disk_size=4 * GIB)
    try:
        assert sb.disk_size == 4 * GIB
        assert 3.8 * (GIB >> 10) < _df_kib(sb) <= 4 * (GIB >> 10)
        # bigger than the image itself (110 MiB): the space is real
        r = sb.exec("dd if=/dev/zero of=/root/big bs=1M count=512 && sync && ls -l /root/big",
                    timeout=300)
        assert r.exit_code == 0, r.stderr
        assert str(512 << 20) in r.stdout
        sb.exec("rm /root/big && sync")
        cp = sb.checkpoint()
        assert cp.manifest.vm.disk_size == 4 * GIB
        assert cp.manifest.base.size < cp.manifest.vm.disk_size  # thin: the base stays raw
        fork = a.fork(cp)
        try:
            assert fork.disk_size == 4 * GIB
            assert 3.8 * (GIB >> 10) < _df_kib(fork) <= 4 * (GIB >> 10)
        finally:
            fork.destroy()
    finally:
        sb.destroy()


def test_template_create_continues_from_the_template(pair):
    a, _b, _first, first_s = pair
    t0 = time.monotonic()
    x = a.create("minimal")
    template_s = time.monotonic() - t0
    y = a.create("minimal")
    t0 = time.monotonic()
    cold = a.create("minimal", cold=True)
    cold_s = time.monotonic() - t0
    try:
        assert x.parent_checkpoint is not None and x.parent_checkpoint == y.parent_checkpoint
        assert cold.parent_checkpoint is None
        boot_log = x.exec(BOOT_LOG).stdout
        assert boot_log.count("\n") >= 20  # a real boot log, not an empty match
        assert boot_log == y.exec(BOOT_LOG).stdout
        assert x.exec(BOOT_LOG).stdout != cold.exec(BOOT_LOG).stdout
        assert template_s < 0.5 * min(cold_s, first_s)
        # each looks like a machine of its own
        names = [s.exec("hostname").stdout.strip() for s in (x, y, cold)]
        assert names == [x.id, y.id, cold.id]
        assert x.exec(RANDOM).stdout != y.exec(RANDOM).stdout
    finally:
        for s in (x, y, cold):
            s.destroy()


def test_a_worker_that_never_booted_the_image_fetches_the_template(pair):
    a, b, _first, _ = pair
    assert not b.local_checkpoint_ids()
    sb = b.create("minimal")
    ref = a.create("minimal")
    try:
        assert sb.parent_checkpoint == ref.parent_checkpoint is not None
        assert sb.exec(BOOT_LOG).stdout == ref.exec(BOOT_LOG).stdout
        assert sb.exec("hostname").stdout.strip() == sb.id
        assert b.warm("minimal") == sb.parent_checkpoint  # `forkyard image warm`
    finally:
        sb.destroy()
        ref.destroy()


def test_a_store_pointer_to_another_machine_is_not_used(pair, tmp_path):
    """The store is untrusted: a template pointer naming a checkpoint of another
    shape must not be forked for this one (the worker boots instead)."""
    from forkyard.worker import Worker
    from forkyard.worker._record import SandboxSpec

    a, _b, first, _ = pair
    other = first.checkpoint(name="not-a-template")  # a real, published checkpoint...
    a.publish(other)
    w = Worker(tmp_path / "c", name="c", store=a.store)
    try:
        info, s = w.image("minimal"), w.home.settings()
        spec = SandboxSpec(info.digest, 2 * GIB, s.memory_mb, s.cpus, None, info.size)
        key = w._template_key(info.digest, w._shape(spec))  # ...of a 4 GiB disk
        w._templates.index.publish(key, other.id)
        sb = w.create("minimal", disk_size=2 * GIB)
        try:
            assert sb.parent_checkpoint is None  # booted
            assert 1.8 * (GIB >> 10) < _df_kib(sb) <= 2 * (GIB >> 10)
        finally:
            sb.destroy()
    finally:
        w.close()


def test_guest_rejects_a_bad_identity(pair):
    _a, _b, first, _ = pair
    agent = first._agent
    with pytest.raises(GuestError):
        agent.set_identity(hostname="h" * 100, machine_id="0" * 32)
    with pytest.raises(GuestError):
        agent.set_identity(hostname="ok", machine_id="../../etc/passwd-xxxxxxxxxxxxxxx")
    assert first.exec("hostname").stdout.strip() == first.id


def test_v1_checkpoints_of_an_image_sized_disk_still_fork(pair):
    """Checkpoints made before --disk (disk = the image's size, profile forkyard-v1:
    no network card either, as before networks)."""
    a, _b, _first, _ = pair
    info = a.image("minimal")
    sb = a.create("minimal", disk_size=info.size, cold=True,
                  network=NetworkSpec(mode=NetworkMode.NONE))
    try:
        sb.files.write("/root/old.txt", "old\n")
        cp = sb.checkpoint()
        assert cp.manifest.vm.devices == "forkyard-v1"
        assert cp.manifest.vm.disk_size == cp.manifest.base.size
        fork = a.fork(cp)
        try:
            assert fork.files.read_text("/root/old.txt") == "old\n"
        finally:
            fork.destroy()
    finally:
        sb.destroy()


"""A sandbox's QEMU is jailed (issue 9 item 1) and host disk faults fail it (item 6).

Checked from the outside, on real VMs, the way an attacker who took over QEMU
would find it: its credentials, seccomp mode, cgroup limits, environment,
namespaces and what its filesystem view holds.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from forkyard.errors import ForkyardError
from forkyard.wire.lifecycle import SandboxState

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="confinement needs root (CI runs as root)"),
]

TOKEN = "fy-test-token-3b1f9c0e"  # must never reach a QEMU


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _memory_limit(pid: int) -> int:
    """The memory cap of the cgroup ``pid`` is in (v1 memory controller or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            raw = Path(f"/sys/fs/cgroup{path}/memory.max").read_text().strip()
            if raw != "max":
                return int(raw)
    raise AssertionError(f"QEMU {pid} is in no memory-capped cgroup")


def _cgroup_dirs(pid: int) -> list[Path]:
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "forkyard" not in path:
            continue
        for c in controllers.split(",") if controllers else [""]:
            dirs.append(Path("/sys/fs/cgroup", c, path.lstrip("/")) if c else
                        Path("/sys/fs/cgroup", path.lstrip("/")))
    return dirs


def test_qemu_runs_jailed(worker_factory, monkeypatch):
    monkeypatch.setenv("FORKYARD_TOKEN", TOKEN)
    monkeypatch.setenv("FORKYARD_WORKER_TOKEN", TOKEN)
    w = worker_factory("jail")
    a = w.create("minimal", memory_mb=256)
    b = w.create("minimal", memory_mb=256)
    pid = a.info().pid
    assert pid is not None
    st = _status(pid)
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    assert 0 not in uids and 0 not in gids, st["Uid"]
    assert st["Groups"] == ""
    assert st["Seccomp"] == "2"
    assert st["NoNewPrivs"] == "1"
    assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0
    # one uid per VM: the other sandbox's QEMU cannot be signalled or traced
    other = _status(b.info().pid)  # type: ignore[arg-type]
    assert other["Uid"].split()[0] != st["Uid"].split()[0]

    cap = _memory_limit(pid)
    assert 256 * 2**20 < cap <= (256 + 1024) * 2**20

    env = Path(f"/proc/{pid}/environ").read_bytes()
    assert TOKEN.encode() not in env
    assert {e.split(b"=")[0] for e in env.split(b"\0") if e} == {b"PATH"}

    for ns in ("mnt", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    # its whole filesystem: /, /usr, the loader cache, a few /dev nodes, the boot files
    mounts = [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
    # /proc: pid directories only, for QEMU to open its RAM memfd (vm/ram.py)
    allowed = {"/", "/usr", "/etc/ld.so.cache", "/dev/null", "/dev/zero", "/dev/full",
               "/dev/random", "/dev/urandom", "/dev/kvm", "/proc"}
    strays = [m for m in mounts if m not in allowed and not m.startswith(str(w.home.root))]
    assert not strays, strays
    home_mounts = [m for m in mounts if m.startswith(str(w.home.root))]
    assert len(home_mounts) <= 2 and all("vmlinuz" in m or "initr" in m for m in home_mounts), \
        home_mounts  # kernel + initramfs only: no disks, no cache, no other sandbox
    # its /proc shows its uid's processes only (hidepid), and no /proc/sys, kcore, ...
    uid = int(st["Uid"].split()[0])
    seen = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "setpriv",
                           f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "ls", "/proc"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert str(pid) in seen and "1" not in seen and "sys" not in seen, seen
    assert all(n.isdigit() or n in ("self", "thread-self") for n in seen), seen
    # and no open file of another sandbox
    fds = [os.readlink(p) for p in Path(f"/proc/{pid}/fd").iterdir()]
    assert not [f for f in fds if b.id in f], fds

    assert a.exec("echo alive").stdout == "alive\n"
    cp = a.checkpoint()
    fork = w.fork(cp)
    assert fork.exec("echo forked").stdout == "forked\n"
    assert _status(fork.info().pid)["Seccomp"] == "2"  # type: ignore[arg-type]

    groups = _cgroup_dirs(pid)
    assert groups and all(g.is_dir() for g in groups)
    a.destroy()
    deadline = time.monotonic() + 5
    while any(g.exists() for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [g for g in groups if g.exists()], "cgroup left behind after the VM exited"


@pytest.fixture
def small_sandboxes_fs(worker_factory):
    w = worker_factory("full")
    target = w.home.sandboxes_dir
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "forkyard-full", str(target)],
                   check=True)
    try:
        yield w
    finally:
        for sb in w.list():
            sb.destroy()
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_guest_filling_a_full_host_fs_fails_the_sandbox(small_sandboxes_fs):
    w = small_sandboxes_fs
    w.image("minimal")  # built outside the small filesystem
    sb = w.create("minimal", cold=True)  # no template checkpoint in the small filesystem
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            sb.exec("dd if=/dev/zero of=/fill bs=1M count=80 conv=fsync", timeout=120)
        except ForkyardError as exc:
            errors.append(exc)

    t0 = time.monotonic()
    writer = threading.Thread(target=fill)
    writer.start()
    deadline = t0 + 90
    while sb.state is not SandboxState.FAILED and time.monotonic() < deadline:
        time.sleep(0.1)
    failed_after = time.monotonic() - t0
    assert sb.state is SandboxState.FAILED, "sandbox did not fail on a full host filesystem"
    info = sb.info()
    assert info.error is not None and "No space left on device" in info.error, info.error
    # the VM was stopped, not left paused (the failing call may see the sandbox
    # failed a moment before the killed QEMU is reaped)
    stopped = time.monotonic() + 10
    while sb.info().pid is not None and time.monotonic() < stopped:
        time.sleep(0.1)
    assert sb.info().pid is None
    writer.join(30)
    assert not writer.is_alive()
    assert errors and "No space left" in str(errors[0]), errors
    assert failed_after < 45  # boot is done: a TCG dd of 24 MiB, then the fault path

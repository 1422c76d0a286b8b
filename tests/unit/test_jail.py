"""The jail's parts without a VM: id leases, the id range check, cgroup files, fd passing."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from forkyard.errors import SetupError
from forkyard.vm import cgroup, vmuser
from forkyard.vm.jail import SANDBOX, JailedFiles, PlainFiles, qcow2_virtual_size
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape, VMState


def test_leases_are_distinct_and_freed_on_release(tmp_path):
    a = vmuser.lease(tmp_path)
    b = vmuser.lease(tmp_path)
    assert a.uid != b.uid and a.uid >= vmuser.VM_ID_BASE and a.gid == a.uid
    # the lease is an flock: another opener cannot take the same slot
    fd = os.open(tmp_path / str(a.uid - vmuser.VM_ID_BASE), os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    a.release()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free now
    os.close(fd)
    b.release()
    b.release()  # idempotent


@pytest.mark.parametrize(("name", "line"), [
    ("passwd", f"intruder:x:{vmuser.VM_ID_BASE + 5}:100::/:/bin/sh"),
    ("group", f"grp:x:{vmuser.VM_ID_BASE}:"),
    ("subuid", f"alice:{vmuser.VM_ID_BASE - 10}:65536"),
    ("subgid", f"bob:{vmuser.VM_ID_BASE + vmuser.VM_ID_SLOTS - 1}:1"),
])
def test_id_range_owned_by_someone_is_refused(tmp_path, name, line):
    (tmp_path / name).write_text(f"root:x:0:0::/root:/bin/sh\n{line}\n")
    with pytest.raises(SetupError, match="reserves for confined VMs"):
        vmuser.ensure_vm_ids(tmp_path)


def test_id_range_check_passes_on_a_normal_host(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:\n")
    (tmp_path / "subuid").write_text(f"alice:100000:65536\nedge:{vmuser.VM_ID_BASE - 1}:1\n")
    vmuser.ensure_vm_ids(tmp_path)


def test_limits_cover_guest_ram_plus_overhead():
    lim = cgroup.limits_for(512, 2, "tcg")
    assert lim.memory_bytes == (512 + cgroup.TCG_OVERHEAD_MB) * 2**20
    assert lim.cpu_quota_us == 2 * 100_000 + 25_000
    assert lim.pids > 2 + 64  # vCPUs + QEMU's block thread pool
    assert cgroup.limits_for(512, 2, "kvm").memory_bytes < lim.memory_bytes


def test_cgroup_v1_files(tmp_path):
    for c in ("memory", "cpu", "pids"):
        (tmp_path / c).mkdir()
    g = cgroup.VMCgroup("vm1", cgroup.limits_for(256, 1, "tcg"), root=tmp_path)
    mem = tmp_path / "memory/forkyard/vm1"
    assert int((mem / "memory.limit_in_bytes").read_text()) == g.limits.memory_bytes
    assert (tmp_path / "cpu/forkyard/vm1/cpu.cfs_quota_us").read_text() == "125000"
    assert (tmp_path / "pids/forkyard/vm1/pids.max").read_text() == str(g.limits.pids)
    assert g.procs_files == [tmp_path / c / "forkyard/vm1/cgroup.procs"
                             for c in ("memory", "cpu", "pids")]


def test_cgroup_v1_missing_controller_is_an_error(tmp_path):
    (tmp_path / "memory").mkdir()
    with pytest.raises(Exception, match="no cgroup cpu controller"):
        cgroup.VMCgroup("vm1", cgroup.limits_for(256, 1, "tcg"), root=tmp_path)


def test_cgroup_v2_files(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    g = cgroup.VMCgroup("vm2", cgroup.limits_for(256, 1, "tcg"), root=tmp_path)
    d = tmp_path / "forkyard/vm2"
    assert (d / "memory.max").read_text() == str(g.limits.memory_bytes)
    assert (d / "cpu.max").read_text() == "125000 100000"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert g.procs_files == [d / "cgroup.procs"]


def test_jailed_files_are_fds_of_the_right_modes(tmp_path):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"x")
    f = JailedFiles()
    assert f.disk(disk, writable=True) == "/dev/fdset/1"
    assert f.disk(disk, writable=False) == "/dev/fdset/2"
    assert f.console(tmp_path / "console.log") == "/dev/fdset/3"
    agent = f.agent(tmp_path / "a.sock")
    args = f.args()
    assert args[:2] == ["-sandbox", SANDBOX]
    fds = [int(a.split(",")[0][3:]) for a in args[3::2]]
    sets = [a.split("set=")[1] for a in args[3::2]]
    assert sets == ["1", "1", "2", "3"]
    modes = [fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE for fd in fds]
    assert modes == [os.O_RDWR, os.O_RDONLY, os.O_RDONLY, os.O_WRONLY]
    # the agent socket is bound by us and already listening: QEMU needs no path
    sock_fd = int(agent.split(",")[0][3:])
    assert set(f.pass_fds) == {*fds, sock_fd}
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "a.sock"))
    client.close()
    f.handed_over()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert f.pass_fds == ()


def test_late_disk_sends_fds_over_qmp(tmp_path):
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"x")
    sent: list[tuple[int, int]] = []

    class FakeQMP:
        def add_fd(self, fd: int, fdset_id: int) -> None:
            sent.append((fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, fdset_id))

    f = JailedFiles()
    f.disk(disk, writable=False)
    assert f.late_disk(FakeQMP(), disk, writable=True) == "/dev/fdset/2"
    assert sent == [(os.O_RDWR, 2), (os.O_RDONLY, 2)]
    f.handed_over()


def test_plain_files_keep_paths(tmp_path):
    f = PlainFiles()
    assert f.disk(tmp_path / "x", writable=True) == str(tmp_path / "x")
    assert f.args() == []


def test_qcow2_virtual_size(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "96M"], check=True)
    assert qcow2_virtual_size(img) == 96 * 2**20
    (tmp_path / "raw").write_bytes(b"\0" * 64)
    assert qcow2_virtual_size(tmp_path / "raw") == 0


def _vm(tmp_path: Path, confine: bool) -> QemuVM:
    return QemuVM(name="t", workdir=tmp_path, agent_socket=tmp_path / "a.sock",
                  shape=VMShape(256, 1, "pc-q35-7.2", "tcg"),
                  boot=BootSpec(tmp_path / "k", tmp_path / "i"),
                  disk=DiskChain(tmp_path / "base", (tmp_path / "l0",), tmp_path / "top"),
                  confine=confine)


def test_unconfined_argv_names_paths_and_no_sandbox(tmp_path):
    argv = _vm(tmp_path, False).argv(incoming=False, qmp_fd=3)
    text = " ".join(argv)
    assert "-sandbox" not in argv and "/dev/fdset" not in text
    assert str(tmp_path / "top") in text and str(tmp_path / "base") in text


def test_confined_argv_names_no_host_file_but_boot_files(tmp_path):
    for name in ("base", "l0", "top"):
        (tmp_path / name).write_bytes(b"")
    files = JailedFiles()
    argv = _vm(tmp_path, True).argv(incoming=False, qmp_fd=3, files=files)
    text = " ".join(argv)
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    for name in ("base", "l0", "top", "console.log", "a.sock"):
        assert str(tmp_path / name) not in text, name
    assert text.count('"locking": "off"') == 3
    files.handed_over()


def test_block_io_error_fails_the_vm_with_its_reason(tmp_path):
    vm = _vm(tmp_path, True)
    got: list[str] = []
    done = threading.Event()
    vm.on_fault = lambda why: (got.append(why), done.set())
    vm._on_event({"event": "RTC_CHANGE", "data": {}})
    assert vm.fault is None
    vm._on_event({"event": "BLOCK_IO_ERROR", "data": {
        "device": "", "node-name": "top0", "operation": "write", "action": "stop",
        "nospace": True, "reason": "No space left on device"}})
    assert done.wait(5)
    assert got == [vm.fault]
    assert "write failed on the host: No space left on device" in got[0]
    assert "full" in got[0]
    assert vm.state is VMState.FAILED
    vm._on_event({"event": "BLOCK_IO_ERROR", "data": {"operation": "read"}})
    assert len(got) == 1  # reported once


def test_not_root_falls_back_with_one_warning(monkeypatch, caplog):
    from forkyard.vm import jail

    monkeypatch.setattr(jail.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(jail, "_warned", threading.Event())
    with caplog.at_level("WARNING", logger="forkyard.vm"):
        assert jail.can_confine() is False
        assert jail.can_confine() is False
    warnings = [r for r in caplog.records if "not running as root" in r.getMessage()]
    assert len(warnings) == 1

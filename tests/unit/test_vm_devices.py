"""Device profiles as data: one rendering for forkyard's QEMU and for an export's plain QEMU."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from forkyard.checkpoint.export import plain_qemu_argv
from forkyard.errors import IncompatibleCheckpoint
from forkyard.vm import devices
from forkyard.vm.cmdline import qemu_argv, standalone_argv
from forkyard.vm.devices import (
    CURRENT_PROFILE,
    DEVICE_PROFILE,
    FORKYARD_V1,
    Device,
    DeviceProfile,
    device_profile,
)
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape

SHAPE = VMShape(256, 1, "pc-q35-7.2", "tcg", qemu="7.2.22", disk_size=1 << 30)


def _devices(argv: list[str]) -> dict[str, dict[str, str]]:
    """The -device options of a command line, by id, as property maps."""
    out = {}
    for flag, value in itertools.pairwise(argv):
        if flag == "-device":
            driver, *props = value.split(",")
            d = dict(p.split("=", 1) for p in props)
            d["driver"] = driver
            out[d["id"]] = d
    return out


def _runtime(shape: VMShape = SHAPE) -> list[str]:
    return qemu_argv(name="sb-x", shape=shape, boot=BootSpec(Path("/k"), Path("/i")),
                     disk=DiskChain(Path("/b.raw"), (), Path("/a.qcow2")), top_node="top0",
                     qmp_fd=7, console_fd=8,
                     agent_socket=Path("/r/a.agent"), incoming=True)


def test_v1_renders_exactly_the_devices_v1_checkpoints_were_saved_with() -> None:
    # the hand-written command line before profiles were data (checkpoints made
    # with it must keep loading): same drivers, ids, buses and PCI addresses
    assert _devices(_runtime()) == {
        "disk0": {"driver": "virtio-blk-pci", "drive": "top0", "id": "disk0", "addr": "0x4"},
        "vser0": {"driver": "virtio-serial-pci", "id": "vser0", "addr": "0x5"},
        "agentport": {"driver": "virtserialport", "bus": "vser0.0", "nr": "1",
                      "chardev": "agent", "name": "agent", "id": "agentport"},
    }
    argv = _runtime()
    assert argv[argv.index("-serial") + 1] == "chardev:console"
    assert argv.count("-serial") == 1
    assert "socket,id=console,fd=8" in argv  # the console ring (vm/console.py)
    assert argv[-2:] == ["-incoming", "defer"]


def test_runtime_and_export_render_the_same_guest_devices() -> None:
    plain = plain_qemu_argv(SHAPE, Path("/x.qcow2"), snapshot="fy", agent_socket=Path("/s"))
    runtime, exported = _devices(_runtime()), _devices(plain)
    for d in (runtime, exported):
        d["disk0"].pop("drive")  # each binds its own block backend
    assert runtime == exported
    assert plain[plain.index("-drive") + 1] == "file=/x.qcow2,if=none,id=disk0,format=qcow2"
    assert plain[-2:] == ["-loadvm", "fy"]
    assert "-kernel" not in plain
    assert plain == standalone_argv(SHAPE, Path("/x.qcow2"), snapshot="fy",
                                    agent_socket=Path("/s"))


def test_qemu_vm_argv_is_the_one_rendering() -> None:
    vm = QemuVM(name="sb-x", workdir=Path("/w"), agent_socket=Path("/r/a.agent"), shape=SHAPE,
                boot=BootSpec(Path("/k"), Path("/i")),
                disk=DiskChain(Path("/b.raw"), (), Path("/a.qcow2")))
    assert vm.argv(incoming=True, qmp_fd=7, console_fd=8) == _runtime()


def test_registry_knows_v1_and_refuses_unknown_profiles() -> None:
    assert DEVICE_PROFILE == "forkyard-v1" == CURRENT_PROFILE.name
    assert device_profile("forkyard-v1") is FORKYARD_V1
    assert SHAPE.profile is FORKYARD_V1
    with pytest.raises(IncompatibleCheckpoint, match="forkyard-v9"):
        device_profile("forkyard-v9")
    with pytest.raises(IncompatibleCheckpoint):
        _ = VMShape(256, 1, "pc-q35-7.2", "tcg", devices="../../etc").profile


def test_a_new_profile_is_one_entry_and_old_checkpoints_render_theirs(monkeypatch) -> None:
    nic = Device("virtio-net-pci", "net0", addr="0x6", backend=("netdev", "net"))
    v2 = DeviceProfile("forkyard-v2", (*FORKYARD_V1.devices, nic))
    monkeypatch.setattr(devices, "PROFILES", {**devices.PROFILES, v2.name: v2})
    assert v2.roles() == {"console", "disk", "agent", "net"}
    rendered = v2.args({"console": "c", "disk": "d", "agent": "a", "net": "n0"})
    assert rendered[-2:] == ["-device", "virtio-net-pci,netdev=n0,id=net0,addr=0x6"]
    # a v1 checkpoint still renders v1: no NIC in its machine
    assert "net0" not in _devices(_runtime(SHAPE))
    with pytest.raises(ValueError, match="net"):
        v2.args({"console": "c", "disk": "d", "agent": "a"})

"""The guest's device set as data: versioned profiles every QEMU command line renders.

A saved VM state only loads into a QEMU with the same devices at the same
addresses ("Unknown savevm section" otherwise).  So the device set is a frozen
value with a version name; checkpoints record that name (manifest
``vm.devices``) and a restore renders the *recorded* profile, whatever the
current one is.  Both forkyard's own QEMU (``forkyard.vm.cmdline``) and the
plain command line of an export render from here, so they cannot drift apart.

Adding a device (say a NIC) is one new profile in :data:`PROFILES` with a new
name, made :data:`CURRENT_PROFILE`; older profiles stay so that checkpoints
made with them still restore.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from forkyard.errors import IncompatibleCheckpoint

__all__ = [
    "CURRENT_PROFILE",
    "DEVICE_PROFILE",
    "FORKYARD_V1",
    "FORKYARD_V2_NET",
    "NET_PROFILE",
    "PROFILES",
    "Device",
    "DeviceProfile",
    "device_profile",
]


@dataclass(frozen=True, slots=True)
class Device:
    """One guest-visible device.

    ``backend`` names the host side it plugs into as ``(property, role)``,
    e.g. ``("drive", "disk")``: each command line binds the role to its own
    backend id (forkyard's ``-blockdev`` node, an export's ``-drive``).
    """

    driver: str  # QEMU device model, e.g. virtio-blk-pci
    id: str
    addr: str | None = None  # PCI slot: part of the saved state's section names
    bus: str | None = None
    props: tuple[tuple[str, str], ...] = ()
    backend: tuple[str, str] | None = None
    # "-serial": the legacy option that creates the ISA UART; checkpoints of
    # forkyard-v1 were saved from a QEMU started that way, so it stays that way
    option: str = "-device"

    def args(self, backends: Mapping[str, str]) -> list[str]:
        bound = None
        if self.backend is not None:
            prop, role = self.backend
            if role not in backends:
                raise ValueError(f"device {self.id} needs a {role!r} backend")
            bound = (prop, backends[role])
        if self.option == "-serial":
            if bound is None:
                raise ValueError(f"serial device {self.id} needs a chardev")
            return ["-serial", f"chardev:{bound[1]}"]
        fields = [self.driver]
        if self.bus is not None:
            fields.append(f"bus={self.bus}")
        fields += [f"{k}={v}" for k, v in self.props]
        if bound is not None:
            fields.append(f"{bound[0]}={bound[1]}")
        fields.append(f"id={self.id}")
        if self.addr is not None:
            fields.append(f"addr={self.addr}")
        return [self.option, ",".join(fields)]


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str  # recorded in manifests; a new device set needs a new name
    devices: tuple[Device, ...]

    def args(self, backends: Mapping[str, str]) -> list[str]:
        """The QEMU options creating every device, in order, plugged into ``backends``."""
        out: list[str] = []
        for device in self.devices:
            out += device.args(backends)
        return out

    def roles(self) -> frozenset[str]:
        """The backends a command line must bind (``disk``, ``agent``, ``console``)."""
        return frozenset(d.backend[1] for d in self.devices if d.backend is not None)


FORKYARD_V1 = DeviceProfile(
    name="forkyard-v1",
    devices=(
        Device("isa-serial", "serial0", backend=("chardev", "console"), option="-serial"),
        Device("virtio-blk-pci", "disk0", addr="0x4", backend=("drive", "disk")),
        Device("virtio-serial-pci", "vser0", addr="0x5"),
        # the guest agent finds its port by name: /dev/virtio-ports/agent
        Device("virtserialport", "agentport", bus="vser0.0",
               props=(("nr", "1"), ("name", "agent")), backend=("chardev", "agent")),
    ),
)

# forkyard-v1 plus a NIC: sandboxes with a network (forkyard.net); ``network:
# none`` keeps forkyard-v1 (no card at all), so checkpoints of either restore.
# The guest's MAC is fixed: every fork is the same machine in its own namespace.
# No option ROM (romfile=): the kernel boots directly, and a ROM would be one
# more RAM block whose size differs between QEMU builds, failing a restore.
FORKYARD_V2_NET = DeviceProfile(
    name="forkyard-v2-net",
    devices=(
        *FORKYARD_V1.devices,
        Device("virtio-net-pci", "nic0", addr="0x6",
               props=(("mac", "52:54:00:12:34:56"), ("romfile", "")),
               backend=("netdev", "net")),
    ),
)

PROFILES: Mapping[str, DeviceProfile] = {p.name: p for p in (FORKYARD_V1, FORKYARD_V2_NET)}
CURRENT_PROFILE = FORKYARD_V1  # what new sandboxes without a network get
NET_PROFILE = FORKYARD_V2_NET  # ... and with one
DEVICE_PROFILE = CURRENT_PROFILE.name


def device_profile(name: str) -> DeviceProfile:
    """The profile a checkpoint recorded; one this forkyard does not know cannot load."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise IncompatibleCheckpoint(
            f"device profile {name!r} is unknown to this forkyard (it builds {known})"
        ) from None

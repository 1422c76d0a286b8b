"""What a VM is, apart from its disk contents: the one shape type and the boot files.

:class:`VMShape` is used by the runtime (the QEMU it starts) and recorded by
checkpoint manifests (``vm`` object) as the same value: a saved state needs
exactly this machine type, accelerator, CPU model, memory, vCPU count and
device profile from the QEMU that loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forkyard.vm.devices import DEVICE_PROFILE, DeviceProfile, device_profile

__all__ = ["DEFAULT_CMDLINE", "BootSpec", "VMShape"]


@dataclass(frozen=True, slots=True)
class VMShape:
    """Everything a saved VM state needs from the QEMU that loads it."""

    memory_mb: int
    cpus: int
    machine: str  # the concrete machine type, e.g. pc-q35-7.2 (never an alias)
    accel: str  # "tcg" or "kvm"
    cpu: str = "qemu64"
    devices: str = DEVICE_PROFILE  # a name in forkyard.vm.devices.PROFILES
    qemu: str = ""  # version of the QEMU that runs (or saved) it, e.g. 7.2.22
    disk_size: int = 0  # virtual disk size in bytes (the raw base's size)

    @property
    def profile(self) -> DeviceProfile:
        return device_profile(self.devices)


# init_on_free=1: freed guest pages are zeroed, and QEMU's migration sends zero
# pages as a flag instead of 4 KiB; a checkpoint of an idle 256 MiB guest drops
# from ~96 MB to ~55 MB of state (and forks load correspondingly faster).
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1 tsc=reliable init_on_free=1"


@dataclass(frozen=True, slots=True)
class BootSpec:
    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE

"""Whether this host's QEMU can load a checkpoint's saved VM state."""

from __future__ import annotations

from collections.abc import Callable

from forkyard.checkpoint import Checkpoint
from forkyard.errors import IncompatibleCheckpoint
from forkyard.host.setup import HostInfo
from forkyard.vm.devices import PROFILES

__all__ = ["check_compatible"]


def check_compatible(cp: Checkpoint, host: HostInfo,
                     machines: Callable[[], set[str]]) -> None:
    """IncompatibleCheckpoint unless ``host`` can build the machine ``cp`` recorded."""
    vm = cp.manifest.vm
    if vm.devices not in PROFILES:
        raise IncompatibleCheckpoint(
            f"checkpoint {cp.short_id} uses device profile {vm.devices!r}; "
            f"this forkyard builds {', '.join(sorted(PROFILES))}"
        )
    if vm.accel != host.accel:
        raise IncompatibleCheckpoint(
            f"checkpoint {cp.short_id} was saved under {vm.accel}, this host runs "
            f"{host.accel}: QEMU cannot move a running state between them"
        )
    if vm.machine not in machines():
        raise IncompatibleCheckpoint(
            f"checkpoint {cp.short_id} needs machine type {vm.machine!r}, which this "
            f"QEMU {host.qemu_version} does not have"
        )

"""A sandbox's facts, and their record on disk: ``<home>/sandboxes/<id>/sandbox.json``.

The record is what lets a hibernated sandbox outlive its worker process: a
new :class:`~forkyard.worker.Worker` on the same home reads it back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkyard._fs import atomic_write_bytes
from forkyard.checkpoint import Checkpoint
from forkyard.errors import ImageError, InsufficientCapacity
from forkyard.wire.network import NetworkSpec

__all__ = ["DEFAULT_DISK", "HIBERNATING_MARK", "MAX_DISK", "RECORD_NAME", "SandboxInfo",
           "SandboxSpec",
           "disk_size_for", "read_record", "spec_of_checkpoint", "spec_of_record", "write_record"]

log = logging.getLogger("forkyard.worker")

RECORD_NAME = "sandbox.json"
# holds the id of the checkpoint a hibernate under way took (removed once hibernated)
HIBERNATING_MARK = "hibernating"
GIB = 1 << 30
DEFAULT_DISK = 4 * GIB  # thin: only what the guest writes takes host space
MAX_DISK = 1024 * GIB  # = the wire's DISK_MAX


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What a sandbox runs on: set at create/fork, replaced by a restore."""

    base_digest: str
    disk_size: int  # the guest's disk (top layer's virtual size), >= the raw base's size
    memory_mb: int
    cpus: int
    parent: str | None  # checkpoint it was forked/woken/restored from
    base_size: int = 0  # the raw base's size; 0: the same as disk_size
    network: NetworkSpec | None = None  # None: network mode none (no NIC at all)


def disk_size_for(requested: int | None, base_size: int) -> int:
    """The guest disk for an image of ``base_size`` bytes: whole MiB, never below the image."""
    size = max(DEFAULT_DISK, base_size) if requested is None else requested
    if size > MAX_DISK:
        raise InsufficientCapacity(f"a disk of {size} bytes is over the limit of {MAX_DISK}",
                                   resource="disk", limit=MAX_DISK)
    if size < base_size:
        raise ImageError(f"the image needs a disk of at least {base_size} bytes, not {size}")
    return -(-size // (1 << 20)) << 20


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    id: str
    state: str
    image: str  # base digest
    disk_size: int
    created: str
    memory_mb: int
    cpus: int
    parent_checkpoint: str | None
    last_checkpoint: str | None
    pid: int | None
    error: str | None = None  # why it failed, when known (e.g. a host-side disk fault)
    network: NetworkSpec | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "image": self.image,
            "disk_size": self.disk_size,
            "created": self.created,
            "memory_mb": self.memory_mb,
            "cpus": self.cpus,
            "parent_checkpoint": self.parent_checkpoint,
            "last_checkpoint": self.last_checkpoint,
            "pid": self.pid,
            "error": self.error,
            "network": None if self.network is None else self.network.model_dump(mode="json"),
        }


def write_record(directory: Path, info: SandboxInfo) -> None:
    """Replace the record atomically (two threads may save the same sandbox at once)."""
    if not directory.exists():
        return  # destroyed meanwhile: nothing to record
    atomic_write_bytes(directory / RECORD_NAME, json.dumps(info.to_json(), indent=1))


def read_record(directory: Path) -> dict[str, Any]:
    """The record's JSON object; OSError or ValueError if missing or unreadable."""
    data = json.loads((directory / RECORD_NAME).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{directory / RECORD_NAME} is not a JSON object")
    return data


def spec_of_record(info: dict[str, Any]) -> SandboxSpec:
    """The spec of a sandbox an earlier process recorded (``read_record``)."""
    return SandboxSpec(base_digest=info["image"], disk_size=info["disk_size"],
                       memory_mb=info["memory_mb"], cpus=info["cpus"],
                       parent=info.get("parent_checkpoint"),
                       network=_recorded_network(info.get("network")))

def _recorded_network(raw: object) -> NetworkSpec | None:
    """A record's network; an unreadable one counts as absent (the checkpoint's then)."""
    if raw is None:
        return None
    try:
        return NetworkSpec.model_validate(raw)
    except ValueError:
        log.warning("ignoring an unreadable network in a sandbox record")
        return None


def spec_of_checkpoint(cp: Checkpoint, network: NetworkSpec | None = None) -> SandboxSpec:
    """A sandbox continuing ``cp``: its machine, and its network unless ``network``
    replaces the rules (a machine without a NIC stays ``none``: the mode is the
    machine's, and checkpoints from before networks have none)."""
    m = cp.manifest
    net = None
    if "net" in m.vm.profile.roles():
        net = m.network or NetworkSpec()
        if network is not None and network.mode is net.mode:
            net = network
    return SandboxSpec(base_digest=m.base.digest, disk_size=m.vm.disk_size,
                       memory_mb=m.vm.memory_mb, cpus=m.vm.cpus, parent=cp.id,
                       base_size=m.base.size, network=net)


"""A sandbox's facts, and their record on disk: ``<home>/sandboxes/<id>/sandbox.json``.

The record is what lets a hibernated sandbox outlive its worker process: a
new :class:`~forkyard.worker.Worker` on the same home reads it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkyard._fs import atomic_write_bytes
from forkyard.errors import ImageError, InsufficientCapacity

__all__ = ["DEFAULT_DISK", "HIBERNATING_MARK", "MAX_DISK", "RECORD_NAME", "SandboxInfo",
           "SandboxSpec",
           "disk_size_for", "read_record", "write_record"]

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

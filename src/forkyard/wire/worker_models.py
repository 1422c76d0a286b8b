"""The bodies only workers and the control plane exchange (docs/api.md, "Workers").

Apart from :mod:`forkyard.wire.models` (the public API's bodies) so each side
of the public/worker divide reads as one page; both follow the same rules
(requests forbid unknown fields, replies ignore them).
"""

from __future__ import annotations

from pydantic import Field, StrictBool

from forkyard.wire.ids import SANDBOX_ID_RE
from forkyard.wire.lifecycle import SandboxState
from forkyard.wire.models import (
    CHECKPOINT_NAME_RE,
    DISK_MAX,
    DISK_MIN,
    CheckpointState,
    Digest,
    WorkerName,
    WorkerState,
    _Reply,
    _Request,
)
from forkyard.wire.network import NetworkSpec

__all__ = [
    "HeartbeatReply",
    "WorkerCapacity",
    "WorkerCheckpoint",
    "WorkerCheckpointRequest",
    "WorkerCreateRequest",
    "WorkerForkRequest",
    "WorkerHealth",
    "WorkerHibernated",
    "WorkerLeaving",
    "WorkerPublishStatus",
    "WorkerReport",
    "WorkerSandbox",
    "WorkerStatus",
    "WorkerWakeRequest",
]


class WorkerSandbox(_Reply):
    """A worker's view of one sandbox (``forkyard.worker.SandboxInfo``)."""

    id: str
    state: SandboxState
    image: str
    created: str
    memory_mb: int
    cpus: int
    parent_checkpoint: str | None
    last_checkpoint: str | None
    pid: int | None = None
    error: str | None = None  # why it failed, e.g. a host-side disk fault
    network: NetworkSpec | None = None  # its mode and rules; None: mode none (no NIC)


class WorkerCheckpoint(_Reply):
    id: Digest
    sandbox: str
    name: str | None
    created: str
    base: Digest
    changed_bytes: int
    state: CheckpointState
    stored_bytes: int | None = None
    error: str | None = None
    ram_new_bytes: int | None = Field(default=None, ge=0)
    ram_shared_bytes: int | None = Field(default=None, ge=0)


class WorkerPublishStatus(_Reply):
    id: str
    state: CheckpointState
    stored_bytes: int | None = None
    error: str | None = None


class WorkerHibernated(_Reply):
    checkpoint: WorkerCheckpoint
    sandbox: WorkerSandbox


class WorkerCapacity(_Reply):
    """What a worker can give guests and what its sandboxes hold of it (admission).

    Each VM costs its guest RAM plus ``vm_overhead_mb`` (QEMU itself, TCG's
    translation buffer) against ``memory_mb``, and its vCPUs against ``cpus``.
    """

    memory_mb: int = Field(ge=0, description="memory usable by guests, overhead included")
    memory_used_mb: int = Field(ge=0)
    cpus: int = Field(ge=0, description="vCPUs this worker runs at most")
    cpus_used: int = Field(ge=0)
    max_vm_cpus: int = Field(ge=1, description="the most vCPUs one sandbox may have")
    vm_overhead_mb: int = Field(ge=0)
    default_memory_mb: int = Field(ge=1, description="the shape of a create that names none")
    default_cpus: int = Field(ge=1)


class WorkerStatus(_Reply):
    name: WorkerName
    running: int = Field(ge=0)
    free_memory_mb: int = Field(ge=0)
    max_sandboxes: int = Field(ge=0)
    capacity: WorkerCapacity | None = Field(
        default=None, description="absent: an older worker; it still refuses what does not fit")
    cached_bases: list[str] = Field(default_factory=list)
    checkpoints: list[str] = Field(default_factory=list)
    images: dict[str, str] = Field(
        default_factory=dict, description="image names this worker has -> base digest"
    )


class WorkerReport(WorkerStatus):
    """Body of register and heartbeat."""

    url: str = Field(pattern=r"^https?://[^/\s]+$")
    store_url: str | None = Field(default=None, description="must equal the control plane's store")
    sandboxes: list[WorkerSandbox] = Field(default_factory=list)


class WorkerLeaving(_Reply):
    """Sent by a worker that shuts down cleanly: what became of its sandboxes."""

    sandboxes: list[WorkerSandbox] = Field(default_factory=list)
    checkpoints: list[WorkerCheckpoint] = Field(default_factory=list)


class HeartbeatReply(_Reply):
    name: str
    state: WorkerState
    destroy: list[str] = Field(
        default_factory=list,
        description="sandboxes the worker runs that the cluster no longer knows: destroy them",
    )


class WorkerHealth(_Reply):
    status: str
    name: str


class WorkerCreateRequest(_Request):
    image: str = Field(default="minimal", min_length=1, max_length=200)
    memory_mb: int | None = Field(default=None, ge=64, le=256 * 1024)
    cpus: int | None = Field(default=None, ge=1, le=64)
    sandbox_id: str | None = Field(default=None, pattern=SANDBOX_ID_RE.pattern)
    disk: int | None = Field(default=None, ge=DISK_MIN, le=DISK_MAX)
    cold: StrictBool = False
    network: NetworkSpec | None = None


class WorkerCheckpointRequest(_Request):
    name: str | None = Field(default=None, pattern=CHECKPOINT_NAME_RE)
    publish: StrictBool = True


class WorkerForkRequest(_Request):
    sandbox_id: str | None = Field(default=None, pattern=SANDBOX_ID_RE.pattern)
    # the source sandbox's network as the control plane stored it (None: the manifest's)
    network: NetworkSpec | None = None


class WorkerWakeRequest(_Request):
    checkpoint_id: Digest | None = None
    network: NetworkSpec | None = None  # the sandbox's stored network (None: the manifest's)

"""Request and reply bodies of both services (docs/api.md), as pydantic models.

The worker daemon uses the same models for the bodies it shares with the
control plane (exec, files, sandbox info), so the two cannot drift apart.
Requests forbid unknown fields: a misspelt option is a 422, not silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forkyard.wire.ids import SANDBOX_ID_RE
from forkyard.wire.lifecycle import SandboxState

__all__ = [
    "CHECKPOINT_NAME_RE",
    "MAX_FILE_BYTES",
    "SANDBOX_ID_RE",
    "WORKER_NAME_RE",
    "CheckpointOut",
    "CheckpointRequest",
    "CheckpointState",
    "CreateSandboxRequest",
    "EntryOut",
    "ExecRequest",
    "ExecResultOut",
    "FileWritten",
    "ForkRequest",
    "Health",
    "HeartbeatReply",
    "HibernateRequest",
    "SandboxOut",
    "SandboxState",
    "WakeRequest",
    "WorkerCheckpoint",
    "WorkerCheckpointRequest",
    "WorkerCreateRequest",
    "WorkerForkRequest",
    "WorkerHealth",
    "WorkerHibernated",
    "WorkerLeaving",
    "WorkerOut",
    "WorkerPublishStatus",
    "WorkerReport",
    "WorkerSandbox",
    "WorkerState",
    "WorkerStatus",
    "WorkerWakeRequest",
    "dump",
]

MAX_FILE_BYTES = 64 * 1024 * 1024  # same as forkyard.guest.client.MAX_FILE_SIZE
WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# what a checkpoint manifest accepts as a name (forkyard.checkpoint.manifest)
CHECKPOINT_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._:+@ -]{0,127}$"
_DIGEST = r"^[0-9a-f]{64}$"
MAX_EXEC_TIMEOUT = 24 * 3600.0


class CheckpointState(enum.StrEnum):
    LOCAL = "local"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    FAILED = "failed"


class WorkerState(enum.StrEnum):
    ALIVE = "alive"
    DEAD = "dead"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Reply(BaseModel):
    # replies from a newer peer may carry fields this version does not know
    model_config = ConfigDict(extra="ignore")


WorkerName = Annotated[str, Field(pattern=WORKER_NAME_RE.pattern)]
Digest = Annotated[str, Field(pattern=_DIGEST)]


# ---------------------------------------------------------------------------
# public objects
class Health(_Reply):
    status: str
    version: str


class SandboxOut(_Reply):
    id: str
    state: SandboxState
    worker: str | None
    image: str | None = Field(description="sha256 of the base image (null until booted)")
    memory_mb: int | None
    cpus: int | None
    created: str
    parent_checkpoint: str | None
    last_checkpoint: str | None
    error: str | None
    recoverable_from: str | None = Field(
        None, description="for `lost` sandboxes: the published checkpoint to fork instead"
    )


class CheckpointOut(_Reply):
    id: str
    sandbox: str
    worker: str | None  # None: known only from the store (e.g. imported)
    name: str | None
    created: str
    state: CheckpointState
    base: str
    changed_bytes: int
    stored_bytes: int | None
    error: str | None


class WorkerOut(_Reply):
    name: str
    url: str
    state: WorkerState
    last_heartbeat: str | None
    running: int
    free_memory_mb: int
    max_sandboxes: int
    cached_bases: list[str]
    checkpoints: list[str]


class ExecResultOut(_Reply):
    exit_code: int
    stdout: str
    stderr: str
    stdout_b64: str
    stderr_b64: str
    pid: int
    signal: int | None
    timed_out: bool
    truncated: bool


class EntryOut(_Reply):
    name: str
    mode: int
    size: int
    mtime_ns: int
    is_dir: bool


class FileWritten(_Reply):
    path: str
    size: int


# ---------------------------------------------------------------------------
# public requests
class CreateSandboxRequest(_Request):
    image: str = Field(default="minimal", min_length=1, max_length=200)
    worker: WorkerName | None = None
    memory_mb: int | None = Field(default=None, ge=64, le=256 * 1024)
    cpus: int | None = Field(default=None, ge=1, le=64)


class ExecRequest(_Request):
    cmd: str | list[str] = Field(description="a string runs under /bin/sh -c; a list is argv")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = Field(
        default=60.0, gt=0, le=MAX_EXEC_TIMEOUT, description="seconds; null: 24 h"
    )
    stdin_b64: str | None = None
    background: bool = False

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or not items[0]:
            raise ValueError("command must not be empty")
        if any("\0" in a for a in items):
            raise ValueError("command must not contain NUL bytes")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise ValueError(f"bad environment variable {key!r}")
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or "\0" in v):
            raise ValueError("cwd must be an absolute guest path")
        return v

    @field_validator("stdin_b64")
    @classmethod
    def _stdin(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("stdin_b64 is not valid base64") from exc
        return v

    def stdin_bytes(self) -> bytes | None:
        return None if self.stdin_b64 is None else base64.b64decode(self.stdin_b64)

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else MAX_EXEC_TIMEOUT


class CheckpointRequest(_Request):
    name: str | None = Field(default=None, pattern=CHECKPOINT_NAME_RE)
    publish: bool = True


class HibernateRequest(_Request):
    wait: bool = True


class WakeRequest(_Request):
    worker: WorkerName | None = None


class ForkRequest(_Request):
    count: int = Field(default=1, ge=1, le=64)
    worker: WorkerName | None = None


# ---------------------------------------------------------------------------
# worker <-> control plane
class WorkerSandbox(_Reply):
    """A worker's view of one sandbox (``forkyard.worker.SandboxInfo``)."""

    id: str
    state: str
    image: str
    created: str
    memory_mb: int
    cpus: int
    parent_checkpoint: str | None
    last_checkpoint: str | None
    pid: int | None = None
    error: str | None = None  # why it failed, e.g. a host-side disk fault


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


class WorkerPublishStatus(_Reply):
    id: str
    state: CheckpointState
    stored_bytes: int | None = None
    error: str | None = None


class WorkerHibernated(_Reply):
    checkpoint: WorkerCheckpoint
    sandbox: WorkerSandbox


class WorkerStatus(_Reply):
    name: WorkerName
    running: int = Field(ge=0)
    free_memory_mb: int = Field(ge=0)
    max_sandboxes: int = Field(ge=0)
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


class WorkerCheckpointRequest(_Request):
    name: str | None = Field(default=None, pattern=CHECKPOINT_NAME_RE)
    publish: bool = True


class WorkerForkRequest(_Request):
    sandbox_id: str | None = Field(default=None, pattern=SANDBOX_ID_RE.pattern)


class WorkerWakeRequest(_Request):
    checkpoint_id: Digest | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")

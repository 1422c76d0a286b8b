"""forkyard's Python SDK: sandboxes on a forkyard cluster, over its HTTP API.

    from forkyard.sdk import Sandbox

    with Sandbox.create() as sb:                       # boots a VM on some worker
        print(sb.exec("uname -r").stdout)
        sb.files.write("/root/hello.txt", "hi\\n")
        cp = sb.checkpoint()                           # ~0.2 s; sb keeps running
        a, b = Sandbox.fork(cp, count=2)               # continue from that instant
        sb.hibernate(); sb.wake(worker="w2")           # move it to another worker

The cluster is found from arguments, then ``FORKYARD_URL`` /
``FORKYARD_API_TOKEN``, then ``<home>/cluster.json`` written by ``forkyard up``
(see :mod:`forkyard.sdk.config`).  Every error is a
:class:`forkyard.errors.ForkyardError`; HTTP statuses map to the classes of
:mod:`forkyard.sdk.errors`.  :class:`AsyncSandbox` is the asyncio twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forkyard.errors import CommandFailed, ForkyardError
from forkyard.sdk._commands import CommandHandle, Commands, ProcessInfo, Pty, PtyHandle
from forkyard.sdk._http import Progress
from forkyard.sdk._sync import Checkpoint, Files, Sandbox, list_workers
from forkyard.sdk.cluster import ClusterFile, load_cluster
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import (
    APIError,
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    GuestOperationError,
    IncompatibleError,
    InsufficientCapacity,
    IntegrityFailure,
    InternalError,
    InvalidRequest,
    NotFoundError,
    PublishFailed,
    ResponseFormatError,
    SandboxTimeout,
    TooLarge,
    Unavailable,
    WorkerError,
)
from forkyard.sdk.models import (
    CheckpointInfo,
    CheckpointState,
    CommandResult,
    EntryInfo,
    SandboxInfo,
    SandboxState,
    WorkerInfo,
)

if TYPE_CHECKING:
    from forkyard.sdk._async import AsyncCheckpoint, AsyncFiles, AsyncSandbox, async_list_workers

# The asyncio twin loads on first use: a CLI command that only makes one sync
# request should not pay for asyncio (see cli/_fast).
_ASYNC = frozenset({"AsyncCheckpoint", "AsyncFiles", "AsyncSandbox", "async_list_workers"})


def __getattr__(name: str) -> Any:
    if name in _ASYNC:
        from forkyard.sdk import _async

        return getattr(_async, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "APIError",
    "AsyncCheckpoint",
    "AsyncFiles",
    "AsyncSandbox",
    "AuthenticationError",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointState",
    "ClusterFile",
    "CommandFailed",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ConfigurationError",
    "ConflictError",
    "ConnectionConfig",
    "EntryInfo",
    "Files",
    "ForkyardError",
    "GuestOperationError",
    "IncompatibleError",
    "InsufficientCapacity",
    "IntegrityFailure",
    "InternalError",
    "InvalidRequest",
    "NotFoundError",
    "ProcessInfo",
    "Progress",
    "Pty",
    "PtyHandle",
    "PublishFailed",
    "ResponseFormatError",
    "Sandbox",
    "SandboxInfo",
    "SandboxState",
    "SandboxTimeout",
    "TooLarge",
    "Unavailable",
    "WorkerError",
    "WorkerInfo",
    "async_list_workers",
    "list_workers",
    "load_cluster",
]

"""Every error forkyard raises on purpose.

Foreign errors (``OSError`` from a socket, ``botocore`` errors, QMP errors,
``sqlalchemy`` errors, ...) are translated where they enter forkyard, with the
original kept as ``__cause__`` (``raise StoreError(...) from exc``), so callers
only ever need to catch this tree::

    ForkyardError
    ├── SetupError                 host set-up failed (package, kernel download)
    ├── ToolError                  an external program failed (argv, exit code, stderr)
    │   └── ToolTimeout            ... or did not finish in time
    ├── ImageError
    │   ├── ImageNotFound          no image with that name/digest in the catalog
    │   │   └── AmbiguousImageRef  a digest prefix matches several images
    │   │                          (forkyard.image.catalog)
    │   ├── ImageBuildError        the build itself failed
    │   └── UnsafeInput            a tarball/dir entry escapes its root, bad type, ...
    ├── SandboxError
    │   ├── SandboxNotFound
    │   ├── SandboxStateError      operation not valid in the sandbox's current state
    │   │   └── SandboxBusy        another operation on it is under way: retry later
    │   ├── VMError                QEMU failed to start, died, or QMP failed
    │   │   └── QMPCommandError    QEMU refused a QMP command (forkyard.vm.qmp)
    │   └── AgentError             talking to the guest agent failed
    │       ├── AgentTimeout       no answer within the call's timeout
    │       ├── AgentDisconnected  the channel closed under the call
    │       ├── PayloadTooLarge    request or reply over the protocol limit
    │       ├── AgentProtocolError the guest sent a malformed frame or field
    │       └── GuestError         the guest reported a failure (errno, kind)
    │           ├── GuestFileNotFound
    │           ├── CommandTimeout  a command ran past its timeout (killed; .result)
    │           └── CommandFailed   exec(check=True) saw a non-zero exit (.result)
    ├── CheckpointError
    │   ├── CheckpointNotFound
    │   │   └── AmbiguousCheckpoint an id prefix matches several checkpoints
    │   ├── IncompatibleCheckpoint this host cannot load the saved VM state
    │   └── ManifestError          a manifest is malformed or fails validation
    ├── StoreError                 the object store failed (I/O, network, auth)
    │   └── ObjectNotFound
    ├── IntegrityError             bytes do not match the digest/size they must have
    ├── UnsafePath                 a name from untrusted input would leave its directory
    ├── FleetError                 the control plane cannot use its workers as asked
    │   ├── WorkerNotFound         no worker by that name
    │   ├── WorkerConflict         a worker's report contradicts the cluster (name, store)
    │   ├── BadWorkerReport        a report that names another worker
    │   ├── PlacementConflict      an unpublished checkpoint asked to start elsewhere
    │   ├── WorkerUnavailable      no worker can take the work (unknown, dead, full,
    │   │                          unreachable)
    │   ├── InsufficientCapacity   no room (memory, vCPUs, sandbox slots) for that sandbox
    │   ├── WorkerTimeout          a worker did not answer in time
    │   └── WorkerReplyError       a worker's answer is unusable (or it refused our token)
    ├── DatabaseError              the control plane's database cannot be opened/migrated
    │   ├── DatabaseUnavailable    a transaction failed (connection lost, locked, ...)
    │   └── Standby                this control plane stands by: another one is active
    ├── ClusterError               a local cluster process failed to start or stop
    │                              (forkyard.cli._procs)
    └── (SDK) ConfigurationError, ResponseFormatError, APIError and its subclasses
                                   (forkyard.sdk.errors: the control plane's HTTP answers)

The HTTP status and error body of each class are in one table,
``forkyard.wire.errors`` (docs/api.md, "Errors"); the services raise these
classes and only that table turns them into HTTP.  Two exceptions there are
not part of this tree on purpose: ``ApiError`` (a refusal of the serving layer
itself, e.g. a bad Content-Length) and ``WorkerReply`` (a worker's error reply,
relayed unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentDisconnected",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AmbiguousCheckpoint",
    "BadWorkerReport",
    "CheckpointError",
    "CheckpointNotFound",
    "CommandFailed",
    "CommandTimeout",
    "DatabaseError",
    "DatabaseUnavailable",
    "FleetError",
    "ForkyardError",
    "GuestError",
    "GuestFileNotFound",
    "ImageBuildError",
    "ImageError",
    "ImageNotFound",
    "IncompatibleCheckpoint",
    "InsufficientCapacity",
    "IntegrityError",
    "ManifestError",
    "ObjectNotFound",
    "PayloadTooLarge",
    "PlacementConflict",
    "SandboxBusy",
    "SandboxError",
    "SandboxNotFound",
    "SandboxStateError",
    "SetupError",
    "Standby",
    "StoreError",
    "ToolError",
    "ToolTimeout",
    "UnsafeInput",
    "UnsafePath",
    "VMError",
    "WorkerConflict",
    "WorkerNotFound",
    "WorkerReplyError",
    "WorkerTimeout",
    "WorkerUnavailable",
]


class ForkyardError(Exception):
    """Base of every error forkyard raises on purpose."""


class SetupError(ForkyardError):
    """The host is missing something forkyard needs and could not install it."""


class ToolError(ForkyardError):
    """An external program exited with a failure status."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = f"{message}"
        if returncode is not None:
            detail += f" (exit {returncode})"
        tail = stderr.strip().splitlines()[-5:]
        if tail:
            detail += ": " + " | ".join(tail)
        super().__init__(detail)


class ToolTimeout(ToolError):
    """An external program did not finish within its timeout and was killed."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"{message} (timed out after {timeout:g}s)", argv=argv)


class ImageError(ForkyardError):
    """Base of base-image errors."""


class ImageNotFound(ImageError):
    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"no image {ref!r} in the catalog")


class ImageBuildError(ImageError):
    """Building a base image failed."""


class UnsafeInput(ImageError):
    """Untrusted build input (tarball/directory entry) was refused."""

    def __init__(self, message: str, *, entry: str = "") -> None:
        self.entry = entry
        super().__init__(f"{message}: {entry!r}" if entry else message)


class SandboxError(ForkyardError):
    """Base of sandbox/VM errors."""


class SandboxNotFound(SandboxError):
    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        super().__init__(f"no sandbox {sandbox_id!r}")


class SandboxStateError(SandboxError):
    """The operation is not valid in the sandbox's current state."""

    def __init__(self, sandbox_id: str, state: str, operation: str, *,
                 message: str | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.state = str(state)
        self.operation = operation
        super().__init__(message or f"cannot {operation} sandbox {sandbox_id!r}: it is {state}")


class SandboxBusy(SandboxStateError):
    """Another operation on the sandbox is under way (starting, hibernating, waking)."""

    def __init__(self, sandbox_id: str, state: str, operation: str, *,
                 message: str | None = None) -> None:
        super().__init__(sandbox_id, state, operation, message=message or (
            f"sandbox {sandbox_id} is {state}; retry when it settles"))


class VMError(SandboxError):
    """QEMU failed to start, exited unexpectedly, or a QMP command failed."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message + (f"\n--- log tail ---\n{log_tail}" if log_tail else ""))


class AgentError(SandboxError):
    """Talking to the guest agent failed."""


class AgentTimeout(AgentError):
    def __init__(self, operation: str, timeout: float) -> None:
        self.operation = operation
        self.timeout = timeout
        super().__init__(f"guest agent did not answer {operation} within {timeout:g}s")


class AgentDisconnected(AgentError):
    """The agent channel closed (VM stopped, or it was never reachable)."""


class PayloadTooLarge(AgentError):
    """A request or reply over its limit (``unit``: bytes, or e.g. fields)."""

    def __init__(self, what: str, size: int, limit: int, *, unit: str = "bytes") -> None:
        self.what = what
        self.size = size
        self.limit = limit
        self.unit = unit
        super().__init__(f"{what} is {size} {unit}, over the limit of {limit} {unit}")


class AgentProtocolError(AgentError):
    """The guest agent sent bytes that break the protocol (bad magic, malformed fields)."""


class GuestError(AgentError):
    """The guest agent reported a failure of the requested operation."""

    def __init__(self, operation: str, message: str, *, kind: str = "io", errno: int = 0) -> None:
        self.operation = operation
        self.kind = kind
        self.errno = errno
        super().__init__(f"guest {operation} failed: {message}")


class GuestFileNotFound(GuestError):
    """The path does not exist in the guest."""


class CommandTimeout(GuestError):
    """A command ran past its timeout; the guest killed it.  ``result`` has its output."""

    def __init__(self, command: str, timeout: float, result: object) -> None:
        self.command = command
        self.timeout = timeout
        self.result = result
        super().__init__("exec", f"{command!r} timed out after {timeout:g}s", kind="timeout")


class CommandFailed(GuestError):
    """``exec(..., check=True)`` and the command exited non-zero.  ``result`` has its output."""

    def __init__(self, command: str, result: object) -> None:
        self.command = command
        self.result = result
        code = getattr(result, "exit_code", "?")
        super().__init__("exec", f"{command!r} exited with {code}", kind="exit")


class CheckpointError(ForkyardError):
    """Base of checkpoint errors."""


class CheckpointNotFound(CheckpointError):
    def __init__(self, checkpoint_id: str, *, hint: str = "") -> None:
        self.checkpoint_id = checkpoint_id
        super().__init__(f"no checkpoint {checkpoint_id!r}" + (f" ({hint})" if hint else ""))


class AmbiguousCheckpoint(CheckpointNotFound):
    """An id prefix matches more than one checkpoint."""

    def __init__(self, prefix: str, matches: int) -> None:
        self.prefix = prefix
        self.matches = matches
        CheckpointError.__init__(
            self, f"checkpoint prefix {prefix!r} is ambiguous; give more digits")
        self.checkpoint_id = prefix


class IncompatibleCheckpoint(CheckpointError):
    """This host's QEMU/machine cannot load the checkpoint's saved VM state."""


class ManifestError(CheckpointError):
    """A checkpoint manifest is malformed or fails validation."""


class StoreError(ForkyardError):
    """The object store failed (I/O, network, permissions)."""


class ObjectNotFound(StoreError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"object {key!r} is not in the store")


class IntegrityError(ForkyardError):
    """Bytes do not match the digest or size they are required to have."""

    def __init__(
        self,
        what: str,
        *,
        expected: str,
        actual: str,
    ) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: expected {expected}, got {actual}")


class UnsafePath(ForkyardError):
    """A name taken from untrusted input would resolve outside its directory."""

    def __init__(self, name: str, root: str = "") -> None:
        self.name = name
        self.root = root
        super().__init__(f"unsafe path {name!r}" + (f" (outside {root})" if root else ""))


# ---------------------------------------------------------------------------
# the control plane and its fleet (HTTP statuses: forkyard.wire.errors)
class FleetError(ForkyardError):
    """The control plane cannot use its workers as the request asks."""


class WorkerNotFound(FleetError):
    def __init__(self, name: str, *, hint: str = "") -> None:
        self.name = name
        super().__init__(f"no worker {name!r}" + (f": {hint}" if hint else ""))


class WorkerConflict(FleetError):
    """A worker's report contradicts the cluster: its name is taken, or its store differs."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class BadWorkerReport(FleetError):
    """A worker's report is malformed in a way the schema cannot see (e.g. another name)."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class PlacementConflict(FleetError):
    """An unpublished checkpoint can only start on the worker that took it."""

    def __init__(self, checkpoint_id: str, origin: str, asked: str) -> None:
        self.checkpoint_id = checkpoint_id
        self.origin = origin
        self.asked = asked
        super().__init__(f"checkpoint {checkpoint_id[:12]} is not published: it can only "
                         f"start on worker {origin!r}, not {asked!r}")


class WorkerUnavailable(FleetError):
    """No worker can take the work now: unknown, dead, full, unreachable, or none at all."""

    def __init__(self, message: str, *, worker: str | None = None) -> None:
        self.worker = worker
        super().__init__(message)


class WorkerTimeout(FleetError):
    def __init__(self, worker: str, what: str, timeout: float) -> None:
        self.worker = worker
        self.what = what
        self.timeout = timeout
        super().__init__(f"worker {worker} did not answer {what} within {timeout:g}s")


class WorkerReplyError(FleetError):
    """A worker's answer is unusable (not our error shape, bad JSON, refused our token)."""

    def __init__(self, worker: str, message: str) -> None:
        self.worker = worker
        super().__init__(message)


class AccessError(ForkyardError):
    """The caller's key may not do this (tenants, API keys)."""


class Forbidden(AccessError):
    """A valid key without the right: e.g. a tenant key on an admin-only route."""


class KeyNotFound(AccessError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no API key {name!r}")


class KeyConflict(AccessError):
    """The key name is taken (keys are never renamed or reused), or the change would
    lock every admin out."""


class DatabaseError(ForkyardError):
    """The control plane's database cannot be opened or migrated."""


class DatabaseUnavailable(DatabaseError):
    """A transaction failed (connection lost, database locked, ...): retry later."""


class Standby(DatabaseError):
    """This control plane stands by (another holds the database's lead): ask the next."""


class InsufficientCapacity(FleetError):
    """No worker (or not this one) has room for the sandbox; nothing was started.

    ``resource`` is what was short: ``"memory"`` (MiB), ``"cpus"`` or
    ``"sandboxes"``; ``needed`` is what the sandbox asked for of it, ``free``
    what was left (for ``"sandboxes"``: 1 and the free slots).
    """

    def __init__(self, message: str, *, worker: str = "", resource: str = "sandboxes",
                 limit: int | None = None, needed: int | None = None,
                 free: int | None = None) -> None:
        self.worker = worker
        self.resource = resource
        self.limit = limit
        self.needed = needed
        self.free = free
        super().__init__(message)

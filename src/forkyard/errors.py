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
    │   ├── ImageBuildError        the build itself failed
    │   └── UnsafeInput            a tarball/dir entry escapes its root, bad type, ...
    ├── SandboxError
    │   ├── SandboxNotFound
    │   ├── SandboxStateError      operation not valid in the sandbox's current state
    │   ├── VMError                QEMU failed to start, died, or QMP failed
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
    │   ├── IncompatibleCheckpoint this host cannot load the saved VM state
    │   └── ManifestError          a manifest is malformed or fails validation
    ├── StoreError                 the object store failed (I/O, network, auth)
    │   └── ObjectNotFound
    ├── IntegrityError             bytes do not match the digest/size they must have
    └── UnsafePath                 a name from untrusted input would leave its directory

Control-plane/SDK errors (HTTP status mapping) live in ``forkyard.sdk.errors``
and also derive from :class:`ForkyardError`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentDisconnected",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "CheckpointError",
    "CheckpointNotFound",
    "CommandFailed",
    "CommandTimeout",
    "ForkyardError",
    "GuestError",
    "GuestFileNotFound",
    "ImageBuildError",
    "ImageError",
    "ImageNotFound",
    "IncompatibleCheckpoint",
    "IntegrityError",
    "ManifestError",
    "ObjectNotFound",
    "PayloadTooLarge",
    "SandboxError",
    "SandboxNotFound",
    "SandboxStateError",
    "SetupError",
    "StoreError",
    "ToolError",
    "ToolTimeout",
    "UnsafeInput",
    "UnsafePath",
    "VMError",
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

    def __init__(self, sandbox_id: str, state: str, operation: str) -> None:
        self.sandbox_id = sandbox_id
        self.state = state
        self.operation = operation
        super().__init__(f"cannot {operation} sandbox {sandbox_id!r}: it is {state}")


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
    def __init__(self, checkpoint_id: str) -> None:
        self.checkpoint_id = checkpoint_id
        super().__init__(f"no checkpoint {checkpoint_id!r}")


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

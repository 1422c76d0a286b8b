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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema, field_validator

from forkyard.wire.ids import SANDBOX_ID_RE
from forkyard.wire.lifecycle import SandboxState
from forkyard.wire.limits import MAX_FILE_BYTES
from forkyard.wire.network import NetworkSpec
from forkyard.wire.output import OutputEncoding, encode_output

__all__ = [
    "CHECKPOINT_NAME_RE",
    "GUEST_FILE_RE",
    "GUEST_PATH_RE",
    "LABEL_FILTER_RE",
    "MAX_FILE_BYTES",
    "MAX_GUEST_PATH",
    "MAX_LABELS",
    "SANDBOX_ID_RE",
    "WORKER_NAME_RE",
    "CheckpointOut",
    "CheckpointRequest",
    "CheckpointState",
    "CreateSandboxRequest",
    "EntryOut",
    "ErrorBody",
    "ErrorInfo",
    "EventKind",
    "EventOut",
    "ExecRequest",
    "ExecResultOut",
    "FileExists",
    "FileWritten",
    "ForkRequest",
    "Health",
    "HibernateRequest",
    "OnTimeout",
    "SandboxOut",
    "SandboxState",
    "TimeoutRequest",
    "TreeWritten",
    "WakeRequest",
    "WorkerOut",
    "WorkerState",
    "dump",
]

WORKER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# what a checkpoint manifest accepts as a name (forkyard.checkpoint.manifest)
CHECKPOINT_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._:+@ -]{0,127}$"
_DIGEST = r"^[0-9a-f]{64}$"
MAX_EXEC_TIMEOUT = 24 * 3600.0
# a guest account name (/etc/passwd), for `user=`
USER_RE = r"^[a-z_][a-z0-9_.-]{0,31}$"
# Guest paths: absolute, no NUL (the agent's protocol is NUL-free).  A *file*
# path (read, write, remove) also names something below "/": no trailing "/",
# no "." or ".." as its last part -- the guest could only refuse those, and
# `rm -r /` is not a file operation.
GUEST_PATH_RE = r"^/[^\x00]*$"
_PART = r"(?:[^/.\x00][^/\x00]*|\.[^/.\x00][^/\x00]*|\.\.[^/\x00]+)"
GUEST_FILE_RE = rf"^(?:/[^/\x00]*)*/{_PART}$"
MAX_GUEST_PATH = 4096
_NO_NUL = r"^[^\x00]*$"
_BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# what ExecRequest._cmd enforces, for the schema (pydantic cannot derive it)
_CMD_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1, "pattern": _NO_NUL},
        {"type": "array", "minItems": 1,
         "prefixItems": [{"type": "string", "minLength": 1, "pattern": _NO_NUL}],
         "items": {"type": "string", "pattern": _NO_NUL}},
    ],
    "description": "a string runs under /bin/sh -c; a list is argv (its first item non-empty)",
}
_ENV_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": r"^[^=\x00]+$"},
    "additionalProperties": {"type": "string", "pattern": _NO_NUL},
}


# a sandbox disk (bytes): the image must fit, and a worker offers at most 1 TiB
DISK_MIN = 1 << 20
DISK_MAX = 1 << 40

# labels: small, printable metadata to find sandboxes by (bounded: a caller cannot grow rows)
LABEL_KEY_RE = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
LABEL_VALUE_RE = r"^[^\x00-\x1f\x7f]{0,256}$"
MAX_LABELS = 32
LABEL_FILTER_RE = (r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}=[^\x00-\x1f\x7f]{0,256}$")
_LABELS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": LABEL_KEY_RE},
    "additionalProperties": {"type": "string", "pattern": LABEL_VALUE_RE},
    "description": f"up to {MAX_LABELS} labels: key (1-63 of A-Z a-z 0-9 . _ / -, "
                   "starting alphanumeric) -> value (0-256 printable characters)",
}
Labels = Annotated[
    dict[Annotated[str, Field(pattern=LABEL_KEY_RE)],
         Annotated[str, Field(pattern=LABEL_VALUE_RE)]],
    Field(max_length=MAX_LABELS),
    WithJsonSchema(_LABELS_SCHEMA),
]
MAX_TIMEOUT = 30 * 24 * 3600  # seconds: a month


class OnTimeout(enum.StrEnum):
    KILL = "kill"
    HIBERNATE = "hibernate"


class CheckpointState(enum.StrEnum):
    LOCAL = "local"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    FAILED = "failed"


class WorkerState(enum.StrEnum):
    ALIVE = "alive"
    DEAD = "dead"


class _Request(BaseModel):
    # booleans are StrictBool: the schema says boolean, so 0 or "yes" is a 422, not a guess
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
    # "standby": another control plane on the same database is active (it serves)
    role: str = "active"


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
    labels: dict[str, str] = Field(default_factory=dict)
    timeout: int | None = Field(None, description="seconds from creation (or the last "
                                                  "set_timeout) until `on_timeout`")
    expires_at: str | None = Field(None, description="when the timeout fires")
    on_timeout: OnTimeout | None = None
    idle_hibernate: int | None = Field(None, description="hibernate after this many "
                                                         "seconds without exec/file traffic")
    auto_wake: bool = False
    network: NetworkSpec | None = Field(None, description="its network mode and egress "
                                        "rules (null: made before networks, i.e. none)")


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
    labels: dict[str, str] = Field(default_factory=dict)
    # of its RAM chunks: bytes it stored first / bytes earlier checkpoints had stored
    ram_new_bytes: int | None = None
    ram_shared_bytes: int | None = None


class EventKind(enum.StrEnum):
    CREATED = "created"
    CHECKPOINTED = "checkpointed"
    PUBLISHED = "published"
    PUBLISH_FAILED = "publish_failed"
    FORKED = "forked"
    HIBERNATED = "hibernated"
    WOKEN = "woken"
    TIMED_OUT = "timed_out"
    IDLE = "idle"
    FAILED = "failed"
    LOST = "lost"
    DESTROYED = "destroyed"


class EventOut(_Reply):
    id: int
    time: str
    kind: EventKind
    sandbox: str | None
    checkpoint: str | None
    worker: str | None
    detail: str | None
    delivery: str | None = Field(None, description="the webhook's delivery: pending, "
                                 "retrying, delivered, failed or dropped (null: no webhook)")
    attempts: int = 0


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
    """A command's result; each output stream is sent once (:mod:`forkyard.wire.output`)."""

    exit_code: int
    stdout: str = Field(description="the output as text, or base64 (see stdout_encoding)")
    stdout_encoding: OutputEncoding = Field(
        "utf-8", description="utf-8: stdout is the exact text; base64: it was not valid UTF-8"
    )
    stderr: str
    stderr_encoding: OutputEncoding = "utf-8"
    pid: int
    signal: int | None
    timed_out: bool
    truncated: bool

    @classmethod
    def of(cls, exit_code: int, stdout: bytes, stderr: bytes, *, pid: int,
           signal: int | None, timed_out: bool, truncated: bool) -> ExecResultOut:
        out, out_enc = encode_output(stdout)
        err, err_enc = encode_output(stderr)
        return cls(exit_code=exit_code, stdout=out, stdout_encoding=out_enc, stderr=err,
                   stderr_encoding=err_enc, pid=pid, signal=signal, timed_out=timed_out,
                   truncated=truncated)


class EntryOut(_Reply):
    name: str
    mode: int
    size: int
    mtime_ns: int
    is_dir: bool


class FileWritten(_Reply):
    path: str
    size: int


class FileExists(_Reply):
    path: str
    exists: bool


class TreeWritten(_Reply):
    path: str
    entries: int


class ErrorInfo(_Reply):
    type: Literal["bad_request", "unauthorized", "forbidden", "not_found", "method_not_allowed",
                  "conflict", "integrity", "incompatible", "too_large", "invalid",
                  "guest_error", "internal", "worker_error", "unavailable", "timeout"]
    message: str
    detail: Any = Field(None, description="machine-readable facts; their keys depend on type")


class ErrorBody(_Reply):
    """Every error reply of both services (docs/api.md, "Errors")."""

    error: ErrorInfo


# ---------------------------------------------------------------------------
# public requests
class CreateSandboxRequest(_Request):
    image: str = Field(default="minimal", min_length=1, max_length=200)
    worker: WorkerName | None = None
    memory_mb: int | None = Field(default=None, ge=64, le=256 * 1024)
    cpus: int | None = Field(default=None, ge=1, le=64)
    disk: int | None = Field(default=None, ge=DISK_MIN, le=DISK_MAX)  # bytes (thin)
    cold: StrictBool = False  # boot even when the image has a template
    labels: Labels = Field(default_factory=dict)
    timeout: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT,
                                description="seconds until `on_timeout` happens")
    on_timeout: OnTimeout = OnTimeout.KILL
    idle_hibernate: int | None = Field(default=None, ge=1, le=MAX_TIMEOUT,
                                       description="hibernate after this many idle seconds")
    auto_wake: StrictBool = Field(default=False, description="an exec or file request to "
                                  "the hibernated sandbox wakes it first")
    network: NetworkSpec = Field(default_factory=NetworkSpec, description="network mode "
                                 "and egress rules; forks and wakes keep them")


class TimeoutRequest(_Request):
    timeout: int | None = Field(ge=1, le=MAX_TIMEOUT,
                                description="seconds from now; null: no timeout")


class ExecRequest(_Request):
    cmd: Annotated[str | list[str], WithJsonSchema(_CMD_SCHEMA)]
    env: Annotated[dict[str, str], WithJsonSchema(_ENV_SCHEMA)] = Field(default_factory=dict)
    cwd: Annotated[str, Field(pattern=GUEST_PATH_RE)] | None = None
    timeout: float | None = Field(
        default=60.0, gt=0, le=MAX_EXEC_TIMEOUT, description="seconds; null: 24 h"
    )
    stdin_b64: Annotated[str, Field(pattern=_BASE64)] | None = None
    background: StrictBool = False
    user: Annotated[str, Field(pattern=USER_RE)] | None = None

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
    publish: StrictBool = True
    labels: Labels = Field(default_factory=dict, description="added to the sandbox's "
                                                             "labels, which forks inherit")


class HibernateRequest(_Request):
    wait: StrictBool = True


class WakeRequest(_Request):
    worker: WorkerName | None = None


class ForkRequest(_Request):
    count: int = Field(default=1, ge=1, le=64)
    worker: WorkerName | None = None
    labels: Labels = Field(default_factory=dict, description="added to the labels the "
                                                             "forks inherit")


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")

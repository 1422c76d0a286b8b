"""Typed records of the API's JSON objects (docs/api.md, "Objects").

Parsing is tolerant in one direction only: unknown keys are ignored (a newer
control plane may add fields), but a missing required key or a value of the
wrong type raises :class:`~forkyard.sdk.errors.ResponseFormatError`, because a
reply that does not match the contract is a bug to surface, not to paper over.

:class:`CommandResult` and :class:`EntryInfo` have the attributes of the worker
library's ``ExecResult`` and ``EntryInfo`` (``forkyard.worker``), so code
written against a local ``Worker`` sandbox reads the same results from a
remote one; they are the SDK's own types because the SDK imports no worker or
guest code.  :class:`SandboxState` is the one lifecycle enum of
:mod:`forkyard.wire.lifecycle`.
"""

from __future__ import annotations

import enum
import stat as stat_mod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from forkyard.sdk.errors import ResponseFormatError
from forkyard.wire.lifecycle import SandboxState
from forkyard.wire.output import decode_output, encode_output

__all__ = [
    "CheckpointInfo",
    "CheckpointState",
    "CommandResult",
    "EntryInfo",
    "EventInfo",
    "NetworkInfo",
    "SandboxInfo",
    "SandboxState",
    "WorkerInfo",
    "entry_from_json",
    "output_bytes",
]

T = TypeVar("T")


class CheckpointState(enum.StrEnum):
    LOCAL = "local"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    FAILED = "failed"


def _get(data: Mapping[str, Any], key: str, kind: type[T], what: str) -> T:
    try:
        value = data[key]
    except KeyError:
        raise ResponseFormatError(f"{what}: missing {key!r}") from None
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ResponseFormatError(f"{what}: {key!r} is {type(value).__name__}, not {kind.__name__}")
    return value


def _opt(data: Mapping[str, Any], key: str, kind: type[T], what: str) -> T | None:
    if data.get(key) is None:
        return None
    return _get(data, key, kind, what)


def _labels(data: Mapping[str, Any], what: str) -> dict[str, str]:
    labels = _opt(data, "labels", dict, what) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ResponseFormatError(f"{what}: 'labels' is not an object of strings")
    return dict(labels)


def _obj(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ResponseFormatError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """A sandbox's network: ``"outbound"`` or ``"none"``, and its egress rules."""

    mode: str
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: object) -> NetworkInfo:
        d = _obj(data, "network")
        allow, deny = (tuple(str(r) for r in (d.get(k) or ())) for k in ("allow_out", "deny_out"))
        return cls(mode=_get(d, "mode", str, "network"), allow_out=allow, deny_out=deny)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow_out": list(self.allow_out),
                "deny_out": list(self.deny_out)}


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """What the control plane knows about one sandbox, at the time it answered."""

    id: str
    state: str
    worker: str | None
    image: str | None  # sha256 of the base image
    memory_mb: int | None
    cpus: int | None
    created: str | None
    parent_checkpoint: str | None
    last_checkpoint: str | None
    error: str | None
    recoverable_from: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout: int | None = None  # seconds, from creation or the last set_timeout
    expires_at: str | None = None
    on_timeout: str | None = None
    idle_hibernate: int | None = None
    auto_wake: bool = False
    network: NetworkInfo | None = None  # None: made before networks (none)

    @classmethod
    def from_json(cls, data: object) -> SandboxInfo:
        d = _obj(data, "sandbox")
        w = "sandbox"
        return cls(
            id=_get(d, "id", str, w),
            state=_get(d, "state", str, w),
            worker=_opt(d, "worker", str, w),
            image=_opt(d, "image", str, w),
            memory_mb=_opt(d, "memory_mb", int, w),
            cpus=_opt(d, "cpus", int, w),
            created=_opt(d, "created", str, w),
            parent_checkpoint=_opt(d, "parent_checkpoint", str, w),
            last_checkpoint=_opt(d, "last_checkpoint", str, w),
            error=_opt(d, "error", str, w),
            recoverable_from=_opt(d, "recoverable_from", str, w),
            labels=_labels(d, w),
            timeout=_opt(d, "timeout", int, w),
            expires_at=_opt(d, "expires_at", str, w),
            on_timeout=_opt(d, "on_timeout", str, w),
            idle_hibernate=_opt(d, "idle_hibernate", int, w),
            auto_wake=bool(_opt(d, "auto_wake", bool, w)),
            network=NetworkInfo.from_json(d["network"]) if d.get("network") else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "worker": self.worker, "image": self.image,
            "memory_mb": self.memory_mb, "cpus": self.cpus, "created": self.created,
            "parent_checkpoint": self.parent_checkpoint,
            "last_checkpoint": self.last_checkpoint, "error": self.error,
            "recoverable_from": self.recoverable_from, "labels": dict(self.labels),
            "timeout": self.timeout, "expires_at": self.expires_at,
            "on_timeout": self.on_timeout, "idle_hibernate": self.idle_hibernate,
            "auto_wake": self.auto_wake,
            "network": self.network.to_json() if self.network is not None else None,
        }


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    id: str
    state: str
    sandbox: str | None
    worker: str | None
    name: str | None
    created: str | None
    base: str | None
    changed_bytes: int | None
    stored_bytes: int | None
    error: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    ram_new_bytes: int | None = None  # RAM chunks it stored first
    ram_shared_bytes: int | None = None  # RAM chunks earlier checkpoints had stored

    @classmethod
    def from_json(cls, data: object) -> CheckpointInfo:
        d = _obj(data, "checkpoint")
        w = "checkpoint"
        return cls(
            id=_get(d, "id", str, w),
            state=_get(d, "state", str, w),
            sandbox=_opt(d, "sandbox", str, w),
            worker=_opt(d, "worker", str, w),
            name=_opt(d, "name", str, w),
            created=_opt(d, "created", str, w),
            base=_opt(d, "base", str, w),
            changed_bytes=_opt(d, "changed_bytes", int, w),
            stored_bytes=_opt(d, "stored_bytes", int, w),
            error=_opt(d, "error", str, w),
            labels=_labels(d, w),
            ram_new_bytes=_opt(d, "ram_new_bytes", int, w),
            ram_shared_bytes=_opt(d, "ram_shared_bytes", int, w),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "sandbox": self.sandbox, "worker": self.worker,
            "name": self.name, "created": self.created, "base": self.base,
            "changed_bytes": self.changed_bytes, "stored_bytes": self.stored_bytes,
            "error": self.error, "labels": dict(self.labels),
            "ram_new_bytes": self.ram_new_bytes, "ram_shared_bytes": self.ram_shared_bytes,
        }


@dataclass(frozen=True, slots=True)
class EventInfo:
    """One lifecycle event of ``GET /v1/events``."""

    id: int
    time: str
    kind: str
    sandbox: str | None
    checkpoint: str | None
    worker: str | None
    detail: str | None
    delivery: str | None

    @classmethod
    def from_json(cls, data: object) -> EventInfo:
        d = _obj(data, "event")
        w = "event"
        return cls(id=_get(d, "id", int, w), time=_get(d, "time", str, w),
                   kind=_get(d, "kind", str, w), sandbox=_opt(d, "sandbox", str, w),
                   checkpoint=_opt(d, "checkpoint", str, w), worker=_opt(d, "worker", str, w),
                   detail=_opt(d, "detail", str, w), delivery=_opt(d, "delivery", str, w))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "kind": self.kind, "sandbox": self.sandbox,
                "checkpoint": self.checkpoint, "worker": self.worker, "detail": self.detail,
                "delivery": self.delivery}


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    name: str
    state: str
    url: str | None
    last_heartbeat: str | None
    running: int | None
    free_memory_mb: int | None
    max_sandboxes: int | None
    cached_bases: tuple[str, ...]
    checkpoints: tuple[str, ...]

    @classmethod
    def from_json(cls, data: object) -> WorkerInfo:
        d = _obj(data, "worker")
        w = "worker"
        return cls(
            name=_get(d, "name", str, w),
            state=_get(d, "state", str, w),
            url=_opt(d, "url", str, w),
            last_heartbeat=_opt(d, "last_heartbeat", str, w),
            running=_opt(d, "running", int, w),
            free_memory_mb=_opt(d, "free_memory_mb", int, w),
            max_sandboxes=_opt(d, "max_sandboxes", int, w),
            cached_bases=tuple(str(x) for x in _opt(d, "cached_bases", list, w) or ()),
            checkpoints=tuple(str(x) for x in _opt(d, "checkpoints", list, w) or ()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "url": self.url,
            "last_heartbeat": self.last_heartbeat, "running": self.running,
            "free_memory_mb": self.free_memory_mb, "max_sandboxes": self.max_sandboxes,
            "cached_bases": list(self.cached_bases), "checkpoints": list(self.checkpoints),
        }


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Result of :meth:`Sandbox.exec`: ``exit_code``, ``stdout``/``stderr`` (text),
    ``stdout_bytes``/``stderr_bytes`` (exact), ``pid``, ``signal``, ``timed_out``,
    ``truncated``, ``ok``."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    pid: int = 0
    signal: int | None = None
    timed_out: bool = False
    truncated: bool = False

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def from_json(cls, data: object) -> CommandResult:
        d = _obj(data, "exec result")
        w = "exec result"
        return cls(
            exit_code=_get(d, "exit_code", int, w),
            stdout_bytes=output_bytes(d, "stdout", w),
            stderr_bytes=output_bytes(d, "stderr", w),
            pid=_opt(d, "pid", int, w) or 0,
            signal=_opt(d, "signal", int, w),
            timed_out=bool(d.get("timed_out", False)),
            truncated=bool(d.get("truncated", False)),
        )

    def to_json(self) -> dict[str, Any]:
        """The API's ExecResult object (docs/api.md): each stream once, exactly."""
        out, out_enc = encode_output(self.stdout_bytes)
        err, err_enc = encode_output(self.stderr_bytes)
        return {
            "exit_code": self.exit_code, "stdout": out, "stdout_encoding": out_enc,
            "stderr": err, "stderr_encoding": err_enc, "pid": self.pid, "signal": self.signal,
            "timed_out": self.timed_out, "truncated": self.truncated,
        }


def output_bytes(d: Mapping[str, Any], stream: str, what: str) -> bytes:
    """The exact bytes of ``stream`` in an exec result (or a timeout's detail)."""
    text = _opt(d, stream, str, what) or ""
    encoding = _opt(d, f"{stream}_encoding", str, what) or "utf-8"
    try:
        return decode_output(text, encoding)
    except ValueError as exc:
        raise ResponseFormatError(f"{what}: {stream} ({encoding}): {exc}") from exc


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One guest file or directory (``Files.list`` / ``Files.stat``)."""

    name: str
    mode: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)


def entry_from_json(data: object) -> EntryInfo:
    d = _obj(data, "file entry")
    w = "file entry"
    return EntryInfo(
        name=_get(d, "name", str, w),
        mode=_get(d, "mode", int, w),
        size=_get(d, "size", int, w),
        mtime_ns=_get(d, "mtime_ns", int, w),
    )

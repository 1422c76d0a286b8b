"""Every control-plane endpoint of docs/api.md as a :class:`~forkyard.sdk._http.Call`.

Pure functions: arguments in, request description out.  Both the sync and the
async SDK use these, so the request shapes exist exactly once.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from forkyard.sdk._http import Call, json_body, no_body
from forkyard.sdk.errors import ResponseFormatError, TooLarge
from forkyard.sdk.models import (
    CheckpointInfo,
    CommandResult,
    EntryInfo,
    EventInfo,
    SandboxInfo,
    WorkerInfo,
    entry_from_json,
)
from forkyard.wire.limits import MAX_FILE_BYTES

__all__ = [
    "BOOT_TIMEOUT",
    "EXEC_GRACE",
    "checkpoint",
    "checkpoint_manifest",
    "create",
    "delete_checkpoint",
    "disk_bytes",
    "exec_",
    "fork",
    "get_checkpoint",
    "get_sandbox",
    "health",
    "hibernate",
    "kill",
    "list_checkpoints",
    "list_entries",
    "list_sandboxes",
    "list_workers",
    "mkdir_argv",
    "read_file",
    "remove",
    "stat",
    "wake",
    "write_file",
]

# A TCG boot takes ~3 s, but shared CI machines can be 50x slower; the server
# bounds a boot itself (180 s), so the client only needs to outwait it.
BOOT_TIMEOUT = 300.0
# On top of a command's own timeout: the server's agent grace plus transfer.
EXEC_GRACE = 30.0


def _sid(sandbox_id: str) -> str:
    # ids come from users (CLI arguments): never let one add path segments
    return quote(sandbox_id, safe="")


def _sandbox(r: httpx.Response) -> SandboxInfo:
    return SandboxInfo.from_json(json_body(r))


def _checkpoint(r: httpx.Response) -> CheckpointInfo:
    return CheckpointInfo.from_json(json_body(r))


def _array(r: httpx.Response) -> list[Any]:
    data = json_body(r)
    if not isinstance(data, list):
        raise ResponseFormatError(f"{r.request.url.path}: expected a JSON array")
    return data


def _sandboxes(r: httpx.Response) -> list[SandboxInfo]:
    return [SandboxInfo.from_json(x) for x in _array(r)]


def health() -> Call[dict[str, Any]]:
    def parse(r: httpx.Response) -> dict[str, Any]:
        data = json_body(r)
        if not isinstance(data, dict):
            raise ResponseFormatError("/health: expected a JSON object")
        return data

    return Call("GET", "/health", parse)


def events(sandbox: str | None = None, after: int = 0, wait: float = 0.0,
           limit: int = 100) -> Call[list[EventInfo]]:
    params: dict[str, str | int] = {"after": after, "limit": limit}
    if sandbox is not None:
        params["sandbox"] = sandbox
    if wait:
        params["wait"] = str(wait)
    return Call("GET", "/v1/events", lambda r: [EventInfo.from_json(x) for x in _array(r)],
                params=params, timeout=wait + 30.0)


def list_workers() -> Call[list[WorkerInfo]]:
    return Call("GET", "/v1/workers", lambda r: [WorkerInfo.from_json(x) for x in _array(r)])


# --- sandboxes -----------------------------------------------------------------------


def create(image: str, worker: str | None, memory_mb: int | None, cpus: int | None,
           timeout: float | None, *, labels: Mapping[str, str] | None = None,
           lifetime: int | None = None, on_timeout: str | None = None,
           idle_hibernate: int | None = None, auto_wake: bool = False,
           disk: int | str | None = None, cold: bool = False) -> Call[SandboxInfo]:
    """``timeout`` bounds the request; ``lifetime`` is the sandbox's own timeout."""
    body: dict[str, Any] = {"image": image, "worker": worker, "memory_mb": memory_mb,
                            "cpus": cpus}
    # only what is set: an older control plane refuses fields it does not know
    extra = {"labels": dict(labels) if labels else None, "timeout": lifetime,
             "on_timeout": on_timeout, "idle_hibernate": idle_hibernate,
             "auto_wake": auto_wake or None,
             "disk": None if disk is None else disk_bytes(disk), "cold": cold or None}
    body.update({k: v for k, v in extra.items() if v is not None})
    return Call("POST", "/v1/sandboxes", _sandbox, json=body, timeout=timeout)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def disk_bytes(size: int | str) -> int:
    """A disk size: bytes, or a string like ``4G``, ``512M``, ``4GiB`` (powers of 1024)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS and not text[-1:].isdigit() else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or len(number) > 15:
        raise ValueError(f"not a disk size: {size!r} (say e.g. 4G or 512M)")
    return int(number) * _UNITS[unit]


def list_sandboxes(labels: Mapping[str, str] | None = None,
                   state: str | None = None) -> Call[list[SandboxInfo]]:
    params: list[tuple[str, str | int]] = [("label", f"{k}={v}")
                                           for k, v in (labels or {}).items()]
    if state is not None:
        params.append(("state", str(state)))
    return Call("GET", "/v1/sandboxes", _sandboxes, params=params or None)


def set_timeout(sandbox_id: str, timeout: int | None) -> Call[SandboxInfo]:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/timeout", _sandbox,
                json={"timeout": timeout})


def get_sandbox(sandbox_id: str) -> Call[SandboxInfo]:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}", _sandbox)


def kill(sandbox_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/sandboxes/{_sid(sandbox_id)}", no_body, timeout=BOOT_TIMEOUT)


def exec_(
    sandbox_id: str,
    cmd: str | Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    timeout: float | None,
    stdin: bytes | str | None,
    background: bool,
    user: str | None = None,
) -> Call[CommandResult]:
    if not isinstance(cmd, str):
        cmd = [str(a) for a in cmd]
        if not cmd:
            raise ValueError("exec: empty argv")
    data = stdin.encode() if isinstance(stdin, str) else stdin
    body = {
        "cmd": cmd,
        "env": dict(env or {}),
        "cwd": cwd,
        "timeout": timeout,
        "stdin_b64": None if data is None else base64.b64encode(data).decode(),
        "background": background,
    }
    if user is not None:  # only when asked: older servers refuse unknown fields
        body["user"] = user
    return Call(
        "POST", f"/v1/sandboxes/{_sid(sandbox_id)}/exec",
        lambda r: CommandResult.from_json(json_body(r)),
        json=body,
        timeout=None if timeout is None else timeout + EXEC_GRACE,
    )


def checkpoint(sandbox_id: str, name: str | None, publish: bool,
               timeout: float | None, labels: Mapping[str, str] | None = None
               ) -> Call[CheckpointInfo]:
    body: dict[str, Any] = {"name": name, "publish": publish}
    if labels:
        body["labels"] = dict(labels)
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/checkpoint", _checkpoint,
                json=body, timeout=timeout)


def hibernate(sandbox_id: str, wait: bool, timeout: float | None) -> Call[SandboxInfo]:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/hibernate", _sandbox,
                json={"wait": wait}, timeout=timeout)


def wake(sandbox_id: str, worker: str | None, timeout: float | None) -> Call[SandboxInfo]:
    return Call("POST", f"/v1/sandboxes/{_sid(sandbox_id)}/wake", _sandbox,
                json={"worker": worker}, timeout=timeout)


# --- files ---------------------------------------------------------------------------


def _guest_path(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"guest paths must be absolute: {path!r}")
    return path


def mkdir_argv(path: str, mode: int) -> list[str]:
    """``make_dir`` as a guest command: docs/api.md has no mkdir endpoint."""
    return ["mkdir", "-p", "-m", format(mode, "o"), "--", _guest_path(path)]


def write_file(sandbox_id: str, path: str, data: bytes, mode: int,
               append: bool) -> Call[int]:
    # Refused here rather than after sending 64 MiB+ that the server will refuse.
    if len(data) > MAX_FILE_BYTES:
        raise TooLarge(
            f"file {path} is {len(data)} bytes, over the limit of {MAX_FILE_BYTES} bytes",
            status=413, type="too_large", detail={"size": len(data), "limit": MAX_FILE_BYTES},
        )

    def parse(r: httpx.Response) -> int:
        data = json_body(r)
        size = data.get("size") if isinstance(data, dict) else None
        if not isinstance(size, int):
            raise ResponseFormatError("file write: reply has no size")
        return size

    return Call(
        "PUT", f"/v1/sandboxes/{_sid(sandbox_id)}/files", parse,
        params={"path": _guest_path(path), "mode": mode, "append": "true" if append else "false"},
        content=data,
        timeout=120.0,
    )


def read_file(sandbox_id: str, path: str) -> Call[bytes]:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/files", lambda r: r.content,
                params={"path": _guest_path(path)}, timeout=120.0)


def list_entries(sandbox_id: str, path: str) -> Call[list[EntryInfo]]:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/files/list",
                lambda r: [entry_from_json(x) for x in _array(r)],
                params={"path": _guest_path(path)})


def stat(sandbox_id: str, path: str) -> Call[EntryInfo]:
    return Call("GET", f"/v1/sandboxes/{_sid(sandbox_id)}/files/stat",
                lambda r: entry_from_json(json_body(r)), params={"path": _guest_path(path)})


def remove(sandbox_id: str, path: str, recursive: bool) -> Call[None]:
    return Call("DELETE", f"/v1/sandboxes/{_sid(sandbox_id)}/files", no_body,
                params={"path": _guest_path(path), "recursive": "true" if recursive else "false"})


# --- checkpoints ---------------------------------------------------------------------


def list_checkpoints() -> Call[list[CheckpointInfo]]:
    return Call("GET", "/v1/checkpoints", lambda r: [CheckpointInfo.from_json(x)
                                                     for x in _array(r)])


def get_checkpoint(checkpoint_id: str) -> Call[CheckpointInfo]:
    return Call("GET", f"/v1/checkpoints/{_sid(checkpoint_id)}", _checkpoint)


def checkpoint_manifest(checkpoint_id: str) -> Call[bytes]:
    """The published manifest's canonical bytes (the caller checks them against the id)."""
    return Call("GET", f"/v1/checkpoints/{_sid(checkpoint_id)}/manifest",
                lambda r: r.content)


def delete_checkpoint(checkpoint_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/checkpoints/{_sid(checkpoint_id)}", no_body)


def fork(checkpoint_id: str, count: int, worker: str | None,
         timeout: float | None, labels: Mapping[str, str] | None = None
         ) -> Call[list[SandboxInfo]]:
    if count < 1:
        raise ValueError(f"fork count must be at least 1, got {count}")
    body: dict[str, Any] = {"count": count, "worker": worker}
    if labels:
        body["labels"] = dict(labels)
    return Call("POST", f"/v1/checkpoints/{_sid(checkpoint_id)}/fork", _sandboxes,
                json=body, timeout=timeout)

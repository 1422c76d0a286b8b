"""Pieces the sync and async SDK share beyond the request shapes: defaults and checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from forkyard.errors import CommandFailed
from forkyard.sdk._ops import BOOT_TIMEOUT
from forkyard.sdk.errors import ConflictError, PublishFailed, SandboxTimeout
from forkyard.sdk.models import CheckpointInfo, CheckpointState, CommandResult

__all__ = [
    "CHECKPOINT_TIMEOUT",
    "HIBERNATE_TIMEOUT",
    "PUBLISH_TIMEOUT",
    "WAKE_TIMEOUT",
    "as_bytes",
    "check_result",
    "describe",
    "fork_timeout",
    "poll_delays",
    "publish_outcome",
    "publish_timed_out",
]

CHECKPOINT_TIMEOUT = 300.0
# hibernate(wait=True) = checkpoint + publish to the store + stop
HIBERNATE_TIMEOUT = 900.0
# wake may first fetch the checkpoint from the store onto another worker
WAKE_TIMEOUT = 900.0
PUBLISH_TIMEOUT = 900.0


# a fork on another worker may first wait for its checkpoint's publish (the
# control plane gives up after 120 s with a 504)
PUBLISH_WAIT = 120.0


def fork_timeout(count: int, timeout: float | None) -> float:
    # forks of one request are started concurrently but placed on shared
    # hardware: allow some time per fork on top of one boot
    return timeout if timeout is not None else PUBLISH_WAIT + BOOT_TIMEOUT + 30.0 * count


def describe(cmd: str | Sequence[str]) -> str:
    return cmd if isinstance(cmd, str) else " ".join(cmd)


def check_result(cmd: str | Sequence[str], result: CommandResult, check: bool) -> CommandResult:
    if check and result.exit_code != 0:
        raise CommandFailed(describe(cmd), result)
    return result


def as_bytes(data: bytes | bytearray | memoryview | str | IO[bytes]) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return data.read()


def publish_outcome(info: CheckpointInfo) -> bool:
    """True once published; raise if it never will be; False while still publishing."""
    if info.state == CheckpointState.PUBLISHED:
        return True
    if info.state == CheckpointState.FAILED:
        raise PublishFailed(
            f"checkpoint {info.id[:12]} failed to publish: {info.error or 'unknown error'} "
            f"(still forkable on worker {info.worker})",
            status=409, type="publish_failed", detail={"state": info.state},
        )
    if info.state == CheckpointState.LOCAL:
        raise ConflictError(
            f"checkpoint {info.id[:12]} was taken with publish=False; it stays on "
            f"worker {info.worker}",
            status=409, type="conflict", detail={"state": info.state, "operation": "publish"},
        )
    return False


def publish_timed_out(info: CheckpointInfo, timeout: float) -> SandboxTimeout:
    return SandboxTimeout(
        f"checkpoint {info.id[:12]} still {info.state} after {timeout:g}s",
        type="wait_timeout", detail={},
    )


def poll_delays() -> list[float]:
    """Sleep between polls: quick at first (a small publish takes ~100 ms), then 1 s."""
    return [0.05, 0.1, 0.2, 0.3, 0.5, 0.75]

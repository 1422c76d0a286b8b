"""Check that a running guest reads its base image's files correctly.

This is the check that catches a disk opened on the wrong base: after
``drop_caches`` the guest must re-read every file and its metadata from disk,
and each file must hash to the checksum recorded when the image was built.
Files whose metadata was cached in guest RAM before a checkpoint would read
fine even over a wrong base, which is why the page cache is dropped first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from forkyard.errors import GuestError

__all__ = ["VerifyReport", "verify_files"]


class _Output(Protocol):
    # a local sandbox's ExecResult or the SDK's CommandResult
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


class _Execs(Protocol):
    def exec(self, cmd: str, *, timeout: float | None = ..., stdin: bytes | None = ...
             ) -> _Output: ...


@dataclass(frozen=True, slots=True)
class VerifyReport:
    checked: int
    mismatched: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()  # guest error lines (e.g. "Bad message")
    missing: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.unreadable or self.missing)

    def summary(self) -> str:
        if self.ok:
            return f"{self.checked} files verified"
        return (
            f"{self.checked} files: {len(self.mismatched)} wrong, {len(self.unreadable)} "
            f"unreadable, {len(self.missing)} missing; first: "
            + "; ".join([*self.unreadable[:2], *self.mismatched[:2], *self.missing[:2]])
        )


def verify_files(
    sandbox: _Execs,
    expected: Mapping[str, str],
    *,
    drop_caches: bool = True,
    timeout: float = 600.0,
) -> VerifyReport:
    """Hash ``expected`` paths in the guest and compare with the recorded sha256s."""
    if not expected:
        return VerifyReport(0)
    paths = sorted(expected)
    listing = b"\0".join(p.encode() for p in paths) + b"\0"
    script = "xargs -0 sha256sum"
    if drop_caches:
        script = "sync; echo 3 > /proc/sys/vm/drop_caches; " + script
    try:
        result = sandbox.exec(script, timeout=timeout, stdin=listing)
    except GuestError as exc:
        # e.g. "exec /bin/sh: Bad message": the guest cannot even start the check
        return VerifyReport(len(paths), unreadable=(str(exc),), missing=tuple(paths))
    seen: dict[str, str] = {}
    for line in result.stdout.splitlines():
        digest, sep, path = line.partition("  ")
        if sep:
            seen[path] = digest
    mismatched = tuple(p for p in paths if p in seen and seen[p] != expected[p])
    missing = tuple(p for p in paths if p not in seen)
    unreadable = tuple(line for line in result.stderr.splitlines() if line.strip())
    return VerifyReport(len(paths), mismatched, unreadable, missing)

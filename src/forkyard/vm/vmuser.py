"""The unprivileged identities confined QEMUs run as: one uid/gid per running VM.

Why one per VM and not one ``forkyard-vm`` user per worker: processes of one
uid can signal each other, read each other's ``/proc/PID/environ`` and
memory maps, and ptrace each other.  With a shared uid, a guest that takes
over its QEMU could attack every other sandbox's QEMU on the machine.  With
a uid of its own, the only process it can touch is itself.

The ids come from a reserved range (``VM_ID_BASE`` .. ``+VM_ID_SLOTS``) that
needs no ``/etc/passwd`` entries: the kernel accepts any id in
``setresuid``, and nothing a confined QEMU creates outlives it (it writes only
through fds it was handed, owned by the worker).  ``ensure_vm_ids`` (run by
``forkyard setup``) checks that no user, group or subordinate-id range of the
host overlaps the range, so an id is never someone else's.

A VM leases a slot for its lifetime by holding an ``flock`` on
``/run/forkyard/vm-ids/<slot>``: leases are machine-wide (every worker home on
the machine shares them), and the kernel drops them when the worker dies, so
a crashed worker leaks nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from forkyard.errors import SetupError

__all__ = ["LEASE_DIR", "VM_ID_BASE", "VM_ID_SLOTS", "VMIdentity", "ensure_vm_ids", "lease"]

VM_ID_BASE = 900_000_000
VM_ID_SLOTS = 16_384
LEASE_DIR = Path("/run/forkyard/vm-ids")


@dataclass(slots=True)
class VMIdentity:
    """A leased uid/gid pair; ``release`` (or the worker's death) frees it."""

    uid: int
    gid: int
    _fd: int

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing drops the flock


def lease(lease_dir: Path = LEASE_DIR) -> VMIdentity:
    """A uid/gid no other running VM on this machine has."""
    lease_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    start = secrets.randbelow(VM_ID_SLOTS)  # spreads workers starting VMs at once
    for i in range(VM_ID_SLOTS):
        slot = (start + i) % VM_ID_SLOTS
        fd = os.open(lease_dir / str(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        vm_id = VM_ID_BASE + slot
        return VMIdentity(vm_id, vm_id, fd)
    raise SetupError(f"all {VM_ID_SLOTS} VM identities on this machine are in use")


def _ranges(path: Path) -> list[tuple[int, int]]:
    """(first, count) of each ``name:first:count`` line of /etc/subuid-style files."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append((int(parts[1]), int(parts[2])))
    return out


def _ids(path: Path) -> list[tuple[str, int]]:
    """(name, id) of each /etc/passwd- or /etc/group-style line."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split(":")
            if len(parts) > 2 and parts[2].isdigit():
                out.append((parts[0], int(parts[2])))
    return out


def ensure_vm_ids(etc: Path = Path("/etc")) -> None:
    """Refuse to set up a host where the VM id range belongs to someone."""
    end = VM_ID_BASE + VM_ID_SLOTS
    for name in ("passwd", "group"):
        for who, n in _ids(etc / name):
            if VM_ID_BASE <= n < end:
                raise SetupError(
                    f"{who!r} in /etc/{name} has id {n}, inside the range forkyard reserves "
                    f"for confined VMs ({VM_ID_BASE}..{end - 1})"
                )
    for name in ("subuid", "subgid"):
        for first, count in _ranges(etc / name):
            if first < end and first + count > VM_ID_BASE:
                raise SetupError(
                    f"/etc/{name} delegates {first}..{first + count - 1}, which overlaps the "
                    f"range forkyard reserves for confined VMs ({VM_ID_BASE}..{end - 1})"
                )

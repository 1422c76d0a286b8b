"""The initramfs every sandbox boots with.

It holds busybox, the virtio modules the Debian cloud kernel builds as modules
(loaded in dependency order: ``virtio_ring`` before ``virtio`` ...), and the
guest agent.  Its ``/init`` mounts the base image, puts the agent on a tmpfs
inside the new root and ``switch_root``s to it, so base images stay pure user
content and their digests never depend on forkyard's agent.

The archive is written here (newc format, sorted entries, zero timestamps,
fixed inode numbers, gzip with mtime 0) rather than with ``cpio``, so the same
inputs always give the same bytes and therefore the same digest.
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODULES", "InitramfsEntry", "build_initramfs", "init_script"]

# Load order matters: each module's `depends=` must already be loaded.
MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    # the NIC of a sandbox with a network (forkyard.net), and the socket
    # diagnostics the agent aborts stale TCP connections with after a restore
    "failover",
    "net_failover",
    "virtio_net",
    "inet_diag",
    "tcp_diag",
)

AGENT_PATH = "/forkyard-agent"


def init_script() -> str:
    mods = " ".join(MODULES)
    # `fy.fail` on the kernel command line is not used; failures power off so
    # the host sees QEMU exit instead of waiting for an agent forever.
    return f"""#!/bin/busybox sh
# forkyard initramfs: load virtio, mount the base image, hand over to the agent.
B=/bin/busybox
fail() {{ echo "forkyard-init: $*" > /dev/console; $B sync; $B poweroff -f; }}
$B mount -t devtmpfs dev /dev || fail "devtmpfs"
$B mount -t proc proc /proc
for m in {mods}; do $B insmod /lib/modules/$m.ko || fail "insmod $m"; done
# virtio probing is asynchronous: wait for the disk to appear.
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 1000 ] && fail "no /dev/vda"
  $B usleep 10000
done
$B mount -t ext4 /dev/vda /newroot || fail "mount /dev/vda"
for d in dev proc sys run tmp; do [ -d /newroot/$d ] || $B mkdir -p /newroot/$d; done
$B mount -t tmpfs -o mode=0755,nosuid,nodev run /newroot/run || fail "tmpfs /run"
$B mkdir -p /newroot/run/forkyard
$B cp {AGENT_PATH} /newroot/run/forkyard/agent || fail "copy agent"
$B mount --move /dev /newroot/dev
$B umount /proc
exec $B switch_root /newroot /run/forkyard/agent
"""


@dataclass(frozen=True, slots=True)
class InitramfsEntry:
    path: str  # absolute path inside the archive
    mode: int  # full st_mode (type bits included)
    data: bytes = b""  # file content, or symlink target
    rdev: tuple[int, int] = (0, 0)  # device nodes: (major, minor)


def _newc_header(
    ino: int, mode: int, nlink: int, size: int, name: bytes, rdev: tuple[int, int] = (0, 0)
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return b"070701" + b"".join(f"{v:08x}".encode() for v in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _write_cpio(entries: Iterable[InitramfsEntry]) -> bytes:
    out = io.BytesIO()
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        name = entry.path.lstrip("/").encode() or b"."
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        hdr = _newc_header(ino, entry.mode, nlink, len(entry.data), name, entry.rdev)
        out.write(hdr + name + b"\0")
        out.write(_pad4(len(hdr) + len(name) + 1))
        out.write(entry.data)
        out.write(_pad4(len(entry.data)))
    trailer = b"TRAILER!!!"
    hdr = _newc_header(0, 0, 1, 0, trailer)
    out.write(hdr + trailer + b"\0")
    out.write(_pad4(len(hdr) + len(trailer) + 1))
    return out.getvalue()


def build_initramfs(busybox: Path, modules_dir: Path, agent: Path) -> bytes:
    """The gzip'd newc archive; ``modules_dir`` holds ``<name>.ko`` for MODULES."""
    d = stat.S_IFDIR | 0o755
    entries = [
        InitramfsEntry(f"/{name}", d)
        for name in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")
    ]
    entries.append(InitramfsEntry("/bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries.append(InitramfsEntry("/bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(InitramfsEntry(AGENT_PATH, stat.S_IFREG | 0o755, agent.read_bytes()))
    entries.append(InitramfsEntry("/init", stat.S_IFREG | 0o755, init_script().encode()))
    for name in MODULES:
        ko = modules_dir / f"{name}.ko"
        entries.append(
            InitramfsEntry(f"/lib/modules/{name}.ko", stat.S_IFREG | 0o644, ko.read_bytes())
        )
    # the kernel needs /dev/console before devtmpfs is mounted, for init's stdio
    entries.append(InitramfsEntry("/dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    raw = _write_cpio(entries)
    return gzip.compress(raw, compresslevel=6, mtime=0)

"""Staged-tree helpers: normalization and the deterministic tree digest."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from forkyard.errors import UnsafeInput

__all__ = [
    "GUEST_DIRS",
    "MAX_MTIME",
    "TreeScan",
    "clamp_mtime",
    "ensure_guest_dirs",
    "normalize_root",
    "scan_tree",
    "set_all_mtimes",
]

# e2fsprogs 1.47.0 stores only the low 32 bits of st_mtime (no extra epoch
# bits), so a time outside [0, 2**31) would read back as something else in the
# guest. Clamping keeps the tree digest describing what the image holds.
MAX_MTIME = 2**31 - 1

# Directories the guest's initramfs mounts onto (devtmpfs, proc, sysfs, tmpfs).
GUEST_DIRS: tuple[tuple[str, int], ...] = (
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
)

_CHUNK = 1 << 20


def clamp_mtime(mtime: float) -> int:
    return min(max(int(mtime), 0), MAX_MTIME)


def ensure_guest_dirs(
    root: Path, epoch: int, dirs: tuple[tuple[str, int], ...] = GUEST_DIRS
) -> None:
    """Create the mount-point directories the guest needs, if missing.

    An existing entry of that name is left alone (a rootfs knows best), but it
    must not be a symlink pointing somewhere the initramfs would mount over.
    """
    for rel, mode in dirs:
        path = root / rel
        try:
            st = path.lstat()
        except FileNotFoundError:
            path.mkdir(parents=True)
            os.chmod(path, mode)
            _chown_root(path)
            os.utime(path, (epoch, epoch))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeInput("guest mount point is not a directory", entry="/" + rel)


def normalize_root(root: Path, epoch: int) -> None:
    """Root dir attributes as mkfs will write them (0755, 0:0, fake time).

    mke2fs 1.47.0 does not copy the source root's metadata; making the staged
    root match keeps the tree digest honest.
    """
    os.chmod(root, 0o755)  # noqa: S103 - a rootfs root is world-readable
    _chown_root(root)
    os.utime(root, (epoch, epoch))


def _chown_root(path: Path) -> None:
    # Without root the tree keeps the builder's uid: still deterministic for
    # that user, and mkfs -E root_owner=0:0 fixes the image root anyway.
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def set_all_mtimes(root: Path, epoch: int) -> None:
    """Every entry's atime/mtime := ``epoch`` (symlinks themselves, not targets)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


@dataclass(slots=True)
class TreeScan:
    """What the tree digest saw; sizes feed the image size rule."""

    digest: str
    entries: int
    inodes: int
    data_bytes: int
    alloc_bytes: int
    has_lost_found: bool
    checksums: dict[str, str] = field(default_factory=dict)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    try:
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _xattrs_digest(path: str) -> bytes:
    # mkfs -d copies xattrs from the staged files, so they are part of the tree.
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return b""
        raise
    if not names:
        return b""
    h = hashlib.sha256()
    for name in names:
        value = os.getxattr(path, name, follow_symlinks=False)
        h.update(_field(name.encode()) + _field(value))
    return h.hexdigest().encode()


def _field(value: bytes) -> bytes:
    # Length-prefixed fields: no value (file name, link target, xattr) can forge
    # a record boundary.
    return len(value).to_bytes(8, "big") + value


_TYPE_CHARS = (
    (stat.S_ISREG, b"f"),
    (stat.S_ISDIR, b"d"),
    (stat.S_ISLNK, b"l"),
    (stat.S_ISCHR, b"c"),
    (stat.S_ISBLK, b"b"),
    (stat.S_ISFIFO, b"p"),
    (stat.S_ISSOCK, b"s"),
)


def _type_char(mode: int) -> bytes:
    for test, char in _TYPE_CHARS:
        if test(mode):
            return char
    raise ValueError(f"unknown file type {mode:o}")


def _walk_sorted(root: bytes) -> Iterator[bytes]:
    """Relative paths (bytes) in byte-sorted pre-order, root as ``b"."``; never follows links."""
    yield b"."
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        base = os.path.join(root, rel) if rel else root
        with os.scandir(base) as it:
            names = sorted(e.name for e in it)
        children = [os.path.join(rel, n) if rel else n for n in names]
        for child in children:
            yield child
        # Push reversed so the pop order stays sorted.
        for child in reversed(children):
            if stat.S_ISDIR(os.lstat(os.path.join(root, child)).st_mode):
                stack.append(child)


def scan_tree(root: Path, checksum_prefix: str | None = None) -> TreeScan:
    """Deterministic digest of a staged tree, plus checksums under ``checksum_prefix``.

    Per entry, in byte-sorted path order: path, type, permission bits, uid,
    gid, mtime (seconds), size, content (sha256 / link target / rdev),
    hardlink identity (first path of the inode) and xattrs. atime, ctime,
    inode numbers and directory sizes are host accidents and left out.
    """
    broot = os.fsencode(root)
    prefix = checksum_prefix.strip("/").encode() if checksum_prefix else None
    h = hashlib.sha256(b"forkyard-tree-v1\n")
    scan = TreeScan("", 0, 0, 0, 0, False)
    first_path: dict[tuple[int, int], bytes] = {}
    shas: dict[tuple[int, int], str] = {}
    for rel in _walk_sorted(broot):
        full = os.path.join(broot, rel)
        st = os.lstat(full)
        scan.entries += 1
        key = (st.st_dev, st.st_ino)
        link = first_path.get(key, b"")
        if not link:
            first_path[key] = rel
            scan.inodes += 1
            if stat.S_ISREG(st.st_mode):
                shas[key] = _file_sha256(os.fsdecode(full))
                scan.data_bytes += st.st_size
                scan.alloc_bytes += -(-st.st_size // 4096) * 4096
            elif stat.S_ISDIR(st.st_mode):
                scan.alloc_bytes += 4096
        sha = shas.get(key, "")
        if sha and prefix is not None and (rel == prefix or rel.startswith(prefix + b"/")):
            scan.checksums["/" + os.fsdecode(rel)] = sha
        h.update(_entry_record(rel, full, st, link, sha))
    lost_found = os.path.join(broot, b"lost+found")
    scan.has_lost_found = os.path.isdir(lost_found) and not os.path.islink(lost_found)
    scan.digest = h.hexdigest()
    return scan


def _entry_record(rel: bytes, full: bytes, st: os.stat_result, link: bytes, sha: str) -> bytes:
    kind = _type_char(st.st_mode)
    size = st.st_size if kind == b"f" else 0
    content = b""
    if kind == b"f":
        content = sha.encode()
    elif kind == b"l":
        content = os.readlink(full)
    elif kind in (b"c", b"b"):
        content = b"%d:%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
    fields = (
        rel,
        kind,
        b"%o" % stat.S_IMODE(st.st_mode),
        b"%d" % st.st_uid,
        b"%d" % st.st_gid,
        b"%d" % int(st.st_mtime),
        b"%d" % size,
        content,
        link,
        _xattrs_digest(os.fsdecode(full)),
    )
    return b"".join(_field(f) for f in fields)

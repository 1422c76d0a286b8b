"""The built-in minimal source: busybox plus a deterministic checksum test tree."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from forkyard._proc import run
from forkyard.errors import ImageBuildError, SetupError
from forkyard.image._stage import StageContext, Staged

__all__ = ["BUSYBOX", "TEST_TREE", "MinimalSource", "iter_test_tree"]

# Guest path of the checksum test tree (see MinimalSource).
TEST_TREE = "/srv/testtree"
BUSYBOX = Path("/bin/busybox")
_TESTTREE_SEED = b"forkyard-testtree-v1"


def iter_test_tree(count: int, seed: bytes = _TESTTREE_SEED) -> Iterator[tuple[str, bytes]]:
    """(relative path, content) of the deterministic test tree.

    ``dNN/dMM/file_KKKK``: 15 files per leaf, 10 leaves per top directory.
    Sizes are 0..16 KiB, every 500th file ~256 KiB. Content is SHAKE-256 of
    seed‖index, so it never has all-zero blocks that mkfs would turn into holes.
    """
    for k in range(count):
        key = seed + k.to_bytes(8, "big")
        r = int.from_bytes(hashlib.sha256(b"size:" + key).digest()[:4], "big")
        size = 256 * 1024 + r % 4096 if k % 500 == 250 else r % (16 * 1024 + 1)
        rel = f"d{k // 150:02d}/d{(k // 15) % 10:02d}/file_{k:04d}"
        yield rel, hashlib.shake_256(key).digest(size)


def _check_static_elf(path: Path) -> None:
    """Refuse a dynamically linked binary (it has a PT_INTERP program header)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise SetupError(f"{path} is not a little-endian 64-bit ELF binary")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            raise SetupError(f"{path} is dynamically linked; install busybox-static")


def _busybox_applets(busybox: Path) -> list[str]:
    done = run([busybox, "--list-full"], timeout=30, what="busybox --list-full")
    out = []
    for line in done.text.splitlines():
        rel = line.strip().strip("/")
        parts = rel.split("/")
        if not rel or ".." in parts or rel == "bin/busybox":
            continue
        out.append(rel)
    return sorted(set(out))


def _mkdirs(root: Path, rel: str, mode: int = 0o755) -> Path:
    path = root
    for part in rel.split("/"):
        path = path / part
        if not path.exists():
            path.mkdir()
            os.chmod(path, mode)
    return path


def _write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask must not decide the image's bytes
    finally:
        os.close(fd)


_MINIMAL_DIRS: tuple[tuple[str, int], ...] = (
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("srv", 0o755),
    ("home", 0o755),
    ("var/tmp", 0o1777),
    ("mnt", 0o755),
)

# the image's non-root account (`exec --user user`), with a home it owns
USER_ID = 1000

_ETC_FILES: tuple[tuple[str, str], ...] = (
    (
        "passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        f"user:x:{USER_ID}:{USER_ID}:user:/home/user:/bin/sh\n",
    ),
    ("group", f"root:x:0:\nnogroup:x:65534:\nuser:x:{USER_ID}:\n"),
    ("hostname", "forkyard\n"),
    # the network (docs/network.md): names resolve through files, then the
    # worker's resolver that the agent writes into resolv.conf
    ("hosts", "127.0.0.1 localhost\n::1 localhost\n"),
    ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n"),
    (
        "os-release",
        'NAME="forkyard minimal"\nID=forkyard-minimal\nVERSION_ID=1\n'
        'PRETTY_NAME="forkyard minimal (busybox)"\n',
    ),
)


@dataclass(frozen=True, slots=True)
class MinimalSource:
    """Busybox rootfs plus a checksum test tree at :data:`TEST_TREE`.

    Only ``/bin/busybox`` comes from the host (Debian's busybox-static); the
    image's bytes therefore depend on that binary too.
    """

    files: int = 3000

    def describe(self) -> str:
        return "minimal" if self.files == 3000 else f"minimal:files={self.files}"

    def stage(self, root: Path, ctx: StageContext) -> Staged:
        if not 0 <= self.files <= 1_000_000:
            raise ImageBuildError(f"MinimalSource.files must be 0..1000000, got {self.files}")
        if not BUSYBOX.is_file():
            raise SetupError(
                f"{BUSYBOX} is missing (run `forkyard setup` to install busybox-static)"
            )
        _check_static_elf(BUSYBOX)
        for rel, mode in _MINIMAL_DIRS:
            _mkdirs(root, rel)
            os.chmod(root / rel, mode)
        _write_file(root / "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for rel in _busybox_applets(BUSYBOX):
            parent, _, _ = rel.rpartition("/")
            if parent:
                _mkdirs(root, parent)
            link = root / rel
            if not link.is_symlink() and not link.exists():
                link.symlink_to("/bin/busybox")
        for name, text in _ETC_FILES:
            _write_file(root / "etc" / name, text.encode())
        home = _mkdirs(root, "home/user")
        os.chmod(home, 0o700)
        # mkfs -d copies owners; only root can give the home to the account (a
        # non-root builder's tree keeps its own uid, as in _tree._chown_root)
        if os.geteuid() == 0:
            os.chown(home, USER_ID, USER_ID)
        ctx.progress(f"writing test tree ({self.files} files)")
        tree = _mkdirs(root, TEST_TREE.strip("/"))
        for rel, data in iter_test_tree(self.files):
            parent, _, _ = rel.rpartition("/")
            _mkdirs(tree, parent)
            _write_file(tree / rel, data)
        return Staged(source=self.describe(), fixed_times=True)

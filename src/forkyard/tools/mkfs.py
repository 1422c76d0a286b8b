"""e2fsprogs wrapper: mke2fs/mkfs.ext4, debugfs, e2fsck, dumpe2fs.

Nothing else in forkyard runs these programs. The reproducible recipe
(verified with e2fsprogs 1.47.0) is :func:`mkfs_reproducible` followed by
:func:`set_inode_times` on every used inode: ``E2FSPROGS_FAKE_TIME`` pins every
time mkfs stamps, ``-U``/``hash_seed`` pin the UUID and directory hash seed
(both random by default, and ``metadata_csum`` seeds every checksum with the
UUID), and a ``debugfs -w`` pass sets the inode atimes/ctimes that mkfs copies
from the host files. ``SOURCE_DATE_EPOCH`` is ignored by 1.47.0.
"""

from __future__ import annotations

import functools
import re
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from forkyard._proc import require_tool, run
from forkyard.errors import ToolError

__all__ = [
    "BLOCK_SIZE",
    "INODE_RATIO",
    "MKE2FS_PROFILE",
    "FsckResult",
    "InodeLayout",
    "debugfs_cat",
    "debugfs_stat",
    "e2fsprogs_version",
    "fsck_readonly",
    "inode_layout",
    "mkfs_reproducible",
    "mkfs_stock",
    "set_inode_times",
    "superblock",
]

BLOCK_SIZE = 4096

# Pinned mke2fs profile for reproducible builds. Hosts ship different
# /etc/mke2fs.conf files for the *same* e2fsprogs version (upstream 1.47.0
# enables orphan_file and metadata_csum_seed, Debian does not), which would
# give different bytes for the same tree. This is Debian 12's profile.
MKE2FS_PROFILE = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""

# Inode ratio of the profile above; callers size images so inodes cannot run out.
INODE_RATIO = 16384

_VERSION_RE = re.compile(r"mke2fs\s+(\d+\.\d+(?:\.\d+)?)")


@functools.cache
def e2fsprogs_version() -> str:
    """e2fsprogs version (``"1.47.0"``) as reported by ``mke2fs -V``."""
    done = run([require_tool("mke2fs"), "-V"], timeout=30, what="mke2fs -V")
    # mke2fs prints its banner on stderr.
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    match = _VERSION_RE.search(text)
    if match is None:
        raise ToolError("mke2fs -V: cannot parse version", argv=done.argv, stderr=text)
    return match.group(1)


def _mkfs_timeout(size_bytes: int) -> float:
    # mkfs -d writes every byte of content; allow ~20 MB/s plus a fixed floor.
    return 120.0 + size_bytes / (20 * 1024 * 1024)


def _check_fresh(image: Path) -> None:
    # The recipe needs a fresh output file: stale blocks of a reused file would
    # survive in unallocated space and change the bytes.
    if image.exists() or image.is_symlink():
        raise FileExistsError(f"{image} already exists; mkfs needs a fresh output file")


def mkfs_reproducible(
    image: Path,
    source_dir: Path,
    size_bytes: int,
    *,
    fs_uuid: uuid.UUID,
    epoch: int,
) -> None:
    """Byte-reproducible ``mkfs.ext4 -d`` (the module's recipe) into a new file ``image``.

    Only the recipe's inputs decide the bytes: the tree, ``fs_uuid`` (also the
    directory hash seed), ``epoch`` (every time mkfs itself stamps), the size,
    the pinned profile and the e2fsprogs version. Inode atime/ctime still come
    from the host files; :func:`set_inode_times` fixes them afterwards.
    """
    _check_fresh(image)
    u = str(fs_uuid)
    with tempfile.TemporaryDirectory(prefix="forkyard-mke2fs-") as tmp:
        profile = Path(tmp) / "mke2fs.conf"
        profile.write_text(MKE2FS_PROFILE)
        run(
            [
                require_tool("mkfs.ext4"),
                "-q",
                "-F",
                "-t",
                "ext4",
                "-T",
                "default",
                "-b",
                str(BLOCK_SIZE),
                "-U",
                u,
                "-E",
                f"hash_seed={u},lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                "-d",
                source_dir,
                image,
                _size_arg(size_bytes),
            ],
            env=_repro_env(epoch, profile),
            timeout=_mkfs_timeout(size_bytes),
            what="mkfs.ext4 (reproducible)",
        )


def mkfs_stock(image: Path, source_dir: Path, size_bytes: int) -> None:
    """Plain ``mkfs.ext4 -d``: random UUID/hash seed, real times, host profile.

    Models a fleet whose workers each build their own base.
    """
    _check_fresh(image)
    run(
        [
            require_tool("mkfs.ext4"),
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            source_dir,
            image,
            _size_arg(size_bytes),
        ],
        timeout=_mkfs_timeout(size_bytes),
        what="mkfs.ext4 (stock)",
    )


def _size_arg(size_bytes: int) -> str:
    if size_bytes <= 0 or size_bytes % 1024:
        raise ValueError(f"image size must be a positive multiple of 1 KiB, got {size_bytes}")
    return f"{size_bytes // 1024}k"


def _repro_env(epoch: int, profile: Path | None = None) -> dict[str, str]:
    env = {
        # 1.47.0 ignores SOURCE_DATE_EPOCH; this is the variable it reads.
        "E2FSPROGS_FAKE_TIME": str(epoch),
        # mkfs sorts directory entries; keep collation out of the picture.
        "LC_ALL": "C",
    }
    if profile is not None:
        env["MKE2FS_CONFIG"] = str(profile)
    return env


@dataclass(frozen=True, slots=True)
class InodeLayout:
    inode_count: int
    first_ino: int
    used: tuple[int, ...]

    @property
    def used_files(self) -> tuple[int, ...]:
        """Used inodes that hold tree entries: the root dir and ``first_ino`` onwards.

        Reserved inodes (journal, resize, bad blocks, ...) are skipped: mkfs
        stamps them with the fake time and they must stay untouched.
        """
        return tuple(i for i in self.used if i == 2 or i >= self.first_ino)


_GROUP_RE = re.compile(r"^Group (\d+):")
_FREE_INODES_RE = re.compile(r"^\s+Free inodes:\s*(.*)$")


def inode_layout(image: Path) -> InodeLayout:
    """Used inode numbers, read from the inode bitmaps via ``dumpe2fs``.

    The bitmaps are the authority (not a directory walk), so no file name can
    confuse the parse.
    """
    done = run([require_tool("dumpe2fs"), image], timeout=120, what="dumpe2fs")
    lines = done.text.splitlines()
    header = _parse_header(lines)
    count = int(header["Inode count"])
    per_group = int(header["Inodes per group"])
    first_ino = int(header.get("First inode", "11"))
    free: set[int] = set()
    seen_groups = 0
    group: int | None = None
    for line in lines:
        if m := _GROUP_RE.match(line):
            group = int(m.group(1))
            continue
        if group is not None and (m := _FREE_INODES_RE.match(line)):
            free.update(_parse_ranges(m.group(1)))
            seen_groups += 1
            group = None
    if seen_groups * per_group != count:
        raise ToolError(
            f"dumpe2fs: saw free-inode lists for {seen_groups} groups of {per_group}, "
            f"expected {count} inodes",
            argv=done.argv,
        )
    used = tuple(i for i in range(1, count + 1) if i not in free)
    return InodeLayout(inode_count=count, first_ino=first_ino, used=used)


def _parse_ranges(text: str) -> Iterable[int]:
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        yield from range(int(lo), int(hi or lo) + 1)


def _parse_header(lines: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        if _GROUP_RE.match(line):
            break
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith(" "):
            out.setdefault(key.strip(), value.strip())
    return out


def superblock(image: Path) -> dict[str, str]:
    """``dumpe2fs -h`` as a dict (``"Filesystem UUID"``, ``"Filesystem features"``...)."""
    done = run([require_tool("dumpe2fs"), "-h", image], timeout=60, what="dumpe2fs -h")
    return _parse_header(done.text.splitlines())


def set_inode_times(
    image: Path,
    inodes: Iterable[int],
    epoch: int,
    *,
    fields: tuple[str, ...] = ("atime", "ctime"),
) -> int:
    """Set ``fields`` of every inode in ``inodes`` to ``epoch`` with one ``debugfs -w`` pass.

    Inodes are addressed as ``<N>`` so file names never reach the command file.
    The ``@`` prefix matters: a bare number is parsed as ``YYYYMMDD...``.
    Returns the number of inodes changed.
    """
    lines = [f"sif <{ino}> {field} @{epoch}\n" for ino in inodes for field in fields]
    if not lines:
        return 0
    with tempfile.NamedTemporaryFile("w", prefix="forkyard-debugfs-", suffix=".cmds") as cmds:
        cmds.writelines(lines)
        cmds.flush()
        done = run(
            [require_tool("debugfs"), "-w", "-f", cmds.name, image],
            env=_repro_env(epoch),
            timeout=60 + len(lines) / 500,
            what="debugfs -w (set inode times)",
        )
    # debugfs exits 0 even when a request fails; its complaints go to stderr
    # after the banner line.
    errors = [
        ln
        for ln in done.stderr.decode("utf-8", "replace").splitlines()
        if ln.strip() and not ln.startswith("debugfs ")
    ]
    if errors:
        raise ToolError(
            "debugfs -w: set inode times failed", argv=done.argv, stderr="\n".join(errors)
        )
    return len(lines) // len(fields)


@dataclass(frozen=True, slots=True)
class FsckResult:
    clean: bool
    returncode: int
    output: str


def fsck_readonly(image: Path) -> FsckResult:
    """``e2fsck -fn``: full check that changes nothing. Exit 0 means clean."""
    done = run(
        [require_tool("e2fsck"), "-fn", image],
        check=False,
        timeout=600,
        what="e2fsck -fn",
    )
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    return FsckResult(clean=done.returncode == 0, returncode=done.returncode, output=text)


def debugfs_cat(image: Path, guest_path: str) -> bytes:
    """Contents of the regular file ``guest_path`` inside ``image`` (read-only).

    debugfs does not follow symlinks: a symlink reads as empty.
    """
    _check_debugfs_arg(guest_path)
    done = run(
        [require_tool("debugfs"), "-R", f'cat "{guest_path}"', image],
        timeout=60,
        what="debugfs cat",
    )
    err = done.stderr.decode("utf-8", "replace")
    if "File not found" in err or "not found by ext2_lookup" in err:
        raise ToolError(f"debugfs cat: {guest_path} not in image", argv=done.argv, stderr=err)
    return done.stdout


def debugfs_stat(image: Path, ref: str) -> str:
    """``debugfs stat`` text of ``ref`` (a guest path or ``<ino>``)."""
    _check_debugfs_arg(ref)
    done = run(
        [require_tool("debugfs"), "-R", f'stat "{ref}"', image],
        timeout=60,
        what="debugfs stat",
    )
    if not done.stdout.strip():
        raise ToolError(
            f"debugfs stat: {ref} not in image",
            argv=done.argv,
            stderr=done.stderr.decode("utf-8", "replace"),
        )
    return done.text


def _check_debugfs_arg(arg: str) -> None:
    # debugfs has its own quoting; refuse what it cannot express instead of
    # guessing at its escape rules.
    if any(c in arg for c in '"\n\r\0') or not arg:
        raise ValueError(f"cannot pass {arg!r} to debugfs")

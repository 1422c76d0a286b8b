"""Build a base image from a source and add it to the catalog.

Reproducible mode (default) follows the recipe of :mod:`forkyard.tools.mkfs`.
Same tree + same epoch + same e2fsprogs version ⇒ same bytes, on any worker:

1. stage the source into ``home.tmp_dir/image-build-*/root``; add the guest
   mount points (``/dev /proc /sys /tmp /run``) if missing; root dir 0755
   root:root; built-in sources get every mtime = epoch;
2. tree digest over the normalized tree (:func:`forkyard.image._tree.scan_tree`);
3. filesystem UUID = directory hash seed = first 16 bytes of the tree digest
   (RFC 9562 version 8, "custom");
4. ``E2FSPROGS_FAKE_TIME=epoch mkfs.ext4 ... -U uuid -E hash_seed=uuid ...
   -d root`` with a pinned mke2fs profile, on a fresh file;
5. ``debugfs -w`` sets atime and ctime of every used inode (root, and
   ``first_ino`` onwards, read from the inode bitmaps) to the epoch — mkfs
   copies those from the staging files, where they are host accidents. All
   other inode times are already fixed: mtime from the tree, crtime and the
   reserved inodes from the fake time, nanoseconds are zero in 1.47.0;
6. ``e2fsck -fn`` must be clean; digest = sha256 of the image bytes.

The epoch is ``SOURCE_DATE_EPOCH`` if set, else :data:`DEFAULT_EPOCH`
(2024-01-01T00:00:00Z). It is part of the recipe: workers must agree on it.
Directory and tarball sources keep their own mtimes (whole seconds, clamped
to 1970..2038); that is deterministic already, so they are not rewritten.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from forkyard.config import Home
from forkyard.errors import ImageBuildError, ToolError
from forkyard.image._tree import (
    MAX_MTIME,
    TreeScan,
    ensure_guest_dirs,
    normalize_root,
    scan_tree,
    set_all_mtimes,
)
from forkyard.image.catalog import ImageCatalog, ImageInfo, ImageMeta, check_name
from forkyard.image.sources import TEST_TREE, Source, StageContext
from forkyard.tools import mkfs

__all__ = ["DEFAULT_EPOCH", "build_epoch", "build_image", "derive_uuid", "image_size"]

DEFAULT_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z
MiB = 1024 * 1024
_SIZE_STEP = 64 * MiB
_MIN_SIZE = 128 * MiB

Progress = Callable[[str], None]


def build_epoch() -> int:
    """The fixed time stamped into reproducible images."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or not raw.strip():
        return DEFAULT_EPOCH
    try:
        value = int(raw)
    except ValueError:
        raise ImageBuildError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer") from None
    if not 0 <= value <= MAX_MTIME:
        raise ImageBuildError(f"SOURCE_DATE_EPOCH={value} is outside 0..{MAX_MTIME}")
    return value


def derive_uuid(tree_digest: str) -> uuid.UUID:
    """Filesystem UUID from a tree digest: its first 16 bytes, version 8, RFC variant."""
    raw = bytearray(bytes.fromhex(tree_digest)[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(raw))


def image_size(scan: TreeScan) -> int:
    """Deterministic image size for a staged tree, in bytes.

    Content (4 KiB blocks) x 1.3 + 64 MiB of room for the journal and the
    guest's writes, but at least enough space that the profile's inode ratio
    gives 1.5x the tree's inodes + 1024 spare; rounded up to 64 MiB, ≥128 MiB.
    """
    by_content = math.ceil(scan.alloc_bytes * 1.3) + scan.entries * 256 + 64 * MiB
    by_inodes = (scan.inodes * 3 // 2 + 1024) * mkfs.INODE_RATIO
    size = max(by_content, by_inodes, _MIN_SIZE)
    return -(-size // _SIZE_STEP) * _SIZE_STEP


def _noop(_: str) -> None:
    return None


def build_image(
    home: Home,
    source: Source,
    *,
    name: str | None = None,
    stock: bool = False,
    size_mb: int | None = None,
    progress: Progress | None = None,
) -> ImageInfo:
    """Build ``source`` into an ext4 base image and add it to ``home``'s catalog.

    ``stock=True`` runs plain ``mkfs.ext4 -d`` (random UUID, real times): two
    such builds differ, as when every worker builds its own base.
    """
    say = progress or _noop
    if name is not None:
        check_name(name)  # fail before minutes of building, not after
    if size_mb is not None and size_mb <= 0:
        raise ImageBuildError(f"size_mb must be positive, got {size_mb}")
    catalog = ImageCatalog(home)
    home.tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="image-build-", dir=home.tmp_dir))
    try:
        return _build_in(work, catalog, source, name, stock, size_mb, say)
    finally:
        say("cleaning up")
        _remove_tree(work)


def _build_in(
    work: Path,
    catalog: ImageCatalog,
    source: Source,
    name: str | None,
    stock: bool,
    size_mb: int | None,
    say: Progress,
) -> ImageInfo:
    epoch = build_epoch()
    root = work / "root"
    root.mkdir()
    scratch = work / "scratch"
    scratch.mkdir()
    say("staging")
    staged = source.stage(root, StageContext(epoch=epoch, scratch=scratch, progress=say))
    ensure_guest_dirs(root, epoch)
    if staged.fixed_times:
        set_all_mtimes(root, epoch)
    normalize_root(root, epoch)
    test_tree = TEST_TREE if _is_real_dir(root, TEST_TREE) else None
    say("hashing tree")
    scan = scan_tree(root, test_tree)
    size = size_mb * MiB if size_mb is not None else image_size(scan)
    image = work / "image.ext4"
    fs_uuid = derive_uuid(scan.digest)
    say(f"mkfs ({size // MiB} MiB, {'stock' if stock else 'reproducible'})")
    try:
        if stock:
            mkfs.mkfs_stock(image, root, size)
        else:
            mkfs.mkfs_reproducible(image, root, size, fs_uuid=fs_uuid, epoch=epoch)
            say("fixing inode times")
            _fix_inode_times(image, scan, epoch)
    except ToolError as exc:
        raise ImageBuildError(f"building image from {staged.source}: {exc}") from exc
    say("checking filesystem")
    _fsck(image)
    meta = ImageMeta(
        source=staged.source,
        reproducible=not stock,
        e2fsprogs=mkfs.e2fsprogs_version(),
        tree_digest=scan.digest,
        test_tree=test_tree,
        files=scan.checksums,
        epoch=None if stock else epoch,
        fs_uuid=None if stock else str(fs_uuid),
    )
    say("hashing image")
    info = catalog.add_file(image, meta, name=name)
    say(f"image sha256:{info.digest}")
    return info


def _fix_inode_times(image: Path, scan: TreeScan, epoch: int) -> None:
    layout = mkfs.inode_layout(image)
    inodes = layout.used_files
    # The bitmaps must account for exactly the tree's inodes plus
    # lost+found (which mkfs merges with a staged one): otherwise the parse is
    # wrong and some inode would keep a host timestamp.
    expected = scan.inodes + (0 if scan.has_lost_found else 1)
    if len(inodes) != expected:
        raise ImageBuildError(
            f"image has {len(inodes)} used inodes, the staged tree needs {expected}"
        )
    mkfs.set_inode_times(image, inodes, epoch)


def _fsck(image: Path) -> None:
    result = mkfs.fsck_readonly(image)
    if not result.clean:
        tail = " | ".join(result.output.strip().splitlines()[-8:])
        raise ImageBuildError(f"e2fsck -fn found problems (exit {result.returncode}): {tail}")


def _is_real_dir(root: Path, guest_path: str) -> bool:
    """Whether ``guest_path`` is a directory in the staged tree, via no symlink."""
    path = root
    for part in guest_path.strip("/").split("/"):
        path = path / part
        try:
            if not stat.S_ISDIR(path.lstat().st_mode):
                return False
        except OSError:
            return False
    return True


def _remove_tree(path: Path) -> None:
    if os.geteuid() != 0:
        # Tarball modes can leave read-only directories that only root could
        # empty; open them up first (top-down, so the walk can descend).
        for dirpath, dirnames, _files in os.walk(path):
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    shutil.rmtree(path)

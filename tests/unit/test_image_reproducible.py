"""Reproducible (and deliberately non-reproducible) base image builds.

These run mkfs/debugfs/e2fsck on real ext4 images but boot nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

import pytest

from forkyard.config import Home
from forkyard.errors import ImageBuildError, ImageError, SetupError
from forkyard.image import (
    DEFAULT_EPOCH,
    DebianSource,
    DirSource,
    ImageCatalog,
    ImageInfo,
    MinimalSource,
    build_image,
    derive_uuid,
)
from forkyard.image._tree import scan_tree
from forkyard.tools import mkfs


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


@pytest.fixture(scope="module")
def minimal(tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    home = Home.at(tmp_path_factory.mktemp("home-a"))
    return build_image(home, MinimalSource(), name="minimal")


def _times(image: Path, ref: str) -> dict[str, str]:
    out = {}
    for line in mkfs.debugfs_stat(image, ref).splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in ("atime", "ctime", "mtime", "crtime"):
            out[key] = value.split("--")[0].strip()
    return out


def _epoch_hex(t: int) -> str:
    return f"0x{t:08x}:00000000"


# --- minimal ----------------------------------------------------------------------


def test_minimal_same_digest_in_another_home(minimal: ImageInfo, tmp_path: Path) -> None:
    # A longer, different staging path and a later wall clock must not matter.
    deep = tmp_path / ("x" * 60) / "home-b"
    time.sleep(1.1)
    other = build_image(Home.at(deep), MinimalSource())
    assert other.digest == minimal.digest
    assert other.tree_digest == minimal.tree_digest
    assert hashlib.sha256(other.path.read_bytes()).hexdigest() == other.digest


def test_minimal_meta(minimal: ImageInfo) -> None:
    assert minimal.names == ("minimal",)
    assert minimal.source == "minimal"
    assert minimal.reproducible
    assert minimal.e2fsprogs == mkfs.e2fsprogs_version()
    assert minimal.test_tree == "/srv/testtree"
    assert minimal.epoch == DEFAULT_EPOCH
    assert minimal.file_count == 3000
    assert minimal.size == minimal.path.stat().st_size
    assert minimal.size % (64 * 1024 * 1024) == 0
    assert stat.S_IMODE(minimal.path.stat().st_mode) == 0o400


def test_minimal_is_clean_ext4_with_metadata_csum(minimal: ImageInfo) -> None:
    result = mkfs.fsck_readonly(minimal.path)
    assert result.clean, result.output
    features = mkfs.superblock(minimal.path)["Filesystem features"].split()
    assert "metadata_csum" in features
    assert "has_journal" in features


def test_uuid_and_hash_seed_come_from_tree_digest(minimal: ImageInfo) -> None:
    assert minimal.tree_digest is not None
    expected = derive_uuid(minimal.tree_digest)
    sb = mkfs.superblock(minimal.path)
    assert sb["Filesystem UUID"] == str(expected) == minimal.fs_uuid
    assert sb["Directory Hash Seed"] == str(expected)
    assert expected.version == 8
    assert expected.variant == uuid.RFC_4122
    assert expected.hex[:12] == minimal.tree_digest[:12]


def test_every_used_inode_has_epoch_times(minimal: ImageInfo) -> None:
    layout = mkfs.inode_layout(minimal.path)
    want = _epoch_hex(DEFAULT_EPOCH)
    # Sample across the whole range, including the root and the last inode.
    inodes = layout.used_files
    sample = sorted({inodes[0], inodes[1], inodes[-1], *inodes[:: max(1, len(inodes) // 25)]})
    for ino in sample:
        times = _times(minimal.path, f"<{ino}>")
        assert times == dict.fromkeys(("atime", "ctime", "mtime", "crtime"), want), ino


def test_minimal_rootfs_layout(minimal: ImageInfo) -> None:
    img = minimal.path
    assert 'Fast link dest: "/bin/busybox"' in mkfs.debugfs_stat(img, "/bin/sh")
    assert mkfs.debugfs_cat(img, "/bin/busybox") == Path("/bin/busybox").read_bytes()
    assert b"ID=forkyard-minimal" in mkfs.debugfs_cat(img, "/etc/os-release")
    assert mkfs.debugfs_cat(img, "/etc/passwd").startswith(b"root:x:0:0:")
    for d, mode in (("/tmp", "01777"), ("/root", "0700"), ("/proc", "0555"), ("/var/tmp", "01777")):
        st = mkfs.debugfs_stat(img, d)
        assert "Type: directory" in st and f"Mode:  {mode}" in st, d


def test_stock_builds_differ(tmp_path: Path) -> None:
    a = build_image(Home.at(tmp_path / "a"), MinimalSource(files=50), stock=True)
    b = build_image(Home.at(tmp_path / "b"), MinimalSource(files=50), stock=True)
    assert a.digest != b.digest
    assert a.tree_digest == b.tree_digest  # same content, different bytes
    assert not a.reproducible
    ua = mkfs.superblock(a.path)["Filesystem UUID"]
    assert ua != mkfs.superblock(b.path)["Filesystem UUID"]
    assert ua != str(derive_uuid(a.tree_digest or ""))
    assert mkfs.fsck_readonly(a.path).clean


def test_source_date_epoch_is_the_build_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minimal: ImageInfo
) -> None:
    other_epoch = 1_650_000_000
    small = MinimalSource(files=20)
    base = build_image(Home.at(tmp_path / "a"), small)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(other_epoch))
    moved = build_image(Home.at(tmp_path / "b"), small)
    assert moved.digest != base.digest
    assert moved.epoch == other_epoch
    want = _epoch_hex(other_epoch)
    assert set(_times(moved.path, "/srv/testtree/d00/d00/file_0003").values()) == {want}


# --- what the debugfs pass fixes ----------------------------------------------------------


def _stage_small(root: Path) -> None:
    root.mkdir()
    (root / "d").mkdir()
    (root / "d/f").write_bytes(b"x" * 5000)
    os.symlink("/nowhere", root / "d/l")
    for p in (root / "d/f", root / "d/l", root / "d", root):
        os.utime(p, (1_600_000_000, 1_600_000_000), follow_symlinks=False)


def test_debugfs_pass_fixes_atime_and_ctime(tmp_path: Path) -> None:
    _stage_small(tmp_path / "s1")
    time.sleep(1.1)  # different ctimes
    _stage_small(tmp_path / "s2")
    os.utime(tmp_path / "s2/d/f", (1_650_000_000, 1_600_000_000))  # different atime
    u = uuid.UUID("12345678-1234-8234-9234-123456789abc")
    imgs = [tmp_path / "s1.img", tmp_path / "s2.img"]
    for src, img in zip(("s1", "s2"), imgs, strict=True):
        mkfs.mkfs_reproducible(img, tmp_path / src, 128 << 20, fs_uuid=u, epoch=DEFAULT_EPOCH)
    assert imgs[0].read_bytes() != imgs[1].read_bytes()
    diff = _times(imgs[0], "/d/f").items() ^ _times(imgs[1], "/d/f").items()
    assert {k for k, _ in diff} == {"atime", "ctime"}
    for img in imgs:
        layout = mkfs.inode_layout(img)
        assert mkfs.set_inode_times(img, layout.used_files, DEFAULT_EPOCH) == 5
    assert imgs[0].read_bytes() == imgs[1].read_bytes()


def test_inode_layout_matches_tree(tmp_path: Path) -> None:
    _stage_small(tmp_path / "s")
    img = tmp_path / "s.img"
    mkfs.mkfs_reproducible(img, tmp_path / "s", 128 << 20, fs_uuid=uuid.uuid4(), epoch=1)
    layout = mkfs.inode_layout(img)
    # root(2), lost+found(11), d, d/f, d/l
    assert layout.used_files == (2, 11, 12, 13, 14)
    assert layout.inode_count == (128 << 20) // mkfs.INODE_RATIO
    assert layout.first_ino == 11


def test_used_inodes_spanning_groups_all_get_fixed(tmp_path: Path) -> None:
    # More files than one block group's 8192 inodes: the bitmap parse must see
    # every group, or the build's inode-count check fails.
    info = build_image(Home.at(tmp_path / "h"), MinimalSource(files=9000))
    layout = mkfs.inode_layout(info.path)
    per_group = int(mkfs.superblock(info.path)["Inodes per group"])
    assert layout.used_files[-1] > per_group
    assert set(_times(info.path, f"<{layout.used_files[-1]}>").values()) == {
        _epoch_hex(DEFAULT_EPOCH)
    }


def test_mkfs_refuses_existing_output(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    img = tmp_path / "x.img"
    img.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        mkfs.mkfs_reproducible(img, tmp_path / "src", 128 << 20, fs_uuid=uuid.uuid4(), epoch=1)


# --- directory sources --------------------------------------------------------------------


def _make_dir_source(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/conf").write_text("a=1\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/sh\n" + bytes(range(256)) * 40)
    os.chmod(root / "bin/tool", 0o4755)
    os.link(root / "bin/tool", root / "bin/tool2")
    os.symlink("/etc/conf", root / "etc/abs")
    os.symlink("../etc/conf", root / "bin/rel")
    (root / "home/u").mkdir(parents=True)
    (root / "home/u/x").write_text("user file")
    os.chown(root / "home/u/x", 1234, 5678)
    (root / "srv/testtree/a").mkdir(parents=True)
    (root / "srv/testtree/a/one").write_text("1")
    (root / "srv/testtree/two").write_text("22")
    (root / "empty").touch()
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, (1_500_000_000, 1_500_000_000), follow_symlinks=False)


def test_dir_source_reproducible_despite_atime_and_staging(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_dir_source(src)
    first = build_image(Home.at(tmp_path / "h1"), DirSource(src), name="dirimg")
    # Read everything (atime), change a mode and back (ctime), rename the dir.
    for p in src.rglob("*"):
        if p.is_file():
            p.read_bytes()
    os.chmod(src / "etc/conf", 0o600)
    os.chmod(src / "etc/conf", 0o644)
    moved = tmp_path / "somewhere-else" / "src"
    moved.parent.mkdir()
    shutil.move(src, moved)
    time.sleep(1.1)
    second = build_image(Home.at(tmp_path / "other" / "h2"), DirSource(moved))
    assert second.digest == first.digest
    assert second.source == f"dir:{moved}"
    # ...and a real content change does change it.
    (moved / "etc/conf").write_text("a=2\n")
    os.utime(moved / "etc/conf", (1_500_000_000, 1_500_000_000))
    third = build_image(Home.at(tmp_path / "h3"), DirSource(moved))
    assert third.digest != first.digest


def test_dir_source_keeps_modes_owners_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_dir_source(src)
    info = build_image(Home.at(tmp_path / "h"), DirSource(src))
    img = info.path
    assert "Mode:  04755" in mkfs.debugfs_stat(img, "/bin/tool")
    assert "Links: 2" in mkfs.debugfs_stat(img, "/bin/tool")
    assert 'Fast link dest: "/etc/conf"' in mkfs.debugfs_stat(img, "/etc/abs")
    assert 'Fast link dest: "../etc/conf"' in mkfs.debugfs_stat(img, "/bin/rel")
    st = mkfs.debugfs_stat(img, "/home/u/x")
    assert "User:  1234   Group:  5678" in st
    assert _times(img, "/etc/conf")["mtime"] == _epoch_hex(1_500_000_000)
    assert mkfs.debugfs_cat(img, "/bin/tool2") == (src / "bin/tool").read_bytes()
    assert "Type: directory" in mkfs.debugfs_stat(img, "/proc")
    # Only the test tree's files are recorded.
    assert info.test_tree == "/srv/testtree"
    files = ImageCatalog(Home.at(tmp_path / "h")).file_checksums(info.digest)
    assert files == {
        "/srv/testtree/a/one": hashlib.sha256(b"1").hexdigest(),
        "/srv/testtree/two": hashlib.sha256(b"22").hexdigest(),
    }


def test_tree_digest_ignores_atime_but_not_mode(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_dir_source(src)
    before = scan_tree(src).digest
    os.utime(src / "etc/conf", (1_700_000_000, 1_500_000_000))
    assert scan_tree(src).digest == before
    os.chmod(src / "etc/conf", 0o600)
    assert scan_tree(src).digest != before


def test_failed_build_leaves_no_staging_and_no_blob(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "h")
    lines: list[str] = []
    with pytest.raises(ImageBuildError, match=r"mkfs"):
        build_image(home, MinimalSource(files=100), size_mb=4, progress=lines.append)
    assert list(home.tmp_dir.iterdir()) == []
    assert ImageCatalog(home).list() == []
    assert not list((home.images_dir / "blobs").glob("*"))
    assert lines[0] == "staging" and lines[-1] == "cleaning up"


def test_progress_lines(minimal: ImageInfo, tmp_path: Path) -> None:
    lines: list[str] = []
    build_image(Home.at(tmp_path / "h"), MinimalSource(files=10), progress=lines.append)
    joined = "\n".join(lines)
    for word in ("staging", "hashing tree", "mkfs", "fixing inode times", "hashing image"):
        assert word in joined


def test_missing_dir_source(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="not a directory"):
        build_image(Home.at(tmp_path / "h"), DirSource(tmp_path / "nope"))


def test_e2fsprogs_version() -> None:
    version = mkfs.e2fsprogs_version()
    assert version.count(".") >= 1
    assert all(part.isdigit() for part in version.split("."))


def test_debian_source_validates_before_running(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="suite"):
        build_image(Home.at(tmp_path / "h"), DebianSource(suite="--evil"))


def test_debian_source_needs_mmdebstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(SetupError, match="forkyard setup"):
        build_image(Home.at(tmp_path / "h"), DebianSource())


def test_invalid_name_fails_before_building(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "h")
    lines: list[str] = []
    with pytest.raises(ImageError, match="invalid image name"):
        build_image(home, MinimalSource(files=1), name="Bad Name", progress=lines.append)
    assert lines == []


def test_dir_source_containing_the_staging_dir_is_refused(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "h")
    with pytest.raises(ImageBuildError, match="staging"):
        build_image(home, DirSource(tmp_path))
    assert list(home.tmp_dir.iterdir()) == []

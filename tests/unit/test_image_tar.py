"""Safe extraction of untrusted rootfs tarballs (forkyard.image._tarsafe, TarSource)."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from forkyard.config import Home
from forkyard.errors import ImageBuildError, UnsafeInput
from forkyard.image import ImageCatalog, TarSource, build_image
from forkyard.image._tarsafe import extract_tar
from forkyard.tools import mkfs

EPOCH = 1_704_067_200
MTIME = 1_600_000_000


@dataclass
class M:
    """One tar member to write: name, type and payload."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    dev: tuple[int, int] = (0, 0)


def make_tar(members: list[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.mtime = MTIME
            info.linkname = m.link
            info.devmajor, info.devminor = m.dev
            if m.kind == tarfile.REGTYPE:
                info.size = len(m.data)
                tf.addfile(info, io.BytesIO(m.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


@dataclass
class Arena:
    """A staging dir next to an 'outside' dir holding a sentinel the tarball must not touch."""

    stage: Path
    outside: Path
    sentinel: Path

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for p in sorted(self.outside.rglob("*")):
            out[str(p.relative_to(self.outside))] = p.read_bytes() if p.is_file() else b"<dir>"
        return out


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    stage = tmp_path / "work" / "stage"
    stage.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_bytes(b"untouched")
    a = Arena(stage, outside, sentinel)
    before = a.snapshot()
    yield a
    assert a.snapshot() == before, "something was written outside the staging dir"
    assert sentinel.read_bytes() == b"untouched"


def refused(
    arena: Arena,
    members: list[M],
    entry: str,
    max_bytes: int = 1 << 30,
    max_entries: int = 1000,
) -> UnsafeInput:
    with pytest.raises(UnsafeInput) as info:
        extract_tar(
            io.BytesIO(make_tar(members)),
            arena.stage,
            epoch=EPOCH,
            max_bytes=max_bytes,
            max_entries=max_entries,
        )
    assert info.value.entry == entry
    assert entry in str(info.value)
    return info.value


# --- refusals -------------------------------------------------------------------


def test_path_traversal_is_refused(arena: Arena) -> None:
    rel = os.path.relpath(arena.outside / "evil", arena.stage)
    assert rel.startswith("..")
    refused(arena, [M("ok", data=b"x"), M(rel, data=b"pwned")], entry=rel)
    assert not (arena.outside / "evil").exists()


def test_dotdot_inside_name_is_refused_even_if_it_stays_inside(arena: Arena) -> None:
    refused(arena, [M("a/../b", data=b"x")], entry="a/../b")


def test_absolute_member_name_is_refused(arena: Arena) -> None:
    target = str(arena.outside / "abs")
    refused(arena, [M(target, data=b"pwned")], entry=target)
    assert not (arena.outside / "abs").exists()


def test_write_through_extracted_symlink_is_refused(arena: Arena) -> None:
    members = [
        M("etc", kind=tarfile.DIRTYPE, mode=0o755),
        M("escape", kind=tarfile.SYMTYPE, link=str(arena.outside)),
        M("escape/evil", data=b"pwned"),
    ]
    refused(arena, members, entry="escape/evil")
    assert not (arena.outside / "evil").exists()
    # The symlink itself was stored, unfollowed.
    assert os.readlink(arena.stage / "escape") == str(arena.outside)


def test_write_through_relative_symlink_dir_is_refused(arena: Arena) -> None:
    members = [
        M("up", kind=tarfile.SYMTYPE, link="../../outside"),
        M("up/evil", data=b"pwned"),
    ]
    assert (arena.stage / "../../outside").resolve() == arena.outside
    refused(arena, members, entry="up/evil")
    assert not (arena.outside / "evil").exists()


def test_file_replacing_symlink_is_refused(arena: Arena) -> None:
    # A second entry with the symlink's name must not open() through the link.
    members = [
        M("s", kind=tarfile.SYMTYPE, link=str(arena.sentinel)),
        M("s", data=b"overwritten"),
    ]
    refused(arena, members, entry="s")


def test_hardlink_outside_is_refused(arena: Arena) -> None:
    rel = os.path.relpath(arena.sentinel, arena.stage)
    refused(arena, [M("hl", kind=tarfile.LNKTYPE, link=rel)], entry="hl")
    assert arena.sentinel.stat().st_nlink == 1


def test_hardlink_to_absolute_path_is_refused(arena: Arena) -> None:
    refused(arena, [M("hl", kind=tarfile.LNKTYPE, link=str(arena.sentinel))], entry="hl")
    assert arena.sentinel.stat().st_nlink == 1


def test_hardlink_to_symlink_is_refused(arena: Arena) -> None:
    # Linking to a symlink that points outside would make a second name for it.
    members = [
        M("s", kind=tarfile.SYMTYPE, link=str(arena.sentinel)),
        M("hl", kind=tarfile.LNKTYPE, link="s"),
    ]
    refused(arena, members, entry="hl")


def test_hardlink_to_file_not_yet_extracted_is_refused(arena: Arena) -> None:
    members = [M("hl", kind=tarfile.LNKTYPE, link="later"), M("later", data=b"x")]
    refused(arena, members, entry="hl")


def test_duplicate_type_clash_is_refused(arena: Arena) -> None:
    refused(arena, [M("x", data=b"1"), M("x", kind=tarfile.DIRTYPE)], entry="x")


def test_entry_below_regular_file_is_refused(arena: Arena) -> None:
    refused(arena, [M("f", data=b"1"), M("f/g", data=b"2")], entry="f/g")


def test_size_cap_stops_tar_bomb(arena: Arena) -> None:
    members = [M(f"f{i}", data=bytes(1000)) for i in range(5)]
    err = refused(arena, members, entry="f2", max_bytes=2500)
    assert "2500" in str(err)


def test_entry_cap_stops_tar_bomb(arena: Arena) -> None:
    members = [M(f"f{i}") for i in range(10)]
    err = refused(arena, members, entry="f4", max_entries=4)
    assert "4 entries" in str(err)


def test_truncated_tarball_is_a_build_error(arena: Arena) -> None:
    data = make_tar([M("big", data=os.urandom(50_000))])
    with pytest.raises(ImageBuildError):
        extract_tar(io.BytesIO(data[:20_000]), arena.stage, epoch=EPOCH)


# --- a normal rootfs ----------------------------------------------------------------

ROOTFS = [
    M("./", kind=tarfile.DIRTYPE, mode=0o755),
    M("./etc/", kind=tarfile.DIRTYPE, mode=0o755),
    M("./etc/alternatives/", kind=tarfile.DIRTYPE, mode=0o755),
    M("./etc/alternatives/editor", kind=tarfile.SYMTYPE, link="/usr/bin/vi"),
    M("./etc/os-release", data=b'ID="tartest"\n'),
    M("./etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
    M("./usr/bin/vi", data=b"#!/bin/sh\necho vi\n", mode=0o755),
    M("./usr/bin/view", kind=tarfile.LNKTYPE, link="./usr/bin/vi"),
    M("./usr/bin/su", data=b"suid", mode=0o4755),
    M("./usr/lib/rel", kind=tarfile.SYMTYPE, link="../bin/vi"),
    M("./home/user/", kind=tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000),
    M("./home/user/notes", data=b"mine", uid=1000, gid=1000, mode=0o600),
    M("./srv/ro/", kind=tarfile.DIRTYPE, mode=0o555),
    M("./dev/null", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
    M("./run/initctl", kind=tarfile.FIFOTYPE, mode=0o600),
]


def test_rootfs_tar_extracts_with_links_kept(arena: Arena) -> None:
    result = extract_tar(io.BytesIO(make_tar(ROOTFS)), arena.stage, epoch=EPOCH)
    s = arena.stage
    assert os.readlink(s / "etc/alternatives/editor") == "/usr/bin/vi"
    assert os.readlink(s / "usr/lib/rel") == "../bin/vi"
    assert (s / "usr/bin/view").stat().st_ino == (s / "usr/bin/vi").stat().st_ino
    assert stat.S_IMODE((s / "usr/bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((s / "srv/ro").stat().st_mode) == 0o555
    notes = s / "home/user/notes"
    assert (notes.stat().st_uid, notes.stat().st_gid) == (1000, 1000)
    assert (s / "etc/shadow").stat().st_gid == 42
    assert stat.S_ISFIFO((s / "run/initctl").lstat().st_mode)
    if os.geteuid() == 0:
        assert (s / "dev/null").stat().st_rdev == os.makedev(1, 3)
    assert (s / "etc/os-release").stat().st_mtime == MTIME
    assert (s / "usr").stat().st_mtime == EPOCH  # implied, not listed: epoch
    assert (s / "etc").stat().st_mtime == MTIME  # children added after, still MTIME
    assert result.entries == len(ROOTFS)
    assert result.sha256 == hashlib.sha256(make_tar(ROOTFS)).hexdigest()


@pytest.mark.parametrize("compress", ["gz", "xz", "zst"])
def test_compressed_tarballs(arena: Arena, compress: str) -> None:
    raw = make_tar(ROOTFS)
    data = {
        "gz": lambda: gzip.compress(raw),
        "xz": lambda: lzma.compress(raw),
        "zst": lambda: zstandard.ZstdCompressor().compress(raw),
    }[compress]()
    result = extract_tar(io.BytesIO(data), arena.stage, epoch=EPOCH)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert (arena.stage / "usr/bin/vi").read_bytes() == b"#!/bin/sh\necho vi\n"


def test_tar_source_builds_image_with_absolute_symlinks(tmp_path: Path) -> None:
    tar_path = tmp_path / "rootfs.tar.gz"
    tar_path.write_bytes(gzip.compress(make_tar(ROOTFS), mtime=0))
    home = Home.at(tmp_path / "home")
    info = build_image(home, TarSource(tar_path), name="tartest")
    digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    assert info.source == f"tar:sha256:{digest}"
    assert info.test_tree is None
    assert ImageCatalog(home).file_checksums(info.digest) == {}
    img = info.path
    assert 'Fast link dest: "/usr/bin/vi"' in mkfs.debugfs_stat(img, "/etc/alternatives/editor")
    assert mkfs.debugfs_cat(img, "/etc/os-release") == b'ID="tartest"\n'
    st = mkfs.debugfs_stat(img, "/usr/bin/su")
    assert "Mode:  04755" in st
    for d in ("/dev", "/proc", "/sys", "/tmp", "/run"):
        assert "Type: directory" in mkfs.debugfs_stat(img, d)
    assert mkfs.fsck_readonly(img).clean
    assert list((home.tmp_dir).iterdir()) == []
    # Same tarball, another home: same bytes.
    again = build_image(Home.at(tmp_path / "home2"), TarSource(tar_path))
    assert again.digest == info.digest


def test_unsafe_tar_build_leaves_nothing_behind(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tar_path = tmp_path / "evil.tar"
    tar_path.write_bytes(
        make_tar([M("x", kind=tarfile.SYMTYPE, link=str(outside)), M("x/pwn", data=b"!")])
    )
    home = Home.at(tmp_path / "home")
    with pytest.raises(UnsafeInput, match="x/pwn"):
        build_image(home, TarSource(tar_path))
    assert list(outside.iterdir()) == []
    assert list(home.tmp_dir.iterdir()) == []
    assert ImageCatalog(home).list() == []


def test_tar_source_reads_stdin(tmp_path: Path) -> None:
    tar_path = tmp_path / "rootfs.tar"
    tar_path.write_bytes(make_tar(ROOTFS))
    script = (
        "import sys\n"
        "from forkyard.config import Home\n"
        "from forkyard.image import TarSource, build_image\n"
        "print(build_image(Home.at(sys.argv[1]), TarSource('-')).digest)\n"
    )
    with open(tar_path, "rb") as stdin:
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "h-stdin")],
            stdin=stdin,
            capture_output=True,
            timeout=120,
            check=True,
        )
    from_file = build_image(Home.at(tmp_path / "h-file"), TarSource(tar_path))
    assert done.stdout.decode().strip() == from_file.digest
    assert from_file.source == f"tar:sha256:{hashlib.sha256(tar_path.read_bytes()).hexdigest()}"

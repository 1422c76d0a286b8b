"""Trees as tar streams: the entry rules, and local extraction that never leaves its root."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from forkyard import _tarstream as ts
from forkyard.errors import UnsafeArchive


def _tar(*members: tuple[str, bytes, bytes | None, str]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data, link in members:
            i = tarfile.TarInfo(name)
            i.type, i.linkname, i.mode = kind, link, 0o4755
            i.size = len(data) if data is not None else 0
            tf.addfile(i, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def test_pack_and_extract_keep_modes_symlinks_and_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f").write_bytes(os.urandom(3 * ts.CHUNK + 1))
    os.chmod(src / "a" / "b" / "f", 0o640)
    os.chmod(src / "a", 0o700)
    os.symlink("b/f", src / "a" / "l")
    os.symlink("/nowhere", src / "dangling")
    os.mkfifo(src / "fifo")  # skipped, not copied
    out = tmp_path / "out"
    n = ts.extract_dir(ts.IterReader(ts.pack_dir(src)), out)  # type: ignore[arg-type]
    assert n == 5
    assert (out / "a" / "b" / "f").read_bytes() == (src / "a" / "b" / "f").read_bytes()
    assert stat.S_IMODE(os.stat(out / "a" / "b" / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(out / "a").st_mode) == 0o700
    assert os.readlink(out / "a" / "l") == "b/f" and os.readlink(out / "dangling") == "/nowhere"
    assert not (out / "fifo").exists()


@pytest.mark.parametrize("members", [
    [("../x", tarfile.REGTYPE, b"x", "")],
    [("a/../../x", tarfile.REGTYPE, b"x", "")],
    [("/etc/x", tarfile.REGTYPE, b"x", "")],
    [("d", tarfile.CHRTYPE, None, "")],
    [("d", tarfile.BLKTYPE, None, "")],
    [("p", tarfile.FIFOTYPE, None, "")],
    [("ok", tarfile.REGTYPE, b"x", ""), ("h", tarfile.LNKTYPE, None, "ok")],
    [("l", tarfile.SYMTYPE, None, "/tmp"), ("l/x", tarfile.REGTYPE, b"x", "")],
    [("n" * 300, tarfile.REGTYPE, b"x", "")],
], ids=["dotdot", "nested-dotdot", "absolute", "chr", "blk", "fifo", "hardlink",
        "below-own-symlink", "long-component"])
def test_unsafe_entries_are_refused_and_nothing_lands_outside(tmp_path: Path, members) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchive):
        ts.extract_dir(_tar(*members), out)
    outside = {p.name for p in tmp_path.rglob("*")} - {"deep", "out", "ok", "l"}
    assert outside == set(), outside


def test_an_existing_local_symlink_is_replaced_or_refused_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / "dir")
    os.symlink(target / "file", out / "file")
    with pytest.raises(UnsafeArchive, match="below a symlink"):
        ts.extract_dir(_tar(("dir/x", tarfile.REGTYPE, b"x", "")), out)
    ts.extract_dir(_tar(("file", tarfile.REGTYPE, b"new", "")), out)
    assert list(target.iterdir()) == []  # nothing written through either link
    assert (out / "file").read_bytes() == b"new" and not (out / "file").is_symlink()
    # setuid bits of an archive never reach the disk
    assert stat.S_IMODE(os.stat(out / "file").st_mode) == 0o755


def test_entry_count_is_bounded(tmp_path: Path) -> None:
    many = [(f"f{i}", tarfile.REGTYPE, b"", "") for i in range(12)]
    with pytest.raises(UnsafeArchive, match="more than 10 entries"):
        ts.extract_dir(_tar(*many), tmp_path / "o", max_entries=10)
    assert len(list((tmp_path / "o").iterdir())) == 10


def test_a_file_that_changes_size_keeps_the_stream_framed() -> None:
    assert b"".join(ts.exactly([b"abc", b"defgh"], 5)) == b"abcde" + b"\0" * 507
    assert b"".join(ts.exactly([b"ab"], 4)) == b"ab\0\0" + b"\0" * 508

"""Files of any size through the worker library: chunked, committed by rename, trees as tar."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from forkyard import _tarstream as ts
from forkyard.errors import GuestFileNotFound, UnsafeArchive
from forkyard.worker._files import CHUNK
from forkyard.worker._tree import read_tree, write_tree

pytestmark = pytest.mark.vm

BASE = "/tmp/test_files_stream"


def _blocks(n: int, seed: bytes = b"x"):
    # deterministic, incompressible-ish, never the whole file in memory
    for i in range(n):
        yield hashlib.sha256(seed + i.to_bytes(8, "little")).digest() * (65536 // 32)


def test_a_multi_chunk_file_round_trips_and_partial_reads_are_bounded(shared_sandbox):
    files = shared_sandbox.files
    n = (3 * CHUNK) // 65536 + 7  # three chunks and a bit: exercises the rechunking
    want = hashlib.sha256()
    for b in _blocks(n):
        want.update(b)
    size = files.write_stream(f"{BASE}/big.bin", _blocks(n), mode=0o640)
    assert size == n * 65536
    got, parts = hashlib.sha256(), 0
    for chunk in files.read_stream(f"{BASE}/big.bin"):
        assert len(chunk) <= CHUNK
        got.update(chunk)
        parts += 1
    assert got.hexdigest() == want.hexdigest() and parts == 4
    assert files.stat(f"{BASE}/big.bin").mode & 0o777 == 0o640
    assert not [e.name for e in files.list(BASE) if ".fy-up-" in e.name]


def test_a_cut_upload_leaves_the_target_untouched(shared_sandbox):
    files = shared_sandbox.files
    files.write(f"{BASE}/keep.txt", b"old contents\n")

    def cut():
        yield from _blocks(80)  # > 1 chunk sent into the temp file
        raise ConnectionError("caller went away")

    with pytest.raises(ConnectionError):
        files.write_stream(f"{BASE}/keep.txt", cut())
    assert files.read(f"{BASE}/keep.txt") == b"old contents\n"
    assert not [e.name for e in files.list(BASE) if ".fy-up-" in e.name]


def test_mkdir_rename_exists(shared_sandbox):
    files = shared_sandbox.files
    files.make_dir(f"{BASE}/d1/d2", mode=0o700, exact_mode=True)
    assert files.stat(f"{BASE}/d1/d2").mode & 0o777 == 0o700
    files.write(f"{BASE}/d1/a", b"a")
    files.rename(f"{BASE}/d1/a", f"{BASE}/d1/d2/b")
    assert not files.exists(f"{BASE}/d1/a") and files.read(f"{BASE}/d1/d2/b") == b"a"
    files.write(f"{BASE}/d1/c", b"c")
    with pytest.raises(Exception, match="exist"):
        files.rename(f"{BASE}/d1/c", f"{BASE}/d1/d2/b", overwrite=False)
    with pytest.raises(GuestFileNotFound):
        files.read_stream(f"{BASE}/nope")


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "",
          mode: int = 0o644) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.size, i.linkname, i.mode = kind, size, link, mode
    return i


def test_a_tree_round_trips_with_modes_and_symlinks(shared_sandbox, tmp_path):
    files = shared_sandbox.files
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src / "run.sh", 0o750)
    (src / "sub" / "deep" / "data").write_bytes(os.urandom(CHUNK + 5))
    os.chmod(src / "sub", 0o711)
    os.symlink("../run.sh", src / "sub" / "link")
    os.symlink("/etc/passwd", src / "abs-link")
    n = write_tree(files, f"{BASE}/tree", ts.pack_dir(src))
    assert n == 6
    assert files.readlink(f"{BASE}/tree/sub/link") == "../run.sh"
    assert files.stat(f"{BASE}/tree/run.sh").mode & 0o777 == 0o750
    out = tmp_path / "out"
    ts.extract_dir(ts.IterReader(read_tree(files, f"{BASE}/tree")), out)  # type: ignore[arg-type]
    for rel in ("run.sh", "sub/deep/data"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
        assert os.stat(out / rel).st_mode == os.stat(src / rel).st_mode
    assert os.stat(out / "sub").st_mode & 0o777 == 0o711
    assert os.readlink(out / "sub" / "link") == "../run.sh"
    assert os.readlink(out / "abs-link") == "/etc/passwd"


@pytest.mark.parametrize("members", [
    [(_info("../escape", size=1), b"x")],
    [(_info("/abs", size=1), b"x")],
    [(_info("dev", tarfile.CHRTYPE), None)],
    [(_info("l", tarfile.SYMTYPE, link="/"), None), (_info("l/x", size=1), b"x")],
    [(_info("h", tarfile.LNKTYPE, link="ok"), None)],
], ids=["dotdot", "absolute", "device", "below-symlink", "hardlink"])
def test_an_unsafe_tree_is_refused_before_anything_is_written(shared_sandbox, members):
    files = shared_sandbox.files
    with pytest.raises(UnsafeArchive):
        write_tree(files, f"{BASE}/bad", [_tar(*members)])
    # the refused entry and everything after it are not written (a symlink before it is)
    assert {e.name for e in files.list(f"{BASE}/bad")} <= {"l"}
    files.remove(f"{BASE}/bad", recursive=True)
    assert not files.exists("/escape") and not files.exists("/abs") and not files.exists("/x")

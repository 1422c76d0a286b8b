"""The one atomic-write mechanism (forkyard._fs) and its translation at the store boundary."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkyard._fs import atomic_write_bytes, commit_dir, commit_file, private_dir
from forkyard.errors import StoreError
from forkyard.store._base import atomic_write


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_commit_file_publishes_with_its_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    tmp = tmp_path / ".out.part"
    tmp.write_bytes(b"complete")
    dest = tmp_path / "out"
    dest.write_bytes(b"old")
    commit_file(tmp, dest, mode=0o400)
    assert dest.read_bytes() == b"complete" and mode(dest) == 0o400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_commit_file_refuses_a_symlinked_temp(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x")
    (tmp_path / "tmp").symlink_to(target)
    with pytest.raises(OSError):
        commit_file(tmp_path / "tmp", tmp_path / "dest", mode=0o400)
    assert not (tmp_path / "dest").exists() and mode(target) == 0o666


def test_commit_dir_publishes_a_whole_tree(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    (staged / "sub").mkdir(parents=True)
    (staged / "a").write_bytes(b"a")
    (staged / "sub" / "b").write_bytes(b"b")
    commit_dir(staged, tmp_path / "dest")
    assert not staged.exists()
    assert (tmp_path / "dest" / "sub" / "b").read_bytes() == b"b"


def test_private_dir_makes_every_missing_directory_0700(tmp_path: Path) -> None:
    leaf = private_dir(tmp_path / "a" / "b" / "c")
    for d in (tmp_path / "a", tmp_path / "a" / "b", leaf):
        assert mode(d) == 0o700, d
    os.chmod(leaf, 0o755)
    private_dir(leaf)
    assert mode(leaf) == 0o700  # an existing leaf of ours is tightened


def test_private_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(OSError):
        private_dir(tmp_path / "f" / "d")


def test_atomic_write_bytes_is_private_by_default(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "secret.json", "{}")
    assert mode(tmp_path / "secret.json") == 0o600


def test_store_atomic_write_translates_the_mechanism_but_not_the_body(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError), atomic_write(blocker / "under-a-file"):
        pass
    with pytest.raises(FileNotFoundError), atomic_write(tmp_path / "out"):
        raise FileNotFoundError("the body's own error")
    assert list(tmp_path.iterdir()) == [blocker]  # no temp file left behind
    with atomic_write(tmp_path / "out") as f:
        f.write(b"data")
    assert (tmp_path / "out").read_bytes() == b"data" and mode(tmp_path / "out") == 0o600

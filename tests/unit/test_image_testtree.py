"""The checksum test tree: what the catalog records is what the ext4 image holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from forkyard.config import Home
from forkyard.image import ImageCatalog, ImageInfo, MinimalSource, build_image
from forkyard.image.sources import iter_test_tree
from forkyard.tools import mkfs

# Pins the generator: changing it changes every minimal image's digest, which
# must be a deliberate decision, not an accident.
GOLDEN_TREE_3000 = "3e919a4fd785cc3bf79bb0ceba51592b7c054535da01b3d01b64b768e8d777ee"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageInfo, dict[str, str]]:
    home = Home.at(tmp_path_factory.mktemp("home"))
    info = build_image(home, MinimalSource(), name="minimal")
    return info, ImageCatalog(home).file_checksums("minimal")


def test_generator_is_stable() -> None:
    h = hashlib.sha256()
    sizes = []
    for rel, data in iter_test_tree(3000):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        sizes.append(len(data))
    assert h.hexdigest() == GOLDEN_TREE_3000
    assert min(sizes) == 0
    assert sum(1 for s in sizes if s > 200_000) == 6
    assert max(s for s in sizes if s < 200_000) <= 16 * 1024


def test_recorded_checksums_cover_exactly_the_tree(built: tuple[ImageInfo, dict[str, str]]) -> None:
    info, files = built
    expected = {
        f"/srv/testtree/{rel}": hashlib.sha256(data).hexdigest()
        for rel, data in iter_test_tree(3000)
    }
    assert files == expected
    assert info.file_count == 3000
    assert "/srv/testtree/d19/d09/file_2999" in files


def test_recorded_checksums_match_image_contents(built: tuple[ImageInfo, dict[str, str]]) -> None:
    info, files = built
    paths = sorted(files)
    big = [p for p in paths if int(p.rsplit("_", 1)[1]) % 500 == 250]
    sample = sorted({*paths[::97], *big, paths[0], paths[-1]})
    assert len(sample) > 30
    for guest in sample:
        data = mkfs.debugfs_cat(info.path, guest)
        assert hashlib.sha256(data).hexdigest() == files[guest], guest


def test_checksums_detect_a_modified_image(
    built: tuple[ImageInfo, dict[str, str]], tmp_path: Path
) -> None:
    # The guest's check relies on a mismatch being visible: corrupt one data
    # block of a test file in a copy and the checksum must no longer match.
    info, files = built
    guest = "/srv/testtree/d00/d00/file_0001"
    copy = tmp_path / "copy.ext4"
    copy.write_bytes(info.path.read_bytes())
    stat_text = mkfs.debugfs_stat(copy, guest)
    block = int(stat_text.split("EXTENTS:")[1].split(":")[1].split("-")[0].split()[0])
    with open(copy, "r+b") as f:
        f.seek(block * 4096)
        f.write(b"\xff" * 16)
    data = mkfs.debugfs_cat(copy, guest)
    assert hashlib.sha256(data).hexdigest() != files[guest]

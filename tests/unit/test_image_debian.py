"""Debian base images via mmdebstrap (needs network to the Debian mirror; ~1 min)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkyard.config import Home
from forkyard.image import DebianSource, build_image
from forkyard.tools import mkfs


@pytest.mark.slow
def test_debian_image_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    source = DebianSource(suite="bookworm", packages=("python3", "git"))
    first = build_image(Home.at(tmp_path / "a"), source, name="debian")
    second = build_image(Home.at(tmp_path / "b" / "deeper"), source)
    assert second.digest == first.digest
    assert first.source == "debian:bookworm+python3,git"
    assert first.reproducible and first.test_tree is None
    img = first.path
    assert "Type: symlink" in mkfs.debugfs_stat(img, "/usr/bin/python3")
    assert "Type: regular" in mkfs.debugfs_stat(img, "/usr/bin/git")
    assert b"bookworm" in mkfs.debugfs_cat(img, "/usr/lib/os-release")
    assert mkfs.fsck_readonly(img).clean

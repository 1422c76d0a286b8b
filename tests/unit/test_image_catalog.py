"""ImageCatalog: lookup, tagging, imports, integrity and concurrency.

Most tests use small arbitrary byte files as blobs: the catalog is about bytes
and digests, not about ext4.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from forkyard.config import Home
from forkyard.errors import ImageError, ImageNotFound, IntegrityError
from forkyard.image import AmbiguousImageRef, ImageCatalog, ImageMeta, normalize_digest


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home.at(tmp_path / "home")


@pytest.fixture
def catalog(home: Home) -> ImageCatalog:
    return ImageCatalog(home)


def blob(tmp_path: Path, name: str, data: bytes) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


FULL_META = ImageMeta(
    source="minimal",
    reproducible=True,
    e2fsprogs="1.47.0",
    tree_digest="ab" * 32,
    test_tree="/srv/testtree",
    files={"/srv/testtree/a": "cd" * 32},
    epoch=1_704_067_200,
)


def test_get_by_name_digest_prefix_and_sha256(catalog: ImageCatalog, tmp_path: Path) -> None:
    path, digest = blob(tmp_path, "img", b"image bytes")
    added = catalog.add_file(path, FULL_META, name="minimal")
    assert not path.exists()  # consumed
    assert added.digest == digest
    for ref in ("minimal", digest, f"sha256:{digest}", digest[:8], digest[:20], digest.upper()):
        assert catalog.get(ref) == added, ref
    assert added.names == ("minimal",)
    assert added.source == "minimal"
    assert added.reproducible
    assert added.test_tree == "/srv/testtree"
    assert added.path == catalog.path("minimal")
    assert added.path.read_bytes() == b"image bytes"
    assert catalog.has(digest) and catalog.has(f"sha256:{digest}")
    assert catalog.file_checksums("minimal") == {"/srv/testtree/a": "cd" * 32}
    assert catalog.meta(digest).files == {"/srv/testtree/a": "cd" * 32}


@pytest.mark.parametrize("ref", ["nope", "0" * 64, "sha256:" + "1" * 64, "deadbee", "", "../x"])
def test_unknown_refs(catalog: ImageCatalog, tmp_path: Path, ref: str) -> None:
    path, _ = blob(tmp_path, "img", b"x")
    catalog.add_file(path, name="present")
    with pytest.raises(ImageNotFound):
        catalog.get(ref)
    assert not catalog.has(ref)


def test_ambiguous_prefix(catalog: ImageCatalog) -> None:
    # Two real digests sharing 8 hex digits are too costly to find; blobs put
    # in by hand (a supported state: the bytes are the identity) will do.
    catalog.blobs_dir.mkdir(parents=True)
    a = "abcdef01" + "0" * 56
    b = "abcdef01" + "1" * 56
    for d in (a, b):
        (catalog.blobs_dir / f"{d}.ext4").write_bytes(b"")
    with pytest.raises(AmbiguousImageRef) as info:
        catalog.get("abcdef01")
    assert set(info.value.matches) == {a, b}
    assert "ambiguous" in str(info.value)
    assert isinstance(info.value, ImageNotFound)
    assert catalog.get("abcdef010").digest == a
    assert catalog.get("abcdef011").digest == b
    assert catalog.get(a).source == "unknown"  # no meta: still usable


def test_blob_is_read_only_and_list(catalog: ImageCatalog, tmp_path: Path) -> None:
    p1, d1 = blob(tmp_path, "one", b"one")
    p2, d2 = blob(tmp_path, "two", b"two")
    catalog.add_file(p1, name="one")
    catalog.add_file(p2)
    assert stat.S_IMODE(catalog.path(d1).stat().st_mode) == 0o400
    assert {i.digest for i in catalog.list()} == {d1, d2}
    assert [p.name for p in catalog.blobs_dir.iterdir()] != []
    assert not [p for p in catalog.blobs_dir.iterdir() if p.name.startswith(".")]


def test_tag_moves_names(catalog: ImageCatalog, tmp_path: Path) -> None:
    p1, d1 = blob(tmp_path, "one", b"one")
    p2, d2 = blob(tmp_path, "two", b"two")
    catalog.add_file(p1, name="base")
    catalog.add_file(p2)
    catalog.tag("base", d2[:10])
    catalog.tag("also", "base")
    assert catalog.get("base").digest == d2
    assert catalog.get(d2).names == ("also", "base")
    assert catalog.get(d1).names == ()
    catalog.untag("also")
    assert catalog.get(d2).names == ("base",)
    with pytest.raises(ImageNotFound):
        catalog.tag("x", "0" * 64)


@pytest.mark.parametrize("name", ["", "Upper", "a/b", "-x", "deadbeef", "a" * 65, "sha256:x"])
def test_invalid_names(catalog: ImageCatalog, tmp_path: Path, name: str) -> None:
    path, digest = blob(tmp_path, "img", b"x")
    catalog.add_file(path)
    with pytest.raises(ImageError, match="invalid image name"):
        catalog.tag(name, digest)


def test_import_blob_wrong_digest_leaves_nothing(catalog: ImageCatalog, tmp_path: Path) -> None:
    path, digest = blob(tmp_path, "download", b"corrupted in transit")
    wrong = hashlib.sha256(b"what it should have been").hexdigest()
    with pytest.raises(IntegrityError) as info:
        catalog.import_blob(wrong, path, name="minimal")
    assert info.value.expected == wrong and info.value.actual == digest
    assert list(catalog.blobs_dir.iterdir()) == []
    assert list(catalog.meta_dir.iterdir()) == []
    assert not catalog.names_file.exists()
    assert path.read_bytes() == b"corrupted in transit"  # source untouched
    with pytest.raises(ImageNotFound):
        catalog.get("minimal")


def test_import_blob_keeps_holes_and_upgrades_partial_meta(
    catalog: ImageCatalog, tmp_path: Path
) -> None:
    data = b"head" + bytes(8 << 20) + b"tail"
    path, digest = blob(tmp_path, "sparse", data)
    info = catalog.import_blob(f"sha256:{digest}", path)
    assert info.source == "unknown" and info.e2fsprogs is None
    assert info.path.read_bytes() == data
    assert info.path.stat().st_blocks * 512 < 4 << 20
    assert path.exists()  # imports copy
    # A later import with full meta fills in what was unknown...
    info = catalog.import_blob(digest, path, meta=FULL_META, name="minimal")
    assert info.source == "minimal" and info.e2fsprogs == "1.47.0"
    # ...but does not replace a full record.
    info = catalog.import_blob(digest, path, meta=ImageMeta(source="other"))
    assert info.source == "minimal"
    assert info.names == ("minimal",)


def test_import_blob_rejects_bad_digest(catalog: ImageCatalog, tmp_path: Path) -> None:
    path, _ = blob(tmp_path, "x", b"x")
    with pytest.raises(ImageError, match="not a sha256 digest"):
        catalog.import_blob("md5:abc", path)
    assert normalize_digest("SHA256:" + "A" * 64) == "a" * 64


def test_verify_detects_tampering(catalog: ImageCatalog, tmp_path: Path) -> None:
    path, digest = blob(tmp_path, "img", b"original")
    info = catalog.add_file(path)
    catalog.verify(digest)
    os.chmod(info.path, 0o644)
    info.path.write_bytes(b"tampered")
    with pytest.raises(IntegrityError):
        catalog.verify(digest)


def test_meta_round_trips_through_json(catalog: ImageCatalog, tmp_path: Path) -> None:
    path, digest = blob(tmp_path, "img", b"img")
    catalog.add_file(path, FULL_META)
    meta = catalog.meta(digest)
    again = ImageMeta.from_json(meta.to_json())
    assert again == meta
    assert meta.source == FULL_META.source and meta.files == FULL_META.files


def test_concurrent_add_of_same_image_threads(home: Home, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    digest = hashlib.sha256(data).hexdigest()
    n = 8
    paths = [blob(tmp_path, f"copy{i}", data)[0] for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            # Each thread its own catalog object, as separate processes would.
            info = ImageCatalog(home).add_file(paths[i], FULL_META, name=f"n{i}")
            results.append(info.digest)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [digest] * n
    catalog = ImageCatalog(home)
    assert [p.name for p in catalog.blobs_dir.iterdir()] == [f"{digest}.ext4"]
    assert catalog.path(digest).read_bytes() == data
    # No name update was lost to a concurrent read-modify-write.
    assert catalog.get(digest).names == tuple(sorted(f"n{i}" for i in range(n)))
    assert sorted(p.name for p in catalog.meta_dir.iterdir()) == [
        f"{digest}.files.json",
        f"{digest}.json",
    ]


def test_concurrent_import_from_processes(home: Home, tmp_path: Path) -> None:
    path, digest = blob(tmp_path, "img", os.urandom(2 << 20))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from forkyard.config import Home\n"
        "from forkyard.image import ImageCatalog\n"
        "c = ImageCatalog(Home.at(sys.argv[1]))\n"
        "for i in range(20):\n"
        "    c.import_blob(sys.argv[2], Path(sys.argv[3]))\n"
        "    c.tag(f'{sys.argv[4]}-{i}', sys.argv[2])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(home.root), digest, str(path), f"p{k}"])
        for k in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    catalog = ImageCatalog(home)
    assert [p.name for p in catalog.blobs_dir.iterdir()] == [f"{digest}.ext4"]
    assert len(catalog.get(digest).names) == 80

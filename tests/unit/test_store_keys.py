"""Key/digest validation and store-URL parsing (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkyard.config import Settings
from forkyard.errors import StoreError, UnsafePath
from forkyard.store import LocalStore, blob_key, open_store, validate_digest, validate_key
from forkyard.store.s3 import S3Store, parse_s3_url

DIGEST = "ab" + "0" * 62


@pytest.mark.parametrize(
    "key",
    ["a", "blobs/ab/" + DIGEST, "checkpoints/c1.json", ".hidden", "a/.b/c", "x" * 1024, "ünï/kodé"],
)
def test_accepts_normal_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "..",
        ".",
        "../x",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "a\nb",
        "a\x1bb",
        "a\x7fb",
        "x" * 1025,
        "é" * 513,  # 1026 bytes in UTF-8
        "bad\udc80surrogate",
    ],
)
def test_refuses_unsafe_keys(key: str) -> None:
    with pytest.raises(UnsafePath):
        validate_key(key)


def test_local_store_reserves_its_staging_dir(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(UnsafePath):
        store.put_bytes(".forkyard-staging/x", b"x")
    assert store.put_bytes("x/.forkyard-staging", b"x")  # only the top level is reserved


@pytest.mark.parametrize(
    "digest", ["", "AB" + "0" * 62, "ab" * 31, DIGEST + "0", "../" + "0" * 61, "g" * 64]
)
def test_refuses_malformed_digests(digest: str) -> None:
    with pytest.raises(UnsafePath):
        validate_digest(digest)
    with pytest.raises(UnsafePath):
        blob_key(digest)


def test_blob_key_layout() -> None:
    assert blob_key(DIGEST) == f"blobs/ab/{DIGEST}"


# --- open_store ---------------------------------------------------------------------
def test_open_store_file_url_and_bare_path(tmp_path: Path) -> None:
    for url in (tmp_path.as_uri(), str(tmp_path), f"file://localhost{tmp_path}"):
        store = open_store(url)
        assert isinstance(store, LocalStore)
        assert store.root == tmp_path
        assert store.url == tmp_path.as_uri()


def test_open_store_decodes_percent_escapes(tmp_path: Path) -> None:
    root = tmp_path / "with space"
    store = open_store(root.as_uri())  # file:///.../with%20space
    assert isinstance(store, LocalStore)
    assert store.root == root and root.is_dir()


@pytest.mark.parametrize(
    "url",
    [
        "relative/path",
        "file://otherhost/srv/store",
        "file:relative",
        "ftp://host/x",
        "gs://bucket/x",
        "s3://",
        "s3://bad bucket/x",
        "s3://bucket/a/../b",
        "s3://bucket/x?versionId=1",
    ],
)
def test_open_store_refuses_unsupported_urls(url: str) -> None:
    with pytest.raises((StoreError, UnsafePath)):
        open_store(url)


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/") == ("bucket", "")
    assert parse_s3_url("s3://my.bucket/a/b/") == ("my.bucket", "a/b")


def test_s3_store_url_roundtrip_and_region_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "FORKYARD_S3_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    store = open_store("s3://bucket/some/prefix")  # creating a client contacts nobody
    assert isinstance(store, S3Store)
    assert store.url == "s3://bucket/some/prefix"
    assert store.client.meta.region_name == "us-east-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    other = open_store("s3://bucket")
    assert isinstance(other, S3Store)
    assert other.client.meta.region_name == "eu-west-3"


def test_s3_settings_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORKYARD_S3_ENDPOINT", "http://env.invalid:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    settings = Settings(s3_endpoint_url="http://settings.invalid:9000", s3_region="ap-south-1")
    store = open_store("s3://bucket", settings)
    assert isinstance(store, S3Store)
    assert store.client.meta.endpoint_url == "http://settings.invalid:9000"
    assert store.client.meta.region_name == "ap-south-1"
    env_only = open_store("s3://bucket")
    assert isinstance(env_only, S3Store)
    assert env_only.client.meta.endpoint_url == "http://env.invalid:9000"

"""S3-only behaviour: multipart, conditional writes and their fallback, errors, URLs.

Every request goes over HTTP to moto's real server; the one test that needs a
server *without* If-None-Match support rewrites only those requests' answers.
"""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders
from botocore.exceptions import EndpointConnectionError

from forkyard.config import Settings
from forkyard.errors import ObjectNotFound, StoreError
from forkyard.store import open_store
from forkyard.store.s3 import MAX_PARTS, S3Store, make_s3_client
from tests.fixtures.s3server import S3Server, s3_server_fixture

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

pytestmark = pytest.mark.s3

s3_server = s3_server_fixture()

MiB = 1024 * 1024
MakeStore = Callable[..., S3Store]


@pytest.fixture(scope="module")
def s3_client(s3_server: S3Server) -> Iterator[S3Client]:
    client = make_s3_client(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    yield client
    client.close()


@pytest.fixture
def make_store(s3_server: S3Server, s3_client: S3Client) -> MakeStore:
    """A store in a fresh bucket; multipart above 6 MiB in 5 MiB parts unless overridden."""

    def make(**options: Any) -> S3Store:
        options.setdefault("multipart_threshold", 6 * MiB)
        options.setdefault("part_size", 5 * MiB)
        options.setdefault("client", s3_client)
        return S3Store(s3_server.new_bucket(), "p", **options)

    return make


class HeaderLog:
    """Records the headers of every request of one operation (observation only)."""

    def __init__(self, client: S3Client, operation: str) -> None:
        self.headers: list[dict[str, str]] = []
        self._client = client
        self._event = f"before-send.s3.{operation}"
        client.meta.events.register(self._event, self._record)

    def _record(self, request: AWSPreparedRequest, **_: object) -> None:
        self.headers.append({k.lower(): _text(v) for k, v in request.headers.items()})

    def close(self) -> None:
        self._client.meta.events.unregister(self._event, self._record)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self) -> Iterator[bytes]:
        yield self._body


class RejectConditional:
    """Answer requests carrying If-None-Match like a server without conditional writes."""

    BODY = (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NotImplemented</Code>"
        b"<Message>A header you provided implies functionality that is not implemented"
        b"</Message></Error>"
    )

    def __init__(self, client: S3Client, operation: str) -> None:
        self.rejected = 0
        self._client = client
        self._event = f"before-send.s3.{operation}"
        # botocore-stubs type handlers as returning None; before-send ones may answer.
        client.meta.events.register(self._event, self._answer)  # type: ignore[arg-type]

    def _answer(self, request: AWSPreparedRequest, **_: object) -> AWSResponse | None:
        if "If-None-Match" not in request.headers:
            return None  # goes to the server as usual
        self.rejected += 1
        headers = HTTPHeaders.from_dict({"Content-Type": "application/xml"})
        return AWSResponse(request.url, 501, headers, _Raw(self.BODY))

    def close(self) -> None:
        self._client.meta.events.unregister(self._event, self._answer)  # type: ignore[arg-type]


def etag(s3: S3Server, store: S3Store, key: str) -> str:
    return s3.client().head_object(Bucket=store.bucket, Key=f"p/{key}")["ETag"]


# --- multipart -----------------------------------------------------------------
def test_multipart_is_used_above_threshold(make_store: MakeStore, s3_server: S3Server) -> None:
    store = make_store()
    data = os.urandom(13 * MiB)
    assert store.put_stream("big", io.BytesIO(data))
    assert store.put_bytes("small", b"x" * MiB)
    assert etag(s3_server, store, "big").endswith('-3"')  # 5 + 5 + 3 MiB
    assert "-" not in etag(s3_server, store, "small")
    assert store.get_bytes("big", max_size=len(data)) == data


def test_part_size_grows_so_huge_files_fit_in_10000_parts(make_store: MakeStore) -> None:
    store = make_store(part_size=16 * MiB)
    assert store._part_size_for(None) == 16 * MiB
    assert store._part_size_for(100 * MiB) == 16 * MiB
    huge = 400 * 1024 * MiB  # 400 GiB
    part = store._part_size_for(huge)
    assert part % MiB == 0 and part * MAX_PARTS >= huge and part > 16 * MiB


def test_part_size_below_s3_minimum_is_refused(s3_client: S3Client) -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Store("bucket", client=s3_client, part_size=MiB)


# --- write-once via conditional requests -----------------------------------------
@pytest.mark.parametrize(
    ("size", "operation"),
    [(MiB, "PutObject"), (13 * MiB, "CompleteMultipartUpload")],
    ids=["single", "multipart"],
)
def test_final_request_is_conditional(
    make_store: MakeStore, s3_client: S3Client, size: int, operation: str
) -> None:
    store = make_store()
    log = HeaderLog(s3_client, operation)
    try:
        assert store.put_stream("obj", io.BytesIO(os.urandom(size)))
    finally:
        log.close()
    assert [h.get("if-none-match") for h in log.headers] == ["*"]


def test_multipart_race_loses_to_the_object_that_appeared(
    make_store: MakeStore, s3_server: S3Server
) -> None:
    """Someone stores the key while our parts upload: the completion must not replace it."""
    store = make_store()
    src = io.BytesIO(os.urandom(13 * MiB))
    raced = False

    class Racing:
        def read(self, n: int = -1, /) -> bytes:
            nonlocal raced
            if not raced:
                raced = True
                s3_server.put_raw("p/contended", b"theirs", bucket=store.bucket)
            return src.read(n)

    assert store.put_stream("contended", Racing()) is False
    assert raced
    assert store.get_bytes("contended", max_size=100) == b"theirs"
    assert s3_server.pending_uploads(bucket=store.bucket) == []  # our upload was aborted


@pytest.mark.parametrize(
    ("size", "operation"),
    [(MiB, "PutObject"), (13 * MiB, "CompleteMultipartUpload")],
    ids=["single", "multipart"],
)
def test_falls_back_to_head_then_put_when_server_rejects_if_none_match(
    make_store: MakeStore,
    s3_client: S3Client,
    caplog: pytest.LogCaptureFixture,
    size: int,
    operation: str,
) -> None:
    store = make_store()
    data = os.urandom(size)
    reject = RejectConditional(s3_client, operation)
    try:
        with caplog.at_level(logging.WARNING, logger="forkyard.store.s3"):
            assert store.put_stream("obj", io.BytesIO(data)) is True
        assert reject.rejected == 1
        assert "falling back to HEAD-then-PUT" in caplog.text
        # Still write-once, now through the existence check; no more conditional requests.
        assert store.put_stream("obj", io.BytesIO(os.urandom(size))) is False
        assert store.put_stream("other", io.BytesIO(data)) is True
        assert reject.rejected == 1
    finally:
        reject.close()
    assert store.get_bytes("obj", max_size=size) == data


# --- errors -----------------------------------------------------------------------
def test_missing_bucket_is_a_store_error(s3_client: S3Client) -> None:
    store = S3Store("forkyard-no-such-bucket", client=s3_client)
    with pytest.raises(StoreError, match="NoSuchBucket") as info:
        store.put_bytes("k", b"x")
    assert not isinstance(info.value, ObjectNotFound)
    with pytest.raises(StoreError, match="NoSuchBucket"):
        list(store.list())
    with pytest.raises(StoreError, match="NoSuchBucket") as info:
        store.get_bytes("k", max_size=10)
    assert not isinstance(info.value, ObjectNotFound)


def test_unreachable_endpoint_is_a_store_error() -> None:
    with socket.socket() as sock:  # a port that is certainly closed once we let go of it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_s3_client(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    store = S3Store("bucket", client=client)
    with pytest.raises(StoreError) as info:
        store.exists("k")
    assert isinstance(info.value.__cause__, EndpointConnectionError)
    with pytest.raises(StoreError):
        store.put_bytes("k", b"x")


# --- open_store ---------------------------------------------------------------------
def test_open_store_uses_settings_endpoint(s3_server: S3Server) -> None:
    with open_store(s3_server.store_url("some/prefix"), s3_server.settings()) as store:
        assert isinstance(store, S3Store)
        assert store.url == f"s3://{s3_server.bucket}/some/prefix"
        assert store.put_bytes("k", b"v")
        assert list(store.list()) == ["k"]
    assert s3_server.get_raw("some/prefix/k") == b"v"


def test_open_store_takes_endpoint_from_env(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORKYARD_S3_ENDPOINT", s3_server.endpoint_url)
    with open_store(s3_server.store_url("env"), Settings()) as store:
        assert isinstance(store, S3Store)
        assert store.client.meta.endpoint_url == s3_server.endpoint_url
        assert store.put_bytes("k", b"v")
    assert s3_server.get_raw("env/k") == b"v"

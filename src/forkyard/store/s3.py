"""An object store in an S3 bucket (``s3://bucket/prefix``), via boto3.

Works against AWS and S3-compatible servers (MinIO, Ceph RGW, moto): when an
endpoint is configured, requests use path-style addressing, and checksums are
only sent where the API requires them (several compatible servers reject the
newer CRC trailers; forkyard verifies sha256 end to end in the blob layer).

Write-once is enforced with a conditional ``If-None-Match: *`` on PutObject and
CompleteMultipartUpload. Servers that reject that header get HEAD-then-PUT,
which leaves a small race window that is harmless for content-addressed keys
(two racing writers carry the same bytes).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from botocore.exceptions import ClientError

from forkyard.config import Settings
from forkyard.errors import ObjectNotFound, StoreError
from forkyard.store._base import (
    ObjectStore,
    ProgressFn,
    Readable,
    atomic_write,
    copy_stream,
    guarded_reader,
    is_valid_key,
    refuse_existing,
    validate_key,
    validate_prefix,
)
from forkyard.store._s3_client import (
    CONDITIONAL_CONFLICT,
    CONDITIONAL_UNSUPPORTED,
    DEFAULT_REGION,
    NOT_FOUND,
    PRECONDITION_FAILED,
    S3_ERRORS,
    TRANSPORT_ERRORS,
    error_code,
    make_s3_client,
    parse_s3_url,
)
from forkyard.store._s3_multipart import MultipartUploads
from forkyard.store._s3_parts import (
    MAX_PARTS,
    MIN_PART_SIZE,
    MiB,
    part_size_for,
    read_full,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = [
    "DEFAULT_MULTIPART_THRESHOLD", "DEFAULT_PART_SIZE", "DEFAULT_REGION", "MAX_PARTS",
    "MIN_PART_SIZE", "S3Store", "make_s3_client", "parse_s3_url",
]

log = logging.getLogger(__name__)

DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 16 * MiB


class S3Store(MultipartUploads, ObjectStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        if max_concurrency < 1 or multipart_threshold < 0:
            raise ValueError("max_concurrency must be >= 1 and multipart_threshold >= 0")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self._bucket = bucket
        self._prefix = prefix
        self._base = f"{prefix}/" if prefix else ""
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._concurrency = max_concurrency
        self._conditional = True  # flipped once if the server rejects If-None-Match
        self._journal: Path | None = None  # own_uploads: where open multipart uploads are noted
        self._client = client or make_s3_client(
            endpoint_url=endpoint_url,
            region=region,
            max_pool_connections=max(10, 2 * max_concurrency),
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        settings: Settings | None = None,
        *,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = 4,
    ) -> S3Store:
        """Open ``s3://bucket/prefix``; endpoint/region from settings, then env."""
        bucket, prefix = parse_s3_url(url)
        endpoint = (
            (settings.s3_endpoint_url if settings else None)
            or os.environ.get("FORKYARD_S3_ENDPOINT")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        region = (
            (settings.s3_region if settings else None)
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or DEFAULT_REGION
        )
        return cls(
            bucket,
            prefix,
            endpoint_url=endpoint,
            region=region,
            multipart_threshold=multipart_threshold,
            part_size=part_size,
            max_concurrency=max_concurrency,
        )

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def client(self) -> S3Client:
        return self._client

    def close(self) -> None:
        self._client.close()

    # --- reading --------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        full = self._full(key)
        with self._boundary("HEAD", key):
            return self._client.head_object(Bucket=self._bucket, Key=full)["ContentLength"]

    def open_read(self, key: str) -> BinaryIO:
        reader, _ = self._open(key)
        return reader

    def get_file(
        self,
        key: str,
        dest: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
    ) -> int:
        reader, total = self._open(key)
        with reader, atomic_write(Path(dest)) as out:
            try:
                return copy_stream(reader, out, total=total, progress=progress)
            except OSError as exc:  # the reader raises StoreError, so this is dest
                raise StoreError(f"writing {os.fspath(dest)!r} failed: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        with self._boundary("LIST", prefix or "/"):
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._base + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self._base) :]
                    if is_valid_key(key):
                        yield key

    # --- writing --------------------------------------------------------
    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._boundary("DELETE", key):
            self._client.delete_object(Bucket=self._bucket, Key=full)

    # --- internals: errors ----------------------------------------------
    def _full(self, key: str) -> str:
        return self._base + validate_key(key)

    def _error(self, op: str, key: str, exc: BaseException) -> StoreError:
        if isinstance(exc, ClientError):
            code = error_code(exc)
            if code in NOT_FOUND:
                return ObjectNotFound(key)
            message = exc.response.get("Error", {}).get("Message", "")
            return StoreError(f"S3 {op} {key!r} in {self.url} failed: {code} {message}".rstrip())
        return StoreError(f"S3 {op} {key!r} in {self.url} failed: {exc}")

    @contextmanager
    def _boundary(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            raise self._error(op, key, exc) from exc
        except TRANSPORT_ERRORS as exc:
            raise self._error(op, key, exc) from exc

    def _open(self, key: str) -> tuple[BinaryIO, int]:
        full = self._full(key)
        with self._boundary("GET", key):
            resp = self._client.get_object(Bucket=self._bucket, Key=full)
        body = resp["Body"]
        reader = guarded_reader(
            body.read,
            body.close,
            errors=S3_ERRORS,
            what=f"{key!r} from {self.url}",
        )
        return reader, resp["ContentLength"]

    # --- internals: uploads ---------------------------------------------
    def _put(
        self,
        key: str,
        src: Readable,
        total: int | None,
        progress: ProgressFn | None,
        if_absent: bool,
    ) -> bool:
        full = self._full(key)
        if self.exists(key):  # saves the upload; the conditional write is the real guard
            return refuse_existing(key, if_absent)
        try:
            return self._upload(key, full, src, total, progress, if_absent)
        except OSError as exc:  # S3 errors are StoreErrors by now; this is the source
            raise StoreError(f"reading the data for {key!r} failed: {exc}") from exc

    def _upload(
        self,
        key: str,
        full: str,
        src: Readable,
        total: int | None,
        progress: ProgressFn | None,
        if_absent: bool,
    ) -> bool:
        part_size = self._part_size_for(total)
        head: deque[bytes] = deque()
        buffered = 0
        while buffered <= self._threshold:
            chunk = read_full(src, part_size)
            if chunk:
                head.append(chunk)
                buffered += len(chunk)
            if len(chunk) < part_size:
                if buffered <= self._threshold:
                    return self._put_single(key, full, b"".join(head), progress, if_absent)
                break
        return self._put_multipart(key, full, head, src, part_size, total, progress, if_absent)

    def _part_size_for(self, total: int | None) -> int:
        return part_size_for(total, self._part_size)

    def _put_single(
        self, key: str, full: str, data: bytes, progress: ProgressFn | None, if_absent: bool
    ) -> bool:
        def send(conditional: bool) -> None:
            if conditional:
                self._client.put_object(Bucket=self._bucket, Key=full, Body=data, IfNoneMatch="*")
            else:
                self._client.put_object(Bucket=self._bucket, Key=full, Body=data)

        written = self._write_once(key, "PUT", send, if_absent)
        if written and progress is not None:
            progress(len(data), len(data))
        return written

    def _write_once(self, key: str, op: str, send: Callable[[bool], None], if_absent: bool) -> bool:
        """Run a final write request so that it never replaces an existing object."""
        conditional = self._conditional
        try:
            send(conditional)
        except ClientError as exc:
            code = error_code(exc)
            if conditional and code in PRECONDITION_FAILED:
                return refuse_existing(key, if_absent)
            if conditional and code in CONDITIONAL_CONFLICT and self.exists(key):
                return refuse_existing(key, if_absent)
            if conditional and code in CONDITIONAL_UNSUPPORTED:
                return self._write_unconditionally(key, op, send, if_absent, code)
            raise self._error(op, key, exc) from exc
        except TRANSPORT_ERRORS as exc:
            raise self._error(op, key, exc) from exc
        return True

    def _write_unconditionally(
        self, key: str, op: str, send: Callable[[bool], None], if_absent: bool, code: str
    ) -> bool:
        if self.exists(key):
            return refuse_existing(key, if_absent)
        with self._boundary(op, key):
            send(False)
        if self._conditional:
            log.warning(
                "%s rejected If-None-Match (%s); falling back to HEAD-then-PUT", self.url, code
            )
            self._conditional = False  # only once the plain request proved to work
        return True

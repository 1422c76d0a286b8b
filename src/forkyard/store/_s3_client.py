"""Making an S3 client and making sense of what S3 answers.

Kept apart from :mod:`forkyard.store.s3` so the store's logic reads without
the botocore configuration and the table of error codes servers really send.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from forkyard.errors import StoreError
from forkyard.store._base import validate_key

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = [
    "CONDITIONAL_CONFLICT",
    "CONDITIONAL_UNSUPPORTED",
    "DEFAULT_REGION",
    "NOT_FOUND",
    "PRECONDITION_FAILED",
    "S3_ERRORS",
    "TRANSPORT_ERRORS",
    "error_code",
    "make_s3_client",
    "parse_s3_url",
]

DEFAULT_REGION = "us-east-1"

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    BotoCoreError,
    OSError,
    urllib3.exceptions.HTTPError,
)
S3_ERRORS: tuple[type[BaseException], ...] = (ClientError, *TRANSPORT_ERRORS)
NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
PRECONDITION_FAILED = frozenset({"412", "PreconditionFailed"})
CONDITIONAL_CONFLICT = frozenset({"ConditionalRequestConflict"})
# What servers answer when they do not implement conditional writes.
CONDITIONAL_UNSUPPORTED = frozenset({"501", "NotImplemented", "InvalidArgument", "InvalidRequest"})
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")  # what botocore itself accepts


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment:
        raise StoreError(f"not an S3 store URL: {url!r} (expected s3://bucket/prefix)")
    if not _BUCKET_RE.match(parts.netloc):
        raise StoreError(f"invalid S3 bucket name in {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        validate_key(prefix)
    return parts.netloc, prefix


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_pool_connections: int = 10,
    max_attempts: int = 5,
) -> S3Client:
    """A boto3 S3 client; credentials come from the standard AWS chain."""
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=10,
        read_timeout=120,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or DEFAULT_REGION,
            config=config,
        )
    except (BotoCoreError, ValueError) as exc:
        raise StoreError(f"cannot create an S3 client for {endpoint_url or 'AWS'}: {exc}") from exc


def error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    code = error.get("Code") or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return str(code)

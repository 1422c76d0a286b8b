"""Where checkpoint archives travel between workers.

* :class:`ObjectStore` - immutable, write-once objects under safe keys;
  :class:`LocalStore` (``file:///path``) and :class:`S3Store` (``s3://bucket/prefix``),
  picked by :func:`open_store`.
* :class:`BlobStore` - zstd-compressed, sha256-addressed blobs at
  ``blobs/<ab>/<sha256>`` plus small write-once JSON documents.
* :class:`BlobCache` - a worker's local, verified, single-flight blob cache.

Local stores and caches may hold guest memory: they are private to the worker
(directories 0700, objects and entries 0400, whatever the umask).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from forkyard.config import Settings
from forkyard.errors import StoreError
from forkyard.store._base import ObjectStore, ProgressFn, Readable, validate_key
from forkyard.store.blobs import (
    BLOB_PREFIX,
    BlobRef,
    BlobStore,
    blob_key,
    canonical_json,
    hash_file,
    validate_digest,
)
from forkyard.store.cache import BlobCache
from forkyard.store.local import LocalStore

if TYPE_CHECKING:
    from forkyard.store.s3 import S3Store

__all__ = [
    "BLOB_PREFIX",
    "BlobCache",
    "BlobRef",
    "BlobStore",
    "LocalStore",
    "ObjectStore",
    "ProgressFn",
    "Readable",
    "S3Store",
    "blob_key",
    "canonical_json",
    "hash_file",
    "open_store",
    "validate_digest",
    "validate_key",
]


def open_store(url: str, settings: Settings | None = None) -> ObjectStore:
    """The store a URL names: ``file:///abs/path`` (or ``/abs/path``) or ``s3://bucket/prefix``.

    S3 endpoint and region come from ``settings``, then ``FORKYARD_S3_ENDPOINT``
    / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``;
    credentials from the standard AWS chain.
    """
    parts = urlsplit(url)
    if parts.scheme == "" and url.startswith("/"):
        return LocalStore(Path(url))
    if parts.scheme == "file":
        return LocalStore(_file_url_path(url))
    if parts.scheme == "s3":
        from forkyard.store.s3 import S3Store  # boto3 costs ~150 ms to import

        return S3Store.from_url(url, settings)
    raise StoreError(f"unsupported store URL {url!r} (expected file:///path or s3://bucket/prefix)")


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise StoreError(f"unsupported file URL {url!r} (expected file:///absolute/path)")
    path = unquote(parts.path)
    if not os.path.isabs(path):
        raise StoreError(f"file store URL must name an absolute path: {url!r}")
    return Path(path)


def __getattr__(name: str) -> Any:
    # S3Store is imported lazily so that `import forkyard.store` stays cheap.
    if name == "S3Store":
        from forkyard.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

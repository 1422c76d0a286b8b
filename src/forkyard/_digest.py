"""sha256 helpers shared by every content-addressed piece of forkyard."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["DIGEST_RE", "check_digest", "sha256_bytes", "sha256_file"]

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(value: str, what: str = "digest") -> str:
    """Return ``value`` if it is 64 lowercase hex characters, else raise ValueError."""
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ValueError(f"{what} is not a sha256 hex digest: {value!r}")
    return value

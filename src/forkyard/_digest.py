"""sha256 helpers shared by every content-addressed piece of forkyard."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from forkyard.errors import AmbiguousCheckpoint, CheckpointNotFound

__all__ = [
    "DIGEST_RE",
    "MIN_PREFIX",
    "check_digest",
    "normalize_prefix",
    "resolve_prefix",
    "sha256_bytes",
    "sha256_file",
]

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
# shorter prefixes would match by accident once a store holds a few thousand ids
MIN_PREFIX = 6
_HEX = frozenset("0123456789abcdef")


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


def normalize_prefix(prefix: str) -> str:
    """``prefix`` as lowercase hex without ``cp-``, or CheckpointNotFound if it cannot be one.

    Callers that look candidates up by prefix (a database ``LIKE``, a store
    listing) query with this form, then pass what they found to
    :func:`resolve_prefix`.
    """
    ref = prefix.strip().lower().removeprefix("cp-")
    if not MIN_PREFIX <= len(ref) <= 64 or not _HEX.issuperset(ref):
        raise CheckpointNotFound(ref, hint=f"give its id or a prefix of {MIN_PREFIX}+ hex digits")
    return ref


def resolve_prefix(prefix: str, candidates: Iterable[str]) -> str:
    """The one candidate digest that starts with ``prefix`` (a full id or ≥ 6 hex digits).

    Raises :class:`CheckpointNotFound` when none does (or ``prefix`` is not a
    prefix of hex digits), :class:`AmbiguousCheckpoint` when several do.
    """
    ref = normalize_prefix(prefix)
    hits: set[str] = set()
    for candidate in candidates:
        if candidate.startswith(ref):
            hits.add(candidate)
            if len(hits) > 1:
                # stop early: a huge listing proves nothing more
                raise AmbiguousCheckpoint(ref, len(hits))
    if not hits:
        raise CheckpointNotFound(ref)
    return hits.pop()

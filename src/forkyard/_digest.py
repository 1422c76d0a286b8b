"""sha256 helpers shared by every content-addressed piece of forkyard."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DIGEST_RE",
    "AmbiguousPrefix",
    "NoPrefixMatch",
    "PrefixError",
    "check_digest",
    "resolve_prefix",
    "sha256_bytes",
    "sha256_file",
]

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


class PrefixError(LookupError):
    """A digest prefix that names no candidate, or more than one.

    Callers translate it into their own not-found error at their boundary
    (a checkpoint, an image...), keeping this one as ``__cause__``.
    """

    def __init__(self, prefix: str, matches: tuple[str, ...]) -> None:
        self.prefix = prefix
        self.matches = matches
        super().__init__(prefix, matches)


class NoPrefixMatch(PrefixError):
    def __str__(self) -> str:
        return f"nothing matches {self.prefix!r}"


class AmbiguousPrefix(PrefixError):
    def __str__(self) -> str:
        return f"{self.prefix!r} is ambiguous: {len(self.matches)} matches"


def resolve_prefix(prefix: str, candidates: Iterable[str]) -> str:
    """The one candidate that starts with ``prefix`` (an exact match always wins).

    Pure: the caller decides what a valid prefix is (length, ``cp-``...) and
    where the candidates come from.  Raises :class:`NoPrefixMatch` or
    :class:`AmbiguousPrefix` (whose ``matches`` lists them, sorted).
    """
    hits: list[str] = []
    for candidate in candidates:
        if candidate == prefix:
            return candidate
        if candidate.startswith(prefix) and candidate not in hits:
            hits.append(candidate)
    if not hits:
        raise NoPrefixMatch(prefix, ())
    if len(hits) > 1:
        raise AmbiguousPrefix(prefix, tuple(sorted(hits)))
    return hits[0]

"""What the image catalog records about an image, and the names it accepts.

:class:`ImageMeta` is what a build or import knows besides the bytes;
:class:`ImageInfo` is one catalogued image as callers see it. Image names and
digest references are checked here, so a name can never be mistaken for a
digest prefix.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkyard.errors import ImageError, ImageNotFound

__all__ = [
    "DIGEST_RE",
    "PREFIX_RE",
    "AmbiguousImageRef",
    "ImageInfo",
    "ImageMeta",
    "check_name",
    "normalize_digest",
    "now",
    "opt_int",
    "opt_str",
]

DIGEST_RE = re.compile(r"[0-9a-f]{64}")
PREFIX_RE = re.compile(r"[0-9a-f]{8,64}")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A name that looks like a digest prefix would make `get` ambiguous.
_HEXISH_RE = re.compile(r"[0-9a-f]{8,}")


class AmbiguousImageRef(ImageNotFound):
    """A digest prefix matches more than one image."""

    def __init__(self, ref: str, matches: list[str]) -> None:
        super().__init__(ref)
        self.matches = matches
        shown = ", ".join(m[:16] for m in matches[:5])
        self.args = (f"image reference {ref!r} is ambiguous: it matches {shown}",)


def normalize_digest(value: str) -> str:
    """``sha256:<hex>`` or ``<hex>`` → lowercase hex; anything else raises ImageError."""
    digest = value.strip().lower().removeprefix("sha256:")
    if not DIGEST_RE.fullmatch(digest):
        raise ImageError(f"not a sha256 digest: {value!r}")
    return digest


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """What is known about an image besides its bytes (all optional for imports)."""

    source: str = "unknown"
    reproducible: bool = False
    e2fsprogs: str | None = None
    tree_digest: str | None = None
    test_tree: str | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    epoch: int | None = None
    fs_uuid: str | None = None
    created: str | None = None
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["files"] = dict(self.files)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        files = kwargs.get("files", {})
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise ImageError("image meta: 'files' must map guest paths to sha256 strings")
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """One catalogued base image. Identity is ``digest`` (sha256 of the bytes)."""

    digest: str
    size: int
    path: Path
    names: tuple[str, ...]
    e2fsprogs: str | None
    source: str
    reproducible: bool
    tree_digest: str | None
    created: str
    test_tree: str | None
    epoch: int | None = None
    fs_uuid: str | None = None
    file_count: int = 0

    @property
    def ref(self) -> str:
        return f"sha256:{self.digest}"


def check_name(name: str) -> None:
    """Raise ImageError unless ``name`` is a valid image name."""
    if not _NAME_RE.fullmatch(name) or _HEXISH_RE.fullmatch(name):
        raise ImageError(
            f"invalid image name {name!r}: use 1-64 of [a-z0-9._-], starting with a letter "
            "or digit, and not something that looks like a digest"
        )


def opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))

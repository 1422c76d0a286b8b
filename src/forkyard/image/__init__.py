"""Content-addressed, reproducible base images.

Build a base with :func:`build_image` from a :class:`MinimalSource`,
:class:`DirSource`, :class:`TarSource` or :class:`DebianSource`; find it again
in the :class:`ImageCatalog` by name, digest or digest prefix. An image's
identity is the sha256 of its bytes; reproducible builds make that identity
the same on every worker with the same e2fsprogs version.
"""

from __future__ import annotations

from forkyard.image.build import DEFAULT_EPOCH, build_epoch, build_image, derive_uuid
from forkyard.image.catalog import (
    AmbiguousImageRef,
    ImageCatalog,
    ImageInfo,
    ImageMeta,
    check_name,
    normalize_digest,
)
from forkyard.image.sources import (
    TEST_TREE,
    DebianSource,
    DirSource,
    MinimalSource,
    Source,
    TarSource,
)

__all__ = [
    "DEFAULT_EPOCH",
    "TEST_TREE",
    "AmbiguousImageRef",
    "DebianSource",
    "DirSource",
    "ImageCatalog",
    "ImageInfo",
    "ImageMeta",
    "MinimalSource",
    "Source",
    "TarSource",
    "build_epoch",
    "build_image",
    "check_name",
    "derive_uuid",
    "normalize_digest",
]

"""Reading and checking qcow2 headers of disk layers (untrusted input).

Every layer forkyard writes names the exact bytes it was written over in its
header's backing-file string: ``forkyard:sha256:<digest of the layer or raw
base below>``.  QEMU never opens that string (forkyard gives the chain with
``-blockdev``), but it is part of the layer's own bytes and so of its digest:
a manifest that puts a layer on any other base — edited, forged or buggy — is
caught before a VM starts, whatever the manifest claims.

Layers also come from stores and imports, so the header is checked for
features that would make QEMU touch host files or misread data: an external
data file, encryption, a corrupt or dirty flag.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from forkyard._digest import DIGEST_RE
from forkyard.errors import IntegrityError, UnsafeInput

__all__ = ["Qcow2Header", "check_layer", "parent_marker", "read_header"]

MAGIC = b"QFI\xfb"
_MARKER_PREFIX = "forkyard:sha256:"
PENDING_MARKER = "forkyard:pending"

_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_KNOWN_INCOMPAT = 0b11111  # dirty, corrupt, data file, compression type, extended L2
_EXT_DATA_FILE = 0x44415441
_EXT_END = 0


def parent_marker(digest: str) -> str:
    return _MARKER_PREFIX + digest


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    version: int
    size: int  # virtual disk size
    backing_name: str
    crypt_method: int
    incompatible: int
    data_file_extension: bool

    @property
    def parent_digest(self) -> str | None:
        if not self.backing_name.startswith(_MARKER_PREFIX):
            return None
        digest = self.backing_name.removeprefix(_MARKER_PREFIX)
        return digest if DIGEST_RE.match(digest) else None


def read_header(path: Path) -> Qcow2Header:
    with open(path, "rb") as f:
        head = f.read(4096)
        if len(head) < 72 or head[:4] != MAGIC:
            raise UnsafeInput("not a qcow2 image", entry=path.name)
        version, bf_off, bf_size = struct.unpack_from(">IQI", head, 4)
        size, crypt = struct.unpack_from(">QI", head, 24)
        if version not in (2, 3):
            raise UnsafeInput(f"unsupported qcow2 version {version}", entry=path.name)
        incompatible = 0
        header_len = 72
        if version == 3:
            if len(head) < 104:
                raise UnsafeInput("truncated qcow2 v3 header", entry=path.name)
            (incompatible,) = struct.unpack_from(">Q", head, 72)
            (header_len,) = struct.unpack_from(">I", head, 100)
        backing = b""
        if bf_off:
            if bf_size > 1023 or bf_off > 1 << 20:
                raise UnsafeInput("qcow2 backing file name out of range", entry=path.name)
            f.seek(bf_off)
            backing = f.read(bf_size)
        data_file = _has_extension(head, header_len, _EXT_DATA_FILE)
    return Qcow2Header(
        version=version,
        size=size,
        backing_name=backing.decode("utf-8", "replace"),
        crypt_method=crypt,
        incompatible=incompatible,
        data_file_extension=data_file,
    )


def _has_extension(head: bytes, offset: int, wanted: int) -> bool:
    """Walk the header extensions (in the first cluster) looking for ``wanted``."""
    while offset + 8 <= len(head):
        ext_type, ext_len = struct.unpack_from(">II", head, offset)
        if ext_type == _EXT_END:
            return False
        if ext_type == wanted:
            return True
        offset += 8 + ((ext_len + 7) & ~7)
    return False


def check_layer(path: Path, *, parent: str, disk_size: int, what: str) -> Qcow2Header:
    """Refuse a layer that is unsafe to open or that was written over other bytes."""
    h = read_header(path)
    if h.crypt_method != 0:
        raise UnsafeInput(f"{what} is encrypted", entry=path.name)
    if h.incompatible & _INCOMPAT_DATA_FILE or h.data_file_extension:
        raise UnsafeInput(f"{what} refers to an external data file", entry=path.name)
    if h.incompatible & (_INCOMPAT_CORRUPT | _INCOMPAT_DIRTY):
        raise UnsafeInput(f"{what} is marked corrupt or dirty", entry=path.name)
    if h.incompatible & ~_KNOWN_INCOMPAT:
        raise UnsafeInput(f"{what} uses unknown qcow2 features", entry=path.name)
    if h.size != disk_size:
        raise IntegrityError(f"{what} virtual size", expected=str(disk_size), actual=str(h.size))
    if h.parent_digest != parent:
        raise IntegrityError(
            f"{what} was written over other bytes than the manifest puts under it",
            expected=f"sha256:{parent}",
            actual=h.backing_name or "(no parent recorded)",
        )
    return h

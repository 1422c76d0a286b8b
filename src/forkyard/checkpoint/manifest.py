"""Checkpoint manifests: archive format v2, reading v1 too (see docs/archive-format.md).

A manifest names every part of a checkpoint by sha256 and size: the base
image, the disk layers the sandbox wrote on top of it, the saved VM state, the
kernel and initramfs, and the VM shape the state needs.  Its **id is the
sha256 of its canonical JSON bytes**, so a manifest fetched from anywhere is
verified by its own name, and editing any field (say, pointing it at another
base) makes it a different, unknown checkpoint.

Manifests come from the store, i.e. from untrusted input: :meth:`Manifest.parse`
validates types, digests, sizes and lengths before anything else looks at them.

v2 adds ``state_chunks``: the VM state travels as fixed-size chunks, each its
own blob (:mod:`forkyard.checkpoint.chunks`), so a reader verifies every byte
before QEMU parses it.  ``state`` still names the whole state (the key of the
local file a worker keeps and forks from).  A v1 manifest (no chunks) keeps its
exact bytes, hence its id, and still restores.

v3 adds ``ram``: guest RAM as a page-aligned image in fixed-size content-addressed
chunks (all-zero ones left out), and ``state`` is then QEMU's device state
only (a stream saved with ``x-ignore-shared``).  Forks map the image
(``forkyard.vm.ram``); a checkpoint stores only chunks no earlier one did.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from forkyard._digest import DIGEST_RE, sha256_bytes
from forkyard.checkpoint.chunks import ChunkRef, RamImageRef, check_cover, check_ram
from forkyard.errors import IntegrityError, ManifestError
from forkyard.vm.shape import VMShape
from forkyard.wire.network import NetworkSpec

__all__ = ["FORMAT", "FORMAT_V1", "FORMAT_V2", "FORMAT_V3", "MAX_MANIFEST_BYTES", "SHARED_ROLES",
           "BootRef", "ChunkRef", "Manifest", "PartRef", "RamImageRef", "VMInfo", "VMShape",
           "utcnow"]

FORMAT_V3 = "forkyard.checkpoint/v3"  # RAM as a chunked image, state = device state only
FORMAT_V2 = "forkyard.checkpoint/v2"  # the whole migration stream in chunks; still written
FORMAT = FORMAT_V3  # what checkpoints of a VM on its own RAM file are written as
FORMAT_V1 = "forkyard.checkpoint/v1"  # one whole state part; still read
_FORMATS = (FORMAT_V1, FORMAT_V2, FORMAT_V3)
MAX_MANIFEST_BYTES = 1 << 20
# Parts that many checkpoints share and that travel once per store.
SHARED_ROLES = frozenset({"base", "kernel", "initrd"})
MAX_LAYERS = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@ -]{0,127}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_VM_MEMORY_MB = 256 * 1024
MAX_VM_CPUS = 64
_MAX_SIZE = 1 << 44  # 16 TiB: anything larger is nonsense, not a disk


def utcnow() -> str:
    """A manifest's ``created`` time: UTC, ISO 8601 with milliseconds and ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PartRef:
    """One content-addressed part: sha256 of its (uncompressed) bytes and size."""

    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class BootRef:
    kernel: PartRef
    initrd: PartRef
    cmdline: str

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel.to_json(),
            "initrd": self.initrd.to_json(),
            "cmdline": self.cmdline,
        }


# The manifest's ``vm`` object is the runtime's own shape; older name kept for callers.
VMInfo = VMShape


def _vm_json(vm: VMShape) -> dict[str, Any]:
    """``vm`` as archive format v1 spells it (keys fixed: they are part of every id)."""
    return {
        "qemu": vm.qemu,
        "machine": vm.machine,
        "accel": vm.accel,
        "cpu": vm.cpu,
        "memory_mb": vm.memory_mb,
        "cpus": vm.cpus,
        "devices": vm.devices,
        "disk_size": vm.disk_size,
    }


@dataclass(frozen=True, slots=True)
class Manifest:
    created: str  # UTC, ISO 8601
    base: PartRef  # raw ext4 image
    layers: tuple[PartRef, ...]  # qcow2 without backing name, bottom first
    state: PartRef  # QEMU migration stream
    boot: BootRef
    vm: VMShape
    sandbox: str  # id of the sandbox it was taken from
    parent: str | None = None  # checkpoint this sandbox was forked/woken from
    name: str | None = None  # user's label
    agent: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # v2: the state as chunks (what the store holds of it); empty: a v1 manifest
    state_chunks: tuple[ChunkRef, ...] = ()
    # the sandbox's network mode and egress rules, which its forks and wakes
    # keep; absent (None) for a machine without a NIC, so checkpoints made
    # before networks existed read and hash exactly as before
    network: NetworkSpec | None = None
    # v3: guest RAM as a chunked image (``state`` is then device state only)
    ram: RamImageRef | None = None

    # ------------------------------------------------------------------
    @property
    def format(self) -> str:
        if self.ram is not None:
            return FORMAT_V3
        return FORMAT_V2 if self.state_chunks else FORMAT_V1

    def to_json(self) -> dict[str, Any]:
        out = self._json()
        if self.state_chunks:
            out["state_chunks"] = [c.to_json() for c in self.state_chunks]
        if self.network is not None:
            out["network"] = self.network.model_dump(mode="json")
        if self.ram is not None:
            out["ram"] = self.ram.to_json()
        return out

    def _json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created": self.created,
            "base": self.base.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
            "state": self.state.to_json(),
            "boot": self.boot.to_json(),
            "vm": _vm_json(self.vm),
            "sandbox": self.sandbox,
            "parent": self.parent,
            "name": self.name,
            "agent": self.agent,
            "extra": dict(self.extra),
        }

    def canonical(self) -> bytes:
        """The exact bytes stored and hashed: sorted keys, no spaces, UTF-8."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()

    @property
    def id(self) -> str:
        return sha256_bytes(self.canonical())

    @property
    def changed_bytes(self) -> int:
        """Disk layers + VM state (+ non-zero RAM chunks), uncompressed: what this
        checkpoint adds to its base (chunks shared with other checkpoints included)."""
        ram = self.ram.stored_bytes if self.ram is not None else 0
        return sum(layer.size for layer in self.layers) + self.state.size + ram

    def own_parts(self) -> list[tuple[str, PartRef]]:
        """The parts this checkpoint stores for itself (layers and state), with roles.

        The others (base, kernel, initramfs) are shared by many checkpoints and
        travel once per store.
        """
        return [(role, ref) for role, ref in self.parts() if role not in SHARED_ROLES]

    def parts(self) -> list[tuple[str, PartRef]]:
        """Every part with a role name, base first."""
        out = [("base", self.base)]
        out += [(f"layer{i}", layer) for i, layer in enumerate(self.layers)]
        out += self.state_parts()
        out += self.ram_parts()
        out += [("kernel", self.boot.kernel), ("initrd", self.boot.initrd)]
        return out

    def ram_parts(self) -> list[tuple[str, PartRef]]:
        """The blobs of a v3 RAM image: its non-zero chunks."""
        if self.ram is None:
            return []
        return [(f"ram.{i}", PartRef(c.digest, c.size)) for i, c in enumerate(self.ram.chunks)]

    def state_parts(self) -> list[tuple[str, PartRef]]:
        """The blobs the store holds of the VM state: its chunks (v2) or the whole (v1)."""
        if not self.state_chunks:
            return [("state", self.state)]
        return [(f"state.{i}", PartRef(c.digest, c.size))
                for i, c in enumerate(self.state_chunks)]

    # ------------------------------------------------------------------
    @classmethod
    def parse(cls, raw: bytes, *, expect_id: str | None = None) -> Manifest:
        """Validate untrusted manifest bytes; with ``expect_id`` also their digest."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(raw)} bytes, over {MAX_MANIFEST_BYTES}")
        if expect_id is not None:
            actual = sha256_bytes(raw)
            if actual != expect_id:
                raise IntegrityError(
                    f"manifest of checkpoint {expect_id[:12]}", expected=expect_id, actual=actual
                )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc
        m = cls.from_json(data)
        if expect_id is not None and m.canonical() != raw:
            # Same digest but not our canonical form: not something we wrote.
            raise ManifestError("manifest is not in canonical form")
        return m

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        d = _obj(data, "manifest")
        fmt = d.get("format")
        if fmt not in _FORMATS:
            raise ManifestError(
                f"unsupported manifest format {fmt!r} (this forkyard reads "
                f"{', '.join(_FORMATS)})"
            )
        keys = {"format", "created", "base", "layers", "state", "boot", "vm", "sandbox",
                "parent", "name", "agent", "extra"}
        # "network" is optional in every format (absent: no NIC, as before networks)
        keys.add("network")
        if fmt != FORMAT_V1:
            keys.add("state_chunks")
        if fmt == FORMAT_V3:
            keys.add("ram")
        _only(d, keys, "manifest")
        state = _part(d.get("state"), "state")
        chunks: tuple[ChunkRef, ...] = ()
        if fmt != FORMAT_V1:
            raw_chunks = d.get("state_chunks")
            if not isinstance(raw_chunks, list) or not raw_chunks:
                raise ManifestError("manifest.state_chunks must be a non-empty list")
            chunks = tuple(_chunk(x, f"state_chunks[{i}]") for i, x in enumerate(raw_chunks))
            check_cover(chunks, state.size, "state_chunks")
        layers_raw = d.get("layers")
        if not isinstance(layers_raw, list) or len(layers_raw) > MAX_LAYERS:
            raise ManifestError(f"manifest.layers must be a list of at most {MAX_LAYERS}")
        boot = _obj(d.get("boot"), "boot")
        _only(boot, {"kernel", "initrd", "cmdline"}, "boot")
        vm = _obj(d.get("vm"), "vm")
        _only(vm, {"qemu", "machine", "accel", "cpu", "memory_mb", "cpus", "devices",
                   "disk_size"}, "vm")
        extra = _obj(d.get("extra", {}), "extra")
        if len(extra) > 64 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) < 128 and len(v) < 4096
            for k, v in extra.items()
        ):
            raise ManifestError("manifest.extra must map short strings to strings")
        ram = _ram(d.get("ram"), vm.get("memory_mb")) if fmt == FORMAT_V3 else None
        return cls(
            ram=ram,
            created=_str(d.get("created"), "created", 64),
            base=_part(d.get("base"), "base"),
            layers=tuple(_part(x, f"layers[{i}]") for i, x in enumerate(layers_raw)),
            state=state,
            state_chunks=chunks,
            boot=BootRef(
                kernel=_part(boot.get("kernel"), "boot.kernel"),
                initrd=_part(boot.get("initrd"), "boot.initrd"),
                cmdline=_str(boot.get("cmdline"), "boot.cmdline", 1024),
            ),
            vm=VMShape(
                qemu=_str(vm.get("qemu"), "vm.qemu", 64),
                machine=_token(vm.get("machine"), "vm.machine"),
                accel=_choice(vm.get("accel"), "vm.accel", ("tcg", "kvm")),
                cpu=_token(vm.get("cpu"), "vm.cpu"),
                # no larger than a create may ask for (wire CreateSandboxRequest); what a
                # given worker can hold, its admission decides
                memory_mb=_int(vm.get("memory_mb"), "vm.memory_mb", 16, MAX_VM_MEMORY_MB),
                cpus=_int(vm.get("cpus"), "vm.cpus", 1, MAX_VM_CPUS),
                devices=_token(vm.get("devices"), "vm.devices"),
                disk_size=_int(vm.get("disk_size"), "vm.disk_size", 1, _MAX_SIZE),
            ),
            sandbox=_id(d.get("sandbox"), "sandbox"),
            parent=None if d.get("parent") is None else _digest(d.get("parent"), "parent"),
            name=None if d.get("name") is None else _label(d.get("name"), "name"),
            agent=_str(d.get("agent", ""), "agent", 128),
            extra={str(k): str(v) for k, v in extra.items()},
            network=_network(d.get("network")),
        )


# --- validation helpers ----------------------------------------------------
def _network(v: object) -> NetworkSpec | None:
    if v is None:
        return None
    try:
        return NetworkSpec.model_validate(v)
    except ValidationError as exc:
        raise ManifestError(f"manifest.network: {exc.errors()[0].get('msg', exc)}") from exc


def _obj(v: object, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ManifestError(f"manifest {where} must be an object")
    return v


def _only(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ManifestError(f"manifest {where} has unknown fields: {sorted(unknown)}")


def _str(v: object, where: str, limit: int) -> str:
    if not isinstance(v, str) or len(v) > limit or "\0" in v:
        raise ManifestError(f"manifest {where} must be a string of at most {limit} characters")
    return v


def _token(v: object, where: str) -> str:
    s = _str(v, where, 64)
    if not _ID_RE.match(s):
        raise ManifestError(f"manifest {where} has an invalid value {s!r}")
    return s


def _id(v: object, where: str) -> str:
    return _token(v, where)


def _label(v: object, where: str) -> str:
    s = _str(v, where, 128)
    if not _NAME_RE.match(s):
        raise ManifestError(f"manifest {where} has an invalid value {s!r}")
    return s


def _choice(v: object, where: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ManifestError(f"manifest {where} must be one of {choices}, not {v!r}")
    return str(v)


def _int(v: object, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ManifestError(f"manifest {where} must be an integer in [{lo}, {hi}]")
    return v


def _digest(v: object, where: str) -> str:
    if not isinstance(v, str) or not DIGEST_RE.match(v):
        raise ManifestError(f"manifest {where} is not a sha256 hex digest: {v!r}")
    return v


def _part(v: object, where: str) -> PartRef:
    d = _obj(v, where)
    _only(d, {"digest", "size"}, where)
    return PartRef(_digest(d.get("digest"), f"{where}.digest"),
                   _int(d.get("size"), f"{where}.size", 0, _MAX_SIZE))


def _chunk(v: object, where: str) -> ChunkRef:
    d = _obj(v, where)
    _only(d, {"offset", "size", "digest"}, where)
    return ChunkRef(_int(d.get("offset"), f"{where}.offset", 0, _MAX_SIZE),
                    _int(d.get("size"), f"{where}.size", 0, _MAX_SIZE),
                    _digest(d.get("digest"), f"{where}.digest"))


def _ram(v: object, memory_mb: object) -> RamImageRef:
    d = _obj(v, "ram")
    _only(d, {"size", "chunk_size", "chunks"}, "ram")
    raw = d.get("chunks")
    if not isinstance(raw, list):
        raise ManifestError("manifest ram.chunks must be a list")
    ram = RamImageRef(_int(d.get("size"), "ram.size", 1, _MAX_SIZE),
                      _int(d.get("chunk_size"), "ram.chunk_size", 1, _MAX_SIZE),
                      tuple(_chunk(x, f"ram.chunks[{i}]") for i, x in enumerate(raw)))
    mb = _int(memory_mb, "vm.memory_mb", 16, MAX_VM_MEMORY_MB)
    check_ram(ram, mb * 1024 * 1024)
    return ram

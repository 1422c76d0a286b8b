"""Template snapshots: one booted machine per image and shape, forked by every later create.

A template is an ordinary checkpoint, taken right after a cold boot (and the
root filesystem's growth), before any user command ran.  It is found by a key
that is the digest of everything its saved state depends on: the base image,
kernel, initramfs, agent, VM shape (disk size included) and device profile.
So a template can never be used for a machine it was not made for: any change
of those makes a different key, and the old template is simply not found.

Each worker keeps ``<home>/templates/<key>`` (a checkpoint id) and publishes
the same pointer as ``templates/<key>`` in the store.  The store is
untrusted: a pointer read from it is only a checkpoint id to look up; the
manifest behind it is verified by its digest (as for any fork) and must
match the key's inputs field by field before it is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from forkyard._fs import atomic_write_bytes
from forkyard.checkpoint import Checkpoint
from forkyard.errors import ObjectNotFound, StoreError
from forkyard.store import ObjectStore
from forkyard.vm.shape import VMShape

__all__ = ["TemplateIndex", "TemplateKey"]

_CHECKPOINT_ID = re.compile(r"^[0-9a-f]{64}$")
_FORMAT = 1  # bump when what a key covers changes


@dataclass(frozen=True, slots=True)
class TemplateKey:
    """What a template's saved machine depends on; :attr:`digest` names it."""

    base_digest: str
    kernel_digest: str
    initrd_digest: str
    agent_digest: str
    shape: VMShape

    @property
    def digest(self) -> str:
        s = self.shape
        doc = {
            "format": _FORMAT,
            "base": self.base_digest,
            "kernel": self.kernel_digest,
            "initrd": self.initrd_digest,
            "agent": self.agent_digest,
            "vm": {"memory_mb": s.memory_mb, "cpus": s.cpus, "machine": s.machine,
                   "accel": s.accel, "cpu": s.cpu, "devices": s.devices, "qemu": s.qemu,
                   "disk_size": s.disk_size},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def matches(self, cp: Checkpoint) -> bool:
        """Whether ``cp`` really is a machine of this key (a store pointer may lie)."""
        m = cp.manifest
        v, s = m.vm, self.shape
        return (
            m.base.digest == self.base_digest
            and m.boot.kernel.digest == self.kernel_digest
            and m.boot.initrd.digest == self.initrd_digest
            and (v.memory_mb, v.cpus, v.machine, v.accel, v.cpu, v.devices, v.disk_size)
            == (s.memory_mb, s.cpus, s.machine, s.accel, s.cpu, s.devices, s.disk_size)
        )


class TemplateIndex:
    """Template pointers: this worker's own, and the published ones in the store."""

    def __init__(self, directory: Path, store: ObjectStore) -> None:
        self._dir = directory
        self._store = store

    def local(self, key: TemplateKey) -> str | None:
        try:
            raw = (self._dir / key.digest).read_bytes()
        except FileNotFoundError:
            return None
        return _checkpoint_id(raw)

    def published(self, key: TemplateKey) -> str | None:
        try:
            raw = self._store.get_bytes(_store_key(key), max_size=128)
        except (ObjectNotFound, StoreError):
            return None  # no template yet (or an unreadable pointer): boot instead
        return _checkpoint_id(raw)

    def remember(self, key: TemplateKey, checkpoint_id: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._dir / key.digest, checkpoint_id.encode())

    def forget(self, key: TemplateKey) -> None:
        (self._dir / key.digest).unlink(missing_ok=True)

    def publish(self, key: TemplateKey, checkpoint_id: str) -> None:
        """Point the store's ``templates/<key>`` at ``checkpoint_id`` (after it is published)."""
        self._store.put_bytes(_store_key(key), checkpoint_id.encode(), if_absent=False)


def _store_key(key: TemplateKey) -> str:
    return f"templates/{key.digest}"


def _checkpoint_id(raw: bytes) -> str | None:
    text = raw.decode("ascii", "replace").strip()
    return text if _CHECKPOINT_ID.match(text) else None

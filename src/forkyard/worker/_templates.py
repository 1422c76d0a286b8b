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
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forkyard._fs import atomic_write_bytes
from forkyard.checkpoint import Checkpoint
from forkyard.checkpoint.local import LocalCheckpoints
from forkyard.errors import CheckpointNotFound, ForkyardError, ObjectNotFound, StoreError
from forkyard.store import ObjectStore
from forkyard.vm.shape import DEFAULT_CMDLINE, VMShape
from forkyard.worker._sandbox import Sandbox

__all__ = ["TemplateIndex", "TemplateKey", "Templates"]

log = logging.getLogger("forkyard.worker")

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
    cmdline: str = DEFAULT_CMDLINE

    @property
    def digest(self) -> str:
        s = self.shape
        doc = {
            "format": _FORMAT,
            "base": self.base_digest,
            "kernel": self.kernel_digest,
            "initrd": self.initrd_digest,
            "agent": self.agent_digest,
            "cmdline": self.cmdline,
            "vm": {"memory_mb": s.memory_mb, "cpus": s.cpus, "machine": s.machine,
                   "accel": s.accel, "cpu": s.cpu, "devices": s.devices, "qemu": s.qemu,
                   "disk_size": s.disk_size},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    @property
    def checkpoint_name(self) -> str:
        return f"template-{self.digest[:12]}"

    def matches(self, cp: Checkpoint) -> bool:
        """Whether ``cp`` really is a machine of this key (a store pointer may lie).

        Besides the machine, it must be shaped like a template: named for this
        key, of a sandbox that booted (no parent) and had written one layer.
        Anyone who can write the store could still forge such a checkpoint; the
        store's write access is the trust boundary here, as for any pointer.
        """
        m = cp.manifest
        v, s = m.vm, self.shape
        return (
            m.name == self.checkpoint_name and m.parent is None and not m.layers[:-1]
            and m.base.digest == self.base_digest
            and m.boot.cmdline == self.cmdline
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


class Templates:
    """Finding a usable template, and making one of a sandbox that has just booted."""

    def __init__(self, index: TemplateIndex, checkpoints: LocalCheckpoints, *,
                 resolve: Callable[[str], Checkpoint],
                 publish: Callable[[Checkpoint], object]) -> None:
        self.index = index
        self._checkpoints = checkpoints
        self._resolve = resolve  # a local checkpoint, or a published one (verified manifest)
        self._publish = publish
        self._lock = threading.Lock()
        self._background: list[threading.Thread] = []

    def find(self, key: TemplateKey) -> Checkpoint | None:
        """This worker's template for ``key``, else a verified published one."""
        cp_id = self.index.local(key)
        if cp_id is not None:
            try:
                return self._checkpoints.get(cp_id)
            except CheckpointNotFound:
                self.index.forget(key)
        cp_id = self.index.published(key)
        if cp_id is None:
            return None
        try:
            cp = self._resolve(cp_id)
        except ForkyardError as exc:
            log.warning("template %s: published checkpoint unusable: %s", key.digest[:12], exc)
            return None
        if not key.matches(cp):
            log.warning("template %s: the store points at a checkpoint of another machine",
                        key.digest[:12])
            return None
        return cp

    def capture(self, sb: Sandbox, key: TemplateKey) -> None:
        """Checkpoint ``sb`` (just booted) as the template of ``key``; publish it meanwhile.

        The sandbox itself carries on; a failure only costs the template.
        """
        try:
            cp = sb.checkpoint(name=key.checkpoint_name)
        except ForkyardError as exc:
            log.warning("sandbox %s: no template made: %s", sb.id, exc)
            return
        sb.last_checkpoint = None  # the template is the worker's, not the user's checkpoint
        self.index.remember(key, cp.id)

        def publish() -> None:
            try:
                self._publish(cp)
                self.index.publish(key, cp.id)
            except ForkyardError as exc:
                log.warning("template %s not published: %s", key.digest[:12], exc)

        t = threading.Thread(target=publish, name=f"template-{key.digest[:12]}", daemon=True)
        with self._lock:
            self._background.append(t)
        t.start()

    def wait(self, timeout: float) -> None:
        with self._lock:
            threads, self._background = self._background, []
        for t in threads:
            t.join(timeout)

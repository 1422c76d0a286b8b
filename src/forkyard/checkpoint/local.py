"""The worker's local checkpoint catalog: ``<home>/checkpoints/<id>/manifest.json``.

Parts (layers, state, kernel, initramfs) live in the worker's blob cache and
bases in the image catalog, all by digest; this catalog only holds manifests,
written atomically under their own digest.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from forkyard._digest import DIGEST_RE, normalize_prefix, resolve_prefix
from forkyard._fs import atomic_write_bytes
from forkyard.checkpoint.manifest import Manifest
from forkyard.errors import CheckpointNotFound, ManifestError

__all__ = ["Checkpoint", "CheckpointFiles", "LocalCheckpoints", "checkpoint_prefix",
           "resolve_checkpoint_ref"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint: its id (sha256 of the manifest) and the manifest."""

    id: str
    manifest: Manifest

    @classmethod
    def of(cls, manifest: Manifest) -> Checkpoint:
        return cls(manifest.id, manifest)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def created(self) -> str:
        return self.manifest.created

    @property
    def name(self) -> str | None:
        return self.manifest.name

    @property
    def sandbox_id(self) -> str:
        return self.manifest.sandbox

    @property
    def changed_bytes(self) -> int:
        """Disk layers + VM state: what this checkpoint adds on top of its base."""
        return self.manifest.changed_bytes

    @property
    def ram_new_bytes(self) -> int | None:
        """Bytes of RAM chunks this checkpoint stored first (None: not a v3 capture)."""
        return _extra_int(self.manifest, "ram_new_bytes")

    @property
    def ram_shared_bytes(self) -> int | None:
        """Bytes of its RAM chunks an earlier checkpoint (any sandbox's) had stored."""
        return _extra_int(self.manifest, "ram_shared_bytes")


def _extra_int(m: Manifest, key: str) -> int | None:
    raw = m.extra.get(key)
    return int(raw) if raw is not None and raw.isdigit() else None


@dataclass(frozen=True, slots=True)
class CheckpointFiles:
    """Local, verified files holding every part of one checkpoint."""

    base: Path
    layers: tuple[Path, ...]  # bottom first
    state: Path
    kernel: Path
    initrd: Path


def checkpoint_prefix(ref: str) -> str:
    """``ref`` as a lowercase id or id prefix; CheckpointNotFound if it cannot be one."""
    return normalize_prefix(ref)


def resolve_checkpoint_ref(ref: str, ids: Iterable[str]) -> str:
    """The full id among ``ids`` that ``ref`` (an id or a unique prefix) names."""
    prefix = normalize_prefix(ref)
    if DIGEST_RE.match(prefix):
        return prefix
    return resolve_prefix(prefix, (i for i in ids if DIGEST_RE.match(i)))


class LocalCheckpoints:
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, checkpoint_id: str) -> Path:
        if not DIGEST_RE.match(checkpoint_id):
            raise CheckpointNotFound(checkpoint_id)
        return self._root / checkpoint_id

    def add(self, manifest: Manifest) -> Checkpoint:
        cp = Checkpoint.of(manifest)
        d = self._dir(cp.id)
        final = d / "manifest.json"
        if final.exists():
            return cp
        # a unique temp per writer: two threads may add the same checkpoint at once
        atomic_write_bytes(final, manifest.canonical())
        return cp

    def get(self, ref: str) -> Checkpoint:
        """By full id or a unique prefix of at least 6 hex digits."""
        checkpoint_id = self.resolve(ref)
        path = self._dir(checkpoint_id) / "manifest.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointNotFound(ref) from None
        try:
            return Checkpoint(checkpoint_id, Manifest.parse(raw, expect_id=checkpoint_id))
        except ManifestError:
            raise
        except Exception as exc:
            raise ManifestError(f"local manifest {checkpoint_id[:12]} is damaged: {exc}") from exc

    def has(self, checkpoint_id: str) -> bool:
        return bool(DIGEST_RE.match(checkpoint_id)) and (
            self._root / checkpoint_id / "manifest.json"
        ).exists()

    def resolve(self, ref: str) -> str:
        prefix = checkpoint_prefix(ref)
        return resolve_checkpoint_ref(
            prefix, (p.name for p in self._root.glob(f"{prefix}*")
                     if (p / "manifest.json").exists()))

    def list(self) -> list[Checkpoint]:
        out = []
        for d in sorted(self._root.iterdir()):
            if DIGEST_RE.match(d.name) and (d / "manifest.json").exists():
                with contextlib.suppress(CheckpointNotFound, ManifestError):
                    out.append(self.get(d.name))
        return sorted(out, key=lambda c: c.created)

    def mark(self, checkpoint_id: str, flag: str, value: str = "") -> None:
        """Small per-checkpoint facts (e.g. ``published`` with the store URL)."""
        atomic_write_bytes(self._dir(checkpoint_id) / flag, value)

    def unmark(self, checkpoint_id: str, flag: str) -> None:
        (self._dir(checkpoint_id) / flag).unlink(missing_ok=True)

    def flag(self, checkpoint_id: str, flag: str) -> str | None:
        path = self._dir(checkpoint_id) / flag
        return path.read_text() if path.exists() else None

    def remove(self, checkpoint_id: str) -> None:
        d = self._dir(checkpoint_id)
        if not d.exists():
            raise CheckpointNotFound(checkpoint_id)
        shutil.rmtree(d)

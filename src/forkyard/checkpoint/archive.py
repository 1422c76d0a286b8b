"""Publishing checkpoints to an object store and reading them back.

Store layout (all objects written once, never modified)::

    blobs/<ab>/<sha256>           every part, zstd-compressed, named by the sha256
                                  of its uncompressed bytes (forkyard.store.blobs);
                                  a v2 VM state as one blob per chunk
    checkpoints/<id>.json         the manifest; <id> = sha256 of these exact bytes

Publishing uploads every part the store lacks (a base or kernel already there is
not sent again), checks each stored object, and only then writes the manifest:
a checkpoint without a manifest does not exist for readers, so a crash or a
failed upload never leaves a half-published checkpoint visible.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from forkyard._digest import DIGEST_RE
from forkyard.checkpoint.local import checkpoint_prefix, resolve_checkpoint_ref
from forkyard.checkpoint.manifest import MAX_MANIFEST_BYTES, SHARED_ROLES, Manifest, PartRef
from forkyard.errors import CheckpointNotFound, ObjectNotFound
from forkyard.store import BlobStore, ObjectStore, blob_key

__all__ = [
    "MANIFEST_PREFIX",
    "SHARED_ROLES",
    "PublishReport",
    "fetch_manifest",
    "list_published",
    "manifest_key",
    "publish",
    "resolve_published",
    "stored_bytes",
]

MANIFEST_PREFIX = "checkpoints/"

PartProgress = Callable[[str, int, int | None], None]


def manifest_key(checkpoint_id: str) -> str:
    if not DIGEST_RE.match(checkpoint_id):
        raise CheckpointNotFound(checkpoint_id)
    return f"{MANIFEST_PREFIX}{checkpoint_id}.json"


@dataclass(frozen=True, slots=True)
class PublishReport:
    checkpoint_id: str
    parts: int
    uploaded_parts: int
    uploaded_bytes: int  # compressed bytes this call wrote to the store
    stored_bytes: int  # compressed size of the checkpoint's own parts (layers + state)
    shared_bytes: int  # compressed size of base, kernel, initramfs (stored once per store)
    seconds: float


def publish(
    manifest: Manifest,
    blobs: BlobStore,
    local_path: Callable[[str, PartRef], Path],
    *,
    progress: PartProgress | None = None,
) -> PublishReport:
    """Upload what the store lacks, then write the manifest (last)."""
    t0 = time.monotonic()
    uploaded = uploaded_bytes = own = shared = 0
    # a v2 state's chunks are spans of the local state file (no copy is made of them)
    spans = {f"state.{i}": (c.offset, c.size) for i, c in enumerate(manifest.state_chunks)}
    for role, ref in manifest.parts():
        if blobs.has_blob(ref.digest):
            stored = blobs.store.size(_key(ref))  # dedup: identical chunks travel once
        else:
            span = spans.get(role)
            path = local_path(role, ref) if span is None else local_path("state", manifest.state)
            result = blobs.put_blob(path, digest=ref.digest, progress=_for_role(progress, role),
                                    span=span)
            stored = result.stored_size
            uploaded += 1
            uploaded_bytes += stored
        if role in SHARED_ROLES:
            shared += stored
        else:
            own += stored
    data = manifest.canonical()
    blobs.store.put_bytes(manifest_key(manifest.id), data)
    return PublishReport(
        checkpoint_id=manifest.id,
        parts=len(manifest.parts()),
        uploaded_parts=uploaded,
        uploaded_bytes=uploaded_bytes,
        stored_bytes=own,
        shared_bytes=shared,
        seconds=time.monotonic() - t0,
    )


def _for_role(
    progress: PartProgress | None, role: str
) -> Callable[[int, int | None], None] | None:
    if progress is None:
        return None
    report = progress

    def cb(done: int, total: int | None) -> None:
        report(role, done, total)

    return cb


def _key(ref: PartRef) -> str:
    return blob_key(ref.digest)


def is_published(store: ObjectStore, checkpoint_id: str) -> bool:
    return store.exists(manifest_key(checkpoint_id))


def list_published(store: ObjectStore) -> Iterator[str]:
    for key in store.list(MANIFEST_PREFIX):
        name = key.removeprefix(MANIFEST_PREFIX).removesuffix(".json")
        if DIGEST_RE.match(name) and key == manifest_key(name):
            yield name


def resolve_published(store: ObjectStore, ref: str) -> str:
    """A full checkpoint id from an id or a unique prefix (≥ 6 hex digits)."""
    prefix = checkpoint_prefix(ref)
    if DIGEST_RE.match(prefix):
        return prefix
    return resolve_checkpoint_ref(
        prefix, (k.removeprefix(MANIFEST_PREFIX).removesuffix(".json")
                 for k in store.list(MANIFEST_PREFIX + prefix)))


def stored_bytes(store: ObjectStore, manifest: Manifest) -> int:
    """The bytes a published checkpoint stores for itself: its layers and state as
    compressed in ``store`` (base, kernel and initramfs are shared, not counted)."""
    return sum(store.size(_key(ref)) for _role, ref in manifest.own_parts())


def fetch_manifest(store: ObjectStore, ref: str) -> Manifest:
    """The verified manifest of a published checkpoint (its bytes must hash to its id)."""
    checkpoint_id = resolve_published(store, ref)
    try:
        raw = store.get_bytes(manifest_key(checkpoint_id), max_size=MAX_MANIFEST_BYTES)
    except ObjectNotFound:
        raise CheckpointNotFound(checkpoint_id) from None
    return Manifest.parse(raw, expect_id=checkpoint_id)

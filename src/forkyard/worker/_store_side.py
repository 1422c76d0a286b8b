"""What a worker does with checkpoints in the store: resolve, publish, fetch, account.

A seam of :class:`forkyard.worker.Worker` (which inherits it): these methods
touch the store, the blob cache and the checkpoint catalogue, never a VM.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Callable

from forkyard.checkpoint import Checkpoint, LocalCheckpoints, archive
from forkyard.checkpoint.local import CheckpointFiles
from forkyard.checkpoint.ram_images import RamImages
from forkyard.errors import CheckpointNotFound
from forkyard.image import ImageCatalog
from forkyard.store import BlobCache, BlobStore, ObjectStore
from forkyard.worker._faults import crash_point
from forkyard.worker._parts import PartFetcher
from forkyard.worker._sandbox import Sandbox, SandboxState

__all__ = ["PUBLISHING", "StoreSide"]

PUBLISHING = "publishing"  # flag of a checkpoint whose publish is under way


class StoreSide(ABC):
    """The checkpoint methods of a worker; the attributes are the worker's."""

    store: ObjectStore
    blobstore: BlobStore
    blobs: BlobCache
    images: ImageCatalog
    checkpoints: LocalCheckpoints
    ram_images: RamImages
    _parts: PartFetcher

    @abstractmethod
    def list(self) -> builtins.list[Sandbox]:
        ...

    @abstractmethod
    def _check_compatible(self, cp: Checkpoint) -> None:
        ...

    def resolve_checkpoint(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """A local checkpoint, or a published one whose manifest is fetched (verified)."""
        if isinstance(checkpoint, Checkpoint):
            return checkpoint
        try:
            return self.checkpoints.get(checkpoint)
        except CheckpointNotFound:
            pass
        manifest = archive.fetch_manifest(self.store, checkpoint)
        return Checkpoint.of(manifest)

    def publish(
        self,
        checkpoint: Checkpoint | str,
        *,
        progress: Callable[[str, int, int | None], None] | None = None,
    ) -> archive.PublishReport:
        """Make ``checkpoint`` forkable on any worker sharing this worker's store."""
        cp = self.checkpoints.get(checkpoint.id if isinstance(checkpoint, Checkpoint)
                                  else checkpoint)
        # the intent outlives a crash: the next worker start publishes it again
        self.checkpoints.mark(cp.id, PUBLISHING, self.store.url)
        self.ram_images.drain()  # RAM chunks a fork fetched: in the cache, to upload from

        def report_progress(role: str, done: int, total: int | None) -> None:
            if done:
                crash_point("publish-mid")
            if progress is not None:
                progress(role, done, total)

        report = archive.publish(cp.manifest, self.blobstore, self._parts.local_part,
                                 progress=report_progress)
        crash_point("publish-uploaded")
        self.checkpoints.mark(cp.id, "published", self.store.url)
        self.checkpoints.unmark(cp.id, PUBLISHING)
        return report

    def unfinished_publishes(self) -> builtins.list[Checkpoint]:
        """Local checkpoints a publish was started for, or a hibernated sandbox here
        stands on, that are not published: what an earlier process left undone."""
        wanted = {sb.last_checkpoint for sb in self.list()
                  if sb.state is SandboxState.HIBERNATED and sb.last_checkpoint}
        out = []
        for cp in self.checkpoints.list():
            if self.checkpoints.flag(cp.id, "published") is not None:
                continue
            if cp.id in wanted or self.checkpoints.flag(cp.id, PUBLISHING) is not None:
                out.append(cp)
        return out

    def is_published(self, checkpoint_id: str) -> bool:
        return archive.is_published(self.store, checkpoint_id)

    def fetch_checkpoint(self, checkpoint: Checkpoint | str) -> Checkpoint:
        """Bring a published checkpoint and all its parts here, without starting it."""
        cp = self.resolve_checkpoint(checkpoint)
        self._check_compatible(cp)
        self._parts.materialize(cp, self.ram_images)
        return self.checkpoints.add(cp.manifest)

    def materialize(self, checkpoint: Checkpoint) -> CheckpointFiles:
        """Local, verified files of every part of ``checkpoint`` (fetching what is missing)."""
        return self._parts.materialize(checkpoint, self.ram_images)

    def cached_bases(self) -> builtins.list[str]:
        digests = {info.digest for info in self.images.list()}
        for cp in self.checkpoints.list():
            if self.blobs.path_if_present(cp.manifest.base.digest) is not None:
                digests.add(cp.manifest.base.digest)
        return sorted(digests)

    def local_checkpoint_ids(self) -> builtins.list[str]:
        return [cp.id for cp in self.checkpoints.list()]

"""Bringing a checkpoint's parts to this worker: local files, verified, fetched in parallel.

Disk parts are verified before anything can run on them: a missing or
corrupt part is an error, never a broken VM.  A chunked (v2) VM state may
instead come as a stream that a paused QEMU loads while it downloads, each
chunk verified before QEMU sees it (``worker._stream``); a v1 state is
fetched and verified whole first.  Concurrent forks of one checkpoint
download that state once.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from forkyard.checkpoint import Checkpoint, PartRef, qcow2
from forkyard.checkpoint.local import CheckpointFiles
from forkyard.checkpoint.ram_images import RamImages
from forkyard.errors import CheckpointError, ForkyardError
from forkyard.image import ImageCatalog
from forkyard.store import BlobCache, BlobStore
from forkyard.worker._stream import StateStream, fetch_chunked

__all__ = ["PartFetcher", "Parts"]

_STATE_WAIT = 180.0  # for another fork's download of the same state


@dataclass
class Parts:
    """A checkpoint's parts as they arrive (see :meth:`PartFetcher.gather`)."""

    kernel: Future[Path]
    initrd: Future[Path]
    disks: Future[tuple[Path, tuple[Path, ...]]]  # base, layers: verified
    state: Path | StateStream
    pool: ThreadPoolExecutor

    def close(self) -> None:
        if isinstance(self.state, StateStream):
            self.state.close()
        self.pool.shutdown(wait=False)


class PartFetcher:
    def __init__(self, images: ImageCatalog, blobs: BlobCache, blobstore: BlobStore,
                 *, worker: str) -> None:
        self._images = images
        self._blobs = blobs
        self._blobstore = blobstore
        self._worker = worker
        self._lock = threading.Lock()
        self._state_downloads: dict[str, StateStream] = {}  # by digest, while in flight
        self._state_gates: dict[str, threading.Lock] = {}  # whole fetches, by digest

    def find_base(self, digest: str) -> Path | None:
        """A local file with exactly these bytes: a catalogued image or a fetched base."""
        if self._images.has(digest):
            return self._images.path(digest)
        return self._blobs.path_if_present(digest)

    def local_part(self, role: str, ref: PartRef) -> Path:
        """The local file of a part this worker must already have (to publish it)."""
        path = self.find_base(ref.digest) if role == "base" else (
            self._blobs.path_if_present(ref.digest))
        if path is None:
            raise CheckpointError(
                f"{role} sha256:{ref.digest} is not on worker {self._worker}; cannot publish"
            )
        return path

    def materialize(self, cp: Checkpoint, ram: RamImages) -> CheckpointFiles:
        """Local, verified files of every part of ``cp`` (fetching what is missing)."""
        parts = self.gather(cp, stream_state=False)
        try:
            if cp.manifest.ram is not None:
                ram.fetch_chunks(cp.manifest.ram, what=f"checkpoint {cp.short_id}")
            base, layers = parts.disks.result()
            state = parts.state
            assert isinstance(state, Path)
            return CheckpointFiles(base, layers, state, parts.kernel.result(),
                                   parts.initrd.result())
        finally:
            parts.close()

    def gather(self, cp: Checkpoint, *, stream_state: bool) -> Parts:
        """Start fetching every missing part of ``cp``, in parallel.

        With ``stream_state`` a missing VM state comes back as a stream.
        """
        m = cp.manifest
        pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fetch")
        state: Path | StateStream | None = self._blobs.path_if_present(m.state.digest)
        ahead: StateStream | None = None  # another fork's download of this state
        if state is None and stream_state and m.state_chunks:
            state, ahead = self._stream_state(cp)
        try:
            f_base = pool.submit(
                lambda: self.find_base(m.base.digest) or self._fetch(m.base, "base image", cp))
            f_layers = [pool.submit(self._blob, ref, f"disk layer {i}", cp)
                        for i, ref in enumerate(m.layers)]

            def disks() -> tuple[Path, tuple[Path, ...]]:
                layers = tuple(f.result() for f in f_layers)
                parent = m.base.digest
                for i, (ref, path) in enumerate(zip(m.layers, layers, strict=True)):
                    what = f"disk layer {i} of checkpoint {cp.short_id}"
                    qcow2.check_layer(path, parent=parent, disk_size=m.vm.disk_size, what=what)
                    parent = ref.digest
                return f_base.result(), layers

            parts = Parts(
                kernel=pool.submit(self._blob, m.boot.kernel, "kernel", cp),
                initrd=pool.submit(self._blob, m.boot.initrd, "initramfs", cp),
                disks=pool.submit(disks),
                state=state if state is not None else self._state_file(m.state, cp, ahead),
                pool=pool,
            )
        except BaseException:
            if isinstance(state, StateStream):
                state.close()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return parts

    def _stream_state(self, cp: Checkpoint) -> tuple[StateStream | None, StateStream | None]:
        """A new stream of this VM state, or ``(None, ahead)`` if one is in flight.

        Concurrent forks of a checkpoint whose state is not here download it
        once: the first streams it, the others wait for it to be cached.
        """
        ref = cp.manifest.state
        with self._lock:
            ahead = self._state_downloads.get(ref.digest)
            if ahead is not None:
                return None, ahead

            def landed() -> None:
                with self._lock:
                    self._state_downloads.pop(ref.digest, None)

            stream = StateStream(self._blobs, self._blobstore, ref, cp.manifest.state_chunks,
                                 what=f"VM state of checkpoint {cp.short_id}", on_done=landed)
            stream.start()
            self._state_downloads[ref.digest] = stream
        return stream, None

    def _state_file(self, ref: PartRef, cp: Checkpoint, ahead: StateStream | None) -> Path:
        if ahead is not None:
            # Whatever became of that download, the cache now has the state or
            # a fetch of our own reports exactly what is wrong with it.
            ahead.wait_done(_STATE_WAIT)
        found = self._blobs.path_if_present(ref.digest)
        if found is not None:
            return found
        if cp.manifest.state_chunks:
            with self._lock:
                gate = self._state_gates.setdefault(ref.digest, threading.Lock())
            with gate:  # concurrent forks (a v3 state is never streamed) fetch it once
                found = self._blobs.path_if_present(ref.digest)
                if found is not None:
                    return found
                return fetch_chunked(self._blobs, self._blobstore, ref,
                                     cp.manifest.state_chunks,
                                     what=f"VM state of checkpoint {cp.short_id}")
        return self._fetch(ref, "VM state", cp)

    def _blob(self, ref: PartRef, what: str, cp: Checkpoint) -> Path:
        return self._blobs.path_if_present(ref.digest) or self._fetch(ref, what, cp)

    def _fetch(self, ref: PartRef, what: str, cp: Checkpoint) -> Path:
        try:
            return self._blobs.fetch(ref.digest, self._blobstore, size=ref.size)
        except ForkyardError as exc:
            exc.add_note(f"while fetching the {what} (sha256:{ref.digest}) of checkpoint "
                         f"{cp.id} from {self._blobstore.store.url}")
            raise

"""From a capture to a catalogued checkpoint.

A sandbox captures one instant of its VM (``forkyard.worker``: pause, freeze
the top disk layer, save the VM state, resume) and hands back a frozen
:class:`Capture`; a :class:`Recorder` files its parts by digest in the blob
cache and writes the manifest.  The two meet only through these values, so
the VM steps and the bookkeeping can change apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forkyard._digest import sha256_file
from forkyard.checkpoint.chunks import split_file
from forkyard.checkpoint.local import Checkpoint, LocalCheckpoints
from forkyard.checkpoint.manifest import BootRef, Manifest, PartRef, utcnow
from forkyard.checkpoint.ram_image import file_image
from forkyard.checkpoint.ram_images import RamImages
from forkyard.store import BlobCache
from forkyard.vm.ram import RamFile
from forkyard.vm.shape import VMShape
from forkyard.wire.network import NetworkSpec

__all__ = ["Capture", "Recorder"]


@dataclass(frozen=True, slots=True)
class Capture:
    """What a sandbox froze at one instant: everything its manifest will say."""

    sandbox: str  # id of the sandbox captured
    parent: str | None  # checkpoint the sandbox was forked/woken/restored from
    name: str | None  # the caller's label
    base: PartRef  # the raw base under the disk chain
    layers: tuple[PartRef, ...]  # the whole chain, bottom first, the frozen layer last (filed)
    state_file: Path  # the VM state saved at that instant; the recorder files it
    pause_seconds: float  # how long the guest was stopped for the capture
    shape: VMShape  # the machine the state needs (its qemu: the one that saved it)
    boot: BootRef
    agent: str  # the guest agent's version ("" if unknown)
    network: NetworkSpec | None = None  # its mode and rules; None: no NIC
    # format v3: the frozen RAM image copied at that instant (unsealed; the recorder
    # files and seals it) and ``state_file`` is device state only; None: a whole stream
    ram_image: RamFile | None = None


class Recorder:
    """Files captured parts in a blob cache and catalogues their manifests."""

    def __init__(self, blobs: BlobCache, catalog: LocalCheckpoints, *, worker: str,
                 images: RamImages | None = None) -> None:
        self._blobs = blobs
        self._catalog = catalog
        self._worker = worker
        self._images = images or RamImages(blobs, None)

    def file_layer(self, path: Path) -> PartRef:
        """File a disk layer no VM writes any more under its digest (hard link)."""
        digest = sha256_file(path)
        self._blobs.add_local(digest, path, verify=False, link=True)
        return PartRef(digest, path.stat().st_size)

    def drop_image(self, manifest: Manifest) -> None:
        """This worker need not keep the checkpoint's RAM image mapped (a hibernation)."""
        if manifest.ram is not None:
            self._images.forget(manifest.ram)

    def record(self, capture: Capture) -> Checkpoint:
        """Hash and file the capture's VM state, then write its manifest."""
        extra = {"worker": self._worker,
                 "pause_ms": str(round(capture.pause_seconds * 1000, 1))}
        ram = None
        try:
            # one pass: the whole state's digest (its local key) and its chunks (what travels)
            state_digest, state_size, chunks = split_file(capture.state_file)
            self._blobs.add_local(state_digest, capture.state_file, verify=False, link=True)
            capture.state_file.unlink()
            filed = None if capture.ram_image is None else file_image(capture.ram_image,
                                                                       self._blobs)
        except BaseException:
            if capture.ram_image is not None:
                capture.ram_image.release()
            raise
        if capture.ram_image is not None and filed is not None:
            ram = filed.ref
            self._images.add(ram, capture.ram_image)  # forks on this worker map it at once
            # what this checkpoint's RAM added to the worker's chunks, and what it shares
            extra["ram_new_bytes"] = str(filed.new_bytes)
            extra["ram_shared_bytes"] = str(filed.shared_bytes)
        manifest = Manifest(
            ram=ram,
            created=utcnow(),
            base=capture.base,
            layers=capture.layers,
            state=PartRef(state_digest, state_size),
            state_chunks=chunks,
            boot=capture.boot,
            vm=capture.shape,
            sandbox=capture.sandbox,
            parent=capture.parent,
            name=capture.name,
            agent=capture.agent,
            network=capture.network,
            extra=extra,
        )
        return self._catalog.add(manifest)

"""A sandbox's checkpoints: the VM steps of one, live or paused, and its layer chain.

The part of :class:`~forkyard.worker.Sandbox` that captures memory, devices and
disk at one instant and ends in a :class:`Capture`, which the worker's
:class:`Recorder` turns into a manifest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

from forkyard.checkpoint import BootRef, Checkpoint, PartRef, qcow2
from forkyard.checkpoint.recorder import Capture, Recorder
from forkyard.errors import AgentTimeout, CheckpointError, ForkyardError, GuestError
from forkyard.guest.client import AgentClient
from forkyard.vm.machine import QemuVM, VMState
from forkyard.vm.migstream import StreamFormatError
from forkyard.vm.ram import RamFile
from forkyard.vm.ram_capture import LiveSaveUnavailable, save_live_with_image, save_with_image
from forkyard.wire.lifecycle import SandboxState
from forkyard.worker._faults import crash_point
from forkyard.worker._network import SandboxNetwork

__all__ = ["SandboxCheckpoints"]

S = SandboxState
log = logging.getLogger("forkyard.worker")
# A guest sync can wait on a lot of dirty data; past this the checkpoint goes
# ahead with the cache in place rather than stall.
_DROP_CACHE_TIMEOUT = 30.0


class SandboxCheckpoints(SandboxNetwork):
    """Checkpoint methods of a sandbox (mixed into ``Sandbox``, which sets these fields)."""

    last_checkpoint: str | None
    ram_images: bool
    live_checkpoints: bool
    _recorder: Recorder
    _dir: Path
    _disk_seq: int
    _layers: tuple[PartRef, ...]
    _boot: BootRef | None

    @property
    @abstractmethod
    def parent_checkpoint(self) -> str | None:
        ...

    @abstractmethod
    def _require_running(self, op: str) -> tuple[QemuVM, AgentClient]:
        ...

    @abstractmethod
    def _new_active(self, parent: str | None) -> Path:
        ...

    @abstractmethod
    def _mark_failed(self) -> None:
        ...

    def checkpoint(self, *, name: str | None = None, keep_page_cache: bool = False) -> Checkpoint:
        """Capture memory, devices and disk at one instant; the sandbox keeps running.

        The VM is paused only while its disk layer is frozen and its device
        state saved; its RAM of that instant is copied while it runs (paused,
        where QEMU cannot snapshot in the background), and hashing and
        cataloguing happen after that.

        First the guest syncs and drops its clean page cache: those pages are
        copies of disk blocks the checkpoint stores anyway, and without them
        the VM state is smaller and faster to save, ship and load (about half
        the state after a sandbox wrote 40 MB).  Programs see no difference,
        only colder caches.  ``keep_page_cache=True`` captures the memory as is.
        """
        with self._lock:
            vm, agent = self._require_running("checkpoint")
            if not keep_page_cache:
                _drop_page_cache(agent, self.id)
            capture = self._capture(vm, agent, name)
            cp = self._recorder.record(capture)
            self.last_checkpoint = cp.id
            self._save_meta()
            return cp

    def _capture(self, vm: QemuVM, agent: AgentClient, name: str | None) -> Capture:
        """The VM steps of a checkpoint: pause, freeze the top layer, save the state.

        The RAM goes into a new frozen image and the state file holds device
        state only (format v3, ``vm/ram_capture.py``); ``ram_images = False``
        saves the whole stream instead (format v2).
        """
        new_active = self._new_active(None)
        state_file = self._dir / f"state-{self._disk_seq}.tmp"
        t0 = time.monotonic()
        frozen: Path | None = None
        image: RamFile | None = None
        paused: float | None = None  # measured by the live capture

        def freeze() -> None:  # the guest is stopped here
            nonlocal frozen
            crash_point("checkpoint-paused")
            frozen = vm.freeze_disk(new_active)

        try:
            with agent.quiesced():
                self.lifecycle.move(S.PAUSED, "checkpoint")
                try:
                    if self.live_checkpoints and self.ram_images and vm.ram is not None:
                        image, paused = self._capture_live(vm, state_file, freeze)
                    if frozen is None:
                        t0 = time.monotonic()
                        vm.pause()
                        freeze()
                        if self.ram_images:
                            image = save_with_image(vm, state_file)
                        else:
                            vm.save_state(state_file)
                    crash_point("checkpoint-saved")
                finally:
                    try:
                        if paused is None:  # else the live capture resumed it
                            vm.resume()
                    finally:
                        self.lifecycle.move(S.RUNNING, "checkpoint")
        except (ForkyardError, OSError) as exc:
            if image is not None:
                image.release()
            with contextlib.suppress(OSError):
                state_file.unlink()
            if vm.alive() and vm.state is not VMState.RUNNING:
                # not resumed: its block nodes may be inactive after the save, and a
                # write to one (the parent marker below) would abort QEMU
                vm.kill()
            if not vm.alive():
                self._mark_failed()
            elif frozen is not None:
                # the disk moved on to a new layer even though the state was
                # not saved: file the frozen layer so later checkpoints chain
                try:
                    self._chain_frozen(vm, frozen)
                except ForkyardError:
                    # a QEMU just killed can still look alive: its QMP is gone
                    vm.kill()
                    self._mark_failed()
            if isinstance(exc, OSError):
                raise CheckpointError(f"sandbox {self.id}: copying guest RAM: {exc}") from exc
            raise
        if paused is None:
            paused = time.monotonic() - t0
        assert frozen is not None
        self._chain_frozen(vm, frozen)
        if self._boot is None:
            raise CheckpointError(f"sandbox {self.id} has no boot record")
        return Capture(
            sandbox=self.id,
            parent=self.parent_checkpoint,
            name=name,
            base=PartRef(self.spec.base_digest, self.spec.base_size or self.spec.disk_size),
            layers=self._layers,
            state_file=state_file,
            pause_seconds=paused,
            shape=vm.shape,
            boot=self._boot,
            agent=agent.version,
            network=self.spec.network,
            ram_image=image,
        )

    def _capture_live(self, vm: QemuVM, state_file: Path, freeze: Callable[[], None]
                      ) -> tuple[RamFile | None, float | None]:
        """RAM of one instant copied while the guest runs, paused only for the device
        state (``vm/ram_capture.py``); returns the image and the pause.  A host that
        cannot falls back to the paused capture (no image, no pause then).  A stream
        the splitter does not understand fails this checkpoint (QEMU writes none
        before ``freeze`` ran: the layer froze already); the next ones are paused."""
        try:
            return save_live_with_image(vm, state_file, freeze)
        except LiveSaveUnavailable as exc:
            log.warning("sandbox %s: checkpoints pause the guest: %s", self.id, exc)
            self.live_checkpoints = False
            return None, None
        except StreamFormatError as exc:
            self.live_checkpoints = False  # a paused capture stores the whole stream then
            raise CheckpointError(f"sandbox {self.id}: saving its state: {exc}") from exc

    def _chain_frozen(self, vm: QemuVM, frozen: Path) -> None:
        """A layer the VM no longer writes: file it by digest and name it in the next
        layer's header, so every later layer records exactly what lies below it."""
        ref = self._recorder.file_layer(frozen)
        vm.set_parent_marker(qcow2.parent_marker(ref.digest))
        self._layers = (*self._layers, ref)


def _drop_page_cache(agent: AgentClient, sandbox_id: str) -> None:
    try:
        agent.sync(drop_page_cache=True, timeout=_DROP_CACHE_TIMEOUT)
    except (GuestError, AgentTimeout) as exc:
        # only costs size: the checkpoint is as correct with the cache in it
        log.warning("sandbox %s: page cache not dropped before the checkpoint: %s",
                    sandbox_id, exc)

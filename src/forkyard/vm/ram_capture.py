"""Save a VM's state and freeze its RAM into a new image (format v3's capture).

Live (:func:`save_live_with_image`, the default: ``Sandbox.live_checkpoints``):
QEMU's background snapshot, split on the fly; the guest stops only while its
device state is saved, then runs on while RAM of that instant is copied
(``QemuVM.save_background`` says why not a precopy migration).  Paused
(:func:`save_with_image`, where the host gives QEMU no userfaultfd), two cases
by what the VM's RAM is (``vm/ram.py``):

- its own working file (``share=on``): the stream is saved with
  ``x-ignore-shared`` (device state only) and the working file is copied into
  a new memfd in the kernel (``copy_file_range``, holes skipped);
- a frozen image mapped ``share=off`` (a fork): QEMU streams every RAM page,
  and :func:`forkyard.vm.migstream.split_stream` moves the ``pc.ram`` pages
  into a new blank memfd on the fly, writing the device-state-only rest.

Either way the image is *new* (the source never writes an image forks map)
and unsealed: the caller files its chunks and seals it.  If the stream holds
something the splitter does not understand, the whole stream is saved
instead and no image is returned (the checkpoint is then format v2).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path

from forkyard.errors import VMError
from forkyard.vm._migration import LiveSaveUnavailable
from forkyard.vm.machine import QemuVM, VMState
from forkyard.vm.migstream import StreamEnded, StreamFormatError, split_stream
from forkyard.vm.ram import RamFile

__all__ = ["LiveSaveUnavailable", "save_live_with_image", "save_with_image"]

log = logging.getLogger("forkyard.vm")


def save_with_image(vm: QemuVM, state_file: Path) -> RamFile | None:
    """With ``vm`` paused: save its device state to ``state_file``; its RAM as a new image."""
    ram = vm.ram
    if ram is None:
        vm.save_state(state_file)
        return None
    image = RamFile.blank_image(ram.size)
    try:
        if ram.share:
            vm.save_state(state_file, ignore_shared=True)
            ram.copy_into(image)
            return image
        try:
            _split(vm, state_file, image)
            return image
        except StreamFormatError as exc:
            log.warning("%s: saving the whole stream (format v2): %s", vm.name, exc)
    except BaseException:
        image.release()
        raise
    image.release()
    vm.save_state(state_file)
    return None


def save_live_with_image(vm: QemuVM, state_file: Path,
                         at_stop: Callable[[], None]) -> tuple[RamFile, float]:
    """With ``vm`` running: its RAM into a new image and its device state into
    ``state_file``, both of one instant, the guest paused only for the device state.

    A background snapshot (``QemuVM.save_background``) through
    :func:`split_stream`: every ``pc.ram`` page lands in the image as QEMU
    copies it, while the guest runs.  ``at_stop()`` runs with the guest
    stopped, at the instant captured.  The state is saved *without*
    ``x-ignore-shared`` (RAM sent, then split off), which its configuration
    section records: a fork loads it with the capability off
    (``saved_ignore_shared``).  Returns the image and how long the guest was
    paused; ``vm`` ends running.  :class:`LiveSaveUnavailable` (nothing
    stopped): the caller captures paused instead.
    """
    if vm.ram is None:
        raise VMError(f"{vm.name}: a live save needs a RAM file")
    image = RamFile.blank_image(vm.ram.size)
    times: list[float] = []  # when the guest stopped, when it resumed
    vm.state = VMState.PAUSED  # until QEMU has resumed it (a failure leaves it unknown)
    try:
        _split(vm, state_file, image,
               save=lambda fd: times.extend(vm.save_background(fd, at_stop)))
    except BaseException:
        image.release()
        raise
    vm.state = VMState.RUNNING
    return image, times[1] - times[0]


def _split(vm: QemuVM, state_file: Path, image: RamFile,
           save: Callable[[int], object] | None = None) -> None:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    failure: list[BaseException] = []

    def run() -> None:
        with open(read_fd, "rb", buffering=1 << 20) as src:
            try:
                with open(state_file, "wb") as out, \
                        mmap.mmap(image.fd, image.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                    split_stream(src, out, mm)
            except BaseException as exc:
                failure.append(exc)
                # read QEMU's stream to its end all the same: a background snapshot
                # whose writer got EPIPE left QEMU 7.2 hung (QMP unanswered; likely
                # its main loop blocked on a write-protect fault, not proven), and a
                # paused save would wait out its timeout; QEMU writes at most RAM +
                # device state
                with contextlib.suppress(OSError, ValueError):
                    while src.read(1 << 20):
                        pass

    reader = threading.Thread(target=run, name=f"split-{vm.name}", daemon=True)
    reader.start()
    try:
        if save is None:
            vm.save_state_to(write_fd, ignore_shared=True)
        else:
            save(write_fd)
    except BaseException:
        reader.join(30)
        # QEMU failed because the splitter stopped reading: say why (a stream that
        # merely ended is the other way round: QEMU's own error says more)
        if failure and not isinstance(failure[0], StreamEnded):
            raise failure[0] from None
        raise
    reader.join()
    if failure:
        raise failure[0]

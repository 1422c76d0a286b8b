"""The migration steps of a :class:`~forkyard.vm.machine.QemuVM`: saving its state to
a file or pipe, loading one, and the waits QEMU's migration states need.

A part of ``QemuVM`` (which inherits it); it only speaks QMP.
"""

from __future__ import annotations

import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forkyard.errors import VMError
from forkyard.vm.qmp import QMP, QMPCommandError

__all__ = ["LiveSaveUnavailable", "Migration"]


class LiveSaveUnavailable(VMError):
    """QEMU cannot take a background snapshot here (nothing was stopped or saved)."""


class Migration(ABC):
    """State save and load over the VM's QMP; the attributes are the VM's."""

    name: str

    @abstractmethod
    def _require_qmp(self) -> QMP:
        ...

    @abstractmethod
    def _check_alive(self, what: str) -> None:
        ...

    @abstractmethod
    def log_tail(self, lines: int = 20, max_bytes: int = 8192) -> str:
        ...

    def _load_state(self, state: Path | int, owned: list[int], *, timeout: float,
                    resume: bool, ignore_shared: bool) -> None:
        qmp = self._require_qmp()
        self._ignore_shared(ignore_shared)
        fd = owned.pop() if isinstance(state, int) else os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qmp.send_fd(fd, "incoming")
        finally:
            # QEMU has its own copy now; ours would keep a pipe's writer blocked
            # forever if QEMU stopped reading
            os.close(fd)
        qmp.execute("migrate-incoming", {"uri": "fd:incoming"})
        self._wait_migration(timeout, what="loading the VM state")
        # later saves (a checkpoint, an export's savevm) choose for themselves
        self._ignore_shared(False)
        # A state saved from a paused VM loads paused; one saved running resumes
        # by itself (unless -S).  Either way, end in the state the caller asked for.
        deadline = time.monotonic() + timeout
        while True:
            status = qmp.execute("query-status")["status"]
            # "prelaunch": saved from a VM that never ran (an import under -S)
            stopped = status in ("paused", "prelaunch")
            if status == "running" and resume:
                return
            if stopped and not resume:
                return
            if status not in ("inmigrate", "prelaunch", "paused", "restore-vm"):
                raise VMError(f"{self.name}: VM is {status!r} after loading its state")
            if stopped and resume:
                qmp.execute("cont")
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: VM did not resume after loading its state")
            time.sleep(0.005)

    def _wait_migration(self, timeout: float, *, what: str) -> dict[str, Any]:
        qmp = self._require_qmp()
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            info = qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise VMError(
                    f"{self.name}: {what} failed: {info.get('error-desc', status)}",
                    log_tail=self.log_tail(),
                )
            self._check_alive(what)
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: {what} did not finish in {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _ignore_shared(self, on: bool) -> None:
        self._require_qmp().execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": on}]})

    def save_state(self, dest: Path, *, timeout: float = 300.0,
                   ignore_shared: bool = False) -> int:
        """Write RAM + device state to ``dest`` (a migration stream); returns its size.

        With the VM paused this captures the same instant as ``freeze_disk``.
        ``ignore_shared`` leaves out the RAM of a ``share=on`` RAM file (the
        stream then holds device state only: the caller copies the RAM file).
        """
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.save_state_to(fd, timeout=timeout, ignore_shared=ignore_shared)
        return dest.stat().st_size

    def save_state_to(self, fd: int, *, timeout: float = 300.0,
                      ignore_shared: bool = False) -> None:
        """:meth:`save_state` into ``fd`` (a file or a pipe), which this call closes."""
        qmp = self._require_qmp()
        try:
            self._ignore_shared(ignore_shared)
            qmp.send_fd(fd, "outgoing")
        finally:
            os.close(fd)
        qmp.execute("migrate", {"uri": "fd:outgoing"})
        self._wait_migration(timeout, what="saving the VM state")
        self._wait_finalized(timeout)

    def save_background(self, fd: int, at_stop: Callable[[], None], *,
                        timeout: float = 300.0) -> tuple[float, float]:
        """Save RAM + device state of one instant into ``fd``, the guest paused
        only while its device state is saved; returns when it stopped and resumed.

        QEMU's background snapshot (capability ``background-snapshot``): with
        the guest stopped, QEMU saves the device state and write-protects all
        RAM (userfaultfd), then lets the guest run while the RAM is copied; a
        page the guest is about to write is copied first.  So the stream holds
        the memory of the instant of the stop, whatever the guest writes
        meanwhile.  ``at_stop()`` runs in that stop, before QEMU saves
        anything: whatever it freezes (the disk layer) is of the same instant.

        Why not a precopy migration: its final RAM is only as right as QEMU's
        dirty tracking, and QEMU 7.2 under TCG loses writes.  Its fast bitmap
        sync clears dirty bits without resetting the vCPUs' TLB entries, so a
        page written through an entry made writable before the sync is never
        sent again (fixed in QEMU 9.0, commit "physmem: Fix migration dirty
        bitmap coherency with TCG memory access").  A guest program rewriting
        a file page by page (the probe ``tests/integration/test_ram_image.py``
        keeps) found captures mixing pages of different instants.

        ``x-ignore-shared`` is off (RAM is in the stream; the caller splits it
        off).  Raises :class:`LiveSaveUnavailable` before stopping anything if
        QEMU refuses the capability (a host whose kernel gives QEMU's uid no
        userfaultfd: ``vm.unprivileged_userfaultfd``).
        """
        qmp = self._require_qmp()
        try:
            try:
                qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": False},
                    {"capability": "background-snapshot", "state": True}]})
            except QMPCommandError as exc:
                raise LiveSaveUnavailable(f"{self.name}: no background snapshot: "
                                          f"{exc}") from exc
            qmp.send_fd(fd, "outgoing")
        finally:
            os.close(fd)
        started = False
        try:
            stopped_at = time.monotonic()
            qmp.execute("stop")
            at_stop()
            qmp.execute("migrate", {"uri": "fd:outgoing"})
            started = True
            resumed_at: float | None = None
            deadline = time.monotonic() + timeout
            while True:
                seen = time.monotonic()
                # QEMU resumes the guest itself once the RAM is write-protected
                if resumed_at is None and qmp.execute("query-status").get(
                        "status") == "running":
                    resumed_at = seen
                info = qmp.execute("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise VMError(f"{self.name}: saving the VM state live: "
                                  f"{info.get('error-desc', status)}", log_tail=self.log_tail())
                self._check_alive("saving the VM state live")
                if seen > deadline:
                    raise VMError(f"{self.name}: the live state save did not finish "
                                  f"in {timeout:g}s")
                time.sleep(0.002 if resumed_at is None else 0.01)
        except BaseException:
            with contextlib.suppress(Exception):
                if started:
                    qmp.execute("migrate_cancel")
                else:  # QEMU holds the pipe's write end: close it, or its reader waits
                    qmp.execute("closefd", {"fdname": "outgoing"})
            raise
        finally:
            with contextlib.suppress(Exception):
                qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "background-snapshot", "state": False}]})
        return stopped_at, resumed_at if resumed_at is not None else time.monotonic()

    def _wait_finalized(self, timeout: float) -> None:
        """Wait for the run state to leave ``finish-migrate``.

        QEMU reports a migration ``completed`` before its migration thread
        moves the run state on; a ``cont`` in between is refused ("Migration is
        not finalized yet") and leaves every block node inactive, and a write to
        one then aborts QEMU (``bdrv_co_write_req_prepare`` assertion).
        """
        qmp = self._require_qmp()
        deadline = time.monotonic() + timeout
        while qmp.execute("query-status").get("status") == "finish-migrate":
            self._check_alive("finishing the state save")
            if time.monotonic() > deadline:
                raise VMError(f"{self.name}: the state save did not finalize in {timeout:g}s")
            time.sleep(0.005)

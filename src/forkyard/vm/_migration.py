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
from forkyard.vm.qmp import QMP

__all__ = ["Migration"]

# a live save stops the guest once what is left to copy would take this long: the
# pause is then about this, whatever the guest's memory size (QEMU's default: 300)
_DOWNTIME_MS = 20


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

    def save_live(self, fd: int, at_switchover: Callable[[], None], *,
                  timeout: float = 300.0, converge: float = 2.0) -> float:
        """Save RAM + device state into ``fd`` while the VM runs; returns when it stopped.

        A precopy migration: QEMU copies RAM while the guest runs, resending
        what it dirties, and stops the guest only for the last dirty pages and
        the device state (``downtime-limit`` keeps that last set small).  With
        ``pause-before-switchover`` QEMU waits, guest stopped, before that last
        pass: ``at_switchover()`` runs there, so whatever it freezes (the disk
        layer) is of the same instant as the saved RAM.  A guest dirtying
        memory faster than it is copied is stopped ``converge`` seconds after
        the first full pass, and the rest is copied while it is paused.  The VM ends paused
        (``postmigrate``); the caller resumes it.  Returns the monotonic time
        of the last check that saw it running (the pause began after that).
        """
        qmp = self._require_qmp()
        try:
            qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": False},
                {"capability": "pause-before-switchover", "state": True}]})
            qmp.send_fd(fd, "outgoing")
        finally:
            os.close(fd)
        qmp.execute("migrate-set-parameters", {"downtime-limit": _DOWNTIME_MS})
        try:
            qmp.execute("migrate", {"uri": "fd:outgoing"})
            stop_by: float | None = None  # set once every page was sent once
            deadline = time.monotonic() + timeout
            running_at = time.monotonic()
            stopped = False
            while True:
                seen = time.monotonic()
                info = qmp.execute("query-migrate")
                status = info.get("status")
                if status == "pre-switchover":
                    break
                if status in ("failed", "cancelled", "completed"):
                    raise VMError(f"{self.name}: saving the VM state live: "
                                  f"{info.get('error-desc', status)}", log_tail=self.log_tail())
                if not stopped:
                    running_at = seen
                    # the first pass takes what the memory size takes; the passes
                    # after it should converge, or the rest is copied paused
                    if stop_by is None and info.get("ram", {}).get("dirty-sync-count", 0) > 1:
                        stop_by = seen + converge
                    if stop_by is not None and seen > stop_by:
                        qmp.execute("stop")
                        stopped = True
                self._check_alive("saving the VM state live")
                if seen > deadline:
                    raise VMError(f"{self.name}: the live state save did not converge "
                                  f"in {timeout:g}s")
                time.sleep(0.002)
            at_switchover()
            qmp.execute("migrate-continue", {"state": "pre-switchover"})
            self._wait_migration(timeout, what="saving the VM state")
            self._wait_finalized(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                qmp.execute("migrate_cancel")
            raise
        finally:
            with contextlib.suppress(Exception):
                qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "pause-before-switchover", "state": False}]})
        return running_at

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

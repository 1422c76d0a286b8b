"""A sandbox: one QEMU guest, its disk chain, its agent connection."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from forkyard.checkpoint import qcow2
from forkyard.errors import (
    AgentError,
    AgentTimeout,
    ForkyardError,
    GuestError,
    SandboxStateError,
    VMError,
)
from forkyard.guest.client import AgentClient, EntryInfo, ExecResult
from forkyard.tools import qemu_img
from forkyard.vm.machine import QemuVM
from forkyard.wire.lifecycle import SandboxState

if TYPE_CHECKING:
    from forkyard.checkpoint import BootRef, Checkpoint, PartRef
    from forkyard.worker._worker import Worker

__all__ = ["Files", "Sandbox", "SandboxInfo", "SandboxState"]

T = TypeVar("T")
log = logging.getLogger("forkyard.worker")
# A guest sync can wait on a lot of dirty data; past this the checkpoint goes
# ahead with the cache in place rather than stall.
_DROP_CACHE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    id: str
    state: str
    image: str  # base digest
    disk_size: int
    created: str
    memory_mb: int
    cpus: int
    parent_checkpoint: str | None
    last_checkpoint: str | None
    pid: int | None
    error: str | None = None  # why it failed, when known (e.g. a host-side disk fault)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "image": self.image,
            "disk_size": self.disk_size,
            "created": self.created,
            "memory_mb": self.memory_mb,
            "cpus": self.cpus,
            "parent_checkpoint": self.parent_checkpoint,
            "last_checkpoint": self.last_checkpoint,
            "pid": self.pid,
            "error": self.error,
        }


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Files:
    """``sandbox.files``: the guest filesystem through the agent (E2B-style)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def read(self, path: str) -> bytes:
        return self._sb._agent_call(lambda a: a.read_file(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
              append: bool = False) -> int:
        raw = data.encode() if isinstance(data, str) else data
        return self._sb._agent_call(lambda a: a.write_file(path, raw, mode=mode, append=append))

    def list(self, path: str) -> list[EntryInfo]:
        return self._sb._agent_call(lambda a: a.list(path))

    def stat(self, path: str) -> EntryInfo:
        return self._sb._agent_call(lambda a: a.stat(path))

    def exists(self, path: str) -> bool:
        return self._sb._agent_call(lambda a: a.exists(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._sb._agent_call(lambda a: a.remove(path, recursive=recursive))

    def make_dir(self, path: str, *, mode: int = 0o755) -> None:
        self._sb._agent_call(lambda a: a.mkdir(path, mode=mode))


class Sandbox:
    """Handle to one sandbox on this worker.  Methods are thread-safe."""

    def __init__(self, worker: Worker, sandbox_id: str, *, base_digest: str, disk_size: int,
                 memory_mb: int, cpus: int, parent: str | None) -> None:
        self.id = sandbox_id
        self._worker = worker
        self.base_digest = base_digest
        self.disk_size = disk_size  # = the raw base's size
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.parent_checkpoint = parent
        self.last_checkpoint: str | None = None
        self.created = utcnow()
        self._state = SandboxState.STARTING
        self._lock = threading.RLock()  # lifecycle: checkpoint, restore, stop
        self._vm: QemuVM | None = None
        self._agent: AgentClient | None = None
        self._disk_seq = 0
        # manifest parts of the running chain, so a checkpoint never re-hashes old layers
        self._layer_refs: tuple[PartRef, ...] = ()
        self._boot_ref: BootRef | None = None
        self.error: str | None = None
        self.files = Files(self)

    # ------------------------------------------------------------------
    @property
    def state(self) -> SandboxState:
        return self._state

    @property
    def dir(self) -> Path:
        return self._worker.home.sandboxes_dir / self.id

    @property
    def vm(self) -> QemuVM | None:
        return self._vm

    def info(self) -> SandboxInfo:
        vm = self._vm
        return SandboxInfo(
            id=self.id,
            state=self._state.value,
            image=self.base_digest,
            disk_size=self.disk_size,
            created=self.created,
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            parent_checkpoint=self.parent_checkpoint,
            last_checkpoint=self.last_checkpoint,
            pid=vm.pid if vm is not None and vm.alive() else None,
            error=self.error,
        )

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self._state.value}>"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------
    # guest operations
    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = 60.0,
        stdin: bytes | str | None = None,
        background: bool = False,
        check: bool = False,
    ) -> ExecResult:
        """Run a command in the guest; a string runs under ``/bin/sh -c``."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return self._agent_call(
            lambda a: a.exec(cmd, env=env, cwd=cwd, timeout=timeout, stdin=data,
                             background=background, check=check)
        )

    def ping(self, *, timeout: float = 10.0) -> str:
        """The agent's version, proving the guest answers within ``timeout``."""
        return self._agent_call(lambda a: a.ping(timeout=timeout))

    def _agent_call(self, fn: Callable[[AgentClient], T]) -> T:
        agent = self._agent
        if self._state not in (SandboxState.RUNNING, SandboxState.PAUSED) or agent is None:
            raise SandboxStateError(self.id, self._state.value, "talk to")
        try:
            return fn(agent)
        except AgentError:
            # A dead QEMU explains a broken channel better than the channel does.
            vm = self._vm
            if vm is not None and not vm.alive():
                self._mark_failed()
                raise VMError(f"sandbox {self.id}: {vm.fault or 'QEMU exited'}",
                              log_tail=vm.log_tail()) from None
            raise

    # ------------------------------------------------------------------
    # lifecycle (called by Worker)
    def _new_active(self, parent: str | None) -> Path:
        """A new empty top layer recording the digest of what lies below it.

        ``parent`` is None only for the layer that takes over at a checkpoint,
        whose parent (the layer being frozen) has no digest yet; the marker is
        written once it does (``QemuVM.set_parent_marker``).
        """
        self._disk_seq += 1
        path = self.dir / f"disk-{self._disk_seq}.qcow2"
        marker = qcow2.PENDING_MARKER if parent is None else qcow2.parent_marker(parent)
        qemu_img.create(path, self.disk_size, backing=marker,
                        backing_fmt="qcow2" if self._layer_refs else "raw")
        return path

    def _chain_top_digest(self) -> str:
        return self._layer_refs[-1].digest if self._layer_refs else self.base_digest

    def _start(
        self,
        vm: QemuVM,
        *,
        incoming: Path | int | None,
        timeout: float,
        verdict: Callable[[], None] | None = None,
        attach: Callable[[QemuVM], None] | None = None,
    ) -> None:
        """Launch and connect the agent.

        With ``verdict`` the VM is loaded paused and runs only once
        ``verdict()`` returned (downloads verified) and ``attach(vm)`` gave it
        the rest of its disk chain.
        """
        self._vm = vm
        vm.on_fault = self._disk_fault  # confine: host-side disk faults fail the sandbox
        agent = AgentClient(vm.agent_socket, name=self.id)

        def connect_early() -> None:
            agent.open(timeout=timeout)

        try:
            if verdict is None:
                vm.launch(incoming_state=incoming, timeout=timeout, on_started=connect_early)
            else:
                try:
                    vm.launch(incoming_state=incoming, timeout=timeout, run=False,
                              on_started=connect_early)
                except VMError as exc:
                    # a state that fails to load was usually damaged in transit, and
                    # the download's verdict says so more precisely than QEMU
                    try:
                        verdict()
                    except ForkyardError as reason:
                        raise reason from exc
                    raise
                verdict()
                if attach is not None:
                    attach(vm)
                vm.resume()
            agent.connect(timeout=timeout)
        except BaseException:
            agent.close()
            vm.kill()
            self._mark_failed()
            raise
        self._agent = agent
        self._state = SandboxState.RUNNING
        self._save_meta()

    def _disk_fault(self, reason: str) -> None:
        """A guest disk write failed on the host (``QemuVM.on_fault``; QEMU is killed next)."""
        self.error = reason
        log.error("sandbox %s failed: %s", self.id, reason)
        self._mark_failed()

    def _mark_failed(self) -> None:
        if self._state not in (SandboxState.DESTROYED, SandboxState.HIBERNATED):
            self._state = SandboxState.FAILED
            with contextlib.suppress(OSError):
                self._save_meta()

    def _save_meta(self) -> None:
        d = self.dir
        if not d.exists():
            return
        # a unique temp name: two threads may save the same sandbox at once
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".sandbox.json.")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info().to_json(), indent=1))
        os.replace(tmp, d / "sandbox.json")

    # ------------------------------------------------------------------
    def checkpoint(self, *, name: str | None = None, keep_page_cache: bool = False) -> Checkpoint:
        """Capture memory, devices and disk at one instant; the sandbox keeps running.

        The VM is paused only for the capture itself (disk layer freeze and
        state save); hashing and cataloguing happen after it resumes.

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
            new_active = self._new_active(None)
            state_tmp = self.dir / f"state-{self._disk_seq}.tmp"
            t0 = time.monotonic()
            frozen: Path | None = None
            try:
                with agent.quiesced():
                    vm.pause()
                    self._state = SandboxState.PAUSED
                    try:
                        frozen = vm.freeze_disk(new_active)
                        vm.save_state(state_tmp)
                    finally:
                        vm.resume()
                        self._state = SandboxState.RUNNING
            except ForkyardError:
                with contextlib.suppress(OSError):
                    state_tmp.unlink()
                if not vm.alive():
                    self._mark_failed()
                elif frozen is not None:
                    # the disk moved on to a new layer even though the state was
                    # not saved: file the frozen layer so later checkpoints chain
                    self._worker._file_frozen_layer(self, vm, frozen)
                raise
            paused = time.monotonic() - t0
            assert frozen is not None
            cp = self._worker._record_checkpoint(self, vm, frozen, state_tmp, name=name,
                                                 pause_seconds=paused)
            self.last_checkpoint = cp.id
            self._save_meta()
            return cp

    def restore(self, checkpoint: Checkpoint | str) -> None:
        """Revert this sandbox in place to ``checkpoint`` (same id, new VM)."""
        self._worker.restore(self, checkpoint)

    def hibernate(self) -> Checkpoint:
        """Checkpoint, then stop and free the VM; :meth:`Worker.wake` brings it back."""
        with self._lock:
            cp = self.checkpoint(name=f"hibernate-{self.id}")
            self._shutdown()
            self._state = SandboxState.HIBERNATED
            self._discard_disks()
            self._save_meta()
            return cp

    def stop(self) -> None:
        with self._lock:
            self._shutdown()
            if self._state not in (SandboxState.DESTROYED, SandboxState.HIBERNATED):
                self._state = SandboxState.STOPPED
                self._save_meta()

    def destroy(self) -> None:
        """Kill the VM and delete everything local to the sandbox (not its checkpoints)."""
        with self._lock:
            self._shutdown()
            self._state = SandboxState.DESTROYED
            self._worker._forget(self)

    kill = destroy

    def _shutdown(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
        vm, self._vm = self._vm, None
        if vm is not None:
            vm.kill()

    def _discard_disks(self) -> None:
        for p in self.dir.glob("disk-*.qcow2"):
            p.unlink()

    def _require_running(self, op: str) -> tuple[QemuVM, AgentClient]:
        vm, agent = self._vm, self._agent
        if self._state is not SandboxState.RUNNING or vm is None or agent is None:
            raise SandboxStateError(self.id, self._state.value, op)
        if not vm.alive():
            self._mark_failed()
            raise VMError(f"sandbox {self.id}: {vm.fault or 'QEMU exited'}",
                          log_tail=vm.log_tail())
        return vm, agent


def _drop_page_cache(agent: AgentClient, sandbox_id: str) -> None:
    try:
        agent.sync(drop_page_cache=True, timeout=_DROP_CACHE_TIMEOUT)
    except (GuestError, AgentTimeout) as exc:
        # only costs size: the checkpoint is as correct with the cache in it
        log.warning("sandbox %s: page cache not dropped before the checkpoint: %s",
                    sandbox_id, exc)

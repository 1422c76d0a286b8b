"""A sandbox: one QEMU guest, its disk chain, its agent connection, its lifecycle.

Every change of state goes through the sandbox's :class:`Lifecycle` (the one
transition table in ``forkyard.wire.lifecycle``), so an illegal move is a
:class:`SandboxStateError` where it is attempted.  The :class:`Worker` starts
sandboxes through the public methods under "starting" below; a checkpoint's
VM steps are in ``_checkpointing.py`` and end in a :class:`Capture`, which the
worker's :class:`Recorder` turns into a manifest.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from forkyard._fs import atomic_write_bytes
from forkyard.checkpoint import BootRef, Checkpoint, PartRef, qcow2
from forkyard.checkpoint.manifest import utcnow
from forkyard.checkpoint.recorder import Recorder
from forkyard.errors import (
    AgentError,
    SandboxStateError,
    VMError,
)
from forkyard.guest.client import AgentClient, ExecResult
from forkyard.guest.procs import Chunk, ProcInfo
from forkyard.tools import qemu_img
from forkyard.vm.machine import QemuVM
from forkyard.wire.lifecycle import Lifecycle, SandboxState
from forkyard.worker._boot import Chain, boot_vm
from forkyard.worker._checkpointing import SandboxCheckpoints
from forkyard.worker._faults import crash_point
from forkyard.worker._files import Files
from forkyard.worker._record import (
    HIBERNATING_MARK,
    SandboxInfo,
    SandboxSpec,
    write_record,
)

__all__ = ["Chain", "Files", "Sandbox", "SandboxInfo", "SandboxSpec", "SandboxState",
           "utcnow"]

T = TypeVar("T")
S = SandboxState
log = logging.getLogger("forkyard.worker")
# states from which a broken VM makes the sandbox failed; the others keep theirs
# (a failed wake goes back to hibernated, see Sandbox.restarting)
_CAN_FAIL = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPED, S.FAILED})


class Sandbox(SandboxCheckpoints):
    """Handle to one sandbox on this worker.  Methods are thread-safe."""

    def __init__(self, sandbox_id: str, spec: SandboxSpec, *, directory: Path,
                 recorder: Recorder, restore_with: Callable[[Sandbox, Checkpoint | str], None],
                 on_destroy: Callable[[Sandbox], None], state: SandboxState = S.STARTING,
                 last_checkpoint: str | None = None, created: str | None = None) -> None:
        self.id = sandbox_id
        self.spec = spec
        self.last_checkpoint = last_checkpoint
        self.created = created or utcnow()
        self.lifecycle = Lifecycle(sandbox_id, state)
        self.files = Files(self._agent_call)
        self._dir = directory
        self._recorder = recorder
        self._restore_with = restore_with
        self._on_destroy = on_destroy
        self._lock = threading.RLock()  # lifecycle: checkpoint, restore, stop
        self._vm: QemuVM | None = None
        self._agent: AgentClient | None = None
        self._net = None  # the running VM's network namespace (SandboxNetwork)
        self._disk_seq = 0
        # manifest parts of the running chain, so a checkpoint never re-hashes old layers
        self._layers: tuple[PartRef, ...] = ()
        self._boot: BootRef | None = None
        self.error: str | None = None  # why it failed, when known (a host-side disk fault)
        # False: checkpoints save the whole stream (format v2) even from a working RAM file
        self.ram_images = True
        # True: checkpoints copy RAM while the guest runs (vm/ram_capture.py,
        # save_live_with_image), the guest paused only for its device state; turned
        # off by the first checkpoint that finds the host cannot (no userfaultfd)
        self.live_checkpoints = True

    # ------------------------------------------------------------------
    @property
    def state(self) -> SandboxState:
        return self.lifecycle.state

    @property
    def dir(self) -> Path:
        return self._dir

    @property
    def vm(self) -> QemuVM | None:
        return self._vm

    @property
    def base_digest(self) -> str:
        return self.spec.base_digest

    @property
    def disk_size(self) -> int:
        return self.spec.disk_size

    @property
    def memory_mb(self) -> int:
        return self.spec.memory_mb

    @property
    def cpus(self) -> int:
        return self.spec.cpus

    @property
    def parent_checkpoint(self) -> str | None:
        return self.spec.parent

    def info(self) -> SandboxInfo:
        vm = self._vm
        return SandboxInfo(
            id=self.id,
            state=self.state.value,
            image=self.base_digest,
            disk_size=self.disk_size,
            created=self.created,
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            parent_checkpoint=self.parent_checkpoint,
            last_checkpoint=self.last_checkpoint,
            pid=vm.pid if vm is not None and vm.alive() else None,
            error=self.error,
            network=self.network,
        )

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.state.value}>"

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
        user: str | None = None,
    ) -> ExecResult:
        """Run a command in the guest; a string runs under ``/bin/sh -c``."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return self._agent_call(
            lambda a: a.exec(cmd, env=env, cwd=cwd, timeout=timeout, stdin=data,
                             background=background, check=check, user=user)
        )

    @property
    def procs(self) -> GuestProcs:
        """Spawned processes (live output, stdin, terminals): :class:`GuestProcs`."""
        return GuestProcs(self)

    def grow_root_fs(self, *, timeout: float = 300.0) -> int:
        """Grow the guest's root filesystem to fill its disk; its new size in bytes."""
        return self._agent_call(lambda a: a.grow_fs(timeout=timeout))

    def new_identity(self) -> bool:
        """Its own hostname (the sandbox id) and a fresh machine-id where the image has one.

        Returns whether the image had a machine-id to replace.
        """
        machine_id = secrets.token_hex(16)
        return self._agent_call(lambda a: a.set_identity(hostname=self.id,
                                                         machine_id=machine_id))

    def ping(self, *, timeout: float = 10.0) -> str:
        """The agent's version, proving the guest answers within ``timeout``."""
        return self._agent_call(lambda a: a.ping(timeout=timeout))

    def _agent_call(self, fn: Callable[[AgentClient], T]) -> T:
        self.lifecycle.require("talk to", S.RUNNING, S.PAUSED)
        agent = self._agent
        if agent is None:
            raise SandboxStateError(self.id, self.state.value, "talk to")
        try:
            return fn(agent)
        except AgentError:
            # A dead QEMU (or the disk fault it is being killed for) explains a
            # broken channel better than the channel does; the fault is checked
            # first because the kill may still be reaping QEMU.
            vm = self._vm
            if vm is not None and (vm.fault is not None or not vm.alive()):
                if vm.fault is not None:
                    self.error = vm.fault  # the fault thread may not have recorded it yet
                self._mark_failed()
                raise VMError(f"sandbox {self.id}: {vm.fault or 'QEMU exited'}",
                              log_tail=vm.log_tail()) from None
            raise

    # ------------------------------------------------------------------
    # starting (called by Worker)
    def prepare(self, layers: tuple[PartRef, ...], boot: BootRef) -> Path:
        """Record the chain and boot files the VM starts on; returns its new top layer.

        ``layers`` are the manifest parts under the top layer (none for a
        fresh boot): later checkpoints name them without hashing them again.
        """
        self.lifecycle.require("start", S.STARTING, S.WAKING)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._layers = layers
        self._boot = boot
        return self._new_active(self._layers[-1].digest if layers else self.base_digest)

    def start(self, vm: QemuVM, *, incoming: Path | int | None, timeout: float,
              pending_chain: Callable[[], Chain] | None = None) -> None:
        """Launch ``vm`` and connect the agent; the sandbox is then running.

        With ``pending_chain`` the VM is loaded paused with nothing under its
        top layer, and runs only once ``pending_chain()`` returned the verified
        base and layers (downloads done) and they were attached.
        """
        self.lifecycle.require("start", S.STARTING, S.WAKING)
        self._vm = vm
        vm.on_fault = self._disk_fault  # host-side disk faults fail the sandbox
        try:
            agent = boot_vm(vm, self.id, incoming=incoming, timeout=timeout,
                            pending_chain=pending_chain)
        except BaseException:
            self._mark_failed()
            raise
        try:
            self._configure_net(agent, restored=incoming is not None)
        except BaseException:
            agent.close()
            self._mark_failed()
            raise
        if not agent.reseeded:
            # an agent older than the RNG reseed (saved in an old checkpoint's RAM)
            log.warning("sandbox %s: the guest agent did not reseed its RNG", self.id)
        self._agent = agent
        self.lifecycle.move(S.RUNNING, "start")
        self._save_meta()

    @contextlib.contextmanager
    def restarting(self, spec: SandboxSpec) -> Iterator[None]:
        """Hold the sandbox while a new VM on ``spec`` replaces its old one (in place).

        The old VM and its disks go; the body ends in :meth:`start`.  A
        hibernated sandbox is waking meanwhile, and a wake that fails leaves it
        hibernated where it was (its checkpoint is intact); any other restore
        that fails leaves it failed.
        """
        with self._lock:
            waking = self.state is S.HIBERNATED
            self.lifecycle.move(S.WAKING if waking else S.STARTING,
                                "wake" if waking else "restore")
            self._shutdown()
            self._discard_disks()
            before, self.spec = self.spec, spec
            try:
                yield
            except BaseException:
                self._shutdown()
                if self.lifecycle.move_if(frozenset({S.WAKING}), S.HIBERNATED):
                    self.spec = before
                    with contextlib.suppress(OSError):
                        self._save_meta()
                else:
                    self._mark_failed()
                raise

    def abort_start(self) -> None:
        """A start that failed: stop whatever runs; the sandbox is failed."""
        self._shutdown()
        self._mark_failed()

    def _new_active(self, parent: str | None) -> Path:
        """A new empty top layer recording the digest of what lies below it.

        ``parent`` is None only for the layer that takes over at a checkpoint,
        whose parent (the layer being frozen) has no digest yet; the marker is
        written once it does (``QemuVM.set_parent_marker``).
        """
        self._disk_seq += 1
        path = self._dir / f"disk-{self._disk_seq}.qcow2"
        marker = qcow2.PENDING_MARKER if parent is None else qcow2.parent_marker(parent)
        qemu_img.create(path, self.disk_size, backing=marker,
                        backing_fmt="qcow2" if self._layers else "raw")
        return path

    def _disk_fault(self, reason: str) -> None:
        """A guest disk write failed on the host (``QemuVM.on_fault``; QEMU is killed next)."""
        self.error = reason
        log.error("sandbox %s failed: %s", self.id, reason)
        self._mark_failed()

    def _mark_failed(self) -> None:
        if self.lifecycle.move_if(_CAN_FAIL, S.FAILED):
            with contextlib.suppress(OSError):
                self._save_meta()

    def _save_meta(self) -> None:
        write_record(self._dir, self.info())

    # ------------------------------------------------------------------
    def restore(self, checkpoint: Checkpoint | str) -> None:
        """Revert this sandbox in place to ``checkpoint`` (same id, new VM)."""
        self._restore_with(self, checkpoint)

    def hibernate(self) -> Checkpoint:
        """Checkpoint, then stop and free the VM; :meth:`Worker.wake` brings it back."""
        with self._lock:
            cp = self.checkpoint(name=f"hibernate-{self.id}")
            # From here the checkpoint is the sandbox: a worker killed before the
            # record says hibernated finds this mark and keeps it (``_home``).
            mark = self._dir / HIBERNATING_MARK
            atomic_write_bytes(mark, cp.id)
            crash_point("hibernate-recorded")
            self._shutdown()
            # the point is to free memory: a wake builds the image again from its chunks
            self._recorder.drop_image(cp.manifest)
            self.lifecycle.move(S.HIBERNATED, "hibernate")
            self._discard_disks()
            self._save_meta()
            mark.unlink(missing_ok=True)
            return cp

    def stop(self) -> None:
        """Stop the VM; a running sandbox is then stopped (a failed one stays failed)."""
        with self._lock:
            self._shutdown()
            if self.lifecycle.move_if(frozenset({S.RUNNING, S.PAUSED, S.STOPPED}), S.STOPPED):
                self._save_meta()

    def destroy(self) -> None:
        """Kill the VM and delete everything local to the sandbox (not its checkpoints)."""
        with self._lock:
            self._shutdown()
            self.lifecycle.move(S.DESTROYED, "destroy")
            self._on_destroy(self)

    kill = destroy

    def _shutdown(self) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
        vm, self._vm = self._vm, None
        if vm is not None:
            vm.kill()
        net, self._net = self._net, None
        if net is not None:
            net.close()

    def _discard_disks(self) -> None:
        for p in self._dir.glob("disk-*.qcow2"):
            p.unlink()

    def _require_running(self, op: str) -> tuple[QemuVM, AgentClient]:
        self.lifecycle.require(op, S.RUNNING)
        vm, agent = self._vm, self._agent
        if vm is None or agent is None:
            raise SandboxStateError(self.id, self.state.value, op)
        if not vm.alive():
            self._mark_failed()
            raise VMError(f"sandbox {self.id}: {vm.fault or 'QEMU exited'}",
                          log_tail=vm.log_tail())
        return vm, agent


class GuestProcs:
    """:class:`forkyard.guest.procs.Processes` of a sandbox, under its lifecycle checks."""

    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    def spawn(self, cmd: str | Sequence[str] | None, **kw: object) -> int:
        return self._sb._agent_call(lambda a: a.procs.spawn(cmd, **kw))  # type: ignore[arg-type]

    def read(self, pid: int, out_offset: int = 0, err_offset: int = 0, *,
             max_bytes: int = 1024 * 1024, wait: float = 0.0) -> Chunk:
        return self._sb._agent_call(lambda a: a.procs.read(pid, out_offset, err_offset,
                                                           max_bytes=max_bytes, wait=wait))

    def write(self, pid: int, data: bytes, *, eof: bool = False) -> int:
        return self._sb._agent_call(lambda a: a.procs.write(pid, data, eof=eof))

    def list(self) -> list[ProcInfo]:
        return self._sb._agent_call(lambda a: a.procs.list())

    def resize(self, pid: int, rows: int, cols: int) -> None:
        self._sb._agent_call(lambda a: a.procs.resize(pid, rows, cols))

    def kill(self, pid: int, signal: int = 15) -> None:
        self._sb._agent_call(lambda a: a.kill(pid, signal))

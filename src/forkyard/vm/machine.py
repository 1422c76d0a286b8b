"""One QEMU process: its command line, its lifecycle, and the QMP steps of a checkpoint.

The device set is fixed and versioned (``DEVICE_PROFILE``) because a saved VM
state only loads into a QEMU with the same devices at the same addresses;
checkpoints record the profile, the concrete machine type and the memory/CPU
shape, and a restore builds exactly that machine again.

Disks are a chain given entirely on the command line with ``-blockdev``:
``raw base (read-only) <- qcow2 layer ... (read-only) <- qcow2 active``.  The
qcow2 files carry no backing file name in their headers; the chain comes from
these options.  That is what lets the layers be content-addressed objects
used in place, never rewritten to point at a local path (a rewrite would
change their bytes and therefore their digest).
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkyard.errors import VMError
from forkyard.vm import jail
from forkyard.vm.jail import Jail, PlainFiles, VMFiles
from forkyard.vm.qmp import QMP, Event, io_error_reason

__all__ = [
    "DEVICE_PROFILE",
    "BootSpec",
    "DiskChain",
    "QemuVM",
    "VMShape",
    "VMState",
    "kill_all",
    "live_vms",
]

log = logging.getLogger("forkyard.vm")

DEVICE_PROFILE = "forkyard-v1"
_MIGRATION_BANDWIDTH = 64 * 1024**3  # bytes/s: effectively unlimited (default cap is slow)


class VMState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class VMShape:
    """What a saved VM state depends on, besides the disk contents."""

    memory_mb: int
    cpus: int
    machine_type: str
    accel: str
    cpu_model: str = "qemu64"
    devices: str = DEVICE_PROFILE


# init_on_free=1: freed guest pages are zeroed, and QEMU's migration sends zero
# pages as a flag instead of 4 KiB; a checkpoint of an idle 256 MiB guest drops
# from ~96 MB to ~55 MB of state (and forks load correspondingly faster).
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1 tsc=reliable init_on_free=1"


@dataclass(frozen=True, slots=True)
class BootSpec:
    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE


@dataclass(frozen=True, slots=True)
class DiskChain:
    base: Path | None  # raw ext4 image, read-only; None: `active` stands alone
    layers: tuple[Path, ...]  # qcow2, read-only, bottom first
    active: Path  # qcow2, writable

    def blockdev(self, top_name: str, opener: _Opener | None = None) -> dict[str, Any]:
        node: dict[str, Any] | None = None
        if self.base is not None:
            node = {
                "driver": "raw",
                "node-name": "base",
                "read-only": True,
                "file": _file_node(self.base, read_only=True, opener=opener),
            }
        for i, layer in enumerate(self.layers):
            node = {
                "driver": "qcow2",
                "node-name": f"layer{i}",
                "read-only": True,
                "file": _file_node(layer, read_only=True, opener=opener),
                "backing": node,
            }
        top_file = _file_node(self.active, read_only=False, opener=opener)
        return {
            "driver": "qcow2",
            "node-name": top_name,
            "file": {**top_file, "node-name": f"{top_name}-file"},
            "backing": node,  # None: no backing (yet), whatever the header says
        }


# confine: how a confined QEMU names a file it gets as an fd (jail.VMFiles)
_Opener = Callable[[Path, bool], str]  # (path, writable) -> filename for QEMU


def _file_node(path: Path, *, read_only: bool, opener: _Opener | None = None) -> dict[str, Any]:
    name = str(path) if opener is None else opener(path, not read_only)
    node: dict[str, Any] = {"driver": "file", "filename": name}
    if name.startswith("/dev/fdset/"):
        # confine: image locks are per open file description, and the fd set
        # keeps every description QEMU was given alive: locks of a layer that
        # a checkpoint reopened read-only would stay behind and refuse the
        # next activation (``cont``) or a fork.  The worker alone opens these
        # files and never hands a writable one to two VMs.
        node["locking"] = "off"
    if read_only:
        # Many VMs share read-only layers and bases; the write lock is taken by
        # whoever writes, readers need no exclusive lock.
        node["read-only"] = True
    return node


_live: weakref.WeakSet[QemuVM] = weakref.WeakSet()
_live_lock = threading.Lock()


def live_vms() -> list[QemuVM]:
    with _live_lock:
        return [vm for vm in _live if vm.state not in (VMState.STOPPED, VMState.FAILED)]


def kill_all() -> None:
    for vm in live_vms():
        vm.kill()


@dataclass
class QemuVM:
    """A QEMU process; not thread-safe on its own (the sandbox serialises calls)."""

    name: str
    workdir: Path
    agent_socket: Path
    shape: VMShape
    boot: BootSpec
    disk: DiskChain
    state: VMState = VMState.CREATED
    top_node: str = "top0"
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _qmp: QMP | None = field(default=None, repr=False)
    _next_node: int = 1
    # confine: jail QEMU (vm/jail.py); False only to measure what it costs
    confine: bool = True
    # confine: called (from a helper thread) when a guest disk write failed on
    # the host; the VM is killed right after and ``fault`` keeps the reason
    on_fault: Callable[[str], None] | None = field(default=None, repr=False)
    fault: str | None = None
    _files: VMFiles = field(default_factory=PlainFiles, repr=False)
    _jail: Jail | None = field(default=None, repr=False)

    def __hash__(self) -> int:
        return id(self)

    @property
    def log_path(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def console_path(self) -> Path:
        return self.workdir / "console.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # ------------------------------------------------------------------
    def argv(self, *, incoming: bool, qmp_fd: int, paused: bool = False,
             files: VMFiles | None = None) -> list[str]:
        s = self.shape
        f = files or PlainFiles()  # confine: fds instead of paths when jailed

        def opener(path: Path, writable: bool) -> str:
            return f.disk(path, writable=writable)

        accel = "kvm" if s.accel == "kvm" else "tcg,tb-size=256"
        return [
            "qemu-system-x86_64",
            "-name", f"forkyard-{self.name},debug-threads=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", s.machine_type,
            "-accel", accel,
            "-cpu", s.cpu_model,
            "-m", str(s.memory_mb),
            "-smp", str(s.cpus),
            "-kernel", str(self.boot.kernel),
            "-initrd", str(self.boot.initrd),
            "-append", self.boot.cmdline,
            "-chardev", f"socket,id=qmp,fd={qmp_fd}",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"file,id=console,path={f.console(self.console_path)}",
            "-serial", "chardev:console",
            "-blockdev", json.dumps(self.disk.blockdev(self.top_node, opener)),
            "-device", f"virtio-blk-pci,drive={self.top_node},id=disk0,addr=0x4",
            "-device", "virtio-serial-pci,id=vser0,addr=0x5",
            "-chardev", f"socket,id=agent,{f.agent(self.agent_socket)}",
            "-device", "virtserialport,bus=vser0.0,nr=1,chardev=agent,name=agent,id=agentport",
            *(["-incoming", "defer"] if incoming else []),
            *(["-S"] if paused else []),
            *f.args(),
        ]

    def launch(self, *, incoming_state: Path | int | None = None, timeout: float = 60.0,
               run: bool = True, loadvm: str | None = None,
               on_started: Callable[[], None] | None = None) -> None:
        """Start QEMU: boot the kernel, or load ``incoming_state`` and run from there.

        ``incoming_state`` is a file, or a readable fd (e.g. a pipe) whose
        ownership passes to this call.  ``run=False`` leaves the VM paused.
        ``on_started`` runs once QEMU answers QMP, before any state is loaded
        (the agent channel is connected there, see ``AgentClient.open``).
        """
        # an fd we own sits in this list until closed exactly once (by _load_state
        # once QEMU has it, or here on an earlier failure): fd numbers get reused
        owned = [incoming_state] if isinstance(incoming_state, int) else []
        try:
            self._launch(incoming_state, owned, timeout=timeout, run=run, loadvm=loadvm,
                         on_started=on_started)
        finally:
            while owned:
                os.close(owned.pop())

    def _launch(self, incoming_state: Path | int | None, owned: list[int], *, timeout: float,
                run: bool, loadvm: str | None,
                on_started: Callable[[], None] | None) -> None:
        if self.state is not VMState.CREATED:
            raise VMError(f"{self.name}: cannot launch a VM that is {self.state.value}")
        self.state = VMState.STARTING
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.agent_socket.unlink()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._files = files = jail.files_for(self.confine)  # confine: fds, not paths
        try:
            argv = self.argv(incoming=incoming_state is not None, qmp_fd=theirs.fileno(),
                             paused=not run, files=files)
            if loadvm is not None:
                argv += ["-loadvm", loadvm]
            (self.workdir / "qemu.argv.json").write_text(json.dumps(argv, indent=1))
            # confine: uid, namespaces, cgroup, rlimits (vm/jail.py)
            self._proc, self._jail = jail.start(
                argv, files, name=self.name, memory_mb=self.shape.memory_mb,
                cpus=self.shape.cpus, accel=self.shape.accel,
                boot_files=(self.boot.kernel, self.boot.initrd), active=self.disk.active,
                pass_fds=(theirs.fileno(),), log=self.log_path, cwd=self.workdir)
        except BaseException:
            ours.close()
            self.state = VMState.FAILED
            raise
        finally:
            theirs.close()
            files.handed_over()  # confine: QEMU has its copies (or never will)
        with _live_lock:
            _live.add(self)
        try:
            self._qmp = QMP(ours, self.name)
            self._qmp.watch(self._on_event)  # confine: disk faults (issue 9 item 6)
            self._qmp.connect(timeout=timeout)
            self._qmp.execute("migrate-set-parameters",
                              {"max-bandwidth": _MIGRATION_BANDWIDTH})
            if on_started is not None:
                on_started()
            if incoming_state is not None:
                self._load_state(incoming_state, owned, timeout=timeout, resume=run)
            self.state = VMState.RUNNING if run else VMState.PAUSED
        except BaseException as exc:
            self.kill()
            self.state = VMState.FAILED
            if isinstance(exc, VMError):
                raise VMError(str(exc), log_tail=self.log_tail()) from exc
            raise

    def _load_state(self, state: Path | int, owned: list[int], *, timeout: float,
                    resume: bool) -> None:
        qmp = self._require_qmp()
        fd = owned.pop() if isinstance(state, int) else os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qmp.send_fd(fd, "incoming")
        finally:
            # QEMU has its own copy now; ours would keep a pipe's writer blocked
            # forever if QEMU stopped reading
            os.close(fd)
        qmp.execute("migrate-incoming", {"uri": "fd:incoming"})
        self._wait_migration(timeout, what="loading the VM state")
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

    # ------------------------------------------------------------------
    def pause(self) -> None:
        self._require_qmp().execute("stop")
        self.state = VMState.PAUSED

    def resume(self) -> None:
        self._require_qmp().execute("cont")
        self.state = VMState.RUNNING

    def freeze_disk(self, new_active: Path) -> Path:
        """Make the current top layer read-only and continue on ``new_active``.

        Returns the frozen file.  Call with the VM paused: QEMU flushed the
        layer on ``stop``, so its bytes are final from here on.
        """
        qmp = self._require_qmp()
        node = f"top{self._next_node}"
        new_file = _file_node(new_active, read_only=False, opener=self._late_opener(qmp))
        qmp.execute("blockdev-add", {
            "driver": "qcow2",
            "node-name": node,
            "file": {**new_file, "node-name": f"{node}-file"},
            "backing": None,
        })
        qmp.execute("blockdev-snapshot", {"node": self.top_node, "overlay": node})
        frozen = self.disk.active
        self.disk = DiskChain(self.disk.base, (*self.disk.layers, frozen), new_active)
        self.top_node = node
        self._next_node += 1
        return frozen

    def attach_backing(self, base: Path, layers: tuple[Path, ...]) -> None:
        """Put ``base`` and ``layers`` under the top layer of a paused VM.

        For forks whose disk parts were still downloading when QEMU started:
        the VM was loaded with nothing under its (empty) top layer and has not
        run, so no guest read has seen the missing chain.
        """
        if self.state is not VMState.PAUSED or self.disk.base is not None:
            raise VMError(f"{self.name}: can only attach a chain to a paused VM without one")
        qmp = self._require_qmp()
        late = self._late_opener(qmp)
        active = self.disk.active  # already open: only the chain below it is new

        def opener(path: Path, writable: bool) -> str:
            return str(path) if path == active else late(path, writable)

        chain = DiskChain(base, layers, active).blockdev(self.top_node, opener)["backing"]
        qmp.execute("blockdev-add", chain)
        qmp.execute("blockdev-reopen", {"options": [{
            "driver": "qcow2",
            "node-name": self.top_node,
            "file": f"{self.top_node}-file",
            "backing": chain["node-name"],
        }]})
        self.disk = DiskChain(base, layers, self.disk.active)

    def _late_opener(self, qmp: QMP) -> _Opener:
        """confine: files opened after start reach a jailed QEMU as fds over QMP."""
        files = self._files

        def opener(path: Path, writable: bool) -> str:
            return files.late_disk(qmp, path, writable=writable)

        return opener

    def _on_event(self, event: Event) -> None:
        """QMP loop thread: a host-side disk failure fails the VM (not a silent pause)."""
        reason = io_error_reason(event)
        if reason is None or self.fault is not None:
            return
        self.fault = reason
        log.error("%s: %s; stopping the VM", self.name, self.fault)
        threading.Thread(target=self._fail_on_fault, name=f"fault-{self.name}",
                         daemon=True).start()

    def _fail_on_fault(self) -> None:
        self.state = VMState.FAILED
        if self.on_fault is not None and self.fault is not None:
            self.on_fault(self.fault)
        self.kill()

    def _release_jail(self) -> None:
        held, self._jail = self._jail, None
        if held is not None:
            held.release()

    def set_parent_marker(self, marker: str) -> None:
        """Rewrite the active layer's recorded backing name (see checkpoint.qcow2)."""
        self._require_qmp().execute("change-backing-file", {
            "device": self.top_node,
            "image-node-name": self.top_node,
            "backing-file": marker,
        })

    def save_state(self, dest: Path, *, timeout: float = 300.0) -> int:
        """Write RAM + device state to ``dest`` (a migration stream); returns its size.

        With the VM paused this captures the same instant as ``freeze_disk``.
        """
        qmp = self._require_qmp()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            qmp.send_fd(fd, "outgoing")
        finally:
            os.close(fd)
        qmp.execute("migrate", {"uri": "fd:outgoing"})
        self._wait_migration(timeout, what="saving the VM state")
        return dest.stat().st_size

    def hmp(self, command_line: str, *, timeout: float = 300.0) -> str:
        return self._require_qmp().hmp(command_line, timeout=timeout)

    # ------------------------------------------------------------------
    def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit; kill it if it does not."""
        if self._proc is None or self._proc.poll() is not None:
            self._finish()
            return
        with contextlib.suppress(VMError):
            self._require_qmp().execute("quit", timeout=timeout)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._finish()

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._finish()

    def _finish(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._proc is not None and self._proc.poll() is not None:
            self._release_jail()  # confine: the cgroup can go once QEMU is gone
        if self.state is not VMState.FAILED:
            self.state = VMState.STOPPED
        with contextlib.suppress(FileNotFoundError):
            self.agent_socket.unlink()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _check_alive(self, what: str) -> None:
        if not self.alive():
            code = self._proc.returncode if self._proc else None
            raise VMError(f"{self.name}: QEMU exited ({code}) while {what}",
                          log_tail=self.log_tail())

    def _require_qmp(self) -> QMP:
        if self._qmp is None:
            raise VMError(f"{self.name}: QEMU is not running")
        return self._qmp

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self.log_path, self.console_path):
            with contextlib.suppress(OSError):
                text = path.read_bytes()[-8192:].decode("utf-8", "replace")
                tail = "\n".join(text.splitlines()[-lines:])
                if tail:
                    parts.append(f"[{path.name}]\n{tail}")
        return "\n".join(parts)



# Interpreter exit: stop our VMs cleanly (the pdeathsig in _spawn covers crashes).
atexit.register(kill_all)

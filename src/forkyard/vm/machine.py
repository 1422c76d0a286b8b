"""One QEMU process: its lifecycle and the QMP steps of a checkpoint.

What the process is made of lives beside it: the shape and boot files
(``forkyard.vm.shape``), the device profiles (``forkyard.vm.devices``), the disk
chain (``forkyard.vm.disks``) and the command line rendered from them
(``forkyard.vm.cmdline``).  A restore builds exactly the machine its checkpoint
recorded: same profile, machine type and memory/CPU shape.
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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkyard.errors import VMError
from forkyard.vm import jail
from forkyard.vm._migration import Migration
from forkyard.vm.cmdline import qemu_argv
from forkyard.vm.console import ConsoleRing, file_tail, ring_tail
from forkyard.vm.devices import DEVICE_PROFILE
from forkyard.vm.disks import DiskChain, Opener, qcow2_top_node
from forkyard.vm.jail import Jail, PlainFiles, VMFiles
from forkyard.vm.migstream import saved_ignore_shared
from forkyard.vm.qmp import QMP, Event, io_error_reason
from forkyard.vm.ram import RamFile, written_kb
from forkyard.vm.shape import DEFAULT_CMDLINE, BootSpec, VMShape

__all__ = [
    "DEFAULT_CMDLINE",
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

_MIGRATION_BANDWIDTH = 64 * 1024**3  # bytes/s: effectively unlimited (default cap is slow)


class VMState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


_live: weakref.WeakSet[QemuVM] = weakref.WeakSet()
_live_lock = threading.Lock()


def live_vms() -> list[QemuVM]:
    with _live_lock:
        return [vm for vm in _live if vm.state not in (VMState.STOPPED, VMState.FAILED)]


def kill_all() -> None:
    for vm in live_vms():
        vm.kill()


@dataclass
class QemuVM(Migration):
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
    console_cap: int | None = None  # bytes of console kept on disk; None: console.default_cap()
    _console: ConsoleRing | None = field(default=None, repr=False)
    # jail QEMU (vm/jail.py); False only to measure what confinement costs
    confine: bool = True
    # called (from a helper thread) when a guest disk write failed on the host;
    # the VM is killed right after and ``fault`` keeps the reason
    on_fault: Callable[[str], None] | None = field(default=None, repr=False)
    fault: str | None = None
    # the TAP of the sandbox's network (forkyard.net), for a shape with a NIC; the
    # caller owns it, QEMU gets a copy
    tap_fd: int | None = field(default=None, repr=False)
    _files: VMFiles = field(default_factory=PlainFiles, repr=False)
    _jail: Jail | None = field(default=None, repr=False)
    # guest RAM (vm/ram.py): a frozen image this VM maps copy-on-write (one hold of it
    # is the VM's), or None: a working file of its own is made at launch
    ram: RamFile | None = field(default=None, repr=False)
    # returns once ``ram`` is complete and sealed (it may still be filling while QEMU
    # starts: ``RamImages.open``); raises why it cannot be
    ram_ready: Callable[[], None] | None = field(default=None, repr=False)

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
             console_fd: int | None = None, files: VMFiles | None = None) -> list[str]:
        f = files or PlainFiles()  # a jail's files are fds, not paths

        def opener(path: Path, writable: bool) -> str:
            return f.disk(path, writable=writable)

        ram = None if self.ram is None else (self.ram.mem_path, self.ram.share)
        argv = qemu_argv(name=self.name, shape=self.shape, boot=self.boot, disk=self.disk,
                         top_node=self.top_node, qmp_fd=qmp_fd, console_fd=console_fd,
                         agent_socket=self.agent_socket, incoming=incoming, paused=paused,
                         opener=opener, agent_chardev=f.agent(self.agent_socket),
                         tap_fd=self.tap_fd, ram=ram)
        # after the rendering: the jail's -add-fd list grows as the opener is called
        return argv + f.args()

    def launch(self, *, incoming_state: Path | int | None = None, timeout: float = 60.0,
               run: bool = True, loadvm: str | None = None,
               on_started: Callable[[], None] | None = None) -> None:
        """Start QEMU: boot the kernel, or load ``incoming_state`` and run from there.

        ``incoming_state`` is a file, or a readable fd (e.g. a pipe) whose
        ownership passes to this call.  ``run=False`` leaves the VM paused.
        ``on_started`` runs once QEMU answers QMP, before any state is loaded
        (the agent channel is connected there, see ``AgentClient.open``).
        With ``ram`` a frozen image, the state holds device state only (format
        v3: saved with ``x-ignore-shared``) and the image is the guest's RAM.
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
        # a frozen image's device state: saved with x-ignore-shared, or live without it
        ignore_shared = self.ram is not None and not self.ram.share and (
            not isinstance(incoming_state, Path) or saved_ignore_shared(incoming_state))
        if self.ram is None:
            self.ram = RamFile.working(self.shape.memory_mb * 1024 * 1024)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.agent_socket.unlink()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        console = self._console = ConsoleRing(self.console_path, self.console_cap)
        self._files = files = jail.files_for(self.confine)  # fds, not paths, when jailed
        try:
            argv = self.argv(incoming=incoming_state is not None, qmp_fd=theirs.fileno(),
                             paused=not run, console_fd=console.qemu_fd(), files=files)
            if loadvm is not None:
                argv += ["-loadvm", loadvm]
            (self.workdir / "qemu.argv.json").write_text(json.dumps(argv, indent=1))
            # uid, namespaces, cgroup, rlimits (vm/jail.py)
            self._proc, self._jail = jail.start(
                argv, files, name=self.name, memory_mb=self.shape.memory_mb,
                cpus=self.shape.cpus, accel=self.shape.accel,
                boot_files=(self.boot.kernel, self.boot.initrd), active=self.disk.active,
                pass_fds=(theirs.fileno(), console.qemu_fd(), self.ram.fd,
                          *([self.tap_fd] if self.tap_fd is not None else [])),
                log=self.log_path,
                cwd=self.workdir)
        except BaseException:
            ours.close()
            console.close()
            self.state = VMState.FAILED
            raise
        finally:
            theirs.close()
            files.handed_over()  # QEMU has its copies (or never will)
        console.start()
        with _live_lock:
            _live.add(self)
        try:
            self._qmp = QMP(ours, self.name)
            self._qmp.watch(self._on_event)  # host-side disk faults (issue 9 item 6)
            self._qmp.connect(timeout=timeout)
            self._qmp.execute("migrate-set-parameters",
                              {"max-bandwidth": _MIGRATION_BANDWIDTH})
            if on_started is not None:
                on_started()
            if incoming_state is not None:
                self._image_ready()
                self._load_state(incoming_state, owned, timeout=timeout, resume=run,
                                 ignore_shared=ignore_shared)
            self.state = VMState.RUNNING if run else VMState.PAUSED
        except BaseException as exc:
            self.kill()
            self.state = VMState.FAILED
            if isinstance(exc, VMError):
                raise VMError(str(exc), log_tail=self.log_tail()) from exc
            raise

    def _image_ready(self) -> None:
        """Wait for a RAM image still filling, and check QEMU left it untouched meanwhile."""
        if self.ram_ready is None:
            return
        self.ram_ready()
        pid = self.pid
        try:
            written = 0 if pid is None else written_kb(pid)
        except OSError as exc:
            raise VMError(f"{self.name}: cannot check QEMU's guest RAM mapping: {exc}") from exc
        if written:
            # a page written before the image was complete would hide its bytes
            raise VMError(f"{self.name}: QEMU wrote {written} kB of guest RAM before loading "
                          "its state; the RAM image is not what it maps")

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
        qmp.execute("blockdev-add", qcow2_top_node(node, new_active, self._late_opener(qmp)))
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

    def _late_opener(self, qmp: QMP) -> Opener:
        """Files opened after start reach a jailed QEMU as fds over QMP."""
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
        # kill first: by the time anyone sees the sandbox failed its VM is gone, and
        # a callback that meets trouble (a full disk refuses records too) cannot
        # leave a faulted VM paused
        self.state = VMState.FAILED
        self.kill()
        if self.on_fault is not None and self.fault is not None:
            self.on_fault(self.fault)

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
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._proc is not None and self._proc.poll() is not None:
            self._release_jail()  # the cgroup can go once QEMU is gone
            ram, self.ram = self.ram, None
            if ram is not None:
                ram.release()
        elif self._proc is None and self.ram is not None:  # never started
            ram, self.ram = self.ram, None
            ram.release()
        if self.state is not VMState.FAILED:
            self.state = VMState.STOPPED
        with contextlib.suppress(FileNotFoundError):
            self.agent_socket.unlink()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """QEMU's exit status once it exited (negative: the signal), else None."""
        return None if self._proc is None else self._proc.poll()

    def _check_alive(self, what: str) -> None:
        if not self.alive():
            raise VMError(f"{self.name}: QEMU exited ({self.exit_code}) while {what}",
                          log_tail=self.log_tail())

    def _require_qmp(self) -> QMP:
        if self._qmp is None:
            raise VMError(f"{self.name}: QEMU is not running")
        return self._qmp

    def log_tail(self, lines: int = 20, max_bytes: int = 8192) -> str:
        """The last lines of qemu.log and of the console, reading at most ``max_bytes`` of each."""
        parts = []
        for path, raw in ((self.log_path, file_tail(self.log_path, max_bytes)),
                          (self.console_path, ring_tail(self.console_path, max_bytes))):
            text = raw.decode("utf-8", "replace")
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                parts.append(f"[{path.name}]\n{tail}")
        return "\n".join(parts)


# Interpreter exit: stop our VMs cleanly (the pdeathsig in _spawn covers crashes).
atexit.register(kill_all)

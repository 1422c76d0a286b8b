"""Confine one QEMU the way Firecracker's jailer confines its VMM.

A confined QEMU (``QemuVM(confine=True)``, the default):

- runs under QEMU's seccomp filter (:data:`SANDBOX`): no obsolete syscalls, no
  privilege changes, no fork/exec, no scheduler/resource tweaks;
- runs as a uid/gid of its own, never root (``forkyard.vm.vmuser``);
- sees none of the host's files: its root is a private tmpfs (in a new mount
  namespace) holding read-only binds of ``/usr`` and the dynamic loader's
  cache, five harmless ``/dev`` nodes (plus ``/dev/kvm`` for KVM) and the
  kernel and initramfs it boots.  Every other file arrives as an open fd:
  disk layers through fd sets (``-add-fd`` at start, QMP ``add-fd`` for
  parts attached later, opened as ``/dev/fdset/N``), the console log, the
  QMP socket and the agent's listening socket.  So it cannot open another
  sandbox's disks, the blob cache, the store or the worker's keys even if the
  guest takes it over, and the files' own modes do not matter;
- has empty network, IPC and UTS namespaces (no way to the worker's or
  control plane's ports, nor to abstract unix sockets);
- sits in a cgroup capping memory, CPU and threads (``vm/cgroup.py``), with
  rlimits on file size (a disk layer never grows past its disk size plus
  metadata; the state it saves never past its RAM), open files and threads,
  and no core dumps (they would hold guest memory);
- gets an environment of ``PATH`` only: nothing of the worker's (tokens).

The launcher (``vm/_jailer.py``) does the privileged part before exec, since
QEMU 7.2's own ``-runas``/``-chroot`` die under ``-sandbox`` (SIGSYS); it
also re-arms the parent-death signal after dropping privileges (a credential
change clears it), so VMs still die with their worker.

Needs root.  A worker that is not root cannot create namespaces, cgroups or
other uids: it logs one warning and runs QEMU with seccomp, the scrubbed
environment and the fd-only file access, as its own user
(:func:`can_confine`).  ``confine=False`` exists only to measure what
confinement costs (``benchmarks/bench_confine.py``).
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from forkyard.errors import SetupError
from forkyard.vm import vmuser
from forkyard.vm._spawn import ENV, spawn
from forkyard.vm.cgroup import VMCgroup, limits_for

__all__ = ["ENV", "SANDBOX", "Jail", "JailedFiles", "PlainFiles", "VMFiles", "can_confine",
           "files_for", "qcow2_virtual_size", "start"]

log = logging.getLogger("forkyard.vm")

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
JAILER = Path(__file__).with_name("_jailer.py")
JAIL_ROOT = Path("/run/forkyard/jail")  # an empty mount point; each VM mounts its own tmpfs
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_NOFILE = 1024
_warned = threading.Event()


def can_confine() -> bool:
    """Whether this process can jail QEMU (it must be root); warns once if not."""
    if os.geteuid() == 0:
        return True
    if not _warned.is_set():
        _warned.set()
        log.warning("forkyard is not running as root: QEMU runs as this user with seccomp, "
                    "a scrubbed environment and fd-only file access, but without its own "
                    "uid, mount namespace, cgroup or rlimits (docs/security.md)")
    return False


class SendFd(Protocol):
    def add_fd(self, fd: int, fdset_id: int) -> None: ...


class VMFiles(Protocol):
    """How QEMU reaches host files: by path (unconfined) or by fds it is handed."""

    def disk(self, path: Path, *, writable: bool) -> str: ...
    def late_disk(self, qmp: SendFd, path: Path, *, writable: bool) -> str: ...
    def console(self, path: Path) -> str: ...
    def agent(self, path: Path) -> str: ...
    def args(self) -> list[str]: ...
    def handed_over(self) -> None: ...


class PlainFiles:
    """Unconfined QEMU (measurement only): host paths as they are."""

    def disk(self, path: Path, *, writable: bool) -> str:
        return str(path)

    def late_disk(self, qmp: SendFd, path: Path, *, writable: bool) -> str:
        return str(path)

    def console(self, path: Path) -> str:
        return str(path)

    def agent(self, path: Path) -> str:
        return f"path={path},server=on,wait=off"

    def args(self) -> list[str]:
        return []

    def handed_over(self) -> None:
        pass


@dataclass
class JailedFiles:
    """Files as fds: QEMU never needs (or gets) a path to anything of the host's."""

    _next_set: int = 1
    _argv: list[str] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)  # ours until spawn hands them over
    _sockets: list[socket.socket] = field(default_factory=list)

    def _take(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _open_modes(self, path: Path, writable: bool) -> list[int]:
        # A writable layer is reopened read-only when a checkpoint freezes it:
        # QEMU then picks the fd of matching access mode from the same set.
        modes = [os.O_RDWR, os.O_RDONLY] if writable else [os.O_RDONLY]
        return [os.open(path, m | os.O_CLOEXEC) for m in modes]

    def disk(self, path: Path, *, writable: bool) -> str:
        set_id = self._new_set()
        for fd in self._open_modes(path, writable):
            self._argv += ["-add-fd", f"fd={self._take(fd)},set={set_id}"]
        return f"/dev/fdset/{set_id}"

    def late_disk(self, qmp: SendFd, path: Path, *, writable: bool) -> str:
        set_id = self._new_set()
        for fd in self._open_modes(path, writable):
            try:
                qmp.add_fd(fd, set_id)
            finally:
                os.close(fd)  # QEMU holds its own copy now
        return f"/dev/fdset/{set_id}"

    def console(self, path: Path) -> str:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        set_id = self._new_set()
        self._argv += ["-add-fd", f"fd={self._take(fd)},set={set_id}"]
        return f"/dev/fdset/{set_id}"

    def agent(self, path: Path) -> str:
        # the worker binds the socket; QEMU only accepts on it, so it needs no
        # access to the directory holding every sandbox's agent socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        self._sockets.append(sock)
        return f"fd={self._take(sock.fileno())},server=on,wait=off"

    def args(self) -> list[str]:
        return ["-sandbox", SANDBOX, *self._argv]

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(self._fds)

    def handed_over(self) -> None:
        """QEMU has its copies (or failed to start): close ours."""
        for sock in self._sockets:
            self._fds.remove(sock.fileno())
            sock.close()
        self._sockets.clear()
        while self._fds:
            os.close(self._fds.pop())

    def _new_set(self) -> int:
        n = self._next_set
        self._next_set += 1
        return n


class Jail:
    """The uid, cgroup and launcher spec of one confined QEMU; ``release`` after it exited."""

    def __init__(self, name: str, *, memory_mb: int, cpus: int, accel: str,
                 boot_files: tuple[Path, ...], disk_bytes: int) -> None:
        self.name = name
        self.identity = vmuser.lease()
        try:
            self.cgroup = VMCgroup(f"{os.getpid()}-{name}-{self.identity.uid}",
                                   limits_for(memory_mb, cpus, accel))
        except BaseException:
            self.identity.release()
            raise
        self.limits = self.cgroup.limits
        mib = 1024 * 1024
        # a qcow2 layer holds each guest cluster at most once (no internal
        # snapshots while a sandbox runs) plus L1/L2/refcount tables (<1/64);
        # an export's snapshot adds the RAM; a saved state is at most the RAM
        self.max_file_bytes = disk_bytes + disk_bytes // 64 + (memory_mb + 64) * mib
        copied = sum(p.stat().st_size for p in boot_files
                     if not p.stat().st_mode & stat.S_IROTH)
        self._spec: dict[str, object] = {
            "ppid": os.getpid(),
            "uid": self.identity.uid,
            "gid": self.identity.gid,
            "root": str(JAIL_ROOT),
            "tmpfs_kib": 1024 + copied // 1024,
            "devices": [*_DEVICES, *(["/dev/kvm"] if accel == "kvm" else [])],
            "files": [str(p.absolute()) for p in boot_files],  # at the paths argv names
            "cgroups": [str(p) for p in self.cgroup.procs_files],
            "rlimits": {
                "RLIMIT_FSIZE": self.max_file_bytes,
                "RLIMIT_NOFILE": _NOFILE,
                "RLIMIT_NPROC": self.limits.pids,
                "RLIMIT_CORE": 0,
            },
            "env": ENV,
        }

    def command(self, argv: list[str]) -> list[str]:
        """The launcher command line that ends in exec'ing ``argv`` inside the jail."""
        JAIL_ROOT.mkdir(parents=True, exist_ok=True, mode=0o755)
        exe = shutil.which(argv[0], path=ENV["PATH"])
        if exe is None:
            raise SetupError(f"{argv[0]} is not installed (run `forkyard setup`)")
        spec = {**self._spec, "exe": exe}
        return [sys.executable, "-I", "-S", str(JAILER), marshal.dumps(spec).hex(), "--", *argv]

    def release(self) -> None:
        self.cgroup.remove()
        self.identity.release()


def files_for(confine: bool) -> VMFiles:
    return JailedFiles() if confine else PlainFiles()


def start(argv: list[str], files: VMFiles, *, name: str, memory_mb: int, cpus: int, accel: str,
          boot_files: tuple[Path, ...], active: Path, pass_fds: tuple[int, ...], log: Path,
          cwd: Path) -> tuple[subprocess.Popen[bytes], Jail | None]:
    """Spawn QEMU jailed if ``files`` are a jail's (and we can), else as before.

    The caller owns the returned jail and releases it once QEMU exited, and
    calls ``files.handed_over()`` after this returns or raises.
    """
    fds = (*pass_fds, *files.pass_fds) if isinstance(files, JailedFiles) else pass_fds
    if not isinstance(files, JailedFiles) or not can_confine():
        return spawn(argv, pass_fds=fds, log=log, cwd=cwd), None
    jail = Jail(name, memory_mb=memory_mb, cpus=cpus, accel=accel, boot_files=boot_files,
                disk_bytes=qcow2_virtual_size(active))
    try:
        return spawn(jail.command(argv), pass_fds=fds, log=log, cwd=cwd, jailed=True), jail
    except BaseException:
        jail.release()
        raise


def qcow2_virtual_size(path: Path) -> int:
    """The guest-visible size recorded in a qcow2 header (bytes 24..32, big-endian)."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return 0
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return 0
    return int.from_bytes(head[24:32], "big")

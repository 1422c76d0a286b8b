"""QEMU command lines, rendered from a :class:`VMShape` and its device profile.

Two renderings of the same machine: :func:`qemu_argv` is the QEMU forkyard runs
(kernel boot or incoming state, QMP on an inherited fd, disk chain as
``-blockdev``); :func:`standalone_argv` resumes an exported qcow2 with plain
QEMU (``-loadvm``, no kernel: it is in the saved RAM).  Both take their guest
devices from the shape's recorded profile, so a state saved by one loads in
the other.  Host-side backends (chardevs, block nodes) are declared here, one
per role the profile's devices plug into.
"""

from __future__ import annotations

import json
from pathlib import Path

from forkyard.vm.disks import DiskChain, Opener
from forkyard.vm.ram import BACKEND_ID
from forkyard.vm.shape import BootSpec, VMShape

__all__ = ["machine_args", "qemu_argv", "standalone_argv"]


def machine_args(shape: VMShape, *, tb_size: bool = True,
                 ram: tuple[str, bool] | None = None) -> list[str]:
    """Machine type, accelerator, CPU, memory and vCPUs.

    ``ram`` is (mem-path, share) of the file backing guest RAM (``vm.ram``);
    without it QEMU allocates RAM itself (a plain command line).  The backend's
    id is the legacy RAM block name, so either way the same streams load.
    """
    accel = "kvm" if shape.accel == "kvm" else ("tcg,tb-size=256" if tb_size else "tcg")
    backend: list[str] = []
    machine = shape.machine
    if ram is not None:
        path, share = ram
        machine += f",memory-backend={BACKEND_ID}"
        backend = ["-object", f"memory-backend-file,id={BACKEND_ID},size={shape.memory_mb}M,"
                              f"mem-path={path},share={'on' if share else 'off'}"]
    return [
        *backend,
        "-machine", machine,
        "-accel", accel,
        "-cpu", shape.cpu,
        "-m", str(shape.memory_mb),
        "-smp", str(shape.cpus),
    ]


def qemu_argv(*, name: str, shape: VMShape, boot: BootSpec, disk: DiskChain, top_node: str,
              qmp_fd: int, console_fd: int | None, agent_socket: Path, incoming: bool,
              paused: bool = False, opener: Opener | None = None,
              agent_chardev: str | None = None, tap_fd: int | None = None,
              ram: tuple[str, bool] | None = None) -> list[str]:
    """The command line of one forkyard VM (see ``QemuVM.launch``).

    A confined QEMU (``vm.jail``) gets its files as fds: ``opener`` names each
    disk file and ``agent_chardev`` is the agent socket's chardev options; the
    jail's own arguments (seccomp, ``-add-fd``) are appended by the caller.
    """
    agent = agent_chardev or f"path={agent_socket},server=on,wait=off"
    net: list[str] = []
    if "net" in shape.profile.roles():
        # the TAP was opened by the worker in the sandbox's own namespace
        # (forkyard.net); QEMU only ever holds its fd.  Without one (the export
        # helper's QEMU) the card goes to a hub port, which has no saved state:
        # user-mode networking would add a "slirp" section no TAP QEMU can load
        net = ["-netdev", (f"tap,id=net0,fd={tap_fd}" if tap_fd is not None
                           else "hubport,id=net0,hubid=0")]
    return [
        "qemu-system-x86_64",
        "-name", f"forkyard-{name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *machine_args(shape, ram=ram),
        "-kernel", str(boot.kernel),
        "-initrd", str(boot.initrd),
        "-append", boot.cmdline,
        # backends, one per role the profile's devices plug into
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
        # the guest's console is a bounded ring fed through this socket (vm/console.py);
        # without one (an argv only shown, never run) it goes nowhere
        "-chardev", (f"socket,id=console,fd={console_fd}" if console_fd is not None
                     else "null,id=console"),
        "-blockdev", json.dumps(disk.blockdev(top_node, opener)),
        "-chardev", f"socket,id=agent,{agent}",
        *net,
        *shape.profile.args({"console": "console", "disk": top_node, "agent": "agent",
                             "net": "net0"}),
        *(["-incoming", "defer"] if incoming else []),
        *(["-S"] if paused else []),
    ]


def standalone_argv(shape: VMShape, qcow2_path: Path, *, snapshot: str,
                    agent_socket: Path) -> list[str]:
    """Plain QEMU resuming savevm ``snapshot`` of a self-contained ``qcow2_path``."""
    return [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        *machine_args(shape, tb_size=False),
        "-chardev", "stdio,id=console",
        "-drive", f"file={qcow2_path},if=none,id=disk0,format=qcow2",
        "-chardev", f"socket,id=agent,path={agent_socket},server=on,wait=off",
        # user-mode networking has the guest's addresses (10.0.2.15, gateway .2, DNS .3)
        *(["-netdev", "user,id=net0"] if "net" in shape.profile.roles() else []),
        *shape.profile.args({"console": "console", "disk": "disk0", "agent": "agent",
                             "net": "net0"}),
        "-loadvm", snapshot,
    ]

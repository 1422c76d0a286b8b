"""``forkyard setup``: make a host ready to run sandboxes (idempotent).

Installs missing Debian packages, fetches the cloud kernel, compiles the guest
agent, builds the initramfs and picks the accelerator.  The result is recorded
in ``<home>/host/host.json`` with versions and sha256 digests: checkpoints name
the kernel and initramfs they were made with by digest.

Downloads and compiled artefacts are shared by every home on the machine
through a cache directory (``$FORKYARD_CACHE``, default ``~/.cache/forkyard``),
so a cluster of several workers on one machine fetches the kernel once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from forkyard._digest import sha256_bytes, sha256_file
from forkyard._fs import atomic_write_bytes
from forkyard._proc import require_tool
from forkyard.config import Home
from forkyard.errors import SetupError
from forkyard.host.accel import detect_accel
from forkyard.host.agent import build_agent
from forkyard.host.initramfs import build_initramfs
from forkyard.host.kernel import fetch_kernel
from forkyard.tools import apt, mkfs, qemu_system
from forkyard.vm.vmuser import ensure_vm_ids

__all__ = ["PACKAGES", "BootFile", "HostInfo", "cache_dir", "ensure_host", "ensure_userfaultfd",
           "load_host"]

PACKAGES = [
    "qemu-system-x86",
    "qemu-utils",
    "e2fsprogs",
    "busybox-static",
    "zstd",
    "gcc",
    "libc6-dev",
    "mmdebstrap",
    "util-linux",  # setpriv: QEMU dies with its worker (see vm/_spawn.py)
    # sandbox networks (forkyard.net): namespaces, veths, TAPs, and their rules
    "iproute2",
    "nftables",
]

HOST_FORMAT = 1


@dataclass(frozen=True, slots=True)
class BootFile:
    path: Path
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class HostInfo:
    kernel: BootFile
    initrd: BootFile
    kernel_release: str
    agent_digest: str
    qemu_version: str
    machine_type: str  # the concrete versioned type, e.g. pc-q35-7.2
    accel: str  # "kvm" or "tcg"
    e2fsprogs: str

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["format"] = HOST_FORMAT
        for k in ("kernel", "initrd"):
            d[k]["path"] = str(d[k]["path"])
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> HostInfo:
        def boot(v: object) -> BootFile:
            if not isinstance(v, dict):
                raise ValueError("bad boot file record")
            return BootFile(Path(v["path"]), str(v["digest"]), int(v["size"]))

        return cls(
            kernel=boot(d["kernel"]),
            initrd=boot(d["initrd"]),
            kernel_release=str(d["kernel_release"]),
            agent_digest=str(d["agent_digest"]),
            qemu_version=str(d["qemu_version"]),
            machine_type=str(d["machine_type"]),
            accel=str(d["accel"]),
            e2fsprogs=str(d["e2fsprogs"]),
        )


def cache_dir() -> Path:
    env = os.environ.get("FORKYARD_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "forkyard"
    base.mkdir(parents=True, exist_ok=True)
    return base


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_host(home: Home) -> HostInfo | None:
    """The recorded host info, if set-up ran and its files are still intact."""
    record = home.host_dir / "host.json"
    if not record.exists():
        return None
    try:
        data = json.loads(record.read_text())
        if data.get("format") != HOST_FORMAT:
            return None
        info = HostInfo.from_json(data)
    except (ValueError, KeyError, TypeError):
        return None
    for f in (info.kernel, info.initrd):
        if not f.path.exists() or f.path.stat().st_size != f.size:
            return None
    return info


def ensure_host(
    home: Home, *, install: bool = True, log: Callable[[str], None] | None = None
) -> HostInfo:
    """Set the host up for ``home`` unless it already is; returns what is in use."""
    say = log or (lambda _msg: None)
    home.ensure()
    ensure_userfaultfd(say)
    with _locked(home.host_dir / ".setup.lock"):
        info = load_host(home)
        if info is not None and _current(info):
            return info
        if install:
            apt.ensure_installed(PACKAGES, log=say)
        ensure_vm_ids()  # confinement: the uid range confined QEMUs run as is nobody's
        for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs", "gcc", "ip",
                     "nft"):
            require_tool(tool)
        shared = cache_dir()
        with _locked(shared / ".kernel.lock"):
            say("fetching the guest kernel")
            kernel = fetch_kernel(shared)
            say("compiling the guest agent")
            agent = build_agent(shared)
        say("building the initramfs")
        busybox = Path("/bin/busybox")
        if not busybox.exists():
            raise SetupError("/bin/busybox missing (package busybox-static)")
        initrd_bytes = build_initramfs(busybox, kernel.modules_dir, agent)
        host = home.host_dir
        kernel_dst = _install_file(kernel.vmlinuz.read_bytes(), host, "vmlinuz")
        initrd_dst = _install_file(initrd_bytes, host, "initramfs")
        qemu_version = qemu_system.version()
        kernel_file = BootFile(kernel_dst, sha256_file(kernel_dst), kernel_dst.stat().st_size)
        say("checking the accelerator")
        accel = detect_accel(shared, kernel_dst, qemu_version, kernel_file.digest)
        info = HostInfo(
            kernel=kernel_file,
            initrd=BootFile(initrd_dst, sha256_bytes(initrd_bytes), len(initrd_bytes)),
            kernel_release=kernel.release,
            agent_digest=sha256_file(agent),
            qemu_version=qemu_version,
            machine_type=qemu_system.machine_alias("q35"),
            accel=accel,
            e2fsprogs=mkfs.e2fsprogs_version(),
        )
        atomic_write_bytes(host / "host.json", json.dumps(info.to_json(), indent=2,
                                                          sort_keys=True), mode=0o644)
        return info


_UFFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
_UFFD_CONF = Path("/etc/sysctl.d/60-forkyard-userfaultfd.conf")


def ensure_userfaultfd(say: Callable[[str], None], *, proc: Path = _UFFD_SYSCTL,
                       conf: Path = _UFFD_CONF) -> bool:
    """Let confined QEMUs create a userfaultfd: live checkpoints need one.

    A live checkpoint is QEMU's background snapshot, which write-protects
    guest RAM with userfaultfd (``vm/_migration.py``).  QEMU 7.2 asks the
    kernel without ``UFFD_USER_MODE_ONLY``, which an unprivileged uid (a
    confined QEMU) may do only with ``vm.unprivileged_userfaultfd = 1``.  Set
    here, and in ``conf`` for reboots, unless ``conf`` says ``= 0``: that is the
    operator's no, kept (``docs/security.md`` says what the setting costs).
    Without it checkpoints pause the guest for the RAM copy.  Returns whether
    it is on.
    """
    with contextlib.suppress(OSError):
        if re.search(r"^\s*vm\.unprivileged_userfaultfd\s*=\s*0\s*$", conf.read_text(),
                     re.MULTILINE):
            say(f"{conf} keeps userfaultfd root-only: checkpoints will pause the guest")
            return False
    try:
        if proc.read_text().strip() != "1":
            proc.write_text("1\n")
            say("allowed userfaultfd to unprivileged processes (live checkpoints)")
    except OSError as exc:
        say(f"userfaultfd stays root-only ({exc}): checkpoints will pause the guest")
        return False
    if not conf.exists():
        try:
            conf.write_text("# forkyard: confined QEMUs write-protect guest RAM for live "
                            "checkpoints (docs/security.md).\n# Set to 0 to keep "
                            "userfaultfd root-only: forkyard setup leaves 0 alone.\n"
                            "vm.unprivileged_userfaultfd = 1\n")
        except OSError as exc:
            say(f"{conf}: {exc} (the setting lasts until the next boot)")
    return True


def _current(info: HostInfo) -> bool:
    """Cheap check that nothing the record depends on changed under it."""
    try:
        return info.qemu_version == qemu_system.version() and info.agent_digest == _agent_digest()
    except SetupError:
        return False


def _agent_digest() -> str:
    return sha256_file(build_agent(cache_dir()))


def _install_file(data: bytes, directory: Path, stem: str) -> Path:
    """Store boot files under their digest so a running VM's file never changes."""
    digest = sha256_bytes(data)
    dst = directory / f"{stem}-{digest[:16]}"
    if not dst.exists() or sha256_file(dst) != digest:
        atomic_write_bytes(dst, data, mode=0o444)
    return dst

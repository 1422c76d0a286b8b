"""The guest kernel: Debian's cloud kernel package, fetched with apt-get download.

Nothing is installed on the host; the .deb is unpacked with ``dpkg-deb -x``
and only ``vmlinuz`` and the modules the initramfs needs are kept.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from forkyard._fs import commit_dir
from forkyard._proc import run
from forkyard.errors import SetupError
from forkyard.host.initramfs import MODULES
from forkyard.tools import apt

__all__ = ["KERNEL_METAPACKAGE", "KernelFiles", "fetch_kernel"]

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True, slots=True)
class KernelFiles:
    package: str
    release: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    modules_dir: Path  # holds <module>.ko for every name in MODULES


def fetch_kernel(cache_dir: Path) -> KernelFiles:
    """Download (once per cache dir) and unpack the current cloud kernel."""
    package = apt.resolve_depends(KERNEL_METAPACKAGE)
    release = package.removeprefix("linux-image-")
    dest = cache_dir / "kernels" / release
    files = _files(package, release, dest)
    if files.vmlinuz.exists() and all(
        (files.modules_dir / f"{m}.ko").exists() for m in MODULES
    ):
        return files
    debs = cache_dir / "debs"
    deb = next(iter(sorted(debs.glob(f"{package}_*.deb"))), None) or apt.download(package, debs)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        root = Path(tmp) / "x"
        run(["dpkg-deb", "-x", deb, root], timeout=300)
        staged = Path(tmp) / "out"
        (staged / "modules").mkdir(parents=True)
        vmlinuz = root / "boot" / f"vmlinuz-{release}"
        if not vmlinuz.exists():
            raise SetupError(f"{deb.name} has no boot/vmlinuz-{release}")
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        moddir = root / "lib" / "modules" / release
        for name in MODULES:
            found = sorted(moddir.rglob(f"{name}.ko"))
            if not found:
                raise SetupError(f"{deb.name} has no module {name}.ko (compressed modules?)")
            shutil.copyfile(found[0], staged / "modules" / f"{name}.ko")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        # the files' presence is what says "fetched": never publish empty ones
        commit_dir(staged, dest)
    return files


def _files(package: str, release: str, dest: Path) -> KernelFiles:
    return KernelFiles(package, release, dest / "vmlinuz", dest / "modules")

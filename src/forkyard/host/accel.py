"""Choose the accelerator: KVM when it really runs a guest, else TCG.

``/dev/kvm`` existing is not enough: on nested hosts KVM can create a VM that
then spins forever.  So we boot the guest kernel without a root disk under
KVM: a working KVM reaches the "no root" panic and exits within a second or
two; anything else is TCG.  The answer is cached per host kernel, QEMU and
guest kernel; ``FORKYARD_ACCEL=tcg|kvm`` overrides it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from forkyard._proc import run
from forkyard.errors import SetupError, ToolError

__all__ = ["detect_accel"]

_PROBE_TIMEOUT = 8.0


def detect_accel(cache_dir: Path, vmlinuz: Path, qemu_version: str, kernel_digest: str) -> str:
    forced = os.environ.get("FORKYARD_ACCEL")
    if forced:
        if forced not in ("tcg", "kvm"):
            raise SetupError(f"FORKYARD_ACCEL must be tcg or kvm, not {forced!r}")
        return forced
    key = f"{platform.release()}|{qemu_version}|{kernel_digest}"
    cache = cache_dir / "accel.json"
    known: dict[str, str] = {}
    if cache.exists():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    if key in known:
        return known[key]
    accel = "kvm" if _kvm_boots(vmlinuz) else "tcg"
    known[key] = accel
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=1))
    tmp.replace(cache)
    return accel


def _kvm_boots(vmlinuz: Path) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-machine", "q35",
        "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", "stdio", "-kernel", str(vmlinuz),
        "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]
    try:
        done = run(argv, timeout=_PROBE_TIMEOUT, check=False, what="kvm probe")
    except ToolError:
        return False
    return b"Kernel panic" in done.stdout or b"VFS:" in done.stdout

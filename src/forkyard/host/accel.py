"""Choose the accelerator: KVM when it really runs a guest, else TCG.

``/dev/kvm`` existing is not enough: on nested hosts KVM can create a VM that
then spins forever.  So we boot the guest kernel without a root disk under
KVM: a working KVM reaches the "no root" panic and exits within a second or
two; anything else is TCG.  The answer is cached per host kernel, QEMU and
guest kernel; ``FORKYARD_ACCEL=tcg|kvm`` overrides it.  The probe itself is
``forkyard.tools.qemu_system.kvm_boots``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from forkyard._fs import atomic_write_bytes
from forkyard.errors import SetupError
from forkyard.tools import qemu_system

__all__ = ["detect_accel"]


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
    accel = "kvm" if qemu_system.kvm_boots(vmlinuz) else "tcg"
    known[key] = accel
    atomic_write_bytes(cache, json.dumps(known, indent=1), mode=0o644)
    return accel

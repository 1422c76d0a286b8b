"""qemu-system-x86_64 probed: its version, its machine types, whether KVM runs a guest.

The one place forkyard asks the installed QEMU what it is; setup records the
answers (``HostInfo``) and the worker checks checkpoints against them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from forkyard._fs import atomic_write_bytes
from forkyard._proc import run
from forkyard.errors import SetupError, ToolError

__all__ = ["QEMU", "kvm_boots", "machine_alias", "machine_types", "parse_machine_types",
           "supported_machines", "version"]

QEMU = "qemu-system-x86_64"
_KVM_PROBE_TIMEOUT = 8.0


def version() -> str:
    """The installed QEMU's version, e.g. ``7.2.22``."""
    out = run([QEMU, "--version"], timeout=30).text
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    if not m:
        raise SetupError(f"cannot read the QEMU version from {out!r}")
    return m.group(1)


def _machine_help() -> str:
    return run([QEMU, "-machine", "help"], timeout=30).text


def parse_machine_types(help_text: str) -> set[str]:
    """Machine type names in ``-machine help`` output (its first line is a header)."""
    return {line.split()[0] for line in help_text.splitlines()[1:] if line.strip()}


def machine_types() -> set[str]:
    return parse_machine_types(_machine_help())


def machine_alias(alias: str = "q35") -> str:
    """The concrete machine type an alias stands for: saved state names it exactly."""
    m = re.search(rf"^{re.escape(alias)}\s.*\(alias of (\S+)\)", _machine_help(), re.MULTILINE)
    if not m:
        raise SetupError(f"this QEMU has no {alias} machine type")
    return m.group(1)


def supported_machines(cache: Path, qemu_version: str) -> set[str]:
    """:func:`machine_types`, cached in ``cache`` for as long as QEMU's version holds."""
    try:
        data = json.loads(cache.read_text())
        if data.get("qemu") == qemu_version and isinstance(data.get("machines"), list):
            return {str(m) for m in data["machines"]}
    except (OSError, ValueError, AttributeError):
        pass  # no cache, or a damaged one: ask QEMU again
    names = machine_types()
    atomic_write_bytes(cache, json.dumps({"qemu": qemu_version, "machines": sorted(names)}),
                       mode=0o644)
    return names


def kvm_boots(vmlinuz: Path) -> bool:
    """Whether KVM really runs ``vmlinuz`` here (``/dev/kvm`` existing is not enough).

    The kernel boots without a root disk: a working KVM reaches the "no root"
    panic and exits within a second or two; a nested host's KVM that creates a
    VM and then spins forever times out.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        QEMU, "-accel", "kvm", "-cpu", "host", "-machine", "q35",
        "-m", "128", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", "stdio", "-kernel", str(vmlinuz),
        "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent",
    ]
    try:
        done = run(argv, timeout=_KVM_PROBE_TIMEOUT, check=False, what="kvm probe")
    except ToolError:
        return False
    return b"Kernel panic" in done.stdout or b"VFS:" in done.stdout

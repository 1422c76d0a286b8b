"""A cgroup per confined QEMU: memory, CPU and thread caps, removed when the VM exits.

cgroup v2 where the host mounts it with the controllers (``/sys/fs/cgroup``
is then cgroup2), else the v1 hierarchies ``memory``, ``cpu`` and ``pids``
(what these machines have).  The worker creates the group and writes its
limits; the jail launcher joins it before exec, so QEMU never runs a single
instruction outside it.

Limits (see :func:`limits_for`):

- memory: guest RAM plus a stated overhead for QEMU itself (TCG's
  translation buffer is sized with ``tb-size``, device emulation and page
  cache for its disk I/O); swap is not a way around it (memsw / swap.max);
- CPU: its vCPUs, plus a quarter CPU for QEMU's main loop and I/O threads;
- pids (threads, since QEMU cannot fork under seccomp): vCPUs plus QEMU's
  block thread pool (at most 64) and helpers.

Groups left by a worker that died (its QEMUs died with it) are swept the
next time a group is created on the machine.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from forkyard.errors import VMError

__all__ = ["CgroupLimits", "VMCgroup", "limits_for", "sweep_orphans"]

_ROOT = Path("/sys/fs/cgroup")
_GROUP = "forkyard"
_PERIOD_US = 100_000
_STALE_AFTER = 120.0  # s: an empty group this old is not one being set up
TCG_OVERHEAD_MB = 256 + 192  # the tb-size=256 translation buffer + QEMU itself
KVM_OVERHEAD_MB = 192


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    memory_bytes: int
    cpu_quota_us: int  # per _PERIOD_US
    pids: int


def limits_for(memory_mb: int, cpus: int, accel: str) -> CgroupLimits:
    overhead = KVM_OVERHEAD_MB if accel == "kvm" else TCG_OVERHEAD_MB
    return CgroupLimits(
        memory_bytes=(memory_mb + overhead) * 1024 * 1024,
        cpu_quota_us=cpus * _PERIOD_US + _PERIOD_US // 4,
        pids=cpus + 96,
    )


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise VMError(f"cannot set {path} to {value!r}: {exc}") from exc


def _is_v2(root: Path) -> bool:
    try:
        return "memory" in (root / "cgroup.controllers").read_text().split()
    except OSError:
        return False


class VMCgroup:
    """The group(s) of one VM; ``procs_files`` are what the launcher writes its pid to."""

    def __init__(self, name: str, limits: CgroupLimits, *, root: Path = _ROOT) -> None:
        self.limits = limits
        self._dirs: list[Path] = []
        self.procs_files: list[Path] = []
        v2 = _is_v2(root)
        try:
            if v2:
                self._make_v2(root, name, limits)
            else:
                self._make_v1(root, name, limits)
        except BaseException:
            self.remove()
            raise

    def _make_v2(self, root: Path, name: str, lim: CgroupLimits) -> None:
        parent = root / _GROUP
        parent.mkdir(exist_ok=True)
        # controllers must be enabled on the way down for the leaf to get them
        for d in (root, parent):
            _write(d / "cgroup.subtree_control", "+memory +cpu +pids")
        _sweep(parent)
        d = parent / name
        d.mkdir()
        self._dirs.append(d)
        _write(d / "memory.max", str(lim.memory_bytes))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to cap
            (d / "memory.swap.max").write_text("0")
        _write(d / "cpu.max", f"{lim.cpu_quota_us} {_PERIOD_US}")
        _write(d / "pids.max", str(lim.pids))
        self.procs_files.append(d / "cgroup.procs")

    def _make_v1(self, root: Path, name: str, lim: CgroupLimits) -> None:
        settings = {
            "memory": [("memory.limit_in_bytes", str(lim.memory_bytes)),
                       ("memory.memsw.limit_in_bytes", str(lim.memory_bytes))],
            "cpu": [("cpu.cfs_period_us", str(_PERIOD_US)),
                    ("cpu.cfs_quota_us", str(lim.cpu_quota_us))],
            "pids": [("pids.max", str(lim.pids))],
        }
        for controller, values in settings.items():
            hierarchy = root / controller
            if not hierarchy.is_dir():
                raise VMError(f"no cgroup {controller} controller at {hierarchy} (v1) "
                              f"and no cgroup v2 at {root}")
            parent = hierarchy / _GROUP
            parent.mkdir(exist_ok=True)
            _sweep(parent)
            d = parent / name
            d.mkdir()
            self._dirs.append(d)
            for fname, value in values:
                if fname == "memory.memsw.limit_in_bytes" and not (d / fname).exists():
                    continue  # kernel without swap accounting
                _write(d / fname, value)
            self.procs_files.append(d / "cgroup.procs")

    @property
    def dirs(self) -> list[Path]:
        return list(self._dirs)

    def remove(self) -> None:
        """Delete the group(s); call after the VM exited (a populated group stays)."""
        for d in self._dirs:
            for _ in range(50):  # the kernel empties a group just after the last exit
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self._dirs = [d for d in self._dirs if d.exists()]


def _sweep(parent: Path) -> None:
    now = time.time()
    with contextlib.suppress(OSError):
        for d in parent.iterdir():
            with contextlib.suppress(OSError):
                if d.is_dir() and now - d.stat().st_mtime > _STALE_AFTER:
                    os.rmdir(d)  # fails (EBUSY) while a process is in it


def sweep_orphans(root: Path = _ROOT) -> int:
    """Remove the empty groups of VMs whose owning process is gone (a crashed worker's);
    how many.  A group's name starts with its owner's pid (``jail.Jail``)."""
    removed = 0
    parents = [root / _GROUP] if _is_v2(root) else \
        [root / c / _GROUP for c in ("memory", "cpu", "pids")]
    for parent in parents:
        with contextlib.suppress(OSError):
            for d in parent.iterdir():
                owner = d.name.split("-", 1)[0]
                if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                    continue
                with contextlib.suppress(OSError):
                    os.rmdir(d)  # fails (EBUSY) while a process is still in it
                    removed += 1
    return removed

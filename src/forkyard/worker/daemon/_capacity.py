"""Admission on the worker: VM slots, guest memory and vCPUs a boot must hold to start.

Every VM costs its guest RAM plus :data:`VM_OVERHEAD_MB` against the
worker's memory budget and its vCPUs against the vCPU budget; a boot that
does not fit is refused with :class:`~forkyard.errors.InsufficientCapacity`
*before* anything is started.  What a boot holds is reserved for as long as
it is in flight, so concurrent boots cannot together overshoot.  The control
plane places with the same numbers (:meth:`Capacity.report`); this check is
the one that holds even when its view is stale.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from forkyard.errors import InsufficientCapacity
from forkyard.vm.cgroup import KVM_OVERHEAD_MB, TCG_OVERHEAD_MB
from forkyard.wire.lifecycle import BUSY
from forkyard.wire.worker_models import WorkerCapacity
from forkyard.worker import Worker

__all__ = ["CPU_OVERCOMMIT", "HOST_RESERVE_MB", "VM_OVERHEAD_MB", "Budget", "Capacity",
           "free_memory_mb", "host_budget"]

# Host memory a VM costs beyond its guest RAM, by accelerator: QEMU's own heap
# and device models (~150-200 MB RSS measured here), plus under TCG the
# translated-code buffer (tb-size 256 MiB).  The same figures cap each QEMU's
# cgroup (vm/cgroup.py on the confinement branch): admission and the cap agree.
# the same overhead the VM's cgroup allows it (vm/cgroup.py): what admission counts is
# what the jail lets it use
VM_OVERHEAD_MB: dict[str, int] = {"tcg": TCG_OVERHEAD_MB, "kvm": KVM_OVERHEAD_MB}
# left to the host (worker daemon, page cache for the blob cache) by default
HOST_RESERVE_MB = 1024
# vCPUs per host core the default budget allows: guests mostly idle (sandboxes
# wait on their callers), so a strict 1:1 would waste the host
CPU_OVERCOMMIT = 16


def free_memory_mb() -> int:
    return _meminfo("MemAvailable:")


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True, slots=True)
class Budget:
    """What this worker gives guests in all (``memory_mb`` counts each VM's overhead)."""

    memory_mb: int
    cpus: int
    max_vm_cpus: int  # one VM wider than the host gains nothing and starves the rest


def host_budget(memory_mb: int | None = None, cpus: int | None = None) -> Budget:
    """The host's memory less :data:`HOST_RESERVE_MB`, its cores x :data:`CPU_OVERCOMMIT`;
    either may be set explicitly (a worker sharing its host with others)."""
    cores = os.cpu_count() or 1
    mem = memory_mb if memory_mb is not None else max(_meminfo("MemTotal:") - HOST_RESERVE_MB, 0)
    return Budget(memory_mb=mem, cpus=cpus if cpus is not None else cores * CPU_OVERCOMMIT,
                  max_vm_cpus=min(cores, cpus) if cpus is not None else cores)


@dataclass(frozen=True, slots=True)
class _Hold:
    sandbox_id: str | None
    memory_mb: int
    cpus: int


class Capacity:
    """VM slots (``limit``), guest memory and vCPUs (``budget``) of running and booting VMs."""

    def __init__(self, worker: Worker, limit: int, *, on_release: Callable[[], None],
                 budget: Budget | None = None) -> None:
        self.worker = worker
        self.limit = limit
        self.budget = budget or host_budget()
        self.overhead_mb = VM_OVERHEAD_MB.get(worker.host.accel, VM_OVERHEAD_MB["tcg"])
        self._on_release = on_release
        self._lock = threading.Lock()
        self._holds: dict[int, _Hold] = {}  # boots still in flight
        self._ids = itertools.count()

    def drain(self) -> None:
        """Take no more boots (shutting down); reports show the worker as full."""
        with self._lock:
            self.limit = 0

    def running(self) -> int:
        return sum(1 for sb in self.worker.list() if sb.state in BUSY)

    def cost_mb(self, memory_mb: int) -> int:
        return memory_mb + self.overhead_mb

    def _used(self) -> tuple[int, int, int]:
        """(VMs, MiB, vCPUs) held by running sandboxes and boots in flight."""
        booting = {h.sandbox_id for h in self._holds.values() if h.sandbox_id is not None}
        vms = mem = cpus = 0
        for sb in self.worker.list():
            if sb.state in BUSY and sb.id not in booting:  # a booting one is in its hold
                vms, mem, cpus = vms + 1, mem + self.cost_mb(sb.memory_mb), cpus + sb.cpus
        for h in self._holds.values():
            vms, mem, cpus = vms + 1, mem + self.cost_mb(h.memory_mb), cpus + h.cpus
        return vms, mem, cpus

    def report(self) -> WorkerCapacity:
        settings = self.worker.home.settings()
        with self._lock:
            _, mem, cpus = self._used()
        return WorkerCapacity(
            memory_mb=self.budget.memory_mb, memory_used_mb=mem, cpus=self.budget.cpus,
            cpus_used=cpus, max_vm_cpus=self.budget.max_vm_cpus, vm_overhead_mb=self.overhead_mb,
            default_memory_mb=settings.memory_mb, default_cpus=settings.cpus)

    def _refuse(self, memory_mb: int, cpus: int, vms: int, mem: int, used_cpus: int) -> None:
        name = self.worker.name
        if vms >= self.limit:
            raise InsufficientCapacity(
                f"worker {name} is full ({self.limit} sandboxes)", worker=name,
                resource="sandboxes", limit=self.limit, needed=1, free=0)
        if cpus > self.budget.max_vm_cpus:
            raise InsufficientCapacity(
                f"worker {name} runs sandboxes of at most {self.budget.max_vm_cpus} vCPUs, "
                f"not {cpus}", worker=name, resource="cpus", limit=self.budget.max_vm_cpus,
                needed=cpus, free=max(self.budget.cpus - used_cpus, 0))
        need = self.cost_mb(memory_mb)
        free = max(self.budget.memory_mb - mem, 0)
        if need > free:
            raise InsufficientCapacity(
                f"worker {name} is short of memory: {free} MiB free for guests, a {memory_mb} "
                f"MiB sandbox needs {need} MiB (guest RAM + {self.overhead_mb} MiB per VM)",
                worker=name, resource="memory", limit=self.budget.memory_mb, needed=need, free=free)
        free_cpus = max(self.budget.cpus - used_cpus, 0)
        if cpus > free_cpus:
            raise InsufficientCapacity(
                f"worker {name} is short of cpus: {free_cpus} vCPUs free, the sandbox needs "
                f"{cpus}",
                worker=name, resource="cpus", limit=self.budget.cpus, needed=cpus,
                free=free_cpus)

    @contextlib.contextmanager
    def slot(self, *, memory_mb: int, cpus: int,
             sandbox_id: str | None = None) -> Iterator[None]:
        """Hold one VM's slot, memory and vCPUs for a boot, or refuse (InsufficientCapacity)
        before anything starts."""
        with self._lock:
            vms, mem, used_cpus = self._used()
            self._refuse(memory_mb, cpus, vms, mem, used_cpus)
            key = next(self._ids)
            self._holds[key] = _Hold(sandbox_id, memory_mb, cpus)
        try:
            yield
        finally:
            with self._lock:
                del self._holds[key]
            self._on_release()

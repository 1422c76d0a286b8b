"""Which worker runs a new sandbox, fork or wake (docs/api.md, "Placement").

Pure functions over a snapshot of the workers, so the rules are tested
without a cluster.  Preference order among live workers with room:

1. the worker that already has the checkpoint locally (nothing to download),
2. one with the base image cached (only the small layers to download),
3. the least loaded: fewest running sandboxes, then most free memory --
   ignoring differences under 10 % (workers sharing a host report the same
   memory some MB apart: noise, not a reason to always prefer one).

A worker has room when it has a free sandbox slot and -- if it reports its
capacity -- the memory (guest RAM + its per-VM overhead) and vCPUs the sandbox
needs are free there, and the sandbox is no wider than its widest VM.  When
no live worker has room the refusal is :class:`InsufficientCapacity` naming
what was short (503 ``insufficient_capacity``); nothing is started.

``extra`` counts sandboxes placed earlier in the same request and not yet
visible in the snapshot, so ``fork(count=n)`` spreads over equal workers
round-robin instead of piling onto the first; ``last_used`` (when each worker
was last chosen) does the same across requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from forkyard.errors import (
    InsufficientCapacity,
    PlacementConflict,
    WorkerNotFound,
    WorkerUnavailable,
)

__all__ = ["Candidate", "Placement", "choose", "shortage"]

_MEMORY_NOISE = 0.10


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    alive: bool
    running: int
    free_memory_mb: int
    max_sandboxes: int
    checkpoints: frozenset[str] = frozenset()
    bases: frozenset[str] = frozenset()
    images: Mapping[str, str] = field(default_factory=dict)
    # reported capacity (wire WorkerCapacity); memory_mb None: not reported, not checked
    memory_mb: int | None = None
    memory_used_mb: int = 0
    cpus: int | None = None
    cpus_used: int = 0
    max_vm_cpus: int | None = None
    vm_overhead_mb: int = 0
    default_memory_mb: int = 256
    default_cpus: int = 1


@dataclass(frozen=True, slots=True)
class Placement:
    """What is being placed: a checkpoint (fork/wake) or an image ref (create)."""

    checkpoint: str | None = None
    base: str | None = None
    image_ref: str | None = None
    # an unpublished checkpoint can only start where it was taken
    only_on: str | None = None
    # the sandbox's shape; None: the worker's default (a create that names none)
    memory_mb: int | None = None
    cpus: int | None = None


def _has_base(c: Candidate, p: Placement) -> bool:
    if p.base is not None and p.base in c.bases:
        return True
    if p.image_ref is not None:
        ref = p.image_ref.removeprefix("sha256:")
        return p.image_ref in c.images or ref in c.bases
    return False


def shortage(c: Candidate, p: Placement, placed: int = 0) -> InsufficientCapacity | None:
    """Why ``c`` cannot take the sandbox (``placed`` more of this shape already sent
    there), or None when it fits."""
    free_slots = c.max_sandboxes - c.running - placed
    if free_slots <= 0:
        return InsufficientCapacity(f"worker {c.name!r} is full ({c.running + placed} "
                                    "sandboxes)", worker=c.name, resource="sandboxes",
                                    limit=c.max_sandboxes, needed=1, free=0)
    if c.memory_mb is None:
        return None  # it reports no capacity: its own admission is the check
    guest = p.memory_mb or c.default_memory_mb
    cpus = p.cpus or c.default_cpus
    need = guest + c.vm_overhead_mb
    if c.max_vm_cpus is not None and cpus > c.max_vm_cpus:
        return InsufficientCapacity(
            f"worker {c.name!r} runs sandboxes of at most {c.max_vm_cpus} vCPUs, not {cpus}",
            worker=c.name, resource="cpus", limit=c.max_vm_cpus, needed=cpus,
            free=max((c.cpus or 0) - c.cpus_used, 0))
    free = max(c.memory_mb - c.memory_used_mb - placed * need, 0)
    if need > free:
        return InsufficientCapacity(
            f"worker {c.name!r} is short of memory: {free} MiB free for guests, a {guest} MiB "
            f"sandbox needs {need} MiB (guest RAM + {c.vm_overhead_mb} MiB per VM)", worker=c.name,
            resource="memory", limit=c.memory_mb, needed=need, free=free)
    if c.cpus is not None:
        free_cpus = max(c.cpus - c.cpus_used - placed * cpus, 0)
        if cpus > free_cpus:
            return InsufficientCapacity(
                f"worker {c.name!r} is short of cpus: {free_cpus} vCPUs free, the sandbox "
                f"needs {cpus}",
                worker=c.name, resource="cpus", limit=c.cpus, needed=cpus, free=free_cpus)
    return None


def _closest(refusals: Sequence[InsufficientCapacity], live: int) -> InsufficientCapacity:
    """The refusal of the worker that came nearest, reworded for the whole fleet."""
    order = {"sandboxes": 0, "cpus": 1, "memory": 2}
    best = max(refusals, key=lambda r: (order.get(r.resource, 0), r.free or 0))
    if all(r.resource == "sandboxes" for r in refusals):
        message = f"every live worker is full ({live} alive)"
    else:
        message = (f"no live worker has room ({live} alive); the closest: {best}")
    return InsufficientCapacity(message, worker=best.worker, resource=best.resource,
                                limit=best.limit, needed=best.needed, free=best.free)


def choose(
    candidates: Sequence[Candidate],
    placement: Placement,
    *,
    explicit: str | None = None,
    extra: Mapping[str, int] | None = None,
    last_used: Mapping[str, float] | None = None,
) -> str:
    """The name of the worker to use, or why none: WorkerNotFound, PlacementConflict,
    WorkerUnavailable."""
    extra = extra or {}
    last_used = last_used or {}
    by_name = {c.name: c for c in candidates}

    def load(c: Candidate) -> int:
        return c.running + extra.get(c.name, 0)

    def short(c: Candidate) -> InsufficientCapacity | None:
        return shortage(c, placement, extra.get(c.name, 0))

    if explicit is not None:
        chosen = by_name.get(explicit)
        if chosen is None:
            raise WorkerNotFound(explicit)
        if placement.only_on is not None and explicit != placement.only_on:
            raise PlacementConflict(placement.checkpoint or "", placement.only_on, explicit)
        if not chosen.alive:
            raise WorkerUnavailable(f"worker {explicit!r} is dead", worker=explicit)
        refusal = short(chosen)
        if refusal is not None:
            raise refusal
        return explicit

    if placement.only_on is not None:
        origin = by_name.get(placement.only_on)
        if origin is None or not origin.alive:
            raise WorkerUnavailable(
                f"checkpoint {(placement.checkpoint or '')[:12]} is not published and its "
                f"worker {placement.only_on!r} is not alive", worker=placement.only_on)
        refusal = short(origin)
        if refusal is not None:
            raise refusal
        return origin.name

    live = [c for c in candidates if c.alive]
    if not live:
        raise WorkerUnavailable("no live worker")
    refusals = {c.name: short(c) for c in live}
    roomy = [c for c in live if refusals[c.name] is None]
    if not roomy:
        raise _closest([r for r in refusals.values() if r is not None], len(live))

    def rank(c: Candidate) -> tuple[bool, bool, int]:
        local = placement.checkpoint is not None and placement.checkpoint in c.checkpoints
        return (not local, not _has_base(c, placement), load(c))

    best = min(rank(c) for c in roomy)
    tied = [c for c in roomy if rank(c) == best]
    most = max(c.free_memory_mb for c in tied)
    enough = [c for c in tied if c.free_memory_mb >= most * (1 - _MEMORY_NOISE)]
    return min(enough, key=lambda c: (last_used.get(c.name, 0.0), c.name)).name

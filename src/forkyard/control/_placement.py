"""Which worker runs a new sandbox, fork or wake (docs/api.md, "Placement").

Pure functions over a snapshot of the workers, so the rules are tested
without a cluster.  Preference order among live workers with room:

1. the worker that already has the checkpoint locally (nothing to download),
2. one with the base image cached (only the small layers to download),
3. the least loaded: fewest running sandboxes, then most free memory --
   ignoring differences under 10 % (workers sharing a host report the same
   memory some MB apart: noise, not a reason to always prefer one).

``extra`` counts sandboxes placed earlier in the same request and not yet
visible in the snapshot, so ``fork(count=n)`` spreads over equal workers
round-robin instead of piling onto the first; ``last_used`` (when each worker
was last chosen) does the same across requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from forkyard.errors import PlacementConflict, WorkerNotFound, WorkerUnavailable

__all__ = ["Candidate", "Placement", "choose"]

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


@dataclass(frozen=True, slots=True)
class Placement:
    """What is being placed: a checkpoint (fork/wake) or an image ref (create)."""

    checkpoint: str | None = None
    base: str | None = None
    image_ref: str | None = None
    # an unpublished checkpoint can only start where it was taken
    only_on: str | None = None
    memory_mb: int = 0


def _has_base(c: Candidate, p: Placement) -> bool:
    if p.base is not None and p.base in c.bases:
        return True
    if p.image_ref is not None:
        ref = p.image_ref.removeprefix("sha256:")
        return p.image_ref in c.images or ref in c.bases
    return False


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

    def has_room(c: Candidate) -> bool:
        return load(c) < c.max_sandboxes and c.free_memory_mb >= placement.memory_mb

    if explicit is not None:
        chosen = by_name.get(explicit)
        if chosen is None:
            raise WorkerNotFound(explicit)
        if placement.only_on is not None and explicit != placement.only_on:
            raise PlacementConflict(placement.checkpoint or "", placement.only_on, explicit)
        if not chosen.alive:
            raise WorkerUnavailable(f"worker {explicit!r} is dead", worker=explicit)
        if not has_room(chosen):
            raise WorkerUnavailable(f"worker {explicit!r} is full ({load(chosen)} sandboxes)",
                                    worker=explicit)
        return explicit

    if placement.only_on is not None:
        origin = by_name.get(placement.only_on)
        if origin is None or not origin.alive:
            raise WorkerUnavailable(
                f"checkpoint {(placement.checkpoint or '')[:12]} is not published and its "
                f"worker {placement.only_on!r} is not alive", worker=placement.only_on)
        if not has_room(origin):
            raise WorkerUnavailable(f"worker {origin.name!r} is full ({load(origin)} sandboxes)",
                                    worker=origin.name)
        return origin.name

    live = [c for c in candidates if c.alive]
    if not live:
        raise WorkerUnavailable("no live worker")
    roomy = [c for c in live if has_room(c)]
    if not roomy:
        raise WorkerUnavailable(f"every live worker is full ({len(live)} alive)")

    def rank(c: Candidate) -> tuple[bool, bool, int]:
        local = placement.checkpoint is not None and placement.checkpoint in c.checkpoints
        return (not local, not _has_base(c, placement), load(c))

    best = min(rank(c) for c in roomy)
    tied = [c for c in roomy if rank(c) == best]
    most = max(c.free_memory_mb for c in tied)
    enough = [c for c in tied if c.free_memory_mb >= most * (1 - _MEMORY_NOISE)]
    return min(enough, key=lambda c: (last_used.get(c.name, 0.0), c.name)).name

"""The fleet: worker registration, heartbeats, liveness, and who can take work.

Liveness is judged from each worker's last report time *in the database*
(``workers.last_heartbeat``, written by whichever control plane received the
report), so a control plane that takes over from another (``_leader``) knows
what the old one knew, and two never disagree about a worker.  When this
plane becomes active (``grace_from``), every worker the database calls alive
gets one full timeout of grace: it may have been busy finding the new plane.
The times are wall-clock times of the active plane; a clock that jumps
forward by more than the timeout can declare workers dead (they come back at
their next report, their running sandboxes with them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from forkyard.control._db import Database, SandboxRow, WorkerRow, parse_time, utcnow
from forkyard.control._events import EventLog
from forkyard.control._placement import Candidate
from forkyard.control._records import (
    ACTIVE,
    TRANSITIONAL,
    mark_lost,
    move,
    store_checkpoint,
    worker_out,
)
from forkyard.control._workers import WorkerClient, WorkerClients
from forkyard.errors import BadWorkerReport, WorkerConflict, WorkerNotFound, WorkerUnavailable
from forkyard.wire.models import SandboxState, WorkerOut, WorkerState
from forkyard.wire.worker_models import (
    HeartbeatReply,
    WorkerCapacity,
    WorkerLeaving,
    WorkerReport,
    WorkerSandbox,
)

__all__ = ["Registry"]

log = logging.getLogger("forkyard.control")
S = SandboxState


class Registry:
    def __init__(self, db: Database, clients: WorkerClients, *, store_url: str,
                 heartbeat_timeout: float, events: EventLog | None = None) -> None:
        self.db = db
        self.events = events
        self.clients = clients
        self.store_url = store_url
        self.heartbeat_timeout = heartbeat_timeout
        self.grace_from = utcnow()  # when this plane became active (Leadership)
        self._lock = threading.Lock()
        # (worker, sandboxes it revived): a worker came back; see Hibernation._worker_back
        self.on_back: Callable[[str, list[str]], None] | None = None

    # --- liveness bookkeeping ---------------------------------------------
    def _silent_for(self, row: WorkerRow) -> float:
        """Seconds since the worker's last report (or since our grace began)."""
        seen = row.last_heartbeat
        since = self.grace_from if seen is None else max(seen, self.grace_from)
        return (utcnow() - since).total_seconds()

    def fresh_row(self, row: WorkerRow) -> bool:
        return row.last_heartbeat is not None and \
            (utcnow() - row.last_heartbeat).total_seconds() <= self.heartbeat_timeout

    # --- reports -------------------------------------------------------------
    def _check_report(self, report: WorkerReport) -> None:
        if report.store_url is not None and report.store_url != self.store_url:
            raise WorkerConflict(
                report.name,
                f"worker {report.name} uses store {report.store_url!r}, this cluster uses "
                f"{self.store_url!r}: published checkpoints would not be found",
            )

    @staticmethod
    def _apply(row: WorkerRow, report: WorkerReport) -> None:
        row.url = report.url
        row.state = WorkerState.ALIVE
        row.last_heartbeat = utcnow()
        row.running = report.running
        row.free_memory_mb = report.free_memory_mb
        row.max_sandboxes = report.max_sandboxes
        row.cached_bases = sorted(report.cached_bases)
        row.checkpoints = sorted(report.checkpoints)
        row.images = dict(report.images)
        row.capacity = None if report.capacity is None else report.capacity.model_dump()

    def _taken(self, row: WorkerRow, report: WorkerReport) -> bool:
        """Another live daemon already answers to this name (at another URL)."""
        return (row.state == WorkerState.ALIVE and row.url != report.url
                and self.fresh_row(row))

    def register(self, report: WorkerReport) -> HeartbeatReply:
        """A daemon (re)started: whatever it does not report running is gone."""
        self._check_report(report)
        name = report.name
        lost: list[str] = []
        with self.db.tx() as s:
            row = s.get(WorkerRow, name, with_for_update=True)
            if row is None:
                row = WorkerRow(name=name, registered=utcnow(), url=report.url,
                                state=WorkerState.ALIVE)
                s.add(row)
            elif self._taken(row, report):
                raise WorkerConflict(name, f"worker name {name!r} is taken by a live worker "
                                           f"at {row.url}; retry after it stops")
            row.registered = utcnow()
            self._apply(row, report)
            reported = {sb.id for sb in report.sandboxes}
            for sb in s.scalars(select(SandboxRow).where(
                SandboxRow.worker == name, SandboxRow.state.in_(ACTIVE)
            ).with_for_update()):
                if sb.id not in reported:
                    mark_lost(s, sb, f"worker {name} restarted without it")
                    lost.append(sb.id)
            revived: list[str] = []
            destroy = self._reconcile(s, name, report.sandboxes, revived)
        self._lost(lost, name, "the worker restarted without it")
        if self.on_back is not None:
            self.on_back(name, revived)
        log.info("worker %s registered at %s", name, report.url)
        return HeartbeatReply(name=name, state=WorkerState.ALIVE, destroy=destroy)

    def heartbeat(self, name: str, report: WorkerReport) -> HeartbeatReply:
        if report.name != name:
            raise BadWorkerReport(name, f"heartbeat for {name!r} names worker {report.name!r}")
        self._check_report(report)
        with self.db.tx() as s:
            row = s.get(WorkerRow, name, with_for_update=True)
            if row is None:
                raise WorkerNotFound(name, hint="register first")
            if self._taken(row, report):
                raise WorkerConflict(name, f"worker name {name!r} is taken by a live worker "
                                           f"at {row.url}")
            if row.state == WorkerState.DEAD:
                log.warning("worker %s is back", name)
            self._apply(row, report)
            revived: list[str] = []
            destroy = self._reconcile(s, name, report.sandboxes, revived)
        if revived and self.on_back is not None:
            self.on_back(name, revived)
        return HeartbeatReply(name=name, state=WorkerState.ALIVE, destroy=destroy)

    @staticmethod
    def _reconcile(s: Session, name: str, reported: Sequence[WorkerSandbox],
                   revived: list[str] | None = None) -> list[str]:
        """Fold a worker's view of its sandboxes into ours; return the ones to destroy.

        Only settled states are compared: a transition in flight is owned by
        the request that started it.  Lost sandboxes it brings back hibernated
        are appended to ``revived``.
        """
        revived = [] if revived is None else revived
        if not reported:
            return []
        rows = {r.id: r for r in s.scalars(
            select(SandboxRow).where(SandboxRow.id.in_([sb.id for sb in reported]))
            .with_for_update()
        )}
        destroy: list[str] = []
        for sb in reported:
            row = rows.get(sb.id)
            if row is None:
                # never known here (a new or emptied database): adopt it, never destroy
                # what we did not make -- it may be someone's work
                Registry._adopt(s, name, sb)
            elif row.state in (S.DESTROYED, S.FAILED):
                # not ours any more: a leftover that would hold memory and disk forever
                destroy.append(sb.id)
            elif row.worker != name:
                if row.state not in TRANSITIONAL:  # e.g. hibernated here, woken elsewhere
                    destroy.append(sb.id)
            elif row.state == S.RUNNING and sb.state in (S.FAILED, S.STOPPED):
                move(row, sb.state)
                row.error = sb.error or f"the VM stopped on worker {name} (it reports {sb.state})"
            elif row.state == S.LOST and sb.state == S.RUNNING:
                # the worker only missed heartbeats; its VM kept running
                move(row, S.RUNNING)
                row.recoverable_from = None
                row.error = None
            elif row.state == S.LOST and sb.state == S.HIBERNATED and sb.last_checkpoint:
                # a hibernate cut short by the worker's crash, finished from its disk
                move(row, S.HIBERNATED)
                row.last_checkpoint = sb.last_checkpoint
                row.recoverable_from = None
                row.error = None
                revived.append(sb.id)
        return destroy

    @staticmethod
    def _adopt(s: Session, name: str, sb: WorkerSandbox) -> None:
        """Record a sandbox a worker runs (or keeps hibernated) that we never knew.

        Its tenant is unknown, so only admin keys see it until an operator
        decides (destroys it, or uses it); one in any other state is left alone.
        """
        if sb.state == S.RUNNING or (sb.state == S.HIBERNATED and sb.last_checkpoint):
            now = utcnow()
            s.add(SandboxRow(id=sb.id, state=sb.state, worker=name, image=sb.image,
                             memory_mb=sb.memory_mb, cpus=sb.cpus, created=parse_time(sb.created),
                             updated=now, parent_checkpoint=sb.parent_checkpoint,
                             last_checkpoint=sb.last_checkpoint, tenant=None,
                             error=f"adopted from worker {name}: unknown to this database"))
            log.warning("adopted sandbox %s (%s) reported by worker %s", sb.id, sb.state, name)

    def leave(self, name: str, leaving: WorkerLeaving) -> None:
        """A worker shutting down cleanly tells what became of its sandboxes."""
        with self.db.tx() as s:
            row = s.get(WorkerRow, name, with_for_update=True)
            if row is None:
                raise WorkerNotFound(name)
            row.state = WorkerState.DEAD
            for cp in leaving.checkpoints:
                store_checkpoint(s, cp, name, self.store_url)
            reported = {sb.id: sb for sb in leaving.sandboxes}
            for sb in s.scalars(select(SandboxRow).where(
                SandboxRow.worker == name, SandboxRow.state.in_(ACTIVE)
            ).with_for_update()):
                info = reported.get(sb.id)
                if info is not None and info.state == S.HIBERNATED and info.last_checkpoint:
                    move(sb, S.HIBERNATED)
                    sb.last_checkpoint = info.last_checkpoint
                    sb.error = None
                else:
                    mark_lost(s, sb, f"worker {name} shut down")
        log.info("worker %s left", name)

    # --- liveness --------------------------------------------------------------
    def check_liveness(self) -> list[str]:
        """Declare workers dead after ``heartbeat_timeout`` without a report."""
        with self.db.tx() as s:
            late = [row.name for row in s.scalars(
                select(WorkerRow).where(WorkerRow.state == WorkerState.ALIVE))
                if self._silent_for(row) > self.heartbeat_timeout]
        return [name for name in late if self._declare_dead(name)]

    def _declare_dead(self, name: str) -> bool:
        with self.db.tx() as s:
            row = s.get(WorkerRow, name, with_for_update=True)
            if row is None or row.state != WorkerState.ALIVE or \
                    self._silent_for(row) <= self.heartbeat_timeout:
                return False  # a heartbeat won the race
            row.state = WorkerState.DEAD
            lost: list[str] = []
            for sb in s.scalars(select(SandboxRow).where(
                SandboxRow.worker == name, SandboxRow.state.in_(ACTIVE)
            ).with_for_update()):
                mark_lost(s, sb, f"worker {name} died (no heartbeat for "
                                 f"{self.heartbeat_timeout:g}s)")
                lost.append(sb.id)
        self._lost(lost, name, "the worker died")
        log.warning("worker %s is dead; %d sandbox(es) lost", name, len(lost))
        return True

    def _lost(self, sandboxes: list[str], worker: str, why: str) -> None:
        if self.events is not None:
            for sid in sandboxes:
                self.events.emit("lost", sandbox=sid, worker=worker, detail=why)

    # --- queries ------------------------------------------------------------------
    def all(self) -> list[WorkerOut]:
        with self.db.tx() as s:
            rows = s.scalars(select(WorkerRow).order_by(WorkerRow.name))
            return [worker_out(r) for r in rows]

    def client(self, s: Session, worker: str | None) -> WorkerClient:
        """The client of a live worker, or WorkerUnavailable."""
        row = s.get(WorkerRow, worker) if worker is not None else None
        if row is None:
            raise WorkerUnavailable(f"worker {worker!r} is unknown", worker=worker)
        if row.state != WorkerState.ALIVE:
            raise WorkerUnavailable(f"worker {worker!r} is dead", worker=worker)
        return self.clients.get(row.name, row.url)

    def client_if_alive(self, worker: str | None) -> WorkerClient | None:
        with self.db.tx() as s:
            row = s.get(WorkerRow, worker) if worker is not None else None
            if row is None or row.state != WorkerState.ALIVE:
                return None
            return self.clients.get(row.name, row.url)

    @staticmethod
    def candidates(s: Session) -> list[Candidate]:
        """Every worker as placement sees it; load counts our own sandbox rows,
        which are newer than the worker's last report."""
        active: dict[str | None, list[tuple[int | None, int | None]]] = {}
        for w, mem, cpus in s.execute(
            select(SandboxRow.worker, SandboxRow.memory_mb, SandboxRow.cpus)
            .where(SandboxRow.state.in_(ACTIVE))
        ):
            active.setdefault(w, []).append((mem, cpus))
        return [_candidate(r, active.get(r.name, [])) for r in
                s.scalars(select(WorkerRow).order_by(WorkerRow.name))]


def _candidate(r: WorkerRow, active: list[tuple[int | None, int | None]]) -> Candidate:
    """Placement's view of ``r``; what its sandboxes hold counts our own rows (newer than
    its last report) or its report (which also holds what we do not know), the larger."""
    base = Candidate(name=r.name, alive=r.state == WorkerState.ALIVE, running=len(active),
                     free_memory_mb=r.free_memory_mb, max_sandboxes=r.max_sandboxes,
                     checkpoints=frozenset(r.checkpoints), bases=frozenset(r.cached_bases),
                     images=dict(r.images))
    try:
        cap = None if r.capacity is None else WorkerCapacity.model_validate(r.capacity)
    except ValidationError:
        cap = None  # a row written by another version: its own admission still holds
    if cap is None:
        return base
    mem = sum((m or cap.default_memory_mb) + cap.vm_overhead_mb for m, _ in active)
    cpus = sum(c or cap.default_cpus for _, c in active)
    return replace(base, memory_mb=cap.memory_mb, memory_used_mb=max(mem, cap.memory_used_mb),
                   cpus=cap.cpus, cpus_used=max(cpus, cap.cpus_used),
                   max_vm_cpus=cap.max_vm_cpus, vm_overhead_mb=cap.vm_overhead_mb,
                   default_memory_mb=cap.default_memory_mb, default_cpus=cap.default_cpus)

"""The control plane's logic: sandboxes and checkpoints over a fleet of workers.

:class:`ControlPlane` is the whole: creating and listing sandboxes here,
checkpoints and forks in :mod:`._checkpoints`, hibernate and wake in
:mod:`._hibernation`, and the steps they share (rows, placement, settling an
outcome) in :mod:`._transitions`.  Background work -- the liveness monitor,
publish watchers, resuming what a previous run left open -- starts with
:meth:`ControlPlane.start`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from sqlalchemy import select

from forkyard.control._checkpoints import Checkpoints
from forkyard.control._db import CheckpointRow, SandboxRow, utcnow
from forkyard.control._metrics import timed
from forkyard.control._placement import Placement
from forkyard.control._records import TRANSITIONAL, sandbox_out
from forkyard.control._timers import Timers, timer_fields
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.ids import new_sandbox_id
from forkyard.wire.models import CheckpointState, CreateSandboxRequest, SandboxOut, SandboxState

__all__ = ["ControlPlane"]

log = logging.getLogger("forkyard.control")

S = SandboxState


class ControlPlane(Checkpoints, Timers):
    """Sandboxes and checkpoints; ``workers`` is the fleet, ``publishes`` follows uploads."""

    @timed("create")
    def create_sandbox(self, req: CreateSandboxRequest, caller: Principal) -> SandboxOut:
        sid = new_sandbox_id()
        now = utcnow()
        with self.db.tx() as s:
            placement = Placement(image_ref=req.image, memory_mb=req.memory_mb, cpus=req.cpus)
            target = self._place(self.workers.candidates(s), placement, explicit=req.worker)
            client = self.workers.client(s, target)
            s.add(SandboxRow(id=sid, state=S.STARTING, worker=target, image_ref=req.image,
                             memory_mb=req.memory_mb, cpus=req.cpus, created=now, updated=now,
                             labels=dict(req.labels), tenant=caller.name,
                             **timer_fields(req, now)))
        try:
            info = client.send(worker_api.create(sid, req.image, req.memory_mb, req.cpus,
                                                 disk=req.disk, cold=req.cold))
        except BaseException as exc:
            self._start_failed([sid], exc)
            raise
        out = self._settle(sid, S.STARTING, info, state=S.RUNNING)
        self.events.emit("created", sandbox=sid, worker=target)
        return out

    def list_sandboxes(self, caller: Principal, labels: Mapping[str, str] | None = None,
                       state: SandboxState | None = None) -> list[SandboxOut]:
        """The caller's sandboxes but destroyed ones (or exactly ``state``) with all of
        ``labels``; an admin's list has everyone's."""
        want = dict(labels or {})
        with self.db.tx() as s:
            query = select(SandboxRow).order_by(SandboxRow.created)
            query = query.where(SandboxRow.state == state) if state is not None else \
                query.where(SandboxRow.state != S.DESTROYED)
            if not caller.admin:
                query = query.where(SandboxRow.tenant == caller.name)
            # labels are a JSON column: matched here, the same on SQLite and PostgreSQL
            return [sandbox_out(r) for r in s.scalars(query)
                    if all((r.labels or {}).get(k) == v for k, v in want.items())]

    # --- background work --------------------------------------------------------
    def recover(self) -> None:
        """After a restart: follow publishes and transitions a previous run left open."""
        with self.db.tx() as s:
            publishing = [(c.id, c.worker) for c in s.scalars(
                select(CheckpointRow).where(CheckpointRow.state == CheckpointState.PUBLISHING))
                if c.worker is not None]  # store-only checkpoints are published already
            stuck = [(r.id, r.state, r.worker) for r in s.scalars(
                select(SandboxRow).where(SandboxRow.state.in_(TRANSITIONAL)))]
        for cp_id, worker in publishing:
            self.publishes.watch(cp_id, worker)
        for sid, state, owner in stuck:
            self._resync(sid, S(state), owner)

    def start(self) -> None:
        """Serve once this plane holds the lead (``_leader``): at once, unless another
        control plane on the same PostgreSQL database is active."""
        self.leader.start(self._spawn)

    def _take_over(self) -> None:
        """This plane became active: background work starts (once), open work resumes."""
        self.workers.grace_from = utcnow()
        if not self._background_started:
            self._background_started = True
            self._spawn(self._monitor, "liveness")
            self._spawn(self._timer_loop, "timers")
            self.events.start()
        self._spawn(self._recover_quietly, "recover")

    def _recover_quietly(self) -> None:
        try:
            self.recover()
        except Exception:
            log.exception("recovering open operations")

    def _monitor(self) -> None:
        interval = max(0.1, min(1.0, self.workers.heartbeat_timeout / 5))
        while not self.stopping.wait(interval):
            if not self.leader.active.is_set():
                continue  # a standby judges nobody: the active plane does
            try:
                self.workers.check_liveness()
            except Exception:
                log.exception("liveness check")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop background work; threads still blocked on a worker after ``timeout``
        are daemons and die with the process (a restart resumes what they followed)."""
        self.stopping.set()
        with self._threads_lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))

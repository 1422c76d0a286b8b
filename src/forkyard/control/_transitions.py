"""What every sandbox operation of the control plane shares: rows, placement, outcomes.

Every operation follows the same shape so that no transaction spans a call to
a worker (which can take minutes):

1. a short transaction checks and moves the sandbox to a transitional state
   (``starting``, ``hibernating``, ``waking``) under a row lock, so a
   concurrent conflicting request sees it and gets 409;
2. the worker call, outside any transaction;
3. a short transaction records the outcome -- only if the row is still in the
   state step 1 left (a worker may have been declared dead meanwhile).

Every change of a row's state goes through the lifecycle's guard
(``_records.move`` → :func:`forkyard.wire.lifecycle.check_move`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from forkyard.control._db import Database, SandboxRow
from forkyard.control._events import EventLog
from forkyard.control._keys import Keys
from forkyard.control._leader import Leadership
from forkyard.control._metrics import Metrics
from forkyard.control._placement import Candidate, Placement, choose
from forkyard.control._publish import PublishWatcher
from forkyard.control._records import (
    SYSTEM,
    TRANSITIONAL,
    describe,
    move,
    sandbox_out,
    sandbox_row,
    status_of,
)
from forkyard.control._registry import Registry
from forkyard.control._workers import WorkerClient, WorkerClients
from forkyard.errors import FleetError, SandboxBusy, SandboxStateError
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.errors import WorkerReply
from forkyard.wire.models import SandboxOut, SandboxState
from forkyard.wire.worker_models import WorkerSandbox

__all__ = ["Transitions", "refused"]

log = logging.getLogger("forkyard.control")

S = SandboxState


def refused(sandbox_id: str, state: str, operation: str, hint: str = "") -> SandboxStateError:
    """Why ``operation`` cannot run on a sandbox in ``state`` (409 conflict)."""
    return SandboxStateError(sandbox_id, state, operation,
                             message=f"cannot {operation} sandbox {sandbox_id}: "
                                     f"it is {state}{hint}")


class Transitions:
    """The database, the fleet and the steps every sandbox operation is made of."""

    def __init__(self, db: Database, clients: WorkerClients, *, store_url: str,
                 heartbeat_timeout: float) -> None:
        self.db = db
        self.keys = Keys(db)
        # the credential of a worker by name (server.create_app binds it to the secret)
        self.worker_credential: Callable[[str], str] = clients.credential
        self.store_url = store_url
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._last_used: dict[str, float] = {}  # worker -> when placement last chose it
        self.events = EventLog(db, spawn=self._spawn, stopping=self.stopping)
        self.workers = Registry(db, clients, store_url=store_url,
                                heartbeat_timeout=heartbeat_timeout, events=self.events)
        self.metrics = Metrics(db)
        interval = max(0.2, min(2.0, heartbeat_timeout / 4))
        self.leader = Leadership(db, interval=interval, on_gain=self._take_over,
                                 stopping=self.stopping)
        self._background_started = False
        self.workers.on_back = lambda name, revived: self._spawn(
            self._worker_back_quietly, f"back-{name}", name, revived)
        self.publishes = PublishWatcher(db, clients, store_url=store_url, spawn=self._spawn,
                                        stopping=self.stopping, events=self.events,
                                        metrics=self.metrics)

    def running(self, sandbox_id: str, operation: str, caller: Principal) -> WorkerClient:
        """The client of the worker running ``sandbox_id``, or why it cannot ``operation``."""
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller)
            if row.state != S.RUNNING:
                hint = ""
                if row.state == S.HIBERNATED:
                    hint = "; wake it first"
                elif row.state == S.LOST and row.recoverable_from:
                    hint = f"; fork checkpoint {row.recoverable_from} to recover it"
                raise refused(sandbox_id, row.state, operation, hint)
            return self.workers.client(s, row.worker)

    def get_sandbox(self, sandbox_id: str, caller: Principal) -> SandboxOut:
        with self.db.tx() as s:
            return sandbox_out(sandbox_row(s, sandbox_id, caller=caller))

    def destroy_sandbox(self, sandbox_id: str, caller: Principal) -> None:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller, lock=True)
            if row.state == S.DESTROYED:
                return
            if row.state in TRANSITIONAL:
                raise SandboxBusy(sandbox_id, row.state, "destroy")
            # Destroyed in our books first: if the worker call below fails, the
            # worker's next heartbeat lists it and is told to destroy it.
            move(row, S.DESTROYED, "destroy")
            worker = row.worker
        self.events.emit("destroyed", sandbox=sandbox_id, worker=worker)
        client = self.workers.client_if_alive(worker)
        if client is None:
            return
        try:
            client.send(worker_api.destroy(sandbox_id))
        except (FleetError, WorkerReply) as exc:
            log.warning("destroying %s on %s: %s (its heartbeat will retry)", sandbox_id,
                        worker, describe(exc))

    def _take_over(self) -> None:
        """This plane became the active one (``ControlPlane`` starts its work)."""

    def _worker_back(self, worker: str, revived: list[str]) -> None:
        """A worker registered again (``Hibernation`` learns what its crash hid)."""

    def _worker_back_quietly(self, worker: str, revived: list[str]) -> None:
        try:
            self._worker_back(worker, revived)
        except Exception:
            log.exception("resyncing worker %s", worker)

    # --- the steps ---------------------------------------------------------------
    def _place(self, candidates: list[Candidate], placement: Placement, *,
               explicit: str | None, extra: dict[str, int] | None = None) -> str:
        """``choose``, remembering the choice so that equal workers take turns."""
        with self._threads_lock:
            last_used = dict(self._last_used)
        target = choose(candidates, placement, explicit=explicit, extra=extra,
                        last_used=last_used)
        with self._threads_lock:
            self._last_used[target] = time.monotonic()
        return target

    def _settle(self, sandbox_id: str, expect: SandboxState, info: WorkerSandbox | None,
                *, state: SandboxState, error: str | None = None,
                **fields: Any) -> SandboxOut:
        """Step 3: record an outcome if the row is still where step 1 left it."""
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=SYSTEM, lock=True)
            if row.state == expect:
                move(row, state)
                row.error = error
                if info is not None:
                    row.image = info.image
                    row.memory_mb = info.memory_mb
                    row.cpus = info.cpus
                    row.parent_checkpoint = info.parent_checkpoint
                for key, value in fields.items():
                    setattr(row, key, value)
            return sandbox_out(row)

    def _start_failed(self, sandbox_ids: Iterable[str], exc: BaseException) -> None:
        """A create/fork did not start: forget it if it was the caller's fault."""
        failed: list[tuple[str, str | None]] = []
        with self.db.tx() as s:
            for sid in sandbox_ids:
                row = s.get(SandboxRow, sid, with_for_update=True)
                if row is None or row.state != S.STARTING:
                    continue
                if 400 <= status_of(exc) < 500:
                    s.delete(row)
                else:
                    move(row, S.FAILED)
                    row.error = describe(exc)
                    failed.append((sid, row.worker))
        for sid, worker in failed:
            self.events.emit("failed", sandbox=sid, worker=worker, detail=describe(exc))

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        """A daemon thread the server waits for (briefly) when it stops."""
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._threads_lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

"""Following background publishes until each checkpoint is ``published`` or ``failed``.

One thread per publishing checkpoint long-polls its worker
(``GET /checkpoints/{id}?wait=10``), so a finished publish is seen at once
without a busy loop.  If the worker dies first, the store itself decides: the
manifest is written last, so a manifest in the store means every part is
there too (``forkyard.checkpoint.archive``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from forkyard.checkpoint import archive
from forkyard.control._db import ArchiveRow, CheckpointRow, Database, WorkerRow, utcnow
from forkyard.control._events import EventLog
from forkyard.control._metrics import Metrics
from forkyard.control._records import refresh_recoverable
from forkyard.control._workers import WorkerClients
from forkyard.errors import FleetError, ForkyardError, WorkerTimeout
from forkyard.store import ObjectStore, open_store
from forkyard.wire import worker_api
from forkyard.wire.errors import WorkerReply
from forkyard.wire.models import CheckpointState, WorkerState
from forkyard.wire.worker_models import WorkerPublishStatus

__all__ = ["PUBLISH_WAIT", "PublishTimeout", "PublishWatcher"]

log = logging.getLogger("forkyard.control")

_WAIT = 10.0  # seconds a worker holds a status request open
_RETRY = 1.0
# how long a fork elsewhere waits for a publish under way (below the SDK's fork timeout)
PUBLISH_WAIT = 120.0


class PublishTimeout(WorkerTimeout):
    """A publish a request waits for did not settle in time (504)."""

    def __init__(self, checkpoint_id: str, worker: str, timeout: float) -> None:
        super().__init__(worker, f"the publish of checkpoint {checkpoint_id[:12]}", timeout)
        self.checkpoint_id = checkpoint_id
        self.args = (f"checkpoint {checkpoint_id[:12]} is still publishing on worker "
                     f"{worker} after {timeout:g}s; fork it on {worker} or retry later",)


class PublishWatcher:
    def __init__(self, db: Database, clients: WorkerClients, *, store_url: str,
                 spawn: Callable[..., None], stopping: threading.Event,
                 events: EventLog, metrics: Metrics) -> None:
        self.db = db
        self.events = events
        self.metrics = metrics
        self._started: dict[str, float] = {}  # checkpoint -> monotonic start of the watch
        self.clients = clients
        self.store_url = store_url
        self._spawn = spawn
        self._stopping = stopping
        self._watching: set[str] = set()
        self._lock = threading.Lock()
        self._store: ObjectStore | None = None
        self._settled = threading.Condition()

    def wait_settled(self, checkpoint_id: str, worker: str, timeout: float) -> str:
        """Block until the checkpoint is no longer ``publishing``; its state then.

        Raises PublishTimeout after ``timeout`` seconds.  The database is the
        truth (another process may settle it); the condition only wakes us early.
        """
        self.watch(checkpoint_id, worker)  # e.g. after a restart nobody may follow it yet
        deadline = time.monotonic() + timeout
        while True:
            with self.db.tx() as s:
                row = s.get(CheckpointRow, checkpoint_id)
                state = row.state if row is not None else CheckpointState.FAILED
            if state != CheckpointState.PUBLISHING:
                return state
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                raise PublishTimeout(checkpoint_id, worker, timeout)
            with self._settled:
                self._settled.wait(min(left, 0.5))

    def watch(self, checkpoint_id: str, worker: str) -> None:
        with self._lock:
            if checkpoint_id in self._watching:
                return
            self._watching.add(checkpoint_id)
            self._started.setdefault(checkpoint_id, time.monotonic())
        self._spawn(self._run, f"publish-{checkpoint_id[:12]}", checkpoint_id, worker)

    def _run(self, checkpoint_id: str, worker: str) -> None:
        settled: CheckpointState | None = None
        try:
            while not self._stopping.is_set():
                status = self._poll(checkpoint_id, worker)
                if status is None:
                    return
                if status.state != CheckpointState.PUBLISHING:
                    self._record(checkpoint_id, status)
                    settled = status.state
                    return
        except Exception:
            log.exception("following the publish of %s", checkpoint_id)
        finally:
            with self._lock:
                self._watching.discard(checkpoint_id)
                started = self._started.pop(checkpoint_id, None)
            if started is not None and settled is not None:
                self.metrics.observe("publish", time.monotonic() - started,
                                     settled == CheckpointState.PUBLISHED)

    def _poll(self, checkpoint_id: str, worker: str) -> WorkerPublishStatus | None:
        """The publish's status now (or after a long-poll); None: stop watching."""
        with self.db.tx() as s:
            cp = s.get(CheckpointRow, checkpoint_id)
            if cp is None or cp.state != CheckpointState.PUBLISHING:
                return None  # forgotten, or settled by someone else
            row = s.get(WorkerRow, worker)
            alive = row is not None and row.state == WorkerState.ALIVE
            client = self.clients.get(row.name, row.url) if row is not None else None
        if not alive or client is None:
            return self._from_store(checkpoint_id, worker)
        try:
            status = client.send(worker_api.publish_status(checkpoint_id, _WAIT))
        except WorkerReply as exc:
            if exc.status == 404:
                return self._from_store(checkpoint_id, worker)
            self._stopping.wait(_RETRY)
            return WorkerPublishStatus(id=checkpoint_id, state=CheckpointState.PUBLISHING)
        except FleetError:
            # unreachable for now: liveness decides whether it is dead
            self._stopping.wait(_RETRY)
            return WorkerPublishStatus(id=checkpoint_id, state=CheckpointState.PUBLISHING)
        if status.state == CheckpointState.LOCAL:
            return WorkerPublishStatus(
                id=checkpoint_id, state=CheckpointState.FAILED,
                error=f"the publish was interrupted (worker {worker} restarted)")
        return status

    def _from_store(self, checkpoint_id: str, worker: str) -> WorkerPublishStatus:
        """The worker cannot tell us any more: a manifest in the store settles it."""
        try:
            if self._store is None:
                self._store = open_store(self.store_url)
            if archive.is_published(self._store, checkpoint_id):
                m = archive.fetch_manifest(self._store, checkpoint_id)
                own = archive.stored_bytes(self._store, m)
                return WorkerPublishStatus(id=checkpoint_id, state=CheckpointState.PUBLISHED,
                                           stored_bytes=own)
        except ForkyardError as exc:
            log.warning("checking the store for %s: %s", checkpoint_id[:12], exc)
        return WorkerPublishStatus(
            id=checkpoint_id, state=CheckpointState.FAILED,
            error=f"worker {worker} went away before the publish finished")

    def _record(self, checkpoint_id: str, status: WorkerPublishStatus) -> None:
        with self.db.tx() as s:
            row = s.get(CheckpointRow, checkpoint_id, with_for_update=True)
            if row is None or row.state != CheckpointState.PUBLISHING:
                return
            sandbox, worker = row.sandbox, row.worker
            row.state = status.state
            row.error = status.error
            if status.state == CheckpointState.PUBLISHED and row.archive is None:
                row.archive = ArchiveRow(checkpoint_id=row.id, store_url=self.store_url,
                                         stored_bytes=status.stored_bytes,
                                         published_at=utcnow())
            if status.state == CheckpointState.PUBLISHED:
                refresh_recoverable(s, sandbox)  # its sandbox may have been lost meanwhile
                self.metrics.published(status.stored_bytes)
        self.events.emit("published" if status.state == CheckpointState.PUBLISHED
                         else "publish_failed", sandbox=sandbox, checkpoint=checkpoint_id,
                         worker=worker, detail=status.error)
        with self._settled:
            self._settled.notify_all()
        log.info("checkpoint %s: %s%s", checkpoint_id[:12], status.state,
                 f" ({status.error})" if status.error else "")

"""Publishing checkpoints in the background, and what ``GET /checkpoints/{id}`` says of them.

Publishing is disk + zstd bound: a small pool does it while the request that
took the checkpoint returns at once; the control plane long-polls the state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from forkyard.checkpoint import Checkpoint
from forkyard.wire.models import CheckpointState
from forkyard.wire.worker_models import WorkerCheckpoint
from forkyard.worker import Worker

__all__ = ["MAX_WAIT", "Publisher"]

log = logging.getLogger("forkyard.worker.daemon")

MAX_WAIT = 30.0  # cap on GET /checkpoints/{id}?wait=
_PUBLISH_THREADS = 2  # more threads only thrash the disk


@dataclass
class _Job:
    """One publish, as ``GET /checkpoints/{id}`` reports it."""

    state: CheckpointState
    stored_bytes: int | None = None
    error: str | None = None


class Publisher:
    """The worker's publishes: run now or in the pool, their outcome kept for status polls."""

    def __init__(self, worker: Worker, *, on_change: Callable[[], None]) -> None:
        self.worker = worker
        self._on_change = on_change
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._pool = ThreadPoolExecutor(_PUBLISH_THREADS, thread_name_prefix="publish")

    def checkpoint_json(self, cp: Checkpoint, state: CheckpointState | None = None
                        ) -> WorkerCheckpoint:
        job = self._jobs.get(cp.id)
        if state is None:
            if job is not None:
                state = job.state
            elif self.worker.checkpoints.flag(cp.id, "published") is not None:
                state = CheckpointState.PUBLISHED
            else:
                state = CheckpointState.LOCAL
        m = cp.manifest
        return WorkerCheckpoint(
            id=cp.id, sandbox=m.sandbox, name=m.name, created=m.created, base=m.base.digest,
            changed_bytes=cp.changed_bytes, state=state,
            stored_bytes=job.stored_bytes if job else None, error=job.error if job else None,
            ram_new_bytes=cp.ram_new_bytes, ram_shared_bytes=cp.ram_shared_bytes,
        )

    def publish_now(self, cp: Checkpoint) -> None:
        """Publish in this thread; the outcome lands in the job table (never raises)."""
        with self._lock:
            self._jobs[cp.id] = _Job(CheckpointState.PUBLISHING)
        try:
            report = self.worker.publish(cp)
            result = _Job(CheckpointState.PUBLISHED, stored_bytes=report.stored_bytes)
            log.info("published %s: %d bytes stored, %d uploaded in %.1fs", cp.short_id,
                     report.stored_bytes, report.uploaded_bytes, report.seconds)
        except Exception as exc:
            log.warning("publishing %s failed: %s", cp.short_id, exc)
            result = _Job(CheckpointState.FAILED, error=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._jobs[cp.id] = result
        self._on_change()  # the new local checkpoint list goes out at once

    def publish_later(self, cp: Checkpoint) -> Future[None]:
        with self._lock:
            self._jobs[cp.id] = _Job(CheckpointState.PUBLISHING)
        return self._pool.submit(self.publish_now, cp)

    async def status(self, checkpoint_id: str, wait: float) -> WorkerCheckpoint:
        """Long-poll: answer when the publish settles or ``wait`` seconds pass."""
        deadline = time.monotonic() + min(wait, MAX_WAIT)
        while True:
            job = self._jobs.get(checkpoint_id)
            if job is None or job.state != CheckpointState.PUBLISHING:
                break
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        cp = await run_in_threadpool(self.worker.resolve_checkpoint, checkpoint_id)
        if job is None and not self.worker.checkpoints.has(cp.id):
            return self.checkpoint_json(cp, CheckpointState.PUBLISHED)  # found in the store
        return self.checkpoint_json(cp)

    def close(self) -> None:
        """Wait for publishes in flight: a hibernated sandbox's checkpoint may need them."""
        self._pool.shutdown(wait=True)

"""The control plane's logic: state transitions in the database, work on workers.

Every operation follows the same shape so that no transaction spans a call to
a worker (which can take minutes):

1. a short transaction checks and moves the sandbox to a transitional state
   (``starting``, ``hibernating``, ``waking``) under a row lock, so a
   concurrent conflicting request sees it and gets 409;
2. the worker call, outside any transaction;
3. a short transaction records the outcome -- only if the row is still in the
   state step 1 left (a worker may have been declared dead meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from forkyard.checkpoint import archive
from forkyard.control._db import CheckpointRow, Database, SandboxRow, utcnow
from forkyard.control._placement import Candidate, Placement, choose
from forkyard.control._publish import PublishWatcher
from forkyard.control._records import (
    TRANSITIONAL,
    adopt_published,
    checkpoint_out,
    checkpoint_row,
    describe,
    sandbox_out,
    sandbox_row,
    status_of,
    store_checkpoint,
)
from forkyard.control._registry import Registry
from forkyard.control._workers import (
    BOOT_TIMEOUT,
    CHECKPOINT_TIMEOUT,
    HIBERNATE_TIMEOUT,
    QUICK_TIMEOUT,
    WorkerClient,
    WorkerClients,
)
from forkyard.errors import CheckpointNotFound
from forkyard.store import ObjectStore, blob_key, open_store
from forkyard.wire.errors import ApiError, WorkerReply
from forkyard.wire.ids import new_sandbox_id
from forkyard.wire.models import (
    CheckpointOut,
    CheckpointRequest,
    CheckpointState,
    CreateSandboxRequest,
    ForkRequest,
    SandboxOut,
    SandboxState,
    WakeRequest,
    WorkerCheckpoint,
    WorkerHibernated,
    WorkerSandbox,
)

__all__ = ["ControlPlane"]

log = logging.getLogger("forkyard.control")

S = SandboxState


class ControlPlane:
    """Sandboxes and checkpoints; ``workers`` is the fleet, ``publishes`` follows uploads."""

    def __init__(
        self,
        db: Database,
        clients: WorkerClients,
        *,
        store_url: str,
        heartbeat_timeout: float,
    ) -> None:
        self.db = db
        self.store_url = store_url
        self._store: ObjectStore | None = None
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._last_used: dict[str, float] = {}  # worker -> when placement last chose it
        self.workers = Registry(db, clients, store_url=store_url,
                                heartbeat_timeout=heartbeat_timeout)
        self.publishes = PublishWatcher(db, clients, store_url=store_url, spawn=self._spawn,
                                        stopping=self.stopping)

    def running(self, sandbox_id: str, operation: str) -> WorkerClient:
        """The client of the worker running ``sandbox_id``, or why it cannot ``operation``."""
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id)
            if row.state != S.RUNNING:
                hint = ""
                if row.state == S.HIBERNATED:
                    hint = "; wake it first"
                elif row.state == S.LOST and row.recoverable_from:
                    hint = f"; fork checkpoint {row.recoverable_from} to recover it"
                raise ApiError(
                    409, f"cannot {operation} sandbox {sandbox_id}: it is {row.state}{hint}",
                    detail={"sandbox": sandbox_id, "state": row.state, "operation": operation},
                )
            return self.workers.client(s, row.worker)

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
            row = sandbox_row(s, sandbox_id, lock=True)
            if row.state == expect:
                row.state = state
                row.error = error
                row.updated = utcnow()
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
        with self.db.tx() as s:
            for sid in sandbox_ids:
                row = s.get(SandboxRow, sid, with_for_update=True)
                if row is None or row.state != S.STARTING:
                    continue
                if 400 <= status_of(exc) < 500:
                    s.delete(row)
                else:
                    row.state = S.FAILED
                    row.error = describe(exc)
                    row.updated = utcnow()

    # ==================================================================
    # sandboxes
    def create_sandbox(self, req: CreateSandboxRequest) -> SandboxOut:
        sid = new_sandbox_id()
        now = utcnow()
        with self.db.tx() as s:
            target = self._place(self.workers.candidates(s), Placement(image_ref=req.image),
                                 explicit=req.worker)
            client = self.workers.client(s, target)
            s.add(SandboxRow(id=sid, state=S.STARTING, worker=target, image_ref=req.image,
                             memory_mb=req.memory_mb, cpus=req.cpus, created=now, updated=now))
        try:
            info = WorkerSandbox.model_validate(client.call(
                "POST", "/sandboxes", timeout=BOOT_TIMEOUT,
                json={"image": req.image, "memory_mb": req.memory_mb, "cpus": req.cpus,
                      "sandbox_id": sid},
            ))
        except BaseException as exc:
            self._start_failed([sid], exc)
            raise
        return self._settle(sid, S.STARTING, info, state=S.RUNNING)

    def list_sandboxes(self) -> list[SandboxOut]:
        with self.db.tx() as s:
            rows = s.scalars(select(SandboxRow).where(SandboxRow.state != S.DESTROYED)
                             .order_by(SandboxRow.created))
            return [sandbox_out(r) for r in rows]

    def get_sandbox(self, sandbox_id: str) -> SandboxOut:
        with self.db.tx() as s:
            return sandbox_out(sandbox_row(s, sandbox_id))

    def destroy_sandbox(self, sandbox_id: str) -> None:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, lock=True)
            if row.state == S.DESTROYED:
                return
            if row.state in TRANSITIONAL:
                raise ApiError(409, f"sandbox {sandbox_id} is {row.state}; retry when it settles",
                               detail={"sandbox": sandbox_id, "state": row.state})
            # Destroyed in our books first: if the worker call below fails, the
            # worker's next heartbeat lists it and is told to destroy it.
            row.state = S.DESTROYED
            row.updated = utcnow()
            worker = row.worker
        client = self.workers.client_if_alive(worker)
        if client is None:
            return
        try:
            client.call("DELETE", f"/sandboxes/{sandbox_id}", timeout=CHECKPOINT_TIMEOUT)
        except (ApiError, WorkerReply) as exc:
            log.warning("destroying %s on %s: %s (its heartbeat will retry)", sandbox_id,
                        worker, describe(exc))

    # ==================================================================
    # checkpoints
    def checkpoint(self, sandbox_id: str, req: CheckpointRequest) -> CheckpointOut:
        client = self.running(sandbox_id, "checkpoint")
        info = WorkerCheckpoint.model_validate(client.call(
            "POST", f"/sandboxes/{sandbox_id}/checkpoint", timeout=CHECKPOINT_TIMEOUT,
            json={"name": req.name, "publish": req.publish},
        ))
        with self.db.tx() as s:
            row = store_checkpoint(s, info, client.name, self.store_url)
            sb = s.get(SandboxRow, sandbox_id, with_for_update=True)
            if sb is not None:
                sb.last_checkpoint = info.id
                sb.updated = utcnow()
            out = checkpoint_out(row)
        if info.state == CheckpointState.PUBLISHING:
            self.publishes.watch(info.id, client.name)
        return out

    def list_checkpoints(self) -> list[CheckpointOut]:
        with self.db.tx() as s:
            rows = s.scalars(select(CheckpointRow).order_by(CheckpointRow.created))
            return [checkpoint_out(r) for r in rows]

    def get_checkpoint(self, ref: str) -> CheckpointOut:
        self._adopt_if_unknown(ref)
        with self.db.tx() as s:
            return checkpoint_out(checkpoint_row(s, ref))

    def _adopt_if_unknown(self, ref: str) -> None:
        """A checkpoint published to our store but unknown here becomes known.

        The store is the record of what is published (``forkyard import``
        publishes there; another cluster may share it); its manifest is
        verified by its id before anything is recorded.
        """
        with self.db.tx() as s:
            try:
                checkpoint_row(s, ref)
                return
            except ApiError as exc:
                if exc.status != 404:
                    raise
        if self._store is None:
            self._store = open_store(self.store_url)
        try:
            manifest = archive.fetch_manifest(self._store, ref)
        except CheckpointNotFound:
            return  # the caller's lookup reports the 404
        own = sum(self._store.size(blob_key(r.digest))
                  for role, r in manifest.parts() if role not in archive.SHARED_ROLES)
        with self.db.tx() as s:
            adopt_published(s, manifest, self.store_url, stored_bytes=own)

    def delete_checkpoint(self, ref: str) -> None:
        with self.db.tx() as s:
            s.delete(checkpoint_row(s, ref))

    def fork(self, ref: str, req: ForkRequest) -> list[SandboxOut]:
        self._adopt_if_unknown(ref)
        now = utcnow()
        with self.db.tx() as s:
            cp = checkpoint_row(s, ref)
            published = cp.state == CheckpointState.PUBLISHED
            candidates = [
                # the origin has it even if its last heartbeat predates the checkpoint
                Candidate(c.name, c.alive, c.running, c.free_memory_mb, c.max_sandboxes,
                          c.checkpoints | {cp.id}, c.bases, c.images)
                if c.name == cp.worker else c
                for c in self.workers.candidates(s)
            ]
            placement = Placement(checkpoint=cp.id, base=cp.base,
                                  only_on=None if published else cp.worker)
            extra: dict[str, int] = {}
            plan: list[tuple[str, WorkerClient]] = []
            for _ in range(req.count):
                target = self._place(candidates, placement, explicit=req.worker, extra=extra)
                extra[target] = extra.get(target, 0) + 1
                sid = new_sandbox_id()
                plan.append((sid, self.workers.client(s, target)))
                s.add(SandboxRow(id=sid, state=S.STARTING, worker=target, image=cp.base,
                                 parent_checkpoint=cp.id, created=now, updated=now))
            cp_id = cp.id

        def start(item: tuple[str, WorkerClient]) -> WorkerSandbox:
            sid, client = item
            return WorkerSandbox.model_validate(client.call(
                "POST", f"/checkpoints/{cp_id}/fork", timeout=BOOT_TIMEOUT,
                json={"sandbox_id": sid},
            ))

        results: list[WorkerSandbox | BaseException] = []
        with ThreadPoolExecutor(max_workers=min(len(plan), 8),
                                thread_name_prefix="fork") as pool:
            futures = [pool.submit(start, item) for item in plan]
            for f in futures:
                try:
                    results.append(f.result())
                except BaseException as exc:
                    results.append(exc)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # all or nothing, like Worker.fork_many
            failed = [sid for (sid, _), r in zip(plan, results, strict=True)
                      if isinstance(r, BaseException)]
            self._start_failed(failed, errors[0])
            for (sid, _), r in zip(plan, results, strict=True):
                if not isinstance(r, BaseException):
                    self._settle(sid, S.STARTING, r, state=S.RUNNING)
                    self.destroy_sandbox(sid)
            raise errors[0]
        return [
            self._settle(sid, S.STARTING, r, state=S.RUNNING)
            for (sid, _), r in zip(plan, results, strict=True)
            if isinstance(r, WorkerSandbox)
        ]

    # ==================================================================
    # hibernate / wake
    def hibernate(self, sandbox_id: str, *, wait: bool) -> SandboxOut:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, lock=True)
            if row.state == S.HIBERNATED:
                return sandbox_out(row)
            if row.state == S.HIBERNATING:
                already = True
            elif row.state == S.RUNNING:
                already = False
                client = self.workers.client(s, row.worker)
                row.state = S.HIBERNATING
                row.updated = utcnow()
            else:
                raise ApiError(409, f"cannot hibernate sandbox {sandbox_id}: it is {row.state}",
                               detail={"sandbox": sandbox_id, "state": row.state})
        if already:
            return self._wait_settled(sandbox_id, S.HIBERNATING) if wait else \
                self.get_sandbox(sandbox_id)
        if wait:
            return self._hibernate_on(sandbox_id, client)
        self._spawn(self._hibernate_quietly, f"hibernate-{sandbox_id}", sandbox_id, client)
        return self.get_sandbox(sandbox_id)

    def _hibernate_quietly(self, sandbox_id: str, client: WorkerClient) -> None:
        try:
            self._hibernate_on(sandbox_id, client)
        except Exception as exc:
            log.warning("hibernating %s failed: %s", sandbox_id, describe(exc))

    def _hibernate_on(self, sandbox_id: str, client: WorkerClient) -> SandboxOut:
        try:
            reply = WorkerHibernated.model_validate(client.call(
                "POST", f"/sandboxes/{sandbox_id}/hibernate", timeout=HIBERNATE_TIMEOUT))
        except BaseException as exc:
            self._hibernate_failed(sandbox_id, client, exc)
            raise
        with self.db.tx() as s:
            store_checkpoint(s, reply.checkpoint, client.name, self.store_url)
        return self._settle(sandbox_id, S.HIBERNATING, None, state=S.HIBERNATED,
                            last_checkpoint=reply.checkpoint.id,
                            error=reply.checkpoint.error and
                            f"publish failed (wakes only on {client.name}): "
                            f"{reply.checkpoint.error}")

    def _hibernate_failed(self, sandbox_id: str, client: WorkerClient,
                          exc: BaseException) -> None:
        """Find out what the failed hibernate left: still running, or broken."""
        why = f"hibernate failed: {describe(exc)}"
        state = S.FAILED
        try:
            info = WorkerSandbox.model_validate(
                client.call("GET", f"/sandboxes/{sandbox_id}", timeout=QUICK_TIMEOUT))
            if info.state == "running":
                state = S.RUNNING
            elif info.state == "hibernated" and info.last_checkpoint:
                self._settle(sandbox_id, S.HIBERNATING, None, state=S.HIBERNATED, error=why,
                             last_checkpoint=info.last_checkpoint)
                return
        except (ApiError, WorkerReply):
            pass
        self._settle(sandbox_id, S.HIBERNATING, None, state=state, error=why)

    def _wait_settled(self, sandbox_id: str, transitional: SandboxState) -> SandboxOut:
        while True:
            out = self.get_sandbox(sandbox_id)
            if out.state != transitional or self.stopping.is_set():
                return out
            time.sleep(0.1)

    def wake(self, sandbox_id: str, req: WakeRequest) -> SandboxOut:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, lock=True)
            if row.state == S.RUNNING:
                return sandbox_out(row)
            if row.state == S.HIBERNATING:
                raise ApiError(409, f"sandbox {sandbox_id} is still hibernating (publishing "
                                    "its checkpoint); wake it when it is hibernated",
                               detail={"sandbox": sandbox_id, "state": row.state})
            if row.state != S.HIBERNATED or row.last_checkpoint is None:
                raise ApiError(409, f"cannot wake sandbox {sandbox_id}: it is {row.state}",
                               detail={"sandbox": sandbox_id, "state": row.state})
            cp_id = row.last_checkpoint
            cp = s.get(CheckpointRow, cp_id)
            published = cp is not None and cp.state == CheckpointState.PUBLISHED
            old = row.worker
            candidates = self.workers.candidates(s)
            placement = Placement(checkpoint=cp_id, base=row.image,
                                  only_on=None if published else old)
            previous = next((c for c in candidates if c.name == old), None)
            if (req.worker is None and previous is not None and previous.alive
                    and previous.running < previous.max_sandboxes):
                target = old  # it still has every part locally
            else:
                target = self._place(candidates, placement, explicit=req.worker)
            assert target is not None
            client = self.workers.client(s, target)
            row.state = S.WAKING
            row.worker = target
            row.updated = utcnow()
        try:
            info = WorkerSandbox.model_validate(client.call(
                "POST", f"/sandboxes/{sandbox_id}/wake", timeout=BOOT_TIMEOUT,
                json={"checkpoint_id": cp_id},
            ))
        except BaseException as exc:
            self._settle(sandbox_id, S.WAKING, None, state=S.HIBERNATED, worker=old,
                         error=f"wake on {target} failed: {describe(exc)}")
            raise
        return self._settle(sandbox_id, S.WAKING, info, state=S.RUNNING)

    # ==================================================================
    # background work
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

    def _resync(self, sandbox_id: str, state: SandboxState, worker: str | None) -> None:
        """Settle a transition whose request died with the previous server process."""
        client = self.workers.client_if_alive(worker)
        info: WorkerSandbox | None = None
        if client is not None:
            try:
                info = WorkerSandbox.model_validate(
                    client.call("GET", f"/sandboxes/{sandbox_id}", timeout=QUICK_TIMEOUT))
            except (ApiError, WorkerReply):
                info = None
        why = "the control plane restarted during this operation"
        if info is None:
            self._settle(sandbox_id, state, None, state=S.FAILED, error=why)
        elif info.state == "running":
            self._settle(sandbox_id, state, info, state=S.RUNNING)
        elif info.state == "hibernated" and info.last_checkpoint and client is not None:
            try:
                cp = WorkerCheckpoint.model_validate(client.call(
                    "GET", f"/checkpoints/{info.last_checkpoint}", timeout=QUICK_TIMEOUT))
                with self.db.tx() as s:
                    store_checkpoint(s, cp, client.name, self.store_url)
                if cp.state == CheckpointState.PUBLISHING:
                    self.publishes.watch(cp.id, client.name)
            except (ApiError, WorkerReply):
                pass
            self._settle(sandbox_id, state, None, state=S.HIBERNATED,
                         last_checkpoint=info.last_checkpoint)
        else:
            self._settle(sandbox_id, state, None, state=S.FAILED, error=why)

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        """A daemon thread the server waits for (briefly) when it stops."""
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._threads_lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def start(self) -> None:
        self._spawn(self._monitor, "liveness")
        self._spawn(self._recover_quietly, "recover")

    def _recover_quietly(self) -> None:
        try:
            self.recover()
        except Exception:
            log.exception("recovering open operations")

    def _monitor(self) -> None:
        interval = max(0.1, min(1.0, self.workers.heartbeat_timeout / 5))
        while not self.stopping.wait(interval):
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

"""Checkpoints in the control plane: take, list, look up (adopting published ones), fork."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from sqlalchemy import select

from forkyard.checkpoint import archive
from forkyard.control._db import CheckpointRow, SandboxRow, TombstoneRow, utcnow
from forkyard.control._metrics import timed
from forkyard.control._placement import Placement
from forkyard.control._publish import PUBLISH_WAIT
from forkyard.control._records import (
    SYSTEM,
    adopt_published,
    checkpoint_out,
    checkpoint_row,
    store_checkpoint,
    stored_spec,
)
from forkyard.control._transitions import Transitions
from forkyard.control._workers import WorkerClient
from forkyard.errors import (
    CheckpointNotFound,
    PlacementConflict,
    SandboxStateError,
    WorkerUnavailable,
)
from forkyard.store import ObjectStore, open_store
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.ids import new_sandbox_id
from forkyard.wire.models import (
    CheckpointOut,
    CheckpointRequest,
    CheckpointState,
    ForkRequest,
    SandboxOut,
    SandboxState,
)
from forkyard.wire.network import NetworkSpec
from forkyard.wire.worker_models import WorkerSandbox

__all__ = ["Checkpoints"]

S = SandboxState


class Checkpoints(Transitions):
    _store: ObjectStore | None = None

    @timed("checkpoint")
    def checkpoint(self, sandbox_id: str, req: CheckpointRequest,
                   caller: Principal) -> CheckpointOut:
        client = self.running(sandbox_id, "checkpoint", caller)
        info = client.send(worker_api.checkpoint(sandbox_id, req.name, req.publish))
        with self.db.tx() as s:
            # the same state checkpointed again after an rm gets the same id: it is back
            row = store_checkpoint(s, info, client.name, self.store_url, revive=True)
            sb = s.get(SandboxRow, sandbox_id, with_for_update=True)
            # the sandbox's labels as they are now, plus the checkpoint's own: what forks get
            row.labels = {**(sb.labels if sb is not None else {}), **req.labels}
            if sb is not None:
                sb.last_checkpoint = info.id
                sb.updated = utcnow()
            out = checkpoint_out(row)
        self.events.emit("checkpointed", sandbox=sandbox_id, checkpoint=info.id,
                         worker=client.name)
        if info.state == CheckpointState.PUBLISHED:  # published at once (a tiny one)
            self.events.emit("published", sandbox=sandbox_id, checkpoint=info.id,
                             worker=client.name)
        if info.state == CheckpointState.PUBLISHING:
            self.publishes.watch(info.id, client.name)
        return out

    def list_checkpoints(self, caller: Principal) -> list[CheckpointOut]:
        with self.db.tx() as s:
            query = select(CheckpointRow)
            if not caller.admin:
                query = query.where(CheckpointRow.tenant == caller.name)
            rows = s.scalars(query.order_by(CheckpointRow.created))
            return [checkpoint_out(r) for r in rows]

    def get_checkpoint(self, ref: str, caller: Principal) -> CheckpointOut:
        self._adopt_if_unknown(ref, caller)
        with self.db.tx() as s:
            return checkpoint_out(checkpoint_row(s, ref, caller=caller))

    def _adopt_if_unknown(self, ref: str, caller: Principal) -> None:
        """A checkpoint published to our store but unknown here becomes known.

        The store is the record of what is published (``forkyard import``
        publishes there; another cluster may share it); its manifest is
        verified by its id before anything is recorded.  It becomes the
        caller's; one known here (whoever's) or deleted here is never adopted.
        """
        with self.db.tx() as s:
            try:
                checkpoint_row(s, ref, caller=SYSTEM)
                return
            except CheckpointNotFound:
                pass
        if self._store is None:
            self._store = open_store(self.store_url)
        try:
            manifest = archive.fetch_manifest(self._store, ref)
        except CheckpointNotFound:
            return  # the caller's lookup reports the 404
        with self.db.tx() as s:
            if s.get(TombstoneRow, manifest.id) is not None:
                return  # deleted here: not brought back by what the store still holds
        own = archive.stored_bytes(self._store, manifest)
        with self.db.tx() as s:
            adopt_published(s, manifest, self.store_url, stored_bytes=own, tenant=caller.name)

    def delete_checkpoint(self, ref: str, caller: Principal) -> None:
        """Forget it for good: a tombstone keeps the store's copy from being adopted
        again (the store's objects stay for a garbage collector)."""
        with self.db.tx() as s:
            row = checkpoint_row(s, ref, caller=caller)
            s.merge(TombstoneRow(id=row.id, tenant=row.tenant, deleted=utcnow()))
            s.delete(row)

    def checkpoint_manifest(self, ref: str, caller: Principal) -> bytes:
        """The published manifest (canonical bytes, verified by its id) of a checkpoint
        the caller can see; one not (yet) published is a 409 naming its worker."""
        self._adopt_if_unknown(ref, caller)
        with self.db.tx() as s:
            row = checkpoint_row(s, ref, caller=caller)
            cp_id, state, origin = row.id, row.state, row.worker
        if state != CheckpointState.PUBLISHED:
            raise SandboxStateError(cp_id, state, "show", message=(
                f"checkpoint {cp_id[:12]} is {state}: its manifest is only on worker "
                f"{origin} until it is published"))
        if self._store is None:
            self._store = open_store(self.store_url)
        return archive.fetch_manifest(self._store, cp_id).canonical()

    publish_wait = PUBLISH_WAIT

    @timed("fork")
    def fork(self, ref: str, req: ForkRequest, caller: Principal) -> list[SandboxOut]:
        self._adopt_if_unknown(ref, caller)
        try:
            cp_id, plan, network = self._plan_fork(ref, req, caller)
        except (PlacementConflict, WorkerUnavailable):
            # An unpublished checkpoint starts only where it was taken; if its
            # publish is under way (``checkpoint`` returns at once), waiting for
            # it lets the fork go anywhere instead of failing.
            with self.db.tx() as s:
                cp = checkpoint_row(s, ref, caller=caller)
                publishing = cp.state == CheckpointState.PUBLISHING and cp.worker is not None
                origin = cp.worker or ""
            if not publishing:
                raise
            self.publishes.wait_settled(cp.id, origin, self.publish_wait)
            cp_id, plan, network = self._plan_fork(ref, req, caller)
        return self._start_forks(cp_id, plan, network)

    def _plan_fork(self, ref: str, req: ForkRequest, caller: Principal
                   ) -> tuple[str, list[tuple[str, WorkerClient]], NetworkSpec | None]:
        """Place every fork and record it ``starting`` (one transaction)."""
        now = utcnow()
        with self.db.tx() as s:
            cp = checkpoint_row(s, ref, caller=caller)
            # forks belong to the checkpoint's tenant (an admin forking one included)
            tenant = cp.tenant if cp.tenant is not None else caller.name
            published = cp.state == CheckpointState.PUBLISHED
            candidates = [
                # the origin has it even if its last heartbeat predates the checkpoint
                replace(c, checkpoints=c.checkpoints | {cp.id})
                if c.name == cp.worker else c
                for c in self.workers.candidates(s)
            ]
            # the fork has its source's shape (unknown for a store-only checkpoint: the
            # worker's own admission, which reads the manifest, decides)
            source = s.get(SandboxRow, cp.sandbox)
            memory_mb = source.memory_mb if source is not None else None
            cpus = source.cpus if source is not None else None
            # forks keep their source's network (unknown source: the manifest's, on the worker)
            network = source.network if source is not None else None
            placement = Placement(checkpoint=cp.id, base=cp.base,
                                  only_on=None if published else cp.worker,
                                  memory_mb=memory_mb, cpus=cpus)
            extra: dict[str, int] = {}
            plan: list[tuple[str, WorkerClient]] = []
            for _ in range(req.count):
                target = self._place(candidates, placement, explicit=req.worker, extra=extra)
                extra[target] = extra.get(target, 0) + 1
                sid = new_sandbox_id()
                plan.append((sid, self.workers.client(s, target)))
                s.add(SandboxRow(id=sid, state=S.STARTING, worker=target, image=cp.base,
                                 memory_mb=memory_mb, cpus=cpus,
                                 parent_checkpoint=cp.id, created=now, updated=now,
                                 labels={**(cp.labels or {}), **req.labels}, tenant=tenant,
                                 network=network))
            cp_id = cp.id
        return cp_id, plan, stored_spec(network)

    def _start_forks(self, cp_id: str, plan: list[tuple[str, WorkerClient]],
                     network: NetworkSpec | None) -> list[SandboxOut]:
        def start(item: tuple[str, WorkerClient]) -> WorkerSandbox:
            sid, client = item
            return client.send(worker_api.fork(cp_id, sid, network))

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
                    self.destroy_sandbox(sid, SYSTEM)
            raise errors[0]
        outs = [
            self._settle(sid, S.STARTING, r, state=S.RUNNING)
            for (sid, _), r in zip(plan, results, strict=True)
            if isinstance(r, WorkerSandbox)
        ]
        for out in outs:
            self.events.emit("forked", sandbox=out.id, checkpoint=cp_id, worker=out.worker)
        return outs

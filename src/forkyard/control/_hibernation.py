"""Hibernate (checkpoint, publish, free the VM) and wake (anywhere the checkpoint can go)."""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from forkyard.control._db import CheckpointRow, SandboxRow, WorkerRow
from forkyard.control._metrics import timed
from forkyard.control._placement import Placement, shortage
from forkyard.control._records import (
    SYSTEM,
    describe,
    mark_lost,
    move,
    refresh_recoverable,
    sandbox_out,
    sandbox_row,
    store_checkpoint,
    stored_spec,
)
from forkyard.control._transitions import Transitions, refused
from forkyard.control._workers import WorkerClient
from forkyard.errors import FleetError, SandboxBusy
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.errors import WorkerReply
from forkyard.wire.models import CheckpointState, SandboxOut, SandboxState, WakeRequest
from forkyard.wire.worker_models import WorkerSandbox

__all__ = ["Hibernation"]

log = logging.getLogger("forkyard.control")

S = SandboxState


class Hibernation(Transitions):
    def hibernate(self, sandbox_id: str, caller: Principal, *, wait: bool) -> SandboxOut:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller, lock=True)
            if row.state == S.HIBERNATED:
                return sandbox_out(row)
            if row.state == S.HIBERNATING:
                already = True
            elif row.state == S.RUNNING:
                already = False
                client = self.workers.client(s, row.worker)
                move(row, S.HIBERNATING, "hibernate")
            else:
                raise refused(sandbox_id, row.state, "hibernate")
        if already:
            return self._wait_settled(sandbox_id, S.HIBERNATING) if wait else \
                self.get_sandbox(sandbox_id, caller)
        if wait:
            return self._hibernate_on(sandbox_id, client)
        self._spawn(self._hibernate_quietly, f"hibernate-{sandbox_id}", sandbox_id, client)
        return self.get_sandbox(sandbox_id, caller)

    def _hibernate_quietly(self, sandbox_id: str, client: WorkerClient) -> None:
        try:
            self._hibernate_on(sandbox_id, client)
        except Exception as exc:
            log.warning("hibernating %s failed: %s", sandbox_id, describe(exc))

    @timed("hibernate")
    def _hibernate_on(self, sandbox_id: str, client: WorkerClient) -> SandboxOut:
        try:
            reply = client.send(worker_api.hibernate(sandbox_id))
        except BaseException as exc:
            self._hibernate_failed(sandbox_id, client, exc)
            raise
        with self.db.tx() as s:
            store_checkpoint(s, reply.checkpoint, client.name, self.store_url)
        if reply.checkpoint.state == CheckpointState.PUBLISHED:
            self.metrics.published(reply.checkpoint.stored_bytes)
        self.events.emit("hibernated", sandbox=sandbox_id, checkpoint=reply.checkpoint.id,
                         worker=client.name)
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
            info = client.send(worker_api.get_sandbox(sandbox_id))
            if info.state == S.RUNNING:
                state = S.RUNNING
            elif info.state == S.HIBERNATED and info.last_checkpoint:
                self._settle(sandbox_id, S.HIBERNATING, None, state=S.HIBERNATED, error=why,
                             last_checkpoint=info.last_checkpoint)
                self._worker_back(client.name, [sandbox_id])  # e.g. restarted already
                return
        except FleetError:
            # The worker went away mid-hibernate (a crash): lost, not failed.  Its
            # checkpoint may be safe on its disk; if it comes back reporting the
            # sandbox hibernated, registration takes it back (Registry._reconcile).
            self._lose(sandbox_id, S.HIBERNATING, f"{why} (worker {client.name} went away)")
            return
        except WorkerReply:
            pass
        self._settle(sandbox_id, S.HIBERNATING, None, state=state, error=why)

    def _lose(self, sandbox_id: str, expect: SandboxState, why: str) -> None:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=SYSTEM, lock=True)
            if row.state == expect:
                mark_lost(s, row, why)
        self.events.emit("lost", sandbox=sandbox_id, detail=why)

    def _worker_back(self, worker: str, revived: list[str]) -> None:
        """A worker (re)registered: learn the checkpoints a crash kept from us.

        ``revived`` are sandboxes it brought back hibernated that we had lost
        (their checkpoint was never reported); and a publish of its that we
        saw fail because it went away may be under way again (a restarted
        worker publishes again what it had not finished).
        """
        client = self.workers.client_if_alive(worker)
        if client is None:
            return
        with self.db.tx() as s:
            wanted = [sb.last_checkpoint for sid in revived
                      if (sb := s.get(SandboxRow, sid)) is not None and sb.last_checkpoint]
            local = set(s.get(WorkerRow, worker).checkpoints or [])  # type: ignore[union-attr]
            wanted += [c.id for c in s.scalars(select(CheckpointRow).where(
                CheckpointRow.worker == worker,
                CheckpointRow.state.in_((CheckpointState.FAILED, CheckpointState.PUBLISHING)),
            )) if c.id in local]
        for cp_id in dict.fromkeys(wanted):
            try:
                cp = client.send(worker_api.checkpoint_info(cp_id))
            except (FleetError, WorkerReply) as exc:
                log.warning("asking %s about checkpoint %s: %s", worker, cp_id[:12],
                            describe(exc))
                continue
            if cp.state not in (CheckpointState.PUBLISHING, CheckpointState.PUBLISHED):
                continue
            with self.db.tx() as s:
                store_checkpoint(s, cp, worker, self.store_url)
                if cp.state == CheckpointState.PUBLISHED:
                    refresh_recoverable(s, cp.sandbox)
            if cp.state == CheckpointState.PUBLISHING:
                self.publishes.watch(cp_id, worker)  # it stops at once if tombstoned

    def _wait_settled(self, sandbox_id: str, transitional: SandboxState) -> SandboxOut:
        while True:
            out = self.get_sandbox(sandbox_id, SYSTEM)
            if out.state != transitional or self.stopping.is_set():
                return out
            time.sleep(0.1)

    @timed("wake")
    def wake(self, sandbox_id: str, req: WakeRequest, caller: Principal) -> SandboxOut:
        with self.db.tx() as s:
            row = sandbox_row(s, sandbox_id, caller=caller, lock=True)
            if row.state == S.RUNNING:
                return sandbox_out(row)
            if row.state == S.HIBERNATING:
                raise SandboxBusy(sandbox_id, row.state, "wake",
                                  message=f"sandbox {sandbox_id} is still hibernating "
                                          "(publishing its checkpoint); wake it when it is "
                                          "hibernated")
            if row.state != S.HIBERNATED or row.last_checkpoint is None:
                raise refused(sandbox_id, row.state, "wake")
            cp_id = row.last_checkpoint
            cp = s.get(CheckpointRow, cp_id)
            published = cp is not None and cp.state == CheckpointState.PUBLISHED
            old = row.worker
            candidates = self.workers.candidates(s)
            placement = Placement(checkpoint=cp_id, base=row.image,
                                  only_on=None if published else old,
                                  memory_mb=row.memory_mb, cpus=row.cpus)
            previous = next((c for c in candidates if c.name == old), None)
            if (req.worker is None and previous is not None and previous.alive
                    and shortage(previous, placement) is None):
                target = old  # it still has every part locally
            else:
                target = self._place(candidates, placement, explicit=req.worker)
            assert target is not None
            client = self.workers.client(s, target)
            move(row, S.WAKING, "wake")
            row.worker = target
            network = stored_spec(row.network)
        try:
            info = client.send(worker_api.wake(sandbox_id, cp_id, network))
        except BaseException as exc:
            self._settle(sandbox_id, S.WAKING, None, state=S.HIBERNATED, worker=old,
                         error=f"wake on {target} failed: {describe(exc)}")
            raise
        out = self._settle(sandbox_id, S.WAKING, info, state=S.RUNNING)
        self.events.emit("woken", sandbox=sandbox_id, checkpoint=cp_id, worker=target)
        return out

    def _resync(self, sandbox_id: str, state: SandboxState, worker: str | None) -> None:
        """Settle a transition whose request died with the previous server process."""
        client = self.workers.client_if_alive(worker)
        info: WorkerSandbox | None = None
        if client is not None:
            try:
                info = client.send(worker_api.get_sandbox(sandbox_id))
            except (FleetError, WorkerReply):
                info = None
        why = "the control plane restarted during this operation"
        if info is None:
            self._settle(sandbox_id, state, None, state=S.FAILED, error=why)
        elif info.state == S.RUNNING:
            self._settle(sandbox_id, state, info, state=S.RUNNING)
        elif info.state == S.HIBERNATED and info.last_checkpoint and client is not None:
            try:
                cp = client.send(worker_api.checkpoint_info(info.last_checkpoint))
                with self.db.tx() as s:
                    store_checkpoint(s, cp, client.name, self.store_url)
                if cp.state == CheckpointState.PUBLISHING:
                    self.publishes.watch(cp.id, client.name)
            except (FleetError, WorkerReply):
                pass
            self._settle(sandbox_id, state, None, state=S.HIBERNATED,
                         last_checkpoint=info.last_checkpoint)
        else:
            self._settle(sandbox_id, state, None, state=S.FAILED, error=why)

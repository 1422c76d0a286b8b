"""The daemon's state and the operations that are more than one library call.

:class:`Node` puts together this worker's :class:`~forkyard.worker.Worker`,
its VM slots, its publishes and its link to the control plane; the routes
(``_routes``) call it.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from forkyard.errors import ForkyardError, SandboxNotFound
from forkyard.wire.lifecycle import BUSY, SandboxState
from forkyard.wire.network import NetworkSpec
from forkyard.wire.worker_models import (
    WorkerCheckpoint,
    WorkerHibernated,
    WorkerLeaving,
    WorkerReport,
    WorkerSandbox,
    WorkerStatus,
)
from forkyard.worker import Sandbox, Worker
from forkyard.worker._faults import crash_point
from forkyard.worker.daemon._capacity import Budget, Capacity, free_memory_mb
from forkyard.worker.daemon._link import ControlLink
from forkyard.worker.daemon._publish import Publisher

__all__ = ["Node", "OnShutdown", "sandbox_json"]

log = logging.getLogger("forkyard.worker.daemon")

OnShutdown = Literal["destroy", "hibernate"]


def sandbox_json(sb: Sandbox) -> WorkerSandbox:
    return WorkerSandbox.model_validate(sb.info().to_json())


class Node:
    def __init__(
        self,
        worker: Worker,
        *,
        worker_token: str,
        server_url: str | None,
        public_url: str | None,
        store_url: str | None,
        max_sandboxes: int,
        on_shutdown: OnShutdown,
        ready_file: Path | None,
        heartbeat_interval: float,
        budget: Budget | None = None,
        server_verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.worker = worker
        self.name = worker.name
        self.public_url = public_url
        self.store_url = store_url
        self.on_shutdown = on_shutdown
        self.link = ControlLink(
            name=worker.name, token=worker_token, server_url=server_url, public_url=public_url,
            interval=heartbeat_interval, ready_file=ready_file, report=self.report,
            on_orphans=self.destroy_orphans, verify=server_verify,
        )
        self.capacity = Capacity(worker, max_sandboxes, on_release=self.kick, budget=budget)
        self.publisher = Publisher(worker, on_change=self.kick)
        for cp in worker.unfinished_publishes():
            # cut short by a crash: a hibernated sandbox must be wakeable elsewhere, and
            # the control plane may be waiting for it (it asks again once we register)
            log.info("publishing %s again: an earlier process did not finish", cp.short_id)
            self.publisher.publish_later(cp)

    def kick(self) -> None:
        """Report to the control plane now rather than at the next heartbeat."""
        self.link.kick()

    # ------------------------------------------------------------------
    # what this worker tells the control plane
    def status(self) -> WorkerStatus:
        images: dict[str, str] = {}
        for info in self.worker.images.list():
            for name in info.names:
                images[name] = info.digest
        return WorkerStatus(
            name=self.name, running=self.capacity.running(), free_memory_mb=free_memory_mb(),
            max_sandboxes=self.capacity.limit, cached_bases=self.worker.cached_bases(),
            checkpoints=self.worker.local_checkpoint_ids(), images=images,
            capacity=self.capacity.report(),
        )

    def report(self) -> WorkerReport:
        assert self.public_url is not None
        return WorkerReport(
            **self.status().model_dump(), url=self.public_url, store_url=self.store_url,
            sandboxes=[sandbox_json(sb) for sb in self.worker.list()],
        )

    # ------------------------------------------------------------------
    # sandbox operations that are more than one library call
    def create(self, image: str, *, memory_mb: int | None, cpus: int | None,
               sandbox_id: str | None, disk: int | None = None,
               cold: bool = False, network: NetworkSpec | None = None) -> WorkerSandbox:
        settings = self.worker.home.settings()
        memory_mb = memory_mb or settings.memory_mb
        cpus = cpus or settings.cpus
        with self.capacity.slot(memory_mb=memory_mb, cpus=cpus, sandbox_id=sandbox_id):
            sb = self.worker.create(image, memory_mb=memory_mb, cpus=cpus, sandbox_id=sandbox_id,
                                    disk_size=disk, cold=cold, network=network)
        return sandbox_json(sb)

    def fork(self, checkpoint_id: str, sandbox_id: str | None,
             network: NetworkSpec | None = None) -> WorkerSandbox:
        """Fork; the library fetches what is not local (once, even for concurrent forks)."""
        fetched = not self.worker.checkpoints.has(checkpoint_id)
        # the manifest (verified, small) gives the shape; nothing else moves before admission
        cp = self.worker.resolve_checkpoint(checkpoint_id)
        with self.capacity.slot(memory_mb=cp.manifest.vm.memory_mb, cpus=cp.manifest.vm.cpus,
                                sandbox_id=sandbox_id):
            sb = self.worker.fork(cp, sandbox_id=sandbox_id, network=network)
        if fetched:
            self.kick()  # the control plane should know it is local here now
        return sandbox_json(sb)

    def hibernate(self, sandbox_id: str) -> WorkerHibernated:
        sb = self.worker.get(sandbox_id)
        cp = sb.hibernate()
        self.kick()
        self.publisher.publish_now(cp)
        crash_point("hibernate-published")
        return WorkerHibernated(checkpoint=self.publisher.checkpoint_json(cp),
                                sandbox=sandbox_json(sb))

    def wake(self, sandbox_id: str, checkpoint_id: str | None,
             network: NetworkSpec | None = None) -> WorkerSandbox:
        try:
            local: Sandbox | None = self.worker.get(sandbox_id)
        except SandboxNotFound:
            if checkpoint_id is None:
                raise  # not here, and nothing to adopt it from
            local = None
        if local is not None and checkpoint_id is not None and local.state not in BUSY:
            current = (local.state is SandboxState.HIBERNATED
                       and local.last_checkpoint == checkpoint_id)
            if not current:
                # A stale copy: the sandbox ran (and hibernated) elsewhere since, or
                # broke here.  Waking it would silently go back in time.
                log.info("dropping stale %s copy of %s", local.state.value, sandbox_id)
                local.destroy()
        if checkpoint_id is not None:
            vm = self.worker.resolve_checkpoint(checkpoint_id).manifest.vm
            memory_mb, cpus = vm.memory_mb, vm.cpus
        elif local is not None:
            memory_mb, cpus = local.memory_mb, local.cpus
        else:  # pragma: no cover - SandboxNotFound was raised above
            raise SandboxNotFound(sandbox_id)
        with self.capacity.slot(memory_mb=memory_mb, cpus=cpus, sandbox_id=sandbox_id):
            sb = self.worker.wake(sandbox_id, checkpoint=checkpoint_id, network=network)
        return sandbox_json(sb)

    def destroy_orphans(self, ids: list[str]) -> None:
        for sid in ids:
            try:
                sb = self.worker.get(sid)
            except SandboxNotFound:
                continue
            if sb.state is SandboxState.STARTING:
                continue  # a boot in flight is never an orphan; the next report settles it
            log.info("destroying %s: the control plane no longer has it here", sid)
            with contextlib.suppress(ForkyardError):
                sb.destroy()

    # ------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leave no VM behind: destroy or hibernate every sandbox, then tell the server.

        Heartbeats go on until the sandboxes are settled: a hibernation can take
        longer than the control plane's heartbeat timeout, and a worker declared
        dead in the meantime would have its hibernated sandboxes marked lost.
        They report no free slot, so placement looks elsewhere meanwhile.
        """
        self.capacity.drain()
        self.kick()
        hibernated: list[WorkerCheckpoint] = []
        busy = [sb for sb in self.worker.list() if sb.state in BUSY]
        if self.on_shutdown == "hibernate":
            with ThreadPoolExecutor(4, thread_name_prefix="shutdown") as pool:
                for res in pool.map(self._hibernate_quietly, busy):
                    if res is not None:
                        hibernated.append(res.checkpoint)
        else:
            for sb in busy:
                with contextlib.suppress(Exception):
                    sb.destroy()
        self.publisher.close()  # publishes in flight finish: they may be needed
        self.link.stop()
        self.link.leave(WorkerLeaving(
            sandboxes=[sandbox_json(sb) for sb in self.worker.list()], checkpoints=hibernated))
        self.worker.close()

    def _hibernate_quietly(self, sb: Sandbox) -> WorkerHibernated | None:
        try:
            return self.hibernate(sb.id)
        except Exception as exc:
            log.warning("hibernating %s at shutdown failed (%s); destroying it", sb.id, exc)
            with contextlib.suppress(Exception):
                sb.destroy()
            return None

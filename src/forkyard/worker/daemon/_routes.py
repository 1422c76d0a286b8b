"""The daemon's HTTP routes: thin translations between the wire models and the library."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import FastAPI, Query, Response
from fastapi import Path as PathParam

from forkyard.guest.client import ExecResult
from forkyard.wire.models import ExecRequest, ExecResultOut
from forkyard.wire.network import NetworkSpec
from forkyard.wire.worker_models import (
    WorkerCheckpoint,
    WorkerCheckpointRequest,
    WorkerCreateRequest,
    WorkerForkRequest,
    WorkerHealth,
    WorkerHibernated,
    WorkerSandbox,
    WorkerStatus,
    WorkerWakeRequest,
)
from forkyard.worker.daemon._file_routes import add_file_routes
from forkyard.worker.daemon._node import Node, sandbox_json
from forkyard.worker.daemon._port_routes import add_port_routes
from forkyard.worker.daemon._proc_routes import add_proc_routes
from forkyard.worker.daemon._publish import MAX_WAIT

__all__ = ["add_routes", "exec_json"]

T = TypeVar("T")

SandboxId = Annotated[str, PathParam(pattern=r"^sb-[0-9a-f]{20}$")]
CheckpointId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]


def exec_json(r: ExecResult) -> ExecResultOut:
    return ExecResultOut.of(r.exit_code, r.stdout_bytes, r.stderr_bytes, pid=r.pid,
                            signal=r.signal, timed_out=r.timed_out, truncated=r.truncated)


def add_routes(app: FastAPI, d: Node) -> None:
    w = d.worker
    add_proc_routes(app, d)
    add_file_routes(app, d)
    add_port_routes(app, lambda sandbox_id: w.get(sandbox_id))

    @app.get("/health")
    def health() -> WorkerHealth:
        return WorkerHealth(status="ok", name=d.name)

    @app.get("/status")
    def status() -> WorkerStatus:
        return d.status()

    @app.post("/sandboxes", status_code=201)
    def create(req: WorkerCreateRequest) -> WorkerSandbox:
        return d.create(req.image, memory_mb=req.memory_mb, cpus=req.cpus,
                        sandbox_id=req.sandbox_id, disk=req.disk, cold=req.cold,
                        network=req.network)

    @app.get("/sandboxes")
    def list_sandboxes() -> list[WorkerSandbox]:
        return [sandbox_json(sb) for sb in w.list()]

    @app.get("/sandboxes/{sandbox_id}")
    def get_sandbox(sandbox_id: SandboxId) -> WorkerSandbox:
        return sandbox_json(w.get(sandbox_id))

    @app.delete("/sandboxes/{sandbox_id}", status_code=204)
    def destroy(sandbox_id: SandboxId) -> Response:
        w.get(sandbox_id).destroy()
        d.kick()
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/exec", response_model=ExecResultOut)
    def exec_in(sandbox_id: SandboxId, req: ExecRequest) -> Response:
        r = w.get(sandbox_id).exec(req.cmd, env=req.env, cwd=req.cwd,
                                   timeout=req.effective_timeout, stdin=req.stdin_bytes(),
                                   background=req.background, user=req.user)
        # serialized straight to JSON bytes, each form dropped once the next exists:
        # a full reply is then held about twice at its peak, not four times
        model = exec_json(r)
        del r
        body = model.model_dump_json()
        del model
        return Response(body, media_type="application/json")

    @app.post("/sandboxes/{sandbox_id}/checkpoint", status_code=201)
    def checkpoint(sandbox_id: SandboxId,
                   req: WorkerCheckpointRequest | None = None) -> WorkerCheckpoint:
        req = req or WorkerCheckpointRequest()
        cp = w.get(sandbox_id).checkpoint(name=req.name)
        if req.publish:
            d.publisher.publish_later(cp)
        d.kick()
        return d.publisher.checkpoint_json(cp)

    @app.get("/checkpoints/{checkpoint_id}")
    async def checkpoint_status(
        checkpoint_id: CheckpointId,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0,
    ) -> WorkerCheckpoint:
        return await d.publisher.status(checkpoint_id, wait)

    @app.post("/checkpoints/{checkpoint_id}/fork", status_code=201)
    def fork(checkpoint_id: CheckpointId, req: WorkerForkRequest | None = None) -> WorkerSandbox:
        req = req or WorkerForkRequest()
        return d.fork(checkpoint_id, req.sandbox_id, network=req.network)

    @app.post("/sandboxes/{sandbox_id}/hibernate")
    def hibernate(sandbox_id: SandboxId) -> WorkerHibernated:
        return d.hibernate(sandbox_id)

    @app.post("/sandboxes/{sandbox_id}/wake")
    def wake(sandbox_id: SandboxId, req: WorkerWakeRequest | None = None) -> WorkerSandbox:
        req = req or WorkerWakeRequest()
        return d.wake(sandbox_id, req.checkpoint_id, network=req.network)

    @app.put("/sandboxes/{sandbox_id}/network")
    def set_network(sandbox_id: SandboxId, spec: NetworkSpec) -> WorkerSandbox:
        sb = w.get(sandbox_id)
        sb.set_network(spec)
        return sandbox_json(sb)

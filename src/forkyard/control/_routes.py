"""The control plane's HTTP routes (docs/api.md), thin over :class:`ControlPlane`.

Plain ``def`` routes run in the server's thread pool.  Routes that wait on a
guest for long (exec, file transfers) are ``async`` and proxy with an async
client, so a thousand sleeping commands hold no threads; ``/internal/*`` runs
on its own small thread limiter so heartbeats are never queued behind user
requests (a starved heartbeat would get a healthy worker declared dead).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

import forkyard
from forkyard.control._service import ControlPlane
from forkyard.wire import worker_api
from forkyard.wire.models import (
    CheckpointOut,
    CheckpointRequest,
    CreateSandboxRequest,
    EntryOut,
    ExecRequest,
    ExecResultOut,
    FileWritten,
    ForkRequest,
    Health,
    HeartbeatReply,
    HibernateRequest,
    SandboxOut,
    WakeRequest,
    WorkerLeaving,
    WorkerOut,
    WorkerReport,
)
from forkyard.wire.serving import check_length, limited_body

__all__ = ["add_routes"]

T = TypeVar("T")

SandboxId = Annotated[str, Path(description="sandbox id (`sb-` + 20 hex digits)")]
CheckpointRef = Annotated[str, Path(description="checkpoint id or a unique prefix of 6+ hex")]
GuestPath = Annotated[str, Query(pattern=r"^/[^\x00]*$", max_length=4096,
                                 description="absolute guest path")]
_RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                             "format": "binary"}}},
    }
}
_RAW_REPLY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                              "format": "binary"}}}}
}


def add_routes(app: FastAPI, plane: ControlPlane) -> None:
    limiters: dict[str, anyio.CapacityLimiter] = {}

    async def internal(fn: Callable[..., T], *args: Any) -> T:
        limiter = limiters.get("internal")
        if limiter is None:  # created lazily: it belongs to the running event loop
            limiter = limiters["internal"] = anyio.CapacityLimiter(8)
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    async def threaded(fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    @app.get("/health", tags=["meta"])
    def health() -> Health:
        return Health(status="ok", version=forkyard.__version__)

    @app.get("/v1/workers", tags=["workers"])
    def list_workers() -> list[WorkerOut]:
        return plane.workers.all()

    # --- sandboxes ------------------------------------------------------
    @app.post("/v1/sandboxes", status_code=201, tags=["sandboxes"])
    def create_sandbox(req: CreateSandboxRequest | None = None) -> SandboxOut:
        return plane.create_sandbox(req or CreateSandboxRequest())

    @app.get("/v1/sandboxes", tags=["sandboxes"])
    def list_sandboxes() -> list[SandboxOut]:
        return plane.list_sandboxes()

    @app.get("/v1/sandboxes/{sandbox_id}", tags=["sandboxes"])
    def get_sandbox(sandbox_id: SandboxId) -> SandboxOut:
        return plane.get_sandbox(sandbox_id)

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"])
    def destroy_sandbox(sandbox_id: SandboxId) -> Response:
        plane.destroy_sandbox(sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/exec", response_model=ExecResultOut, tags=["sandboxes"])
    async def exec_in(sandbox_id: SandboxId, req: ExecRequest) -> Response:
        client = await threaded(plane.running, sandbox_id, "exec in")
        raw = await client.raw(worker_api.exec_(sandbox_id, req))
        return Response(raw, media_type="application/json")

    # --- files ----------------------------------------------------------
    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=FileWritten, tags=["files"],
            openapi_extra=_RAW_BODY)
    async def write_file(
        sandbox_id: SandboxId, request: Request, path: GuestPath,
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644, append: bool = False,
    ) -> Response:
        check_length(request)
        client = await threaded(plane.running, sandbox_id, "write files of")
        async with client.stream(
            worker_api.write_file(sandbox_id, path, mode=mode, append=append),
            content=limited_body(request), content_type="application/octet-stream",
        ) as resp:
            raw = await resp.aread()
        return Response(raw, media_type="application/json")

    @app.get("/v1/sandboxes/{sandbox_id}/files", tags=["files"], response_class=Response,
            responses=_RAW_REPLY)
    async def read_file(sandbox_id: SandboxId, path: GuestPath) -> Response:
        client = await threaded(plane.running, sandbox_id, "read files of")
        stack = AsyncExitStack()
        resp = await stack.enter_async_context(
            client.stream(worker_api.read_file(sandbox_id, path)))
        headers = {}
        if "content-length" in resp.headers:
            headers["content-length"] = resp.headers["content-length"]
        return StreamingResponse(resp.aiter_raw(), media_type="application/octet-stream",
                                 headers=headers, background=BackgroundTask(stack.aclose))

    @app.get("/v1/sandboxes/{sandbox_id}/files/list", tags=["files"])
    def list_files(sandbox_id: SandboxId, path: GuestPath) -> list[EntryOut]:
        client = plane.running(sandbox_id, "list files of")
        return client.send(worker_api.list_files(sandbox_id, path))

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", tags=["files"])
    def stat_file(sandbox_id: SandboxId, path: GuestPath) -> EntryOut:
        client = plane.running(sandbox_id, "stat files of")
        return client.send(worker_api.stat_file(sandbox_id, path))

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, tags=["files"])
    def remove_file(sandbox_id: SandboxId, path: GuestPath, recursive: bool = False) -> Response:
        client = plane.running(sandbox_id, "remove files of")
        client.send(worker_api.remove_file(sandbox_id, path, recursive=recursive))
        return Response(status_code=204)

    # --- checkpoints, hibernate, wake -------------------------------------
    @app.post("/v1/sandboxes/{sandbox_id}/checkpoint", status_code=201, tags=["checkpoints"])
    def checkpoint(sandbox_id: SandboxId,
                   req: CheckpointRequest | None = None) -> CheckpointOut:
        return plane.checkpoint(sandbox_id, req or CheckpointRequest())

    @app.post("/v1/sandboxes/{sandbox_id}/hibernate", tags=["sandboxes"])
    def hibernate(sandbox_id: SandboxId, req: HibernateRequest | None = None) -> SandboxOut:
        return plane.hibernate(sandbox_id, wait=(req or HibernateRequest()).wait)

    @app.post("/v1/sandboxes/{sandbox_id}/wake", tags=["sandboxes"])
    def wake(sandbox_id: SandboxId, req: WakeRequest | None = None) -> SandboxOut:
        return plane.wake(sandbox_id, req or WakeRequest())

    @app.get("/v1/checkpoints", tags=["checkpoints"])
    def list_checkpoints() -> list[CheckpointOut]:
        return plane.list_checkpoints()

    @app.get("/v1/checkpoints/{checkpoint_id}", tags=["checkpoints"])
    def get_checkpoint(checkpoint_id: CheckpointRef) -> CheckpointOut:
        return plane.get_checkpoint(checkpoint_id)

    @app.delete("/v1/checkpoints/{checkpoint_id}", status_code=204, tags=["checkpoints"])
    def delete_checkpoint(checkpoint_id: CheckpointRef) -> Response:
        plane.delete_checkpoint(checkpoint_id)
        return Response(status_code=204)

    @app.post("/v1/checkpoints/{checkpoint_id}/fork", status_code=201, tags=["checkpoints"])
    def fork(checkpoint_id: CheckpointRef, req: ForkRequest | None = None) -> list[SandboxOut]:
        return plane.fork(checkpoint_id, req or ForkRequest())

    # --- worker daemons ---------------------------------------------------

    @app.post("/internal/workers/register", tags=["internal"])
    async def register(report: WorkerReport) -> HeartbeatReply:
        return await internal(plane.workers.register, report)

    @app.post("/internal/workers/{name}/heartbeat", tags=["internal"])
    async def heartbeat(name: Annotated[str, Path()], report: WorkerReport) -> HeartbeatReply:
        return await internal(plane.workers.heartbeat, name, report)

    @app.post("/internal/workers/{name}/leave", tags=["internal"], status_code=204)
    async def leave(name: Annotated[str, Path()],
                    leaving: Annotated[WorkerLeaving, Body()]) -> Response:
        await internal(plane.workers.leave, name, leaving)
        return Response(status_code=204)


"""The daemon's HTTP routes: thin translations between the wire models and the library."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from forkyard.guest.client import EntryInfo, ExecResult
from forkyard.wire.models import (
    EntryOut,
    ExecRequest,
    ExecResultOut,
    FileWritten,
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
from forkyard.wire.serving import check_length, limited_body
from forkyard.worker.daemon._node import Node, sandbox_json
from forkyard.worker.daemon._proc_routes import add_proc_routes
from forkyard.worker.daemon._publish import MAX_WAIT

__all__ = ["add_routes", "exec_json"]

T = TypeVar("T")

SandboxId = Annotated[str, PathParam(pattern=r"^sb-[0-9a-f]{20}$")]
CheckpointId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]
GuestPath = Annotated[str, Query(pattern=r"^/[^\x00]*$", max_length=4096)]


def exec_json(r: ExecResult) -> ExecResultOut:
    return ExecResultOut.of(r.exit_code, r.stdout_bytes, r.stderr_bytes, pid=r.pid,
                            signal=r.signal, timed_out=r.timed_out, truncated=r.truncated)


def _entry_json(e: EntryInfo) -> EntryOut:
    return EntryOut(name=e.name, mode=e.mode, size=e.size, mtime_ns=e.mtime_ns,
                    is_dir=e.is_dir)


def add_routes(app: FastAPI, d: Node) -> None:
    w = d.worker
    add_proc_routes(app, d)

    async def threaded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    @app.get("/health")
    def health() -> WorkerHealth:
        return WorkerHealth(status="ok", name=d.name)

    @app.get("/status")
    def status() -> WorkerStatus:
        return d.status()

    @app.post("/sandboxes", status_code=201)
    def create(req: WorkerCreateRequest) -> WorkerSandbox:
        return d.create(req.image, memory_mb=req.memory_mb, cpus=req.cpus,
                        sandbox_id=req.sandbox_id, disk=req.disk, cold=req.cold)

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

    @app.put("/sandboxes/{sandbox_id}/files", status_code=200)
    async def write_file(sandbox_id: SandboxId, request: Request, path: GuestPath,
                         mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
                         append: bool = False) -> FileWritten:
        check_length(request)
        sb = w.get(sandbox_id)
        data = b"".join([chunk async for chunk in limited_body(request)])
        size = await threaded(sb.files.write, path, data, mode=mode, append=append)
        return FileWritten(path=path, size=size)

    @app.get("/sandboxes/{sandbox_id}/files")
    def read_file(sandbox_id: SandboxId, path: GuestPath) -> Response:
        data = w.get(sandbox_id).files.read(path)
        return Response(data, media_type="application/octet-stream")

    @app.get("/sandboxes/{sandbox_id}/files/list")
    def list_files(sandbox_id: SandboxId, path: GuestPath) -> list[EntryOut]:
        return [_entry_json(e) for e in w.get(sandbox_id).files.list(path)]

    @app.get("/sandboxes/{sandbox_id}/files/stat")
    def stat_file(sandbox_id: SandboxId, path: GuestPath) -> EntryOut:
        return _entry_json(w.get(sandbox_id).files.stat(path))

    @app.delete("/sandboxes/{sandbox_id}/files", status_code=204)
    def remove_file(sandbox_id: SandboxId, path: GuestPath, recursive: bool = False) -> Response:
        w.get(sandbox_id).files.remove(path, recursive=recursive)
        return Response(status_code=204)

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
        return d.fork(checkpoint_id, (req or WorkerForkRequest()).sandbox_id)

    @app.post("/sandboxes/{sandbox_id}/hibernate")
    def hibernate(sandbox_id: SandboxId) -> WorkerHibernated:
        return d.hibernate(sandbox_id)

    @app.post("/sandboxes/{sandbox_id}/wake")
    def wake(sandbox_id: SandboxId, req: WorkerWakeRequest | None = None) -> WorkerSandbox:
        return d.wake(sandbox_id, (req or WorkerWakeRequest()).checkpoint_id)

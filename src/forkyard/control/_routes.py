"""The control plane's HTTP routes (docs/api.md), thin over :class:`ControlPlane`.

Plain ``def`` routes run in the server's thread pool.  Routes that wait on a
guest for long (exec, file transfers) are ``async`` and proxy with an async
client, so a thousand sleeping commands hold no threads; ``/internal/*`` runs
on its own small thread limiter so heartbeats are never queued behind user
requests (a starved heartbeat would get a healthy worker declared dead).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints
from starlette.background import BackgroundTask

import forkyard
from forkyard.control._deps import Admin, Caller
from forkyard.control._file_routes import add_file_routes
from forkyard.control._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from forkyard.control._port_routes import add_port_routes
from forkyard.control._proc_routes import add_proc_routes
from forkyard.control._service import ControlPlane
from forkyard.errors import Forbidden
from forkyard.wire import worker_api
from forkyard.wire.auth import (
    KeyCreate,
    KeyCreated,
    KeyOut,
    Principal,
    WorkerCredential,
)
from forkyard.wire.models import (
    GUEST_FILE_RE,
    GUEST_PATH_RE,
    LABEL_FILTER_RE,
    MAX_GUEST_PATH,
    MAX_LABELS,
    SANDBOX_ID_RE,
    WORKER_NAME_RE,
    CheckpointOut,
    CheckpointRequest,
    CreateSandboxRequest,
    EntryOut,
    ErrorBody,
    EventKind,
    EventOut,
    ExecRequest,
    ExecResultOut,
    FileWritten,
    ForkRequest,
    Health,
    HibernateRequest,
    SandboxOut,
    SandboxState,
    TimeoutRequest,
    WakeRequest,
    WorkerOut,
)
from forkyard.wire.serving import check_length, limited_body
from forkyard.wire.worker_models import HeartbeatReply, WorkerLeaving, WorkerReport

__all__ = ["add_routes"]

MAX_EVENT_WAIT = 10.0

T = TypeVar("T")

SandboxId = Annotated[str, Path(description="sandbox id (`sb-` + 20 hex digits)")]
CheckpointRef = Annotated[str, Path(description="checkpoint id or a unique prefix of 6+ hex")]
GuestPath = Annotated[str, Query(pattern=GUEST_PATH_RE, max_length=MAX_GUEST_PATH,
                                 description="absolute guest path")]
GuestFile = Annotated[str, Query(pattern=GUEST_FILE_RE, max_length=MAX_GUEST_PATH,
                                 description="absolute guest path of a file (not `/`, no "
                                             "trailing `/`, `.` or `..`)")]



def _as_worker(caller: Principal, name: str) -> None:
    """A worker credential acts only for its own worker."""
    if caller.kind != "worker" or caller.name != name:
        raise Forbidden(f"this credential is worker {caller.name!r}'s, not {name!r}'s")


_WHY = {
    400: "malformed request the schema cannot describe (e.g. a bad Content-Length), or a "
         "path the worker refuses",
    403: "the key may not do this (admin only)",
    404: "no such sandbox, checkpoint, worker, image or guest file",
    409: "the sandbox's state forbids it, or a conflict with the cluster (integrity, "
         "incompatible checkpoint, unpublished checkpoint elsewhere)",
    413: "a body or reply over the size limit",
    422: "invalid request (schema), or the guest refused the operation (`guest_error`)",
    502: "a worker failed or answered nonsense",
    503: "no worker can take it now (none alive, full, unreachable) or the database is down",
    504: "a worker or the guest did not answer in time",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error replies a route really gives, each with the one error body."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in statuses}


# what each kind of route can answer besides success (and 401, added for all)
_DB = _errors(503)
_LOOKUP = _errors(404, 422, 503)
_WORKER = (400, 404, 409, 422, 502, 503, 504)  # a call relayed to the sandbox's worker
_RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": False,  # no body: an empty file
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                             "format": "binary"}}},
    }
}
_RAW_REPLY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                              "format": "binary"}}}},
    **_errors(*_WORKER, 413),
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

    add_proc_routes(app, plane, _errors)
    add_file_routes(app, plane, _errors)
    add_port_routes(app, plane, _errors)

    @app.get("/health", tags=["meta"])
    def health() -> Health:
        role = "active" if plane.leader.active.is_set() else "standby"
        return Health(status="ok", version=forkyard.__version__, role=role)

    # fleet-wide numbers (every tenant's sandboxes, the workers): an operator's, so admin only
    @app.get("/metrics", tags=["meta"], response_class=Response, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(403, 503)})
    def metrics(_: Admin) -> Response:
        return Response(plane.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/workers", tags=["workers"], responses=_errors(403, 503))
    def list_workers(_: Admin) -> list[WorkerOut]:
        return plane.workers.all()

    # --- API keys (admin only) -------------------------------------------
    @app.post("/v1/keys", status_code=201, tags=["keys"],
              responses=_errors(400, 403, 409, 422, 503))
    def create_key(_: Admin, req: KeyCreate) -> KeyCreated:
        return plane.keys.create(req.name, admin=req.admin)

    @app.get("/v1/keys", tags=["keys"], responses=_errors(403, 503))
    def list_keys(_: Admin) -> list[KeyOut]:
        return plane.keys.all()

    @app.delete("/v1/keys/{name}", status_code=204, tags=["keys"],
                responses=_errors(403, 404, 409, 422, 503))
    def revoke_key(_: Admin, name: Annotated[str, Path(max_length=64)]) -> Response:
        plane.keys.revoke(name)
        return Response(status_code=204)

    @app.post("/v1/workers/{name}/credential", status_code=201, tags=["workers"],
              responses=_errors(403, 422, 503))
    def enroll_worker(_: Admin, name: Annotated[str, Path(pattern=WORKER_NAME_RE.pattern)]
                      ) -> WorkerCredential:
        """The credential a worker named ``name`` runs with (on another machine, say)."""
        return WorkerCredential(name=name, credential=plane.worker_credential(name))

    # --- sandboxes ------------------------------------------------------
    @app.post("/v1/sandboxes", status_code=201, tags=["sandboxes"],
              responses=_errors(*_WORKER))
    def create_sandbox(caller: Caller, req: CreateSandboxRequest | None = None) -> SandboxOut:
        return plane.create_sandbox(req or CreateSandboxRequest(), caller)

    @app.get("/v1/sandboxes", tags=["sandboxes"], responses=_errors(422, 503))
    def list_sandboxes(
        caller: Caller,
        label: Annotated[list[Annotated[str, StringConstraints(pattern=LABEL_FILTER_RE)]],
                         Query(max_length=MAX_LABELS,
                               description="`key=value`; repeated: all must match")] = [],  # noqa: B006
        state: Annotated[SandboxState | None, Query(
            description="only this state (default: all but destroyed)")] = None,
    ) -> list[SandboxOut]:
        wanted = dict(item.split("=", 1) for item in label)
        return plane.list_sandboxes(caller, wanted, state)

    @app.get("/v1/sandboxes/{sandbox_id}", tags=["sandboxes"], responses=_LOOKUP)
    def get_sandbox(caller: Caller, sandbox_id: SandboxId) -> SandboxOut:
        return plane.get_sandbox(sandbox_id, caller)

    @app.post("/v1/sandboxes/{sandbox_id}/timeout", tags=["sandboxes"],
              responses=_errors(400, 404, 409, 422, 503))
    def set_timeout(caller: Caller, sandbox_id: SandboxId, req: TimeoutRequest) -> SandboxOut:
        return plane.set_timeout(sandbox_id, req, caller)

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204, tags=["sandboxes"],
                responses=_errors(404, 409, 422, 503))
    def destroy_sandbox(caller: Caller, sandbox_id: SandboxId) -> Response:
        plane.destroy_sandbox(sandbox_id, caller)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/exec", response_model=ExecResultOut, tags=["sandboxes"],
              responses=_errors(*_WORKER, 413))
    async def exec_in(caller: Caller, sandbox_id: SandboxId, req: ExecRequest) -> Response:
        client = await threaded(plane.serving, sandbox_id, "exec in", caller)
        raw = await client.raw(worker_api.exec_(sandbox_id, req))
        return Response(raw, media_type="application/json")

    # --- files ----------------------------------------------------------
    @app.put("/v1/sandboxes/{sandbox_id}/files", response_model=FileWritten, tags=["files"],
             openapi_extra=_RAW_BODY, responses=_errors(*_WORKER, 413))
    async def write_file(
        caller: Caller, sandbox_id: SandboxId, request: Request, path: GuestFile,
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644, append: bool = False,
    ) -> Response:
        check_length(request)
        client = await threaded(plane.serving, sandbox_id, "write files of", caller)
        async with client.stream(
            worker_api.write_file(sandbox_id, path, mode=mode, append=append),
            content=limited_body(request), content_type="application/octet-stream",
        ) as resp:
            raw = await resp.aread()
        return Response(raw, media_type="application/json")

    @app.get("/v1/sandboxes/{sandbox_id}/files", tags=["files"], response_class=Response,
            responses=_RAW_REPLY)
    async def read_file(caller: Caller, sandbox_id: SandboxId, path: GuestFile) -> Response:
        client = await threaded(plane.serving, sandbox_id, "read files of", caller)
        stack = AsyncExitStack()
        resp = await stack.enter_async_context(
            client.stream(worker_api.read_file(sandbox_id, path)))
        headers = {}
        if "content-length" in resp.headers:
            headers["content-length"] = resp.headers["content-length"]
        return StreamingResponse(resp.aiter_raw(), media_type="application/octet-stream",
                                 headers=headers, background=BackgroundTask(stack.aclose))

    @app.get("/v1/sandboxes/{sandbox_id}/files/list", tags=["files"],
             responses=_errors(*_WORKER, 413))
    def list_files(caller: Caller, sandbox_id: SandboxId, path: GuestPath) -> list[EntryOut]:
        client = plane.serving(sandbox_id, "list files of", caller)
        return client.send(worker_api.list_files(sandbox_id, path))

    @app.get("/v1/sandboxes/{sandbox_id}/files/stat", tags=["files"],
             responses=_errors(*_WORKER))
    def stat_file(caller: Caller, sandbox_id: SandboxId, path: GuestPath) -> EntryOut:
        client = plane.serving(sandbox_id, "stat files of", caller)
        return client.send(worker_api.stat_file(sandbox_id, path))

    @app.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, tags=["files"],
                responses=_errors(*_WORKER))
    def remove_file(caller: Caller, sandbox_id: SandboxId, path: GuestFile,
                    recursive: bool = False) -> Response:
        client = plane.serving(sandbox_id, "remove files of", caller)
        client.send(worker_api.remove_file(sandbox_id, path, recursive=recursive))
        return Response(status_code=204)

    # --- checkpoints, hibernate, wake -------------------------------------
    @app.post("/v1/sandboxes/{sandbox_id}/checkpoint", status_code=201, tags=["checkpoints"],
              responses=_errors(*_WORKER))
    def checkpoint(caller: Caller, sandbox_id: SandboxId,
                   req: CheckpointRequest | None = None) -> CheckpointOut:
        return plane.checkpoint(sandbox_id, req or CheckpointRequest(), caller)

    @app.post("/v1/sandboxes/{sandbox_id}/hibernate", tags=["sandboxes"],
              responses=_errors(*_WORKER))
    def hibernate(caller: Caller, sandbox_id: SandboxId,
                  req: HibernateRequest | None = None) -> SandboxOut:
        return plane.hibernate(sandbox_id, caller, wait=(req or HibernateRequest()).wait)

    @app.post("/v1/sandboxes/{sandbox_id}/wake", tags=["sandboxes"],
              responses=_errors(*_WORKER))
    def wake(caller: Caller, sandbox_id: SandboxId, req: WakeRequest | None = None) -> SandboxOut:
        return plane.wake(sandbox_id, req or WakeRequest(), caller)

    @app.get("/v1/checkpoints", tags=["checkpoints"], responses=_DB)
    def list_checkpoints(caller: Caller) -> list[CheckpointOut]:
        return plane.list_checkpoints(caller)

    @app.get("/v1/checkpoints/{checkpoint_id}", tags=["checkpoints"],
             responses=_errors(404, 409, 422, 502, 503))
    def get_checkpoint(caller: Caller, checkpoint_id: CheckpointRef) -> CheckpointOut:
        return plane.get_checkpoint(checkpoint_id, caller)

    @app.get("/v1/checkpoints/{checkpoint_id}/manifest", tags=["checkpoints"],
             response_class=Response, responses={
                 200: {"description": "the manifest's canonical JSON (its sha256 is the id)",
                       "content": {"application/json": {"schema": {"type": "object"}}}},
                 **_errors(404, 409, 422, 502, 503)})
    def checkpoint_manifest(caller: Caller, checkpoint_id: CheckpointRef) -> Response:
        return Response(plane.checkpoint_manifest(checkpoint_id, caller),
                        media_type="application/json")

    @app.delete("/v1/checkpoints/{checkpoint_id}", status_code=204, tags=["checkpoints"],
                responses=_LOOKUP)
    def delete_checkpoint(caller: Caller, checkpoint_id: CheckpointRef) -> Response:
        plane.delete_checkpoint(checkpoint_id, caller)
        return Response(status_code=204)

    @app.post("/v1/checkpoints/{checkpoint_id}/fork", status_code=201, tags=["checkpoints"],
              responses=_errors(*_WORKER))
    def fork(caller: Caller, checkpoint_id: CheckpointRef,
             req: ForkRequest | None = None) -> list[SandboxOut]:
        return plane.fork(checkpoint_id, req or ForkRequest(), caller)

    # --- events -----------------------------------------------------------
    @app.get("/v1/events", tags=["events"], responses=_errors(422, 503))
    async def list_events(
        caller: Caller,
        sandbox: Annotated[str | None, Query(pattern=SANDBOX_ID_RE.pattern)] = None,
        kind: EventKind | None = None,
        after: Annotated[int, Query(ge=0, le=2**62, description="only events with a "
                                                                "larger id")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        wait: Annotated[float, Query(ge=0, le=MAX_EVENT_WAIT, description=(
            "seconds to hold the request open until an event comes (`--follow`)"))] = 0,
    ) -> list[EventOut]:
        return await threaded(functools.partial(
            plane.events.list, caller, sandbox=sandbox, kind=kind, after=after, limit=limit,
            wait=wait))

    # --- worker daemons ---------------------------------------------------

    @app.post("/internal/workers/register", tags=["internal"],
              responses=_errors(403, 409, 422, 503))
    async def register(caller: Caller, report: WorkerReport) -> HeartbeatReply:
        _as_worker(caller, report.name)
        return await internal(plane.workers.register, report)

    @app.post("/internal/workers/{name}/heartbeat", tags=["internal"],
              responses=_errors(400, 403, 404, 409, 422, 503))
    async def heartbeat(caller: Caller, name: Annotated[str, Path()],
                        report: WorkerReport) -> HeartbeatReply:
        _as_worker(caller, name)
        return await internal(plane.workers.heartbeat, name, report)

    @app.post("/internal/workers/{name}/leave", tags=["internal"], status_code=204,
              responses=_errors(403, 404, 422, 503))
    async def leave(caller: Caller, name: Annotated[str, Path()],
                    leaving: Annotated[WorkerLeaving, Body()]) -> Response:
        _as_worker(caller, name)
        await internal(plane.workers.leave, name, leaving)
        return Response(status_code=204)


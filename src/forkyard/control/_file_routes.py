"""The control plane's directory-tree and small file routes, relayed to the sandbox's worker.

Tree bodies (tar streams) are proxied as they arrive, in both directions, as
``PUT``/``GET .../files`` are: the control plane holds one chunk of a transfer
at a time whatever its size; the upload's size is capped by the per-request
file limit (``FORKYARD_MAX_FILE_BYTES``, default 16 GiB: 413 past it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Annotated, Any

import anyio.to_thread
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from forkyard.control._deps import Caller
from forkyard.control._service import ControlPlane
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.models import (
    GUEST_FILE_RE,
    GUEST_PATH_RE,
    MAX_GUEST_PATH,
    FileExists,
    TreeWritten,
)
from forkyard.wire.serving import check_length, limited_body

__all__ = ["add_file_routes"]

SandboxId = Annotated[str, Path(description="sandbox id (`sb-` + 20 hex digits)")]
GuestPath = Annotated[str, Query(pattern=GUEST_PATH_RE, max_length=MAX_GUEST_PATH,
                                 description="absolute guest path")]
GuestFile = Annotated[str, Query(pattern=GUEST_FILE_RE, max_length=MAX_GUEST_PATH,
                                 description="absolute guest path, not `/`, no trailing "
                                             "`/`, `.` or `..`")]
Mode = Annotated[int, Query(ge=0, le=0o7777, description="permission bits")]
Errors = Callable[..., dict[int | str, dict[str, Any]]]
_W = (400, 404, 409, 422, 502, 503, 504)
_TAR: dict[str, Any] = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
# the upload is declared as plain bytes (what it is on the wire; any content type is taken)
_TAR_BODY: dict[str, Any] = {"requestBody": {"required": False, "description": "a tar stream",
                                             "content": {"application/octet-stream": {
                                                 "schema": {"type": "string",
                                                            "format": "binary"}}}}}


def add_file_routes(app: FastAPI, plane: ControlPlane, errors: Errors) -> None:
    async def serving(sandbox_id: str, what: str, caller: Principal) -> Any:
        return await anyio.to_thread.run_sync(plane.serving, sandbox_id, what, caller)

    @app.put("/v1/sandboxes/{sandbox_id}/files/tree", response_model=TreeWritten,
             tags=["files"], openapi_extra=_TAR_BODY,
             responses=errors(*_W, 413))
    async def write_tree(caller: Caller, sandbox_id: SandboxId, request: Request,
                         path: GuestPath) -> Response:
        check_length(request)
        client = await serving(sandbox_id, "write files of", caller)
        async with client.stream(worker_api.write_tree(sandbox_id, path),
                                 content=limited_body(request),
                                 content_type="application/x-tar") as resp:
            raw = await resp.aread()
        return Response(raw, media_type="application/json")

    @app.get("/v1/sandboxes/{sandbox_id}/files/tree", tags=["files"],
             response_class=StreamingResponse,
             responses={200: {"description": "the directory as an uncompressed tar stream",
                              "content": _TAR}, **errors(*_W, 413)})
    async def read_tree(caller: Caller, sandbox_id: SandboxId,
                        path: GuestPath) -> StreamingResponse:
        client = await serving(sandbox_id, "read files of", caller)
        stack = AsyncExitStack()
        resp = await stack.enter_async_context(
            client.stream(worker_api.read_tree(sandbox_id, path)))
        return StreamingResponse(resp.aiter_raw(), media_type="application/x-tar",
                                 background=BackgroundTask(stack.aclose))

    @app.get("/v1/sandboxes/{sandbox_id}/files/exists", tags=["files"],
             responses=errors(*_W))
    async def exists(caller: Caller, sandbox_id: SandboxId, path: GuestPath) -> FileExists:
        client = await serving(sandbox_id, "stat files of", caller)
        return await anyio.to_thread.run_sync(
            client.send, worker_api.file_exists(sandbox_id, path))

    @app.post("/v1/sandboxes/{sandbox_id}/files/mkdir", status_code=204, tags=["files"],
              responses=errors(*_W))
    async def make_dir(caller: Caller, sandbox_id: SandboxId, path: GuestFile,
                       mode: Mode = 0o755, parents: bool = True) -> Response:
        client = await serving(sandbox_id, "write files of", caller)
        await anyio.to_thread.run_sync(
            client.send, worker_api.make_dir(sandbox_id, path, mode=mode, parents=parents))
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/files/rename", status_code=204, tags=["files"],
              responses=errors(*_W))
    async def rename(caller: Caller, sandbox_id: SandboxId, path: GuestFile, to: GuestFile,
                     overwrite: bool = True) -> Response:
        client = await serving(sandbox_id, "write files of", caller)
        await anyio.to_thread.run_sync(
            client.send, worker_api.rename_file(sandbox_id, path, to, overwrite=overwrite))
        return Response(status_code=204)

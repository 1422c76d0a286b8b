"""The daemon's file routes: bodies and replies streamed, one chunk held at a time.

An upload's body is pulled chunk by chunk from the event loop by the thread
that writes it into the guest (``anyio.from_thread``), so neither side holds
more than a chunk; a download is a generator the response drains in the
thread pool.  The first chunk of a download is read before the response
starts, so a missing file is a clean 404 rather than a cut stream.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, TypeVar

import anyio.from_thread
from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from forkyard.guest.client import EntryInfo
from forkyard.wire.models import (
    GUEST_PATH_RE,
    MAX_GUEST_PATH,
    EntryOut,
    FileExists,
    FileWritten,
    TreeWritten,
)
from forkyard.wire.serving import check_length, limited_body
from forkyard.worker._tree import read_tree, write_tree
from forkyard.worker.daemon._node import Node

__all__ = ["add_file_routes"]

T = TypeVar("T")

SandboxId = Annotated[str, PathParam(pattern=r"^sb-[0-9a-f]{20}$")]
GuestPath = Annotated[str, Query(pattern=GUEST_PATH_RE, max_length=MAX_GUEST_PATH)]
Mode = Annotated[int, Query(ge=0, le=0o7777)]
_END = object()


def _entry_json(e: EntryInfo) -> EntryOut:
    return EntryOut(name=e.name, mode=e.mode, size=e.size, mtime_ns=e.mtime_ns,
                    is_dir=e.is_dir)


def _pulled(body: AsyncIterator[bytes]) -> Iterator[bytes]:
    """The async body as a blocking iterator, for the worker thread that consumes it."""
    async def step() -> object:
        try:
            return await body.__anext__()
        except StopAsyncIteration:
            return _END

    while (chunk := anyio.from_thread.run(step)) is not _END:
        yield chunk  # type: ignore[misc]


async def _streamed(fn: Callable[[], Iterator[bytes]]) -> StreamingResponse:
    it = await run_in_threadpool(fn)
    first = await run_in_threadpool(next, it, b"")
    return StreamingResponse(itertools.chain([first], it),
                             media_type="application/octet-stream")


def add_file_routes(app: FastAPI, d: Node) -> None:
    w = d.worker

    async def threaded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    @app.put("/sandboxes/{sandbox_id}/files", status_code=200)
    async def write_file(sandbox_id: SandboxId, request: Request, path: GuestPath,
                         mode: Mode = 0o644, append: bool = False) -> FileWritten:
        check_length(request)
        sb = w.get(sandbox_id)
        body = _pulled(limited_body(request))
        size = await threaded(sb.files.write_stream, path, body, mode=mode, append=append)
        return FileWritten(path=path, size=size)

    @app.get("/sandboxes/{sandbox_id}/files")
    async def read_file(sandbox_id: SandboxId, path: GuestPath) -> StreamingResponse:
        sb = w.get(sandbox_id)
        return await _streamed(lambda: sb.files.read_stream(path))

    @app.put("/sandboxes/{sandbox_id}/files/tree", status_code=200)
    async def write_tree_route(sandbox_id: SandboxId, request: Request,
                               path: GuestPath) -> TreeWritten:
        check_length(request)
        sb = w.get(sandbox_id)
        body = _pulled(limited_body(request))
        count = await threaded(write_tree, sb.files, path, body)
        return TreeWritten(path=path, entries=count)

    @app.get("/sandboxes/{sandbox_id}/files/tree")
    async def read_tree_route(sandbox_id: SandboxId, path: GuestPath) -> StreamingResponse:
        sb = w.get(sandbox_id)
        return await _streamed(lambda: read_tree(sb.files, path))

    @app.get("/sandboxes/{sandbox_id}/files/list")
    def list_files(sandbox_id: SandboxId, path: GuestPath) -> list[EntryOut]:
        return [_entry_json(e) for e in w.get(sandbox_id).files.list(path)]

    @app.get("/sandboxes/{sandbox_id}/files/stat")
    def stat_file(sandbox_id: SandboxId, path: GuestPath) -> EntryOut:
        return _entry_json(w.get(sandbox_id).files.stat(path))

    @app.get("/sandboxes/{sandbox_id}/files/exists")
    def file_exists(sandbox_id: SandboxId, path: GuestPath) -> FileExists:
        return FileExists(path=path, exists=w.get(sandbox_id).files.exists(path))

    @app.post("/sandboxes/{sandbox_id}/files/mkdir", status_code=204)
    def make_dir(sandbox_id: SandboxId, path: GuestPath, mode: Mode = 0o755,
                 parents: bool = True) -> Response:
        w.get(sandbox_id).files.make_dir(path, mode=mode, parents=parents, exact_mode=True)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/files/rename", status_code=204)
    def rename(sandbox_id: SandboxId, path: GuestPath, to: GuestPath,
               overwrite: bool = True) -> Response:
        w.get(sandbox_id).files.rename(path, to, overwrite=overwrite)
        return Response(status_code=204)

    @app.delete("/sandboxes/{sandbox_id}/files", status_code=204)
    def remove_file(sandbox_id: SandboxId, path: GuestPath, recursive: bool = False) -> Response:
        w.get(sandbox_id).files.remove(path, recursive=recursive)
        return Response(status_code=204)

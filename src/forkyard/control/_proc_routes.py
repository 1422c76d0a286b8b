"""The control plane's process routes: relayed to the sandbox's worker, plus a live stream.

Each ``/procs`` route is one bounded worker call (see :mod:`forkyard.wire.procs`).
``.../stream`` turns the worker's long-polled output reads into one chunked
response of NDJSON events (a :class:`~forkyard.wire.procs.ProcOutput` a
line, the last one with ``exited``): the next read is only made once the
previous event was handed to the client's connection, so a client that stops
reading stops the reads (and, for a lossless process, the process) instead
of filling this server's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio.to_thread
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from forkyard.control._deps import Caller
from forkyard.control._service import ControlPlane
from forkyard.errors import PayloadTooLarge
from forkyard.wire import worker_api
from forkyard.wire.auth import Principal
from forkyard.wire.procs import (
    MAX_WAIT,
    READ_MAX,
    STDIN_MAX,
    ProcOut,
    ProcOutput,
    ProcStarted,
    ResizeRequest,
    SignalRequest,
    SpawnRequest,
    StdinWritten,
)
from forkyard.wire.serving import check_length

__all__ = ["add_proc_routes"]

SandboxId = Annotated[str, Path(description="sandbox id (`sb-` + 20 hex digits)")]
Pid = Annotated[int, Path(ge=2, le=2**31 - 1, description="process id in the guest")]
Offset = Annotated[int, Query(ge=0, le=2**62, description="byte offset in the stream")]
Wait = Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait for output")]
MaxBytes = Annotated[int, Query(ge=1, le=READ_MAX, description="bytes per stream at most")]
_STREAM_WAIT = 20.0  # one worker read of the stream; an empty event then keeps it alive

Errors = Callable[..., dict[int | str, dict[str, Any]]]
_W = (400, 404, 409, 422, 502, 503, 504)


def add_proc_routes(app: FastAPI, plane: ControlPlane, errors: Errors) -> None:
    async def running(sandbox_id: str, what: str, caller: Principal) -> Any:
        # process traffic is activity too (idle timers, auto-wake: control/_timers)
        return await anyio.to_thread.run_sync(plane.serving, sandbox_id, what, caller)

    @app.post("/v1/sandboxes/{sandbox_id}/procs", status_code=201, tags=["processes"],
              response_model=ProcStarted, responses=errors(*_W))
    async def spawn(caller: Caller, sandbox_id: SandboxId, req: SpawnRequest) -> Response:
        client = await running(sandbox_id, "start processes in", caller)
        raw = await client.raw(worker_api.spawn(sandbox_id, req))
        return Response(raw, status_code=201, media_type="application/json")

    @app.get("/v1/sandboxes/{sandbox_id}/procs", tags=["processes"],
             response_model=list[ProcOut], responses=errors(*_W))
    async def list_procs(caller: Caller, sandbox_id: SandboxId) -> Response:
        client = await running(sandbox_id, "list processes of", caller)
        return Response(await client.raw(worker_api.list_procs(sandbox_id)),
                        media_type="application/json")

    @app.get("/v1/sandboxes/{sandbox_id}/procs/{pid}/output", tags=["processes"],
             response_model=ProcOutput, responses=errors(*_W))
    async def output(caller: Caller, sandbox_id: SandboxId, pid: Pid, out: Offset = 0,
                     err: Offset = 0, wait: Wait = 0.0, max_bytes: MaxBytes = READ_MAX) -> Response:
        client = await running(sandbox_id, "read output of", caller)
        raw = await client.raw(worker_api.proc_output(sandbox_id, pid, out, err, wait,
                                                      max_bytes))
        return Response(raw, media_type="application/json")

    @app.get("/v1/sandboxes/{sandbox_id}/procs/{pid}/stream", tags=["processes"],
             response_class=StreamingResponse, responses={
                 200: {"description": "NDJSON: one ProcOutput a line, the last with `exited`",
                       "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                 **errors(*_W)})
    async def stream(caller: Caller, sandbox_id: SandboxId, pid: Pid, out: Offset = 0,
                     err: Offset = 0) -> StreamingResponse:
        client = await running(sandbox_id, "stream output of", caller)
        # the first read here, so a bad pid or sandbox is an error status, not a stream
        first = await client.raw(worker_api.proc_output(sandbox_id, pid, out, err, 0.0,
                                                        READ_MAX))

        async def events() -> AsyncIterator[bytes]:
            # One read ahead: the next worker read runs while this event is being sent,
            # so a fast stream costs one round trip per event, not two; a stalled
            # client still stops the reads (at most this event and the next are held).
            raw = first
            while True:
                ev = ProcOutput.model_validate_json(raw)
                if ev.exited:
                    yield raw + b"\n"
                    return
                o = ev.out_offset + _length(ev.stdout, ev.stdout_encoding)
                e = ev.err_offset + _length(ev.stderr, ev.stderr_encoding)
                ahead = asyncio.ensure_future(client.raw(worker_api.proc_output(
                    sandbox_id, pid, o, e, _STREAM_WAIT, READ_MAX)))
                try:
                    yield raw + b"\n"
                except BaseException:
                    ahead.cancel()
                    raise
                raw = await ahead

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.post("/v1/sandboxes/{sandbox_id}/procs/{pid}/stdin", tags=["processes"],
              response_model=StdinWritten, responses=errors(*_W, 413), openapi_extra={
                  "requestBody": {"required": False, "content": {"application/octet-stream": {
                      "schema": {"type": "string", "format": "binary"}}}}})
    async def stdin(caller: Caller, sandbox_id: SandboxId, pid: Pid, request: Request,
                    eof: bool = False) -> Response:
        check_length(request)
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > STDIN_MAX:
                raise PayloadTooLarge("stdin", len(data), STDIN_MAX)
        client = await running(sandbox_id, "write to processes of", caller)

        async def body() -> AsyncIterator[bytes]:
            yield bytes(data)

        async with client.stream(worker_api.proc_stdin(sandbox_id, pid, eof), content=body(),
                                 content_type="application/octet-stream") as resp:
            raw = await resp.aread()
        return Response(raw, media_type="application/json")

    @app.post("/v1/sandboxes/{sandbox_id}/procs/{pid}/resize", status_code=204,
              tags=["processes"], responses=errors(*_W))
    async def resize(caller: Caller, sandbox_id: SandboxId, pid: Pid,
                     req: ResizeRequest) -> Response:
        client = await running(sandbox_id, "resize terminals of", caller)
        await client.raw(worker_api.proc_resize(sandbox_id, pid, req))
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/procs/{pid}/signal", status_code=204,
              tags=["processes"], responses=errors(*_W))
    async def signal(caller: Caller, sandbox_id: SandboxId, pid: Pid,
                     req: SignalRequest) -> Response:
        client = await running(sandbox_id, "signal processes of", caller)
        await client.raw(worker_api.proc_signal(sandbox_id, pid, req))
        return Response(status_code=204)


def _length(value: str, encoding: str) -> int:
    """Bytes of a stream field without decoding it (base64: from its length)."""
    if encoding == "base64":
        pad = value[-2:].count("=")
        return len(value) // 4 * 3 - pad
    return len(value.encode("utf-8"))

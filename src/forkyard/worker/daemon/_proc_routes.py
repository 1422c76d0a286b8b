"""The daemon's process routes: spawn, pull output by offset, stdin, list, resize, signal.

Thin over :class:`forkyard.worker._sandbox.GuestProcs`; every reply is one
bounded agent read (see :mod:`forkyard.wire.procs`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from forkyard.errors import PayloadTooLarge
from forkyard.guest.procs import ProcInfo
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
from forkyard.worker.daemon._node import Node

__all__ = ["add_proc_routes", "proc_json"]

SandboxId = Annotated[str, PathParam(pattern=r"^sb-[0-9a-f]{20}$")]
Pid = Annotated[int, PathParam(ge=2, le=2**31 - 1)]
Offset = Annotated[int, Query(ge=0, le=2**62)]


def proc_json(p: ProcInfo) -> ProcOut:
    return ProcOut(pid=p.pid, command=p.command, running=p.running, pty=p.pty,
                   exit_code=p.exit_code, started_ns=p.started_ns, timed_out=p.timed_out)


def add_proc_routes(app: FastAPI, d: Node) -> None:
    w = d.worker

    @app.post("/sandboxes/{sandbox_id}/procs", status_code=201)
    def spawn(sandbox_id: SandboxId, req: SpawnRequest) -> ProcStarted:
        pid = w.get(sandbox_id).procs.spawn(req.cmd, **req.spawn_kwargs())
        return ProcStarted(pid=pid)

    @app.get("/sandboxes/{sandbox_id}/procs")
    def list_procs(sandbox_id: SandboxId) -> list[ProcOut]:
        return [proc_json(p) for p in w.get(sandbox_id).procs.list()]

    @app.get("/sandboxes/{sandbox_id}/procs/{pid}/output")
    def output(sandbox_id: SandboxId, pid: Pid, out: Offset = 0, err: Offset = 0,
               wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0,
               max_bytes: Annotated[int, Query(ge=1, le=READ_MAX)] = READ_MAX) -> Response:
        c = w.get(sandbox_id).procs.read(pid, out, err, max_bytes=max_bytes, wait=wait)
        body = ProcOutput.of(c.pid, c.stdout, c.stderr, c.out_offset, c.err_offset,
                             exited=c.exited, exit_code=c.exit_code, signal=c.signal,
                             timed_out=c.timed_out)
        return Response(body.model_dump_json(), media_type="application/json")

    @app.post("/sandboxes/{sandbox_id}/procs/{pid}/stdin")
    async def stdin(sandbox_id: SandboxId, pid: Pid, request: Request,
                    eof: bool = False) -> StdinWritten:
        check_length(request)
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > STDIN_MAX:  # refused before more is buffered
                raise PayloadTooLarge("stdin", len(data), STDIN_MAX)
        sb = w.get(sandbox_id)
        pending = await run_in_threadpool(sb.procs.write, pid, bytes(data), eof=eof)
        return StdinWritten(pending=pending)

    @app.post("/sandboxes/{sandbox_id}/procs/{pid}/resize", status_code=204)
    def resize(sandbox_id: SandboxId, pid: Pid, req: ResizeRequest) -> Response:
        w.get(sandbox_id).procs.resize(pid, req.rows, req.cols)
        return Response(status_code=204)

    @app.post("/sandboxes/{sandbox_id}/procs/{pid}/signal", status_code=204)
    def signal(sandbox_id: SandboxId, pid: Pid, req: SignalRequest) -> Response:
        w.get(sandbox_id).procs.kill(pid, req.signal)
        return Response(status_code=204)

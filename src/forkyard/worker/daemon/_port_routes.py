"""The worker's end of a byte tunnel: a WebSocket relayed to one TCP connection into the guest.

The control plane opens ``/sandboxes/{id}/ports/{port}/tunnel`` with this
worker's credential (``BearerAuth`` checks WebSockets too).  The guest
connection comes from ``Sandbox.connect_port``; once it is open the worker
sends the text message ``ok``, then relays bytes both ways as binary
messages of at most ``TUNNEL_MESSAGE`` bytes.  A connection that cannot be
made closes the WebSocket with ``4000 + status`` and the error type
(:mod:`forkyard.wire.ports`).  At most ``max_tunnels`` are open at once.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.to_thread
from anyio.abc import SocketStream
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from forkyard.errors import ForkyardError
from forkyard.wire.errors import error_body
from forkyard.wire.ports import MAX_PORT, TUNNEL_MESSAGE, close_code, no_delay

__all__ = ["CONNECT_TIMEOUT", "PortTarget", "add_port_routes"]

CONNECT_TIMEOUT = 10.0
IDLE = 300.0


class PortTarget(Protocol):
    """What a tunnel needs of a sandbox (``forkyard.worker.Sandbox``)."""

    def connect_port(self, port: int, *, timeout: float) -> socket.socket: ...


def add_port_routes(app: FastAPI, sandbox: Callable[[str], Any], *,
                    max_tunnels: int = 256) -> None:
    """``sandbox(id)`` is the sandbox (a :class:`PortTarget`) or raises SandboxNotFound."""
    open_now = [0]

    @app.websocket("/sandboxes/{sandbox_id}/ports/{port}/tunnel")
    async def tunnel(ws: WebSocket, sandbox_id: str, port: int) -> None:
        await ws.accept()
        if open_now[0] >= max_tunnels:  # counted before the connect: no burst passes the cap
            await ws.close(code=close_code(503), reason="unavailable")
            return
        open_now[0] += 1
        try:
            try:
                if not 1 <= port <= MAX_PORT:
                    raise _Close(close_code(422), "invalid")
                target = sandbox(sandbox_id)
                connect = getattr(target, "connect_port", None)
                if connect is None:  # a worker library without guest networking
                    raise _Close(close_code(409), "conflict")
                sock = await anyio.to_thread.run_sync(
                    lambda: connect(port, timeout=CONNECT_TIMEOUT))
            except _Close as exc:
                await ws.close(code=exc.code, reason=exc.reason)
                return
            except ForkyardError as exc:
                status, body = error_body(exc)
                await ws.close(code=close_code(status), reason=str(body["error"]["type"])[:100])
                return
            no_delay(sock)
            stream = await SocketStream.from_socket(sock)
            async with stream:
                await ws.send_text("ok")
                await _relay(ws, stream)
        finally:
            open_now[0] -= 1


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


async def _relay(ws: WebSocket, stream: SocketStream) -> None:
    async def to_guest() -> None:
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data:
                    await stream.send(data)
        except (WebSocketDisconnect, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            pass
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await stream.send_eof()  # the caller finished sending: half-close, keep reading

    async def from_guest() -> None:
        try:
            while True:
                with anyio.fail_after(IDLE):
                    data = await stream.receive(TUNNEL_MESSAGE)
                await ws.send_bytes(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                TimeoutError, OSError, WebSocketDisconnect, RuntimeError):
            pass
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=1000)

    async with anyio.create_task_group() as tg:
        tg.start_soon(to_guest)
        await from_guest()
        tg.cancel_scope.cancel()

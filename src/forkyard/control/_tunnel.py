"""Byte tunnels from the control plane to a guest port, through the sandbox's worker.

A tunnel is a WebSocket to the worker (:data:`forkyard.wire.worker_api.TUNNEL`)
with the worker's own credential.  The worker answers a text message ``ok``
once it reached the guest port, or closes with ``4000 + status`` and the error
type (:mod:`forkyard.wire.ports`), which becomes the same typed error here.
Every tunnel's memory is bounded: messages of at most ``TUNNEL_MESSAGE`` bytes
and a short receive queue, so a fast sender on either side waits for the slow one.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import websockets
from websockets.asyncio.client import ClientConnection, connect

from forkyard.control._workers import WorkerClient
from forkyard.errors import WorkerReplyError, WorkerTimeout, WorkerUnavailable
from forkyard.wire import worker_api
from forkyard.wire.errors import WorkerReply
from forkyard.wire.ports import TUNNEL_MESSAGE, close_status

__all__ = ["OPEN_TIMEOUT", "open_tunnel"]

OPEN_TIMEOUT = 15.0  # connect to the worker, and the worker to the guest port
_QUEUE = 4  # messages buffered per direction (x TUNNEL_MESSAGE bytes)


def _ssl_for(client: WorkerClient) -> ssl.SSLContext | None:
    if not client.url.startswith("https://"):
        return None
    verify = client.verify
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def refusal(worker: str, code: int | None, reason: str) -> Exception:
    """What a tunnel closed with ``code`` before it opened means."""
    status = close_status(code)
    if status is None:
        return WorkerReplyError(worker, f"worker {worker} closed the tunnel ({code} {reason})")
    kind = reason or "worker_error"
    message = {404: "no such sandbox or port on its worker",
               409: "the sandbox's guest refused the connection, or has no network",
               503: "the worker cannot open more tunnels now"}.get(
                   status, f"the worker refused the tunnel ({kind})")
    return WorkerReply(status, {"error": {"type": kind, "message": message, "detail": None}})


@asynccontextmanager
async def open_tunnel(client: WorkerClient, sandbox_id: str,
                      port: int) -> AsyncIterator[ClientConnection]:
    """An open tunnel to ``port`` of ``sandbox_id``'s guest (closed on exit)."""
    url = "ws" + client.url.removeprefix("http") + worker_api.tunnel_path(sandbox_id, port)
    try:
        ws = await connect(url, additional_headers={"authorization": f"Bearer {client.token}"},
                           ssl=_ssl_for(client), open_timeout=OPEN_TIMEOUT, compression=None,
                           max_size=TUNNEL_MESSAGE, max_queue=_QUEUE, proxy=None,
                           write_limit=TUNNEL_MESSAGE, ping_interval=None)
    except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as exc:
        raise WorkerUnavailable(f"worker {client.name} is unreachable (tunnel to "
                                f"{sandbox_id}:{port}): {exc}", worker=client.name) from exc
    try:
        try:
            with anyio.fail_after(OPEN_TIMEOUT):
                first = await ws.recv()
        except TimeoutError as exc:
            raise WorkerTimeout(client.name, f"tunnel to {sandbox_id}:{port}",
                                OPEN_TIMEOUT) from exc
        except websockets.exceptions.ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise refusal(client.name, rcvd.code if rcvd else None,
                          rcvd.reason if rcvd else "") from None
        if first != "ok":
            raise WorkerReplyError(client.name, f"worker {client.name} opened a tunnel with "
                                                f"{str(first)[:40]!r}, not 'ok'")
        yield ws
    finally:
        await ws.close()

"""``port-forward``: local TCP connections tunnelled to a guest port through the control plane.

Each accepted connection opens one WebSocket to ``/v1/sandboxes/{id}/tunnel/{port}``
(the API key in the header) and relays bytes both ways in two threads; at most
``max_connections`` are open at once (more are refused by closing them).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import threading
from collections.abc import Callable
from urllib.parse import quote

from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import APIError, Unavailable, error_class
from forkyard.wire.ports import TUNNEL_MESSAGE, close_status, no_delay

__all__ = ["Forwarder", "open_tunnel", "tunnel_error"]


def _ssl(config: ConnectionConfig) -> ssl.SSLContext | None:
    if not config.url.startswith("https://"):
        return None
    verify = config.verify()
    if isinstance(verify, ssl.SSLContext):
        return verify
    return ssl.create_default_context()


def open_tunnel(config: ConnectionConfig, sandbox_id: str, port: int,
                timeout: float = 30.0) -> ClientConnection:
    """A raw byte tunnel to ``port`` of the sandbox (binary messages both ways)."""
    url = ("ws" + config.url.rstrip("/").removeprefix("http")
           + f"/v1/sandboxes/{quote(sandbox_id, safe='')}/tunnel/{int(port)}")
    headers = {"authorization": f"Bearer {config.token}"} if config.token else {}
    try:
        ws = connect(url, additional_headers=headers, ssl=_ssl(config), open_timeout=timeout,
                     max_size=TUNNEL_MESSAGE, max_queue=4, compression=None, proxy=None)
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise Unavailable(f"cannot open a tunnel at {config.url}: {exc}") from exc
    return ws


def tunnel_error(exc: ConnectionClosed) -> APIError | None:
    """The typed error a tunnel closed with, or None (a plain close)."""
    rcvd = exc.rcvd
    status = close_status(rcvd.code if rcvd else None)
    if status is None or rcvd is None:
        return None
    return error_class(status, rcvd.reason)(f"the tunnel was refused: {status} {rcvd.reason}",
                                            status=status, type=rcvd.reason or "error")

_CLOSE_GRACE = 2.0  # seconds a tunnel's close handshake may take when the forwarder stops


class Forwarder:
    """Listen on ``host:local_port``; every connection is tunnelled to the guest's port.

    The relays run on an asyncio loop of their own (one thread): the asyncio
    WebSocket client waits for a slow peer without blocking its reader, where
    the threaded one holds its lock while a send blocks and so can deadlock a
    connection carrying a full load both ways.
    """

    def __init__(self, config: ConnectionConfig, sandbox_id: str, remote_port: int, *,
                 local_port: int = 0, host: str = "127.0.0.1", max_connections: int = 64,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.config = config
        self.sandbox_id = sandbox_id
        self.remote_port = remote_port
        self.listener = socket.create_server((host, local_port))
        self.port = self.listener.getsockname()[1]
        self.on_error = on_error
        self.max_connections = max_connections
        self._open = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve until :meth:`close` (from another thread), or SIGINT/SIGTERM in the main thread."""
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, sock=self.listener, limit=TUNNEL_MESSAGE))
        # In the main thread a signal stops the loop between callbacks: a
        # KeyboardInterrupt raised at any bytecode could land inside the loop's
        # own bookkeeping and leave the shutdown below waiting forever (seen once:
        # `forkyard port-forward` still running 30 s after SIGINT).
        stops = [signal.SIGINT, signal.SIGTERM] \
            if threading.current_thread() is threading.main_thread() else []
        for sig in stops:
            self._loop.add_signal_handler(sig, self._loop.stop)
        try:
            self._loop.run_forever()
        finally:
            for sig in stops:
                self._loop.remove_signal_handler(sig)
            self._server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:  # open connections end with the forwarder
                task.cancel()
            if pending:
                # bounded: a stop (Ctrl-C) does not wait on a slow peer's close handshake
                self._loop.run_until_complete(asyncio.wait(pending, timeout=_CLOSE_GRACE))
            self._loop.close()

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _report(self, exc: Exception) -> None:
        if self.on_error is not None:
            self.on_error(exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.max_connections:
            writer.close()  # bounded: a flood of local connections opens no more tunnels
            return
        # create_server made the listener with proto 0, so asyncio left Nagle on
        no_delay(writer.get_extra_info("socket"))
        self._open += 1
        try:
            await self._relay(reader, writer)
        finally:
            self._open -= 1
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = self.config
        url = ("ws" + config.url.rstrip("/").removeprefix("http")
               + f"/v1/sandboxes/{quote(self.sandbox_id, safe='')}/tunnel/{self.remote_port}")
        headers = {"authorization": f"Bearer {config.token}"} if config.token else {}
        try:
            ws = await aconnect(url, additional_headers=headers, ssl=_ssl(config),
                                open_timeout=30, close_timeout=_CLOSE_GRACE,
                                max_size=TUNNEL_MESSAGE, max_queue=4,
                                compression=None, proxy=None)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._report(Unavailable(f"cannot open a tunnel at {config.url}: {exc}"))
            return

        async def upstream() -> None:
            try:
                while data := await reader.read(TUNNEL_MESSAGE):
                    await ws.send(data)
            except (OSError, ConnectionClosed):
                pass
            await ws.close()

        up = asyncio.ensure_future(upstream())
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    writer.write(message)
                    await writer.drain()
        except ConnectionClosed as exc:
            err = tunnel_error(exc)
            if err is not None:
                self._report(err)
        except OSError:
            pass
        finally:
            up.cancel()
            await ws.close()

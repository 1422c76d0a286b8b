"""``port-forward``: local TCP connections tunnelled to a guest port through the control plane.

Each accepted connection opens one WebSocket to ``/v1/sandboxes/{id}/tunnel/{port}``
(the API key in the header) and relays bytes both ways in two threads; at most
``max_connections`` are open at once (more are refused by closing them).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from urllib.parse import quote

from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import APIError, Unavailable, error_class
from forkyard.wire.ports import TUNNEL_MESSAGE, close_status

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


class Forwarder:
    """Listen on ``host:local_port``; every connection is tunnelled to the guest's port."""

    def __init__(self, config: ConnectionConfig, sandbox_id: str, remote_port: int, *,
                 local_port: int = 0, host: str = "127.0.0.1", max_connections: int = 64,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.config = config
        self.sandbox_id = sandbox_id
        self.remote_port = remote_port
        self.listener = socket.create_server((host, local_port))
        self.port = self.listener.getsockname()[1]
        self.on_error = on_error
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()

    def serve_forever(self) -> None:
        self.listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            if not self._slots.acquire(blocking=False):
                conn.close()  # bounded: a flood of local connections opens no more tunnels
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def start(self) -> Forwarder:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            ws = open_tunnel(self.config, self.sandbox_id, self.remote_port)
        except Exception as exc:
            conn.close()
            self._slots.release()
            if self.on_error is not None:
                self.on_error(exc)
            return

        def upstream() -> None:
            try:
                while data := conn.recv(TUNNEL_MESSAGE):
                    ws.send(data)
            except (OSError, ConnectionClosed):
                pass
            ws.close()

        up = threading.Thread(target=upstream, daemon=True)
        up.start()
        try:
            for message in ws:
                if isinstance(message, bytes):
                    conn.sendall(message)
        except ConnectionClosed as exc:
            err = tunnel_error(exc)
            if err is not None and self.on_error is not None:
                self.on_error(err)
        except OSError:
            pass
        finally:
            ws.close()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            up.join(timeout=5)
            self._slots.release()

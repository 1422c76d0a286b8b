"""Guest ports from outside: the HTTP proxy and the raw tunnel of ``port-forward``.

``/v1/sandboxes/{id}/ports/{port}/{path}`` relays one HTTP exchange per
request to the guest's ``port``; ``/v1/sandboxes/{id}/tunnel/{port}`` (a
WebSocket) relays a raw TCP connection.  Both go through a byte tunnel to the
sandbox's worker (:mod:`._tunnel`).  This sits *outside* ``KeyAuth``: a
preview URL carries no API key, so who may pass is decided here
(:meth:`Networks.port_target`).

Bounded everything: at most ``max_tunnels`` open at once on the server and
``per_sandbox`` per sandbox (more get a typed 503), request bodies up to
``max_body`` bytes, response heads up to 64 KiB (h11's limit), every buffer a
few 64 KiB messages, and an idle timeout on every read.  The caller's
``Authorization`` (an API key) and ``forkyard_token`` never reach the guest;
hop-by-hop headers are dropped both ways.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, contextmanager
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import anyio.to_thread
import h11
import websockets
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection

from forkyard.control._network import port_path
from forkyard.control._tunnel import open_tunnel
from forkyard.control._wsproxy import relay_websocket
from forkyard.errors import ForkyardError, TunnelLimit
from forkyard.wire.auth import Principal, bearer_token
from forkyard.wire.errors import ApiError, WorkerReply, error_body
from forkyard.wire.ports import MAX_PORT, TOKEN_PARAM, TUNNEL_MESSAGE, close_code

__all__ = ["MAX_BODY", "PortProxy"]

MAX_BODY = 64 * 1024 * 1024
IDLE = 300.0  # seconds without a byte either way before a tunnel is closed
_PATH = re.compile(r"^/v1/sandboxes/(sb-[0-9a-f]{20})/(ports|tunnel)/([0-9]{1,5})(/.*)?$")
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                  b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host",
                  b"content-length"})


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body


def _as_refusal(exc: BaseException) -> _Refused:
    if isinstance(exc, WorkerReply):
        return _Refused(exc.status, exc.body)
    if isinstance(exc, ApiError):
        return _Refused(exc.status, exc.body())
    if isinstance(exc, ForkyardError):
        return _Refused(*error_body(exc))
    raise exc


class PortProxy:
    """ASGI middleware: serves the port paths itself, passes every other request on."""

    def __init__(self, app: ASGIApp, *, plane: Any, resolve: Callable[[str], Principal | None],
                 max_tunnels: int = 256, per_sandbox: int = 32,
                 max_body: int = MAX_BODY) -> None:
        self.app = app
        self.plane = plane
        self.resolve = resolve
        self.max_tunnels = max_tunnels
        self.per_sandbox = per_sandbox
        self.max_body = max_body
        self._open: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.match(scope.get("path", "")) if scope["type"] in ("http", "websocket") \
            else None
        if match is None:
            await self.app(scope, receive, send)
            return
        sandbox_id, kind, raw_port, rest = match.groups()
        port = int(raw_port)
        is_ws = scope["type"] == "websocket"
        if is_ws and (await receive())["type"] != "websocket.connect":
            return
        try:
            if not 1 <= port <= MAX_PORT:
                raise ApiError(422, f"port {port} is not a TCP port (1-{MAX_PORT})")
            if kind == "tunnel" and (rest or not is_ws):
                raise ApiError(400, "a tunnel is a WebSocket on /v1/sandboxes/{id}/tunnel/{port}")
            if kind == "ports" and rest is None:
                await _redirect(send, scope, port_path(sandbox_id, port))
                return
            token, from_query = _token(scope, port)
            principal = await self._principal(scope, token)
            client = await anyio.to_thread.run_sync(lambda: self.plane.port_target(
                sandbox_id, port, principal=principal, token=token))
            with self._slot(sandbox_id):
                async with open_tunnel(client, sandbox_id, port) as tunnel:
                    if is_ws and kind == "tunnel":
                        await _relay_socket(tunnel, receive, send)
                    elif is_ws:
                        await relay_websocket(
                            tunnel, receive, send, host=_host(scope).decode("latin-1"),
                            target=_target(scope, rest or "/"),
                            headers=_forward_headers(scope, principal is None, ws=True),
                            subprotocols=scope.get("subprotocols") or [])
                    else:
                        await self._relay_http(scope, receive, send, tunnel, rest or "/",
                                               principal is None, token if from_query else None,
                                               port_path(sandbox_id, port))
        except Exception as exc:
            refusal = _as_refusal(exc)
            if is_ws:
                await _close_ws(send, refusal)
            else:
                await _reply(send, refusal.status, refusal.body)

    async def _principal(self, scope: Scope, token: str | None) -> Principal | None:
        given = bearer_token(list(scope.get("headers", [])))
        if token is not None or given is None:
            return None  # a preview token (the Authorization header is the guest's)
        principal = await anyio.to_thread.run_sync(self.resolve, given)
        if principal is None:
            raise ApiError(401, "invalid bearer token")
        return principal

    @contextmanager
    def _slot(self, sandbox_id: str) -> Any:
        if sum(self._open.values()) >= self.max_tunnels:
            raise TunnelLimit(f"this control plane has {self.max_tunnels} tunnels open, its "
                              "limit; retry later", scope="server", limit=self.max_tunnels)
        if self._open[sandbox_id] >= self.per_sandbox:
            raise TunnelLimit(f"sandbox {sandbox_id} has {self.per_sandbox} tunnels open, its "
                              "limit; retry later", scope="sandbox", limit=self.per_sandbox)
        self._open[sandbox_id] += 1
        try:
            yield
        finally:
            self._open[sandbox_id] -= 1
            if not self._open[sandbox_id]:
                del self._open[sandbox_id]

    async def _relay_http(self, scope: Scope, receive: Receive, send: Send,
                          tunnel: ClientConnection, path: str, strip_auth: bool,
                          new_token: str | None, cookie_path: str) -> None:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        target = _target(scope, path)
        first = await receive()
        body = first.get("body", b"") if first["type"] == "http.request" else b""
        more = bool(first.get("more_body", False))
        headers = [(b"host", _host(scope)), *_forward_headers(scope, strip_auth),
                   (b"connection", b"close")]
        headers.append((b"transfer-encoding", b"chunked") if more
                       else (b"content-length", str(len(body)).encode()))
        await tunnel.send(conn.send(h11.Request(method=scope["method"], target=target,
                                                headers=headers)))
        started = False

        async def upload() -> None:
            nonlocal body, more
            sent = len(body)
            while True:
                if body:
                    await tunnel.send(conn.send(h11.Data(data=body)))
                if not more:
                    break
                message = await receive()
                if message["type"] != "http.request":
                    return  # the caller went away
                body, more = message.get("body", b""), bool(message.get("more_body", False))
                sent += len(body)
                if sent > self.max_body:
                    raise ApiError(413, f"request body over the limit of {self.max_body} "
                                        "bytes", detail={"limit": self.max_body})
            if conn.our_state is h11.SEND_BODY:
                await tunnel.send(conn.send(h11.EndOfMessage()))

        async def download() -> None:
            nonlocal started
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    with anyio.fail_after(IDLE):
                        try:
                            data = await tunnel.recv()
                        except websockets.exceptions.ConnectionClosed:
                            data = b""
                    conn.receive_data(data if isinstance(data, bytes) else b"")
                elif isinstance(event, h11.Response):
                    out = [(k.lower(), v) for k, v in event.headers if k.lower() not in _HOP
                           or k.lower() == b"content-length"]
                    if new_token is not None:  # later requests of the page carry it as a cookie
                        out.append((b"set-cookie", _cookie(new_token, cookie_path)))
                    await send({"type": "http.response.start", "status": event.status_code,
                                "headers": out})
                    started = True
                elif isinstance(event, h11.Data):
                    await send({"type": "http.response.body", "body": bytes(event.data),
                                "more_body": True})
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return

        try:
            async with anyio.create_task_group() as tg:
                async def upload_then_wait() -> None:
                    await upload()
                tg.start_soon(upload_then_wait)
                await download()
                tg.cancel_scope.cancel()
        except Exception as exc:
            cause = _first(exc)
            if started:
                return  # the reply is cut short: the caller sees a truncated body
            if isinstance(cause, h11.ProtocolError):
                raise WorkerReply(502, {"error": {
                    "type": "worker_error", "message": "the guest's port did not answer "
                    f"HTTP: {cause}", "detail": None}}) from None
            if isinstance(cause, TimeoutError):
                raise WorkerReply(504, {"error": {
                    "type": "timeout", "message": f"the guest's port sent nothing for "
                    f"{IDLE:.0f} s", "detail": None}}) from None
            raise cause from None


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _host(scope: Scope) -> bytes:
    return next((v for k, v in scope["headers"] if k == b"host"), b"localhost")


def _target(scope: Scope, path: str) -> str:
    """The guest's request target: the path below the port, the query without the token."""
    query = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode(
        "latin-1"), keep_blank_values=True) if k != TOKEN_PARAM])
    return path + (f"?{query}" if query else "")


def _forward_headers(scope: Scope, strip_auth: bool, *,
                     ws: bool = False) -> list[tuple[bytes, bytes]]:
    """The caller's headers the guest gets: no hop-by-hop ones, never the API key or the
    preview-token cookie (``strip_auth``: the Authorization header was a preview token's
    caller's own, for the guest)."""
    return [(k, v) for k, v in scope["headers"] if k not in _HOP
            and not (ws and k.startswith(b"sec-websocket-"))
            and not (k == b"authorization" and not strip_auth)
            and not (k == b"cookie" and TOKEN_PARAM.encode() in v)]


def _token(scope: Scope, port: int) -> tuple[str | None, bool]:
    """The preview token of the request, and whether it came in the query."""
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == TOKEN_PARAM:
            return value[:200], True
    for k, v in scope.get("headers", []):
        if k == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(v.decode("latin-1"))
            except Exception:  # noqa: S112 - a malformed cookie is no token
                continue
            if TOKEN_PARAM in jar:
                return jar[TOKEN_PARAM].value[:200], False
    return None, False


def _cookie(token: str, path: str) -> bytes:
    return f"{TOKEN_PARAM}={token}; Path={path}; HttpOnly; SameSite=Lax".encode()


async def _relay_socket(tunnel: ClientConnection, receive: Receive, send: Send) -> None:
    """A raw byte tunnel (port-forward): binary messages relayed both ways."""
    await send({"type": "websocket.accept"})

    async def inbound() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data:
                for i in range(0, len(data), TUNNEL_MESSAGE):
                    await tunnel.send(data[i:i + TUNNEL_MESSAGE])

    async def outbound() -> None:
        try:
            while True:
                with anyio.fail_after(IDLE):
                    data = await tunnel.recv()
                if isinstance(data, bytes):
                    await send({"type": "websocket.send", "bytes": data})
        except (websockets.exceptions.ConnectionClosed, TimeoutError):
            pass
        await send({"type": "websocket.close", "code": 1000})

    async with AsyncExitStack(), anyio.create_task_group() as tg:
        async def inbound_then_stop() -> None:
            await inbound()
            tg.cancel_scope.cancel()
        tg.start_soon(inbound_then_stop)
        await outbound()
        tg.cancel_scope.cancel()


async def _close_ws(send: Send, refusal: _Refused) -> None:
    kind = str(refusal.body.get("error", {}).get("type", "error"))[:100]
    # accepted first so that the close code (4000 + status) reaches the caller; a relay
    # that failed after its accept only closes
    with contextlib.suppress(RuntimeError, OSError):
        await send({"type": "websocket.accept"})
    with contextlib.suppress(RuntimeError, OSError):
        await send({"type": "websocket.close", "code": close_code(refusal.status),
                    "reason": kind})


async def _redirect(send: Send, scope: Scope, path: str) -> None:
    query = scope.get("query_string", b"")
    location = path.encode() + (b"?" + query if query else b"")
    await send({"type": "http.response.start", "status": 308,
                "headers": [(b"location", location), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    import json

    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})

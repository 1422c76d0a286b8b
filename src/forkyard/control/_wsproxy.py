"""WebSockets to a guest port: the caller's WebSocket relayed, message by message, to one
the control plane opens to the guest over a byte tunnel.

The server (uvicorn) ends the caller's WebSocket; the guest's is spoken here
with the sans-I/O client of ``websockets``, so both sides keep their own
framing and masking and the proxy sees whole messages -- each bounded by
``MAX_MESSAGE`` (a larger one closes the connection with 1009), with a few
messages buffered per direction at most.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import websockets
from starlette.types import Receive, Send
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from forkyard.wire.errors import WorkerReply

__all__ = ["MAX_MESSAGE", "relay_websocket"]

MAX_MESSAGE = 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0
IDLE = 300.0


def _refused(message: str) -> WorkerReply:
    return WorkerReply(502, {"error": {"type": "worker_error", "message": message,
                                       "detail": None}})


async def _flush(proto: ClientProtocol, tunnel: ClientConnection) -> None:
    for data in proto.data_to_send():
        if data:
            await tunnel.send(data)


async def relay_websocket(tunnel: ClientConnection, receive: Receive, send: Send, *,
                          host: str, target: str, headers: Sequence[tuple[bytes, bytes]],
                          subprotocols: Sequence[str]) -> None:
    """Handshake with the guest, then accept the caller and relay until either closes."""
    proto = ClientProtocol(parse_uri(f"ws://{host}{target}"), max_size=MAX_MESSAGE,
                           subprotocols=[websockets.Subprotocol(s) for s in subprotocols]
                           or None)
    request = proto.connect()
    for k, v in headers:
        request.headers[k.decode("latin-1")] = v.decode("latin-1")
    proto.send_request(request)
    await _flush(proto, tunnel)
    response: Response | None = None
    with anyio.fail_after(HANDSHAKE_TIMEOUT):
        while response is None:
            try:
                data = await tunnel.recv()
            except websockets.exceptions.ConnectionClosed:
                raise _refused("the guest's port closed the connection during the "
                               "WebSocket handshake") from None
            proto.receive_data(data if isinstance(data, bytes) else b"")
            for event in proto.events_received():
                if isinstance(event, Response):
                    response = event
    if proto.state is not State.OPEN:
        raise _refused(f"the guest's port refused the WebSocket ({response.status_code} "
                       f"{response.reason_phrase})"[:200])
    await send({"type": "websocket.accept", "subprotocol": proto.subprotocol})

    async def inbound() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                proto.send_close(message.get("code", 1000))
                await _flush(proto, tunnel)
                return
            if message.get("text") is not None:
                proto.send_text(message["text"].encode())
            elif message.get("bytes") is not None:
                proto.send_binary(message["bytes"])
            await _flush(proto, tunnel)

    async def outbound() -> None:
        parts: list[bytes] = []
        kind = Opcode.TEXT
        size = 0
        while True:
            try:
                with anyio.fail_after(IDLE):
                    data = await tunnel.recv()
            except (websockets.exceptions.ConnectionClosed, TimeoutError):
                break
            proto.receive_data(data if isinstance(data, bytes) else b"")
            await _flush(proto, tunnel)  # pongs, the close reply
            for frame in proto.events_received():
                if not isinstance(frame, Frame):
                    continue
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    kind, parts, size = frame.opcode, [], 0
                elif frame.opcode is not Opcode.CONT:
                    continue  # ping, pong and close are the protocol's own
                parts.append(bytes(frame.data))
                size += len(frame.data)
                if size > MAX_MESSAGE:  # the protocol's own limit covers this; twice is cheap
                    await send({"type": "websocket.close", "code": 1009})
                    return
                if frame.fin:
                    whole = b"".join(parts)
                    parts, size = [], 0
                    await send({"type": "websocket.send", "text": whole.decode()}
                               if kind is Opcode.TEXT else
                               {"type": "websocket.send", "bytes": whole})
            if proto.state is State.CLOSED or proto.close_rcvd is not None:
                break
        code = proto.close_rcvd.code if proto.close_rcvd is not None else 1000
        await send({"type": "websocket.close", "code": code if 1000 <= code < 5000 else 1000})

    async with anyio.create_task_group() as tg:
        async def inbound_then_stop() -> None:
            await inbound()
            tg.cancel_scope.cancel()
        tg.start_soon(inbound_then_stop)
        await outbound()
        tg.cancel_scope.cancel()

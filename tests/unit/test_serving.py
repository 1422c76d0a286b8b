"""The listening sockets both services and the port forwarder accept on.

Both replies and relays are written in pieces (a head, then a body): with
Nagle on, the second piece waits for the client's delayed ACK, ~40 ms a reply.
asyncio turns Nagle off only on sockets whose ``proto`` is TCP, so these tests
look at what an accepted connection really has.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from forkyard.sdk._forward import Forwarder
from forkyard.sdk.config import ConnectionConfig
from forkyard.wire.serving import bind


def _nodelay(sock: Any) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_connections_accepted_on_a_bound_socket_have_nagle_off() -> None:
    sock, url = bind("127.0.0.1", 0)
    assert url.startswith("http://127.0.0.1:")
    seen: list[bool] = []

    async def main() -> None:
        async def serve(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(_nodelay(writer.get_extra_info("socket")))
            writer.close()

        server = await asyncio.start_server(serve, sock=sock)
        async with server:
            _r, w = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            while not seen:
                await asyncio.sleep(0.01)
            w.close()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert seen == [True]


def test_the_port_forwarder_turns_nagle_off_on_what_it_accepts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    async def relay(self: Forwarder, _reader: Any, writer: asyncio.StreamWriter) -> None:
        seen.append(_nodelay(writer.get_extra_info("socket")))

    monkeypatch.setattr(Forwarder, "_relay", relay)
    fwd = Forwarder(ConnectionConfig(url="http://127.0.0.1:9", token=None), "sb-" + "0" * 20,
                    8000).start()
    try:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(1) == b""  # the relay returned and the forwarder closed it
    finally:
        fwd.close()
    assert seen == [True]

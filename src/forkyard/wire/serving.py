"""Small HTTP-serving helpers both services share: listening sockets, ready files, bodies."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.requests import Request

from forkyard.wire.errors import ApiError
from forkyard.wire.limits import max_file_bytes

__all__ = ["bind", "check_length", "limited_body", "setup_logging", "write_ready_file"]


def bind(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket and the URL local clients reach it at.

    Binding before the app starts is what lets ``port=0`` work: the URL (with
    the port the kernel picked) is known before anyone is told about it.

    The protocol is named (``IPPROTO_TCP``, not 0) because asyncio sets
    ``TCP_NODELAY`` only on sockets whose ``proto`` says TCP, and accepted
    connections inherit it: with proto 0, every reply written as a head and
    then a body waited ~40 ms (Nagle against the client's delayed ACK).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    actual = sock.getsockname()[1]
    if host in ("0.0.0.0", ""):  # noqa: S104 - naming what the caller bound, not binding
        shown = "127.0.0.1"
    elif host == "::":
        shown = "[::1]"
    elif ":" in host:
        shown = f"[{host}]"
    else:
        shown = host
    return sock, f"http://{shown}:{actual}"


def write_ready_file(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees no file or the whole JSON, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def setup_logging() -> None:
    """Timestamped INFO logs on stderr, unless the embedding program configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # one line per heartbeat / QMP event would bury everything else
        for noisy in ("httpx", "httpcore", "qemu"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"file is {size} bytes or more, over the limit of {limit}",
                    detail={"limit": limit})


def check_length(request: Request) -> None:
    """Refuse an oversized body from its Content-Length, before reading any of it."""
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError:
        raise ApiError(400, f"bad Content-Length {raw!r}") from None
    limit = max_file_bytes()
    if length > limit:
        raise _too_large(length, limit)


async def limited_body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, refused (413) as soon as it passes the limit."""
    total, limit = 0, max_file_bytes()
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(total, limit)
        if chunk:
            yield chunk

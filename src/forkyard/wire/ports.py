"""Guest ports from outside, as the wire carries them: preview URLs and byte tunnels.

A *tunnel* is a WebSocket whose binary messages are the bytes of one TCP
connection to a guest port, in order, both ways.  The control plane opens
one to the worker (``/sandboxes/{id}/ports/{port}/tunnel``, the worker's own
credential) for every proxied HTTP exchange, WebSocket and port-forward; a
caller opens one to the control plane for ``forkyard port-forward``
(``/v1/sandboxes/{id}/tunnel/{port}``).  A tunnel that cannot be opened is
closed with ``4000 + HTTP status`` and the error type as the reason, so each
end turns it back into the one typed error body (:func:`close_code`,
:func:`close_status`).
"""

from __future__ import annotations

import socket

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from forkyard.wire.network import MAX_RULES, EgressRule

__all__ = [
    "MAX_PORT",
    "TOKEN_PARAM",
    "TUNNEL_MESSAGE",
    "NetworkUpdate",
    "PreviewOut",
    "PreviewRequest",
    "close_code",
    "close_status",
    "no_delay",
]

MAX_PORT = 65535
# the query parameter (and cookie) a preview URL carries its token in
TOKEN_PARAM = "forkyard_token"  # noqa: S105 - a name, not a secret
TUNNEL_MESSAGE = 64 * 1024  # bytes per WebSocket message of a tunnel, either way
_CLOSE_BASE = 4000


def close_code(status: int) -> int:
    """The WebSocket close code that carries HTTP ``status`` (4400, 4404, 4502, ...)."""
    return _CLOSE_BASE + status if 400 <= status <= 599 else 1011


def close_status(code: int | None) -> int | None:
    """The HTTP status a tunnel's close code carries, or None (a plain close)."""
    if code is not None and _CLOSE_BASE + 400 <= code <= _CLOSE_BASE + 599:
        return code - _CLOSE_BASE
    return None


class NetworkUpdate(BaseModel):
    """New egress rules for a running sandbox; a list left out stays as it is.
    The mode is fixed at creation (a card cannot be added to a running guest)."""

    model_config = ConfigDict(extra="forbid")

    allow_out: tuple[EgressRule, ...] | None = Field(default=None, max_length=MAX_RULES)
    deny_out: tuple[EgressRule, ...] | None = Field(default=None, max_length=MAX_RULES)


class PreviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public: StrictBool = Field(default=False, description="reachable without a token or "
                               "key (only where the operator enabled public ports)")


class PreviewOut(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sandbox: str
    port: int
    url: str = Field(description="the proxy URL; with the token in it unless public")
    token: str | None = Field(description="the preview token (shown once; kept hashed)")
    public: bool


def no_delay(sock: socket.socket | None) -> None:
    """Turn Nagle off on a TCP socket a tunnel relays into (nothing for other sockets).

    A relay writes what arrives at once, often a head then a body: with Nagle
    on, the second write waits for the peer's delayed ACK, ~40 ms.
    """
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

"""Bearer-token auth as ASGI middleware: deny by default.

Checking in middleware rather than per-route dependencies means a route added
later cannot forget auth, and an unauthenticated caller learns nothing (FastAPI
parses and validates a JSON body *before* running dependencies, so a dependency
would answer 422 to a stranger's malformed body instead of 401).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["BearerAuth", "bearer_token", "token_matches"]

PUBLIC_PATHS = frozenset({"/health"})


def bearer_token(headers: Mapping[str, str] | list[tuple[bytes, bytes]]) -> str | None:
    if isinstance(headers, list):
        raw = next((v for k, v in headers if k.lower() == b"authorization"), None)
        value = raw.decode("latin-1") if raw is not None else None
    else:
        value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    # compare_digest: no early exit that would leak the token byte by byte
    return hmac.compare_digest(given.encode(), expected.encode())


class BearerAuth:
    """Require ``Authorization: Bearer <token>``; ``token_for(path)`` names the token."""

    def __init__(self, app: ASGIApp, *, token_for: Callable[[str], str],
                 public: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.token_for = token_for
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and scope["path"] in self.public
        ):
            await self.app(scope, receive, send)
            return
        given = bearer_token(list(scope.get("headers", [])))
        if token_matches(given, self.token_for(scope["path"])):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket (none today) is refused, never let through
            await send({"type": "websocket.close", "code": 1008})
            return
        message = "missing bearer token" if given is None else "invalid bearer token"
        await _reply_401(send, message)


async def _reply_401(send: Send, message: str) -> None:
    body: dict[str, Any] = {"error": {"type": "unauthorized", "message": message, "detail": None}}
    raw = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"www-authenticate", b"Bearer"),
        ],
    })
    await send({"type": "http.response.body", "body": raw})

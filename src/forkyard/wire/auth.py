"""Bearer-token auth as ASGI middleware: deny by default.

Checking in middleware rather than per-route dependencies means a route added
later cannot forget auth, and an unauthenticated caller learns nothing (FastAPI
parses and validates a JSON body *before* running dependencies, so a dependency
would answer 422 to a stranger's malformed body instead of 401).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from forkyard.wire.limits import EXEC_STDIN_BYTES, max_file_bytes

__all__ = [
    "BearerAuth",
    "BodyLimit",
    "KeyAuth",
    "KeyCreate",
    "KeyCreated",
    "KeyOut",
    "Principal",
    "RateLimiter",
    "WorkerCredential",
    "bearer_token",
    "body_limit",
    "client_verify",
    "principal_of",
    "tls_options",
    "token_matches",
    "worker_credential",
    "worker_of",
]

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


# --- tenants, API keys and worker credentials (the control plane) -------------------
@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an API key (its name is its tenant) or a worker."""

    name: str
    kind: Literal["admin", "tenant", "worker"]

    @property
    def admin(self) -> bool:
        return self.kind == "admin"


KEY_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "admin": 1 meaning yes

    name: str = Field(pattern=KEY_NAME_RE, description="the key's name, which is its tenant")
    admin: bool = Field(default=False, description="sees and manages every tenant's objects "
                                                   "and the keys")


class KeyOut(BaseModel):
    name: str
    admin: bool
    created: str
    revoked: str | None = None


class KeyCreated(KeyOut):
    key: str = Field(description="the secret; shown this once, only its sha256 is kept")


class WorkerCredential(BaseModel):
    name: str
    credential: str = Field(description="what worker `name` runs with (`--worker-token`)")


_WORKER_PREFIX = "fyw."


def worker_credential(secret: str, name: str) -> str:
    """Worker ``name``'s credential: bound to the name by an HMAC of the cluster secret.

    The control plane never stores it (it recomputes it to check a worker's
    request and to call that worker), so one worker's credential opens nothing
    of another's, and the secret itself never leaves the control plane's host.
    """
    mac = hmac.new(secret.encode(), b"worker:" + name.encode(), hashlib.sha256).hexdigest()
    return f"{_WORKER_PREFIX}{name}.{mac}"


def worker_of(secret: str, token: str) -> str | None:
    """The worker name ``token`` is the valid credential of, or None."""
    if not token.startswith(_WORKER_PREFIX):
        return None
    name, dot, _ = token[len(_WORKER_PREFIX):].rpartition(".")
    if not dot or not name:
        return None
    return name if token_matches(token, worker_credential(secret, name)) else None


class RateLimiter:
    """A token bucket per key name, in bounded memory.

    Only authenticated names get a bucket (a stranger's garbage tokens are
    refused before), and at most ``max_keys`` buckets are kept: the least
    recently used is dropped, which at worst hands its key a fresh burst.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, name: str) -> float:
        """0 if ``name`` may send a request now, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.pop(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[name] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


def principal_of(scope: Scope) -> Principal:
    """The caller :class:`KeyAuth` let in (a route reached without one is a bug)."""
    principal = scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        raise RuntimeError("no authenticated caller: is KeyAuth installed?")
    return principal


class KeyAuth:
    """Resolve the bearer token to a :class:`Principal` before any route runs.

    ``resolve(path, token)`` answers who the token is, or None when it is not
    valid *for that path* (a tenant key on ``/internal/*``, a worker credential
    on ``/v1/*``): both get the same 401, so a refusal tells nothing about the
    key.  It may query a database, so it runs in a thread.  ``limiter`` then
    counts the request against its key (workers are exempt: a throttled
    heartbeat would get a healthy worker declared dead).
    """

    def __init__(self, app: ASGIApp, *, resolve: Callable[[str, str], Principal | None],
                 limiter: RateLimiter | None = None,
                 public: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.resolve = resolve
        self.limiter = limiter
        self.public = public
        # its own threads: a pool full of routes waiting on boots must not hold up
        # the auth of a heartbeat (created lazily: it belongs to the running loop)
        self._threads: anyio.CapacityLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and scope["path"] in self.public
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        given = bearer_token(list(scope.get("headers", [])))
        principal = None
        if given is not None:
            if self._threads is None:
                self._threads = anyio.CapacityLimiter(16)
            principal = await anyio.to_thread.run_sync(self.resolve, scope["path"], given,
                                                       limiter=self._threads)
        if principal is None:
            await _reply_401(send, "missing bearer token" if given is None
                             else "invalid bearer token")
            return
        if self.limiter is not None and principal.kind != "worker":
            wait = self.limiter.take(principal.name)
            if wait > 0:
                await _reply_429(send, wait)
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _reply_429(send: Send, wait: float) -> None:
    seconds = max(1, math.ceil(wait))
    await _reply(send, 429, {"error": {
        "type": "rate_limited", "message": f"too many requests; retry after {seconds}s",
        "detail": {"retry_after": seconds}}}, [(b"retry-after", str(seconds).encode())])


JSON_LIMIT = 1024 * 1024  # a JSON request body; far above any real one
# exec carries stdin as base64 in its JSON: as much as a file, plus the rest
EXEC_LIMIT = EXEC_STDIN_BYTES * 4 // 3 + JSON_LIMIT
REPORT_LIMIT = 16 * 1024 * 1024  # a worker's report lists every sandbox and checkpoint


def body_limit(path: str) -> tuple[int, bool]:
    """``(limit, streamed)`` of a request body on ``path``, for both services' routes."""
    if path.startswith(("/v1/sandboxes/", "/sandboxes/")) and path.endswith(
            ("/files", "/files/tree")):
        return max_file_bytes(), True  # the route counts it as it streams it on
    if path.startswith(("/v1/sandboxes/", "/sandboxes/")) and path.endswith("/exec"):
        return EXEC_LIMIT, False
    if path.startswith("/internal/"):
        return REPORT_LIMIT, False
    return JSON_LIMIT, False


class BodyLimit:
    """Refuse (413) a request body over its limit *before* anything parses it.

    ``limit_for(path)`` gives ``(limit, streamed)``.  A declared Content-Length
    over the limit is refused at once.  Otherwise a body that is not
    ``streamed`` (JSON: small) is read here, up to the limit and no further --
    a chunked body or one that lies about its length is cut off there -- and
    handed on whole; a ``streamed`` body (a file) goes on as it arrives and
    its route counts it (``serving.limited_body``).  No route ever holds more
    than its limit in memory, whatever the client sends.
    """

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], tuple[int, bool]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, streamed = self.limit_for(scope["path"])
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"),
                        None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply_413(send, limit)
            return
        if streamed:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _reply_413(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                                 "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)


async def _reply_413(send: Send, limit: int) -> None:
    await _reply(send, 413, {"error": {
        "type": "too_large", "message": f"request body over the limit of {limit} bytes",
        "detail": {"limit": limit}}})


async def _reply(send: Send, status: int, body: dict[str, Any],
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": raw})


# --- TLS ------------------------------------------------------------------------------
def tls_options(cert: str | os.PathLike[str] | None,
                key: str | os.PathLike[str] | None) -> tuple[str, str] | None:
    """The checked ``(cert, key)`` files to serve HTTPS with, or None: plain HTTP."""
    if (cert is None) != (key is None):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
    if cert is None or key is None:
        return None
    for path in (cert, key):
        if not os.path.isfile(path):
            raise ValueError(f"TLS file {os.fspath(path)!r} does not exist")
    return os.fspath(cert), os.fspath(key)


def client_verify(ca: str | os.PathLike[str] | None) -> ssl.SSLContext | bool:
    """How a client checks a server's certificate: against ``ca`` (a PEM bundle, e.g. a
    private CA or a self-signed certificate), else the system's trust store."""
    if ca is None:
        return True
    try:
        return ssl.create_default_context(cafile=os.fspath(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use CA bundle {os.fspath(ca)!r}: {exc}") from exc

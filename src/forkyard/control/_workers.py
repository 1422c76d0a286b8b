"""The control plane's client of worker daemons: executes :mod:`forkyard.wire.worker_api` calls.

Every call carries its own timeout; transport failures become
:class:`~forkyard.errors.WorkerUnavailable` (cannot reach the worker) or
:class:`~forkyard.errors.WorkerTimeout`, an unusable answer
:class:`~forkyard.errors.WorkerReplyError`, and a worker's own error reply is
relayed unchanged (:class:`~forkyard.wire.errors.WorkerReply`).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx
from pydantic import ValidationError

from forkyard.errors import WorkerReplyError, WorkerTimeout, WorkerUnavailable
from forkyard.wire.errors import WorkerReply
from forkyard.wire.worker_api import (
    BOOT_TIMEOUT,
    CHECKPOINT_TIMEOUT,
    EXEC_MARGIN,
    FILE_TIMEOUT,
    HIBERNATE_TIMEOUT,
    QUICK_TIMEOUT,
    Call,
)

__all__ = [
    "BOOT_TIMEOUT",
    "CHECKPOINT_TIMEOUT",
    "EXEC_MARGIN",
    "FILE_TIMEOUT",
    "HIBERNATE_TIMEOUT",
    "QUICK_TIMEOUT",
    "WorkerClient",
    "WorkerClients",
    "error_from_response",
]

R = TypeVar("R")
_CONNECT_TIMEOUT = 5.0


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(_CONNECT_TIMEOUT, seconds), pool=30.0)


def error_from_response(worker: str, status: int, raw: bytes) -> Exception:
    """The exception to raise for a worker's error reply."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status == 401:
        # the caller's token was fine: it is ours the worker refused
        return WorkerReplyError(worker, f"worker {worker} refused the control plane's "
                                        "worker token")
    if (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("type"), str)
        and isinstance(body["error"].get("message"), str)
    ):
        return WorkerReply(status, body)
    text = raw[:200].decode("utf-8", "replace")
    return WorkerReplyError(worker, f"worker {worker} answered {status}: {text}")


def transport_error(worker: str, what: str, exc: httpx.HTTPError,
                    timeout: float) -> WorkerTimeout | WorkerUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return WorkerTimeout(worker, what, timeout)
    return WorkerUnavailable(f"worker {worker} is unreachable ({what}): {exc}", worker=worker)


class WorkerClient:
    """One worker daemon, by name and URL; thread-safe (httpx.Client is)."""

    def __init__(self, name: str, url: str, http: httpx.Client, token: str,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.name = name
        self.url = url
        self._http = http
        self._token = token
        self._verify = verify

    @property
    def token(self) -> str:
        """The worker's credential, for connections outside this client (tunnels)."""
        return self._token

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return self._verify

    def send(self, call: Call[R]) -> R:
        """Make ``call`` and parse its reply."""
        try:
            resp = self._http.request(call.method, call.path, json=call.json(),
                                      params=call.params, timeout=_timeout(call.timeout))
        except httpx.HTTPError as exc:
            raise transport_error(self.name, str(call), exc, call.timeout) from exc
        if resp.status_code >= 400:
            raise error_from_response(self.name, resp.status_code, resp.content)
        if resp.status_code == 204 or not resp.content:
            return call.parse(None)
        try:
            data = resp.json()
        except ValueError as exc:
            raise WorkerReplyError(self.name, f"worker {self.name} sent invalid JSON "
                                              f"({call})") from exc
        try:
            return call.parse(data)
        except (ValidationError, ValueError) as exc:
            # a worker of another version, or a bug: not the caller's fault
            raise WorkerReplyError(self.name, f"worker {self.name} sent a reply outside the "
                                              f"wire contract ({call}): {exc}") from exc

    async def raw(self, call: Call[R]) -> bytes:
        """Make ``call`` asynchronously; the reply body as is (relayed unchanged)."""
        async with self.stream(call) as resp:
            try:
                return await resp.aread()
            except httpx.HTTPError as exc:
                raise transport_error(self.name, str(call), exc, call.timeout) from exc

    @asynccontextmanager
    async def stream(self, call: Call[R], *, content: AsyncIterator[bytes] | None = None,
                     content_type: str | None = None) -> AsyncIterator[httpx.Response]:
        """A streamed call (file bodies): yields the response with its body unread.

        A fresh AsyncClient per call: async clients are bound to the event loop
        they were first used on, and a file transfer dwarfs a TCP connect.
        """
        hdrs = {"authorization": f"Bearer {self._token}"}
        if content_type is not None:
            hdrs["content-type"] = content_type
        async with httpx.AsyncClient(base_url=self.url, timeout=_timeout(call.timeout),
                                     verify=self._verify) as client:
            try:
                req = client.build_request(call.method, call.path, params=call.params,
                                           content=content, json=call.json(), headers=hdrs)
                resp = await client.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise transport_error(self.name, str(call), exc, call.timeout) from exc
            try:
                if resp.status_code >= 400:
                    raw = await resp.aread()
                    raise error_from_response(self.name, resp.status_code, raw)
                yield resp
            finally:
                await resp.aclose()


class WorkerClients:
    """Pooled clients, one connection pool per worker URL."""

    def __init__(self, token_for: Callable[[str], str],
                 verify: ssl.SSLContext | bool = True) -> None:
        # each worker is called with its own credential, which it checks: a
        # worker cannot replay what it receives to another worker
        self._token_for = token_for
        self._verify = verify
        self._lock = threading.Lock()
        self._http: dict[tuple[str, str], httpx.Client] = {}

    def credential(self, name: str) -> str:
        """Worker ``name``'s credential: what it runs with, and what it is called with."""
        return self._token_for(name)

    def get(self, name: str, url: str) -> WorkerClient:
        token = self._token_for(name)
        with self._lock:
            http = self._http.get((name, url))
            if http is None:
                http = httpx.Client(
                    base_url=url,
                    headers={"authorization": f"Bearer {token}"},
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                    verify=self._verify,
                )
                self._http[(name, url)] = http
        return WorkerClient(name, url, http, token, self._verify)

    def close(self) -> None:
        with self._lock:
            clients, self._http = list(self._http.values()), {}
        for http in clients:
            http.close()

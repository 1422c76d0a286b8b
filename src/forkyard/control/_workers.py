"""HTTP calls from the control plane to worker daemons.

Every call has a timeout chosen for what it does; transport failures become
``503 unavailable`` (cannot reach the worker) or ``504 timeout``, and a
worker's own error reply is relayed unchanged (:class:`WorkerReply`).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from forkyard.wire.errors import ApiError, WorkerReply

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

QUICK_TIMEOUT = 10.0
BOOT_TIMEOUT = 240.0  # the library waits up to 180 s for a guest under TCG
CHECKPOINT_TIMEOUT = 180.0
HIBERNATE_TIMEOUT = 1800.0  # checkpoint + publish of a whole sandbox to a remote store
FILE_TIMEOUT = 180.0
EXEC_MARGIN = 30.0  # on top of a command's own timeout: agent grace + reply transfer
_CONNECT_TIMEOUT = 5.0


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(_CONNECT_TIMEOUT, seconds), pool=30.0)


def error_from_response(worker: str, status: int, raw: bytes) -> Exception:
    """The exception to raise for a worker's error reply."""
    import json

    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status == 401:
        # the caller's token was fine: it is ours the worker refused
        return ApiError(502, f"worker {worker} refused the control plane's worker token")
    if (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and isinstance(body["error"].get("type"), str)
        and isinstance(body["error"].get("message"), str)
    ):
        return WorkerReply(status, body)
    text = raw[:200].decode("utf-8", "replace")
    return ApiError(502, f"worker {worker} answered {status}: {text}")


def transport_error(worker: str, what: str, exc: httpx.HTTPError, timeout: float) -> ApiError:
    if isinstance(exc, httpx.TimeoutException):
        return ApiError(504, f"worker {worker} did not answer {what} within {timeout:g}s")
    return ApiError(503, f"worker {worker} is unreachable ({what}): {exc}")


class WorkerClient:
    """One worker daemon, by name and URL; thread-safe (httpx.Client is)."""

    def __init__(self, name: str, url: str, http: httpx.Client, token: str) -> None:
        self.name = name
        self.url = url
        self._http = http
        self._token = token

    def request(
        self,
        method: str,
        path: str,
        *,
        timeout: float,
        json: Any = None,
        params: Mapping[str, str | int | float | bool] | None = None,
    ) -> httpx.Response:
        what = f"{method} {path}"
        try:
            resp = self._http.request(method, path, json=json, params=params,
                                      timeout=_timeout(timeout))
        except httpx.HTTPError as exc:
            raise transport_error(self.name, what, exc, timeout) from exc
        if resp.status_code >= 400:
            raise error_from_response(self.name, resp.status_code, resp.content)
        return resp

    def call(self, method: str, path: str, *, timeout: float, json: Any = None,
             params: Mapping[str, str | int | float | bool] | None = None) -> Any:
        resp = self.request(method, path, timeout=timeout, json=json, params=params)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise ApiError(502, f"worker {self.name} sent invalid JSON ({method} {path})") from exc

    async def arequest(self, method: str, path: str, *, timeout: float,
                       json: Any = None) -> bytes:
        """An async call returning the raw reply body (relayed as is: exec results)."""
        async with self.stream(method, path, timeout=timeout, json=json) as resp:
            try:
                return await resp.aread()
            except httpx.HTTPError as exc:
                raise transport_error(self.name, f"{method} {path}", exc, timeout) from exc

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        timeout: float,
        params: Mapping[str, str | int | float | bool] | None = None,
        content: AsyncIterator[bytes] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed call (file bodies): yields the response with its body unread.

        A fresh AsyncClient per call: async clients are bound to the event loop
        they were first used on, and a file transfer dwarfs a TCP connect.
        """
        what = f"{method} {path}"
        hdrs = {"authorization": f"Bearer {self._token}", **(headers or {})}
        async with httpx.AsyncClient(base_url=self.url, timeout=_timeout(timeout)) as client:
            try:
                req = client.build_request(method, path, params=params, content=content,
                                           json=json, headers=hdrs)
                resp = await client.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise transport_error(self.name, what, exc, timeout) from exc
            try:
                if resp.status_code >= 400:
                    raw = await resp.aread()
                    raise error_from_response(self.name, resp.status_code, raw)
                yield resp
            finally:
                await resp.aclose()


class WorkerClients:
    """Pooled clients, one connection pool per worker URL."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._http: dict[str, httpx.Client] = {}

    def get(self, name: str, url: str) -> WorkerClient:
        with self._lock:
            http = self._http.get(url)
            if http is None:
                http = httpx.Client(
                    base_url=url,
                    headers={"authorization": f"Bearer {self._token}"},
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                )
                self._http[url] = http
        return WorkerClient(name, url, http, self._token)

    def close(self) -> None:
        with self._lock:
            clients, self._http = list(self._http.values()), {}
        for http in clients:
            http.close()

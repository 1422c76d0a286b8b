"""The HTTP boundary: every request of the SDK goes through here.

An API operation is described once, as a :class:`Call` (method, path, body,
how to parse the reply), by the functions in :mod:`forkyard.sdk._ops`; the
sync and async sandboxes only choose which client executes it.  This is also
the one place where ``httpx`` errors and error statuses become SDK exceptions.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import (
    ConfigurationError,
    ResponseFormatError,
    error_from_response,
    from_transport_error,
)

__all__ = ["DEFAULT", "AsyncHTTP", "Call", "Progress", "SyncHTTP", "json_body", "no_body"]

T = TypeVar("T")

Progress = Callable[[int, int | None], None]
"""``progress(bytes_done, bytes_total_or_None)`` during file transfers."""

_CHUNK = 256 * 1024
_CONNECT_TIMEOUT = 10.0


class _Default(enum.Enum):
    DEFAULT = "default"


DEFAULT = _Default.DEFAULT
"""Timeout of a :class:`Call` that uses the connection's default request timeout."""


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    # pairs when a key repeats (``label=a=1&label=b=2``)
    params: Mapping[str, str | int] | Sequence[tuple[str, str | int]] | None = None
    content: bytes | None = None
    # seconds to wait for the answer; None waits forever (a command without limit)
    timeout: float | _Default | None = DEFAULT


def json_body(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise ResponseFormatError(
            f"{response.request.method} {response.request.url.path}: reply is not JSON "
            f"({response.content[:80]!r})"
        ) from exc


def no_body(_response: httpx.Response) -> None:
    return None


def _timeout(call: Call[Any], config: ConnectionConfig) -> httpx.Timeout:
    t = config.request_timeout if call.timeout is DEFAULT else call.timeout
    return httpx.Timeout(t, connect=_CONNECT_TIMEOUT)


def _request(client: httpx.Client | httpx.AsyncClient, call: Call[Any], config: ConnectionConfig,
             base: str, content: Any = None,
             headers: Mapping[str, str] | None = None) -> httpx.Request:
    return client.build_request(
        call.method,
        base + call.path,
        json=call.json,
        params=(dict(call.params) if isinstance(call.params, Mapping) else list(call.params))
        if call.params else None,
        content=call.content if content is None else content,
        headers=headers,
        timeout=_timeout(call, config),
    )


def _chunks(data: bytes, progress: Progress | None) -> Iterator[bytes]:
    total = len(data)
    for start in range(0, total, _CHUNK):
        chunk = data[start : start + _CHUNK]
        yield chunk
        if progress is not None:
            progress(start + len(chunk), total)


async def _achunks(data: bytes, progress: Progress | None) -> AsyncIterator[bytes]:
    for chunk in _chunks(data, progress):
        yield chunk


def _total(response: httpx.Response) -> int | None:
    raw = response.headers.get("Content-Length")
    return int(raw) if raw is not None and raw.isdigit() else None


# --- shared connection pools -----------------------------------------------------------
# Handles (sandboxes, checkpoints, forks) made from the same config share one
# pool per process, so a hundred forks do not open a hundred pools.  A config
# with its own transport (tests) gets a private client.

_sync_lock = threading.Lock()
_PoolKey = tuple[str, str | None, float, str | None]
_sync_pool: dict[_PoolKey, tuple[int, httpx.Client]] = {}
_async_pool: weakref.WeakKeyDictionary[object, dict[_PoolKey, httpx.AsyncClient]] = \
    weakref.WeakKeyDictionary()


def _key(config: ConnectionConfig) -> _PoolKey:
    return (config.url, config.token, config.request_timeout, config.ca)


def _new_sync(config: ConnectionConfig) -> httpx.Client:
    transport = config.transport
    if transport is not None and not isinstance(transport, httpx.BaseTransport):
        raise ConfigurationError("this transport only serves async clients")
    return httpx.Client(base_url=config.urls[0], headers=config.headers, transport=transport,
                        timeout=httpx.Timeout(config.request_timeout, connect=_CONNECT_TIMEOUT),
                        verify=config.verify())


def _new_async(config: ConnectionConfig) -> httpx.AsyncClient:
    transport = config.transport
    if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
        raise ConfigurationError("this transport only serves sync clients")
    return httpx.AsyncClient(
        base_url=config.urls[0], headers=config.headers, transport=transport,
        timeout=httpx.Timeout(config.request_timeout, connect=_CONNECT_TIMEOUT),
        verify=config.verify(),
    )


def _sync_client(config: ConnectionConfig) -> httpx.Client:
    if config.transport is not None:
        return _new_sync(config)
    key = _key(config)
    with _sync_lock:
        entry = _sync_pool.get(key)
        # after os.fork() the parent's sockets must not be shared with the child
        if entry is None or entry[0] != os.getpid():
            entry = (os.getpid(), _new_sync(config))
            _sync_pool[key] = entry
        return entry[1]


def _async_client(config: ConnectionConfig) -> httpx.AsyncClient:
    if config.transport is not None:
        return _new_async(config)
    import asyncio

    # an AsyncClient's connections belong to the event loop that opened them
    loop = asyncio.get_running_loop()
    clients = _async_pool.setdefault(loop, {})
    key = _key(config)
    client = clients.get(key)
    if client is None or client.is_closed:
        client = clients[key] = _new_async(config)
    return client


# --- several control planes ------------------------------------------------------------
# Which of a config's URLs answered last (by the config's URL list): later
# requests go there first.
_active: dict[str, int] = {}
_Build = Callable[[str], httpx.Request]


def _order(config: ConnectionConfig) -> list[int]:
    n = len(config.urls)
    first = _active.get(config.url, 0) % n
    return [(first + i) % n for i in range(n)]


def _unreached(exc: httpx.HTTPError) -> bool:
    """The request never reached that control plane: another may take it unchanged."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def _standby(response: httpx.Response) -> bool:
    """It stands by (another control plane on its database is active)."""
    if response.status_code != 503:
        return False
    try:
        return bool(json.loads(response.content)["error"]["type"] == "standby")
    except (ValueError, KeyError, TypeError):
        return False


class SyncHTTP:
    """Executes :class:`Call` objects with a blocking ``httpx.Client``."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self._client = _sync_client(config)

    def _send(self, build: _Build, *, stream: bool = False) -> httpx.Response:
        order = _order(self.config)
        for n, i in enumerate(order):
            base, last = self.config.urls[i], n == len(order) - 1
            try:
                response = self._client.send(build(base), stream=stream)
            except httpx.HTTPError as exc:
                if _unreached(exc) and not last:
                    continue
                raise from_transport_error(exc, base) from exc
            if not response.is_success:
                try:
                    response.read()
                except httpx.HTTPError as exc:
                    raise from_transport_error(exc, base) from exc
                finally:
                    response.close()
                if _standby(response) and not last:
                    continue
                raise error_from_response(response)
            _active[self.config.url] = i
            return response
        raise AssertionError("unreachable: the last URL returns or raises")

    def call(self, call: Call[T]) -> T:
        return call.parse(self._send(lambda base: _request(self._client, call, self.config,
                                                           base)))

    def upload(self, call: Call[T], data: bytes, progress: Progress | None) -> T:
        """Like :meth:`call` with ``data`` as the body, reporting progress per chunk."""
        if progress is None:
            return self.call(call)
        return call.parse(self._send(lambda base: _request(
            self._client, call, self.config, base, content=_chunks(data, progress),
            headers={"Content-Length": str(len(data))})))

    def download(self, call: Call[Any], progress: Progress | None) -> bytes:
        response = self._send(lambda base: _request(self._client, call, self.config, base),
                              stream=True)
        total, parts, done = _total(response), [], 0
        try:
            for chunk in response.iter_bytes(_CHUNK):
                parts.append(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        except httpx.HTTPError as exc:
            raise from_transport_error(exc, self.config.url) from exc
        finally:
            response.close()
        return b"".join(parts)


class AsyncHTTP:
    """Executes :class:`Call` objects with an ``httpx.AsyncClient``."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config
        self._client_obj: httpx.AsyncClient | None = None

    @property
    def _client(self) -> httpx.AsyncClient:
        # created on first use, inside the running loop
        if self._client_obj is None or self._client_obj.is_closed:
            self._client_obj = _async_client(self.config)
        return self._client_obj

    async def _send(self, build: _Build, *, stream: bool = False) -> httpx.Response:
        order = _order(self.config)
        for n, i in enumerate(order):
            base, last = self.config.urls[i], n == len(order) - 1
            try:
                response = await self._client.send(build(base), stream=stream)
            except httpx.HTTPError as exc:
                if _unreached(exc) and not last:
                    continue
                raise from_transport_error(exc, base) from exc
            if not response.is_success:
                try:
                    await response.aread()
                except httpx.HTTPError as exc:
                    raise from_transport_error(exc, base) from exc
                finally:
                    await response.aclose()
                if _standby(response) and not last:
                    continue
                raise error_from_response(response)
            _active[self.config.url] = i
            return response
        raise AssertionError("unreachable: the last URL returns or raises")

    async def call(self, call: Call[T]) -> T:
        return call.parse(await self._send(lambda base: _request(self._client, call,
                                                                 self.config, base)))

    async def upload(self, call: Call[T], data: bytes, progress: Progress | None) -> T:
        if progress is None:
            return await self.call(call)
        return call.parse(await self._send(lambda base: _request(
            self._client, call, self.config, base, content=_achunks(data, progress),
            headers={"Content-Length": str(len(data))})))

    async def download(self, call: Call[Any], progress: Progress | None) -> bytes:
        response = await self._send(
            lambda base: _request(self._client, call, self.config, base), stream=True)
        total, parts, done = _total(response), [], 0
        try:
            async for chunk in response.aiter_bytes(_CHUNK):
                parts.append(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        except httpx.HTTPError as exc:
            raise from_transport_error(exc, self.config.url) from exc
        finally:
            await response.aclose()
        return b"".join(parts)

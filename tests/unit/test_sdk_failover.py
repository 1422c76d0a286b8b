"""Several control-plane URLs: the SDK moves on from one that is down or stands by."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from forkyard.sdk._http import AsyncHTTP, Call, SyncHTTP, json_body
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import APIError, ConfigurationError

STANDBY = {"error": {"type": "standby", "message": "stands by"}}


def _fleet(seen: list[str], *, active: str = "c") -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        seen.append(host)
        if host == "a":
            raise httpx.ConnectError("connection refused", request=request)
        if host != active:
            return httpx.Response(503, json=STANDBY)
        return httpx.Response(200, json={"served_by": host, "path": request.url.path})

    return httpx.MockTransport(handler)


def test_the_next_url_serves_when_one_is_down_or_stands_by() -> None:
    seen: list[str] = []
    cfg = ConnectionConfig("http://a, http://b/,http://c", "k", transport=_fleet(seen))
    assert cfg.urls == ("http://a", "http://b", "http://c")
    http = SyncHTTP(cfg)
    call = Call("GET", "/v1/sandboxes", parse=json_body)
    assert http.call(call) == {"served_by": "c", "path": "/v1/sandboxes"}
    assert seen == ["a", "b", "c"]
    seen.clear()
    assert http.call(call)["served_by"] == "c"
    assert seen == ["c"]  # the one that answered is asked first from then on


def test_other_errors_are_not_retried_elsewhere() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(404, json={"error": {"type": "not_found", "message": "no"}})

    http = SyncHTTP(ConnectionConfig("http://x,http://y", "k",
                                     transport=httpx.MockTransport(handler)))
    with pytest.raises(APIError) as info:
        http.call(Call("GET", "/v1/sandboxes/sb-1", parse=json_body))
    assert info.value.status == 404 and seen == ["x"]


def test_all_standing_by_is_the_last_ones_answer() -> None:
    seen: list[str] = []
    http = SyncHTTP(ConnectionConfig("http://b,http://d", "k", transport=_fleet(seen)))
    with pytest.raises(APIError) as info:
        http.call(Call("GET", "/v1/sandboxes", parse=json_body))
    assert info.value.status == 503 and info.value.type == "standby"
    assert seen == ["b", "d"]


def test_async_client_moves_on_too() -> None:
    seen: list[str] = []
    http = AsyncHTTP(ConnectionConfig("http://a,http://c", "k", transport=_fleet(seen)))
    out = asyncio.run(http.call(Call("GET", "/v1/sandboxes", parse=json_body)))
    assert out["served_by"] == "c" and seen == ["a", "c"]


def test_every_url_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="ftp://b"):
        ConnectionConfig("http://a,ftp://b")

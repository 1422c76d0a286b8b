"""One active control plane per PostgreSQL database (the advisory lock), on a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI

from forkyard.control._db import Database
from forkyard.control._leader import Leadership, StandbyGate
from tests.fixtures.postgres import PostgresServer, postgres_fixture

postgres_server = postgres_fixture()


def _spawn(threads: list[threading.Thread]) -> Callable[..., None]:
    def spawn(target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        threads.append(t)
        t.start()
    return spawn


def test_one_leads_the_other_takes_over_when_its_session_ends(
        postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    dbs = [Database(url), Database(url)]
    stops = [threading.Event(), threading.Event()]
    gains = [0, 0]
    threads: list[threading.Thread] = []

    def gained(i: int) -> Callable[[], None]:
        def on_gain() -> None:
            gains[i] += 1
        return on_gain

    leaders = [Leadership(db, interval=0.2, on_gain=gained(i), stopping=stops[i])
               for i, db in enumerate(dbs)]
    try:
        leaders[0].start(_spawn(threads))
        leaders[1].start(_spawn(threads))
        assert leaders[0].active.is_set() and not leaders[1].active.is_set()
        time.sleep(1.0)  # several rounds: the standby never gets it while it is held
        assert not leaders[1].active.is_set() and gains == [1, 0]
        stops[0].set()  # the first one's session ends (as when its process dies)
        assert leaders[1].active.wait(30), "the standby never took over"
        assert gains == [1, 1] and not leaders[0].active.is_set()
    finally:
        for s in stops:
            s.set()
        for t in threads:
            t.join(10)
        for db in dbs:
            db.close()


def test_sqlite_is_always_active(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path}/c.db")
    lead = Leadership(db, interval=0.2, on_gain=lambda: None, stopping=threading.Event())
    lead.start(_spawn([]))
    assert lead.active.is_set() and not lead.shared
    db.close()


def test_a_standby_serves_only_health() -> None:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/sandboxes")
    def sandboxes() -> list[str]:
        return []

    active = threading.Event()
    app.add_middleware(StandbyGate, active=active)
    import asyncio

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            return await client.get(path)

    refused = asyncio.run(get("/v1/sandboxes"))
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "standby"
    assert asyncio.run(get("/health")).status_code == 200
    active.set()
    assert asyncio.run(get("/v1/sandboxes")).json() == []

"""`disk` and `cold` of a create travel from the public API to the worker, bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from forkyard.control.server import create_app
from forkyard.wire.serving import bind
from tests.fixtures.fake_worker import FakeWorker, fake_worker

API = "api-" + "c" * 40
WORKER = "wrk-" + "c" * 40


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, FakeWorker]]:
    home = tmp_path_factory.mktemp("create")
    store = f"file://{home / 'store'}"
    app = create_app(db_url=f"sqlite:///{home}/control.db", api_token=API,
                     worker_token=WORKER, store_url=store, heartbeat_timeout=3600)
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        with fake_worker("fake1", server_url=url, worker_token=WORKER, store_url=store) as w, \
                httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"},
                             timeout=30) as api:
            yield api, w
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_disk_and_cold_reach_the_worker(plane: tuple[httpx.Client, FakeWorker]) -> None:
    api, worker = plane
    resp = api.post("/v1/sandboxes", json={"disk": 4 << 30, "cold": True})
    assert resp.status_code == 201, resp.text
    req = worker.create_requests[-1]
    assert (req.disk, req.cold) == (4 << 30, True)
    assert api.post("/v1/sandboxes", json={}).status_code == 201
    req = worker.create_requests[-1]
    assert (req.disk, req.cold) == (None, False)


@pytest.mark.parametrize("body", [{"disk": 0}, {"disk": -1}, {"disk": 1 << 41},
                                  {"disk": "4G"}, {"cold": "yes"}, {"cold": 1}])
def test_bad_disk_or_cold_is_422_before_any_worker(plane: tuple[httpx.Client, FakeWorker],
                                                   body: dict[str, object]) -> None:
    api, worker = plane
    before = len(worker.create_requests)
    resp = api.post("/v1/sandboxes", json=body)
    assert resp.status_code == 422, resp.text
    assert len(worker.create_requests) == before

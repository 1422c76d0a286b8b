"""Lifecycle features of the control plane over two fake workers (no VM).

Forks waiting for a publish under way, labels, timeouts and idle hibernation,
events and webhooks, metrics.  The fakes (tests/fixtures/fake_worker.py) share
one "store" dict, so a published checkpoint forks on either of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from forkyard.control.server import create_app
from forkyard.wire.models import WorkerCheckpoint
from forkyard.wire.serving import bind
from tests.fixtures.fake_worker import FakeWorker, fake_worker

API = "api-" + "l" * 40
WORKER = "wrk-" + "m" * 40


@dataclass
class Cluster:
    url: str
    app: FastAPI
    api: httpx.Client
    w1: FakeWorker
    w2: FakeWorker

    @property
    def plane(self) -> Any:
        return self.app.state.plane

    def create(self, **body: Any) -> dict[str, Any]:
        resp = self.api.post("/v1/sandboxes", json={"worker": "w1", **body})
        assert resp.status_code == 201, resp.text
        return dict(resp.json())


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _serve(app: FastAPI) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return url, srv, thread


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("lc")
    store_url = f"file://{home / 'store'}"
    # the fakes send no heartbeats: they must not be declared dead mid-test
    app = create_app(db_url=f"sqlite:///{home}/control.db", api_token=API,
                     worker_token=WORKER, store_url=store_url, heartbeat_timeout=3600)
    url, srv, thread = _serve(app)
    store: dict[str, WorkerCheckpoint] = {}
    with (fake_worker("w1", server_url=url, worker_token=WORKER, store_url=store_url,
                      store=store) as w1,
          fake_worker("w2", server_url=url, worker_token=WORKER, store_url=store_url,
                      store=store) as w2,
          httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"},
                       timeout=30) as api):
        yield Cluster(url, app, api, w1, w2)
    srv.should_exit = True
    thread.join(timeout=30)


# --- forks wait for a publish under way -------------------------------------------------
def test_a_fork_elsewhere_waits_for_the_publish_under_way(cluster: Cluster) -> None:
    sb = cluster.create()
    cluster.w1.publish_delay = 1.0
    try:
        cp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/checkpoint", json={}).json()
    finally:
        cluster.w1.publish_delay = 0.0
    assert cp["state"] == "publishing"
    started = time.monotonic()
    resp = cluster.api.post(f"/v1/checkpoints/{cp['id']}/fork", json={"worker": "w2"})
    assert resp.status_code == 201, resp.text
    assert resp.json()[0]["worker"] == "w2"
    assert time.monotonic() - started >= 0.5  # it did wait for the publish
    assert cluster.api.get(f"/v1/checkpoints/{cp['id']}").json()["state"] == "published"


def test_a_publish_that_never_settles_is_a_504_not_a_hang(cluster: Cluster,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    sb = cluster.create()
    monkeypatch.setattr(cluster.plane, "publish_wait", 0.5)
    cluster.w1.publish_delay = 3600.0
    try:
        cp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/checkpoint", json={}).json()
    finally:
        cluster.w1.publish_delay = 0.0
    resp = cluster.api.post(f"/v1/checkpoints/{cp['id']}/fork", json={"worker": "w2"})
    assert resp.status_code == 504, resp.text
    err = resp.json()["error"]
    assert err["type"] == "timeout" and "still publishing" in err["message"]
    # its origin can still fork it at once
    here = cluster.api.post(f"/v1/checkpoints/{cp['id']}/fork", json={"worker": "w1"})
    assert here.status_code == 201, here.text


def test_a_local_checkpoint_elsewhere_is_still_a_prompt_409(cluster: Cluster) -> None:
    sb = cluster.create()
    cp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/checkpoint",
                          json={"publish": False}).json()
    assert cp["state"] == "local"
    started = time.monotonic()
    resp = cluster.api.post(f"/v1/checkpoints/{cp['id']}/fork", json={"worker": "w2"})
    assert resp.status_code == 409 and time.monotonic() - started < 5

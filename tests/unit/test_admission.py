"""Admission in the control plane (docs/api.md, "Placement"): what does not fit is refused.

A real control plane (uvicorn, SQLite) over fake workers (tests/fixtures/fake_worker.py)
that report a capacity: nothing reaches a worker that cannot hold the sandbox, and the
refusal is 503 ``insufficient_capacity`` naming what was short.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import uvicorn

from forkyard.control._placement import Candidate, Placement, choose
from forkyard.control.server import create_app
from forkyard.errors import InsufficientCapacity
from forkyard.sdk import errors as sdk_errors
from forkyard.wire.errors import emitted_types, error_body
from forkyard.wire.serving import bind
from tests.fixtures.fake_worker import FakeWorker, fake_worker

API = "api-" + "s" * 40
WORKER = "wrk-" + "t" * 40
OVERHEAD = 448


def capacity(vms: int, *, cpus: int = 64, default_mb: int = 256) -> dict[str, int]:
    """Room for exactly ``vms`` sandboxes of the default shape."""
    return {"memory_mb": vms * (default_mb + OVERHEAD), "memory_used_mb": 0, "cpus": cpus,
            "cpus_used": 0, "max_vm_cpus": 4, "vm_overhead_mb": OVERHEAD,
            "default_memory_mb": default_mb, "default_cpus": 1}


class Plane:
    def __init__(self, url: str, api: httpx.Client, stack: ExitStack, store: str) -> None:
        self.url, self.api, self._stack, self._store = url, api, stack, store

    def worker(self, name: str, cap: dict[str, int] | None) -> FakeWorker:
        return self._stack.enter_context(fake_worker(
            name, server_url=self.url, worker_token=WORKER, store_url=self._store,
            capacity=cap))


@pytest.fixture
def plane(tmp_path: Any) -> Iterator[Plane]:
    store = f"file://{tmp_path / 'store'}"
    app = create_app(db_url=f"sqlite:///{tmp_path}/control.db", api_token=API,
                     worker_token=WORKER, store_url=store, heartbeat_timeout=3600)
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    with (ExitStack() as stack,
          httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"},
                       timeout=30) as api):
        yield Plane(url, api, stack, store)
    srv.should_exit = True
    thread.join(timeout=30)


def _refusal(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 503, resp.text
    err: dict[str, Any] = resp.json()["error"]
    assert err["type"] == "insufficient_capacity", err
    return err


def test_a_sandbox_larger_than_any_worker_is_refused_and_reaches_none(plane: Plane) -> None:
    a, b = plane.worker("a", capacity(4)), plane.worker("b", capacity(8))
    err = _refusal(plane.api.post("/v1/sandboxes", json={"memory_mb": 256 * 1024}))
    assert err["detail"]["resource"] == "memory" and "memory" in err["message"]
    assert err["detail"]["needed"] == 256 * 1024 + OVERHEAD
    assert err["detail"]["free"] == 8 * (256 + OVERHEAD)  # the closest worker: b
    err = _refusal(plane.api.post("/v1/sandboxes", json={"cpus": 64}))
    assert err["detail"]["resource"] == "cpus" and err["detail"]["needed"] == 64
    assert a.sandboxes == {} and b.sandboxes == {}  # no worker was asked to boot anything
    assert plane.api.get("/v1/sandboxes").json() == []  # and no row is left behind
    # an explicit worker is refused the same way
    err = _refusal(plane.api.post("/v1/sandboxes", json={"memory_mb": 8192, "worker": "a"}))
    assert err["detail"]["worker"] == "a" and err["detail"]["resource"] == "memory"


def test_a_full_worker_sends_the_next_sandbox_elsewhere_then_all_are_refused(
        plane: Plane) -> None:
    small, big = plane.worker("small", capacity(1)), plane.worker("big", capacity(3))
    placed = []
    for _ in range(4):
        resp = plane.api.post("/v1/sandboxes", json={})
        assert resp.status_code == 201, resp.text
        placed.append(resp.json()["worker"])
    # small held one: every later one went to big, though small had fewer sandboxes
    assert sorted(placed) == ["big", "big", "big", "small"]
    assert (len(small.sandboxes), len(big.sandboxes)) == (1, 3)
    err = _refusal(plane.api.post("/v1/sandboxes", json={}))
    assert err["detail"]["resource"] == "memory" and err["detail"]["free"] == 0
    assert len(small.sandboxes) + len(big.sandboxes) == 4
    # a destroyed sandbox gives its memory back
    victim = next(s for s in plane.api.get("/v1/sandboxes").json() if s["worker"] == "small")
    assert plane.api.delete(f"/v1/sandboxes/{victim['id']}").status_code == 204
    resp = plane.api.post("/v1/sandboxes", json={})
    assert resp.status_code == 201 and resp.json()["worker"] == "small", resp.text


def test_forks_count_their_source_shape_and_spill_over(plane: Plane) -> None:
    a = plane.worker("a", capacity(2, default_mb=512))
    big = plane.api.post("/v1/sandboxes", json={"memory_mb": 512})
    assert big.status_code == 201, big.text
    cp = plane.api.post(f"/v1/sandboxes/{big.json()['id']}/checkpoint", json={})
    assert cp.status_code == 201, cp.text
    # one slot of 512 + overhead is left: a fork of two is refused as a whole
    err = _refusal(plane.api.post(f"/v1/checkpoints/{cp.json()['id']}/fork",
                                  json={"count": 2}))
    assert err["detail"]["resource"] == "memory"
    assert len(a.sandboxes) == 1
    ok = plane.api.post(f"/v1/checkpoints/{cp.json()['id']}/fork", json={"count": 1})
    assert ok.status_code == 201, ok.text


def test_a_worker_that_reports_no_capacity_is_placed_on_slots_alone(plane: Plane) -> None:
    legacy = plane.worker("legacy", None)
    resp = plane.api.post("/v1/sandboxes", json={"memory_mb": 64 * 1024})
    assert resp.status_code == 201, resp.text  # its own admission is the check there
    assert len(legacy.sandboxes) == 1


def test_placement_shortages_name_the_resource() -> None:
    def w(name: str, **cap: int) -> Candidate:
        return Candidate(name, True, 0, 8000, 32, memory_mb=cap.get("mem", 2000),
                         cpus=cap.get("cpus", 8), max_vm_cpus=2, vm_overhead_mb=100,
                         memory_used_mb=cap.get("used", 0), cpus_used=cap.get("cpus_used", 0))
    with pytest.raises(InsufficientCapacity) as e:
        choose([w("a")], Placement(memory_mb=1901))
    assert (e.value.resource, e.value.needed, e.value.free) == ("memory", 2001, 2000)
    assert choose([w("a")], Placement(memory_mb=1900)) == "a"
    with pytest.raises(InsufficientCapacity) as e:
        choose([w("a")], Placement(cpus=3))
    assert e.value.resource == "cpus" and "at most 2 vCPUs" in str(e.value)
    with pytest.raises(InsufficientCapacity) as e:
        choose([w("a", cpus_used=7)], Placement(cpus=2))
    assert (e.value.resource, e.value.free) == ("cpus", 1)
    # memory already held elsewhere in the same request (fork count) counts
    full_a = w("a", used=1300)  # 700 MiB free: a 700 MiB guest needs 800
    assert choose([full_a, w("b")], Placement(memory_mb=700), extra={"b": 1}) == "b"
    with pytest.raises(InsufficientCapacity) as e:
        choose([full_a, w("b")], Placement(memory_mb=700), extra={"b": 2})
    assert (e.value.resource, e.value.free) == ("memory", 700)  # the closest: a
    assert error_body(e.value)[0] == 503


def test_the_sdk_maps_the_refusal_to_its_own_exception() -> None:
    assert (503, "insufficient_capacity") in emitted_types()
    cls = sdk_errors.error_class(503, "insufficient_capacity")
    assert cls is sdk_errors.InsufficientCapacity and issubclass(cls, sdk_errors.Unavailable)
    err = cls("short", status=503, type="insufficient_capacity",
              detail={"resource": "memory", "needed": 900, "free": 10, "worker": "a"})
    assert (err.resource, err.needed, err.free, err.worker) == ("memory", 900, 10, "a")

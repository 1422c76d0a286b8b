"""The worker daemon's HTTP layer over a stand-in Worker (no VM): wire shapes and refusals.

The stand-in has only the handful of methods the routes call; the real
Worker behind the same app is exercised by tests/integration/test_control_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from forkyard.config import Settings
from forkyard.errors import InsufficientCapacity, SandboxNotFound
from forkyard.guest.client import ExecResult
from forkyard.wire.lifecycle import SandboxState
from forkyard.wire.output import decode_output
from forkyard.worker.daemon import create_app
from forkyard.worker.daemon._capacity import Capacity, host_budget

TOKEN = "worker-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SID = "sb-" + "0" * 20


@dataclass
class _Info:
    id: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": "running", "image": "b" * 64, "created": "now",
                "memory_mb": 256, "cpus": 1, "parent_checkpoint": None,
                "last_checkpoint": None}


@dataclass
class _Sandbox:
    id: str
    result: ExecResult
    state: SandboxState = SandboxState.RUNNING
    last_checkpoint: str | None = None
    memory_mb: int = 256
    cpus: int = 1

    def info(self) -> _Info:
        return _Info(self.id)

    def exec(self, cmd: object, **_: object) -> ExecResult:
        return self.result

    def destroy(self) -> None:
        self.state = SandboxState.DESTROYED


@dataclass
class _Images:
    def list(self) -> list[Any]:
        return []


@dataclass
class _Host:
    accel: str = "tcg"


@dataclass
class _Blobs:  # the counters of forkyard.store.BlobStore
    uploaded_bytes: int = 0
    downloaded_bytes: int = 0


@dataclass
class _Home:
    def settings(self) -> Settings:
        return Settings()


@dataclass
class _Worker:
    name: str = "w1"
    sandboxes: dict[str, _Sandbox] = field(default_factory=dict)
    images: _Images = field(default_factory=_Images)
    created: int = 0
    host: _Host = field(default_factory=_Host)
    home: _Home = field(default_factory=_Home)
    blobstore: _Blobs = field(default_factory=_Blobs)

    def list(self) -> list[_Sandbox]:
        return [s for s in self.sandboxes.values() if s.state is not SandboxState.DESTROYED]

    def get(self, sandbox_id: str) -> _Sandbox:
        try:
            return self.sandboxes[sandbox_id]
        except KeyError:
            raise SandboxNotFound(sandbox_id) from None

    def create(self, image: str, *, sandbox_id: str | None, memory_mb: int = 256,
               cpus: int = 1, **_: object) -> _Sandbox:
        self.created += 1
        sid = sandbox_id or f"sb-{self.created:020x}"
        sb = self.sandboxes[sid] = _Sandbox(sid, ExecResult(0, b"", b""), memory_mb=memory_mb,
                                            cpus=cpus)
        return sb

    def unfinished_publishes(self) -> list[object]:
        return []  # a fresh home: no earlier process left a publish undone

    def cached_bases(self) -> list[str]:
        return []

    def local_checkpoint_ids(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


class _Client:
    """Sync calls into the app in-process (no socket); each call gets its own loop."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://w") as c:
                return await c.request(method, path, **kw)

        return asyncio.run(go())

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, **kw)


@contextmanager
def _client(worker: _Worker, **kw: Any) -> Iterator[_Client]:
    app = create_app(worker, worker_token=TOKEN, **kw)  # type: ignore[arg-type]
    yield _Client(app)
    app.state.daemon.shutdown()  # what the lifespan's end does: no link, nothing to leave


@pytest.mark.parametrize(("out", "encoding"), [(b"caf\xc3\xa9\n", "utf-8"),
                                               (b"\xff\x00bin", "base64")])
def test_exec_reply_carries_each_stream_once_and_exactly(out, encoding):
    w = _Worker()
    w.sandboxes[SID] = _Sandbox(SID, ExecResult(3, out, b"err\n", pid=7, truncated=True))
    with _client(w) as c:
        resp = c.post(f"/sandboxes/{SID}/exec", json={"cmd": "x"}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    body = json.loads(resp.content)
    assert set(body) == {"exit_code", "stdout", "stdout_encoding", "stderr", "stderr_encoding",
                         "pid", "signal", "timed_out", "truncated"}
    assert body["stdout_encoding"] == encoding
    assert decode_output(body["stdout"], body["stdout_encoding"]) == out
    assert (body["stderr"], body["stderr_encoding"]) == ("err\n", "utf-8")
    assert (body["exit_code"], body["pid"], body["truncated"]) == (3, 7, True)


def test_a_full_worker_refuses_with_503_and_boots_nothing():
    w = _Worker()
    with _client(w, max_sandboxes=2) as c:
        for _ in range(2):
            assert c.post("/sandboxes", json={}, headers=AUTH).status_code == 201
        resp = c.post("/sandboxes", json={}, headers=AUTH)
        assert resp.status_code == 503
        err = resp.json()["error"]
        assert err["type"] == "insufficient_capacity" and "full (2 sandboxes)" in err["message"]
        assert (err["detail"]["resource"], err["detail"]["free"]) == ("sandboxes", 0)
        assert w.created == 2  # the refused request never reached the library
        # a destroyed sandbox frees its slot
        assert c.delete("/sandboxes/sb-" + f"{1:020x}", headers=AUTH).status_code == 204
        assert c.post("/sandboxes", json={}, headers=AUTH).status_code == 201
        assert c.get("/status", headers=AUTH).json()["running"] == 2


def test_a_sandbox_over_the_memory_or_vcpu_budget_is_refused_before_the_library():
    w = _Worker()
    overhead = 448  # TCG: VM_OVERHEAD_MB["tcg"]
    budget = host_budget(memory_mb=2 * (256 + overhead), cpus=3)
    with _client(w, memory_mb=budget.memory_mb, cpus=budget.cpus) as c:
        cap = c.get("/status", headers=AUTH).json()["capacity"]
        assert cap["memory_mb"] == 2 * (256 + overhead) and cap["memory_used_mb"] == 0
        resp = c.post("/sandboxes", json={"memory_mb": 2048}, headers=AUTH)
        assert resp.status_code == 503, resp.text
        err = resp.json()["error"]
        assert err["type"] == "insufficient_capacity" and "memory" in err["message"]
        assert err["detail"] == {"worker": "w1", "resource": "memory", "needed": 2048 + overhead,
                                 "free": 2 * (256 + overhead), "limit": 2 * (256 + overhead)}
        assert w.created == 0
        # two default sandboxes fill the memory; the third is refused, naming memory
        for _ in range(2):
            assert c.post("/sandboxes", json={}, headers=AUTH).status_code == 201
        resp = c.post("/sandboxes", json={}, headers=AUTH)
        err = resp.json()["error"]
        assert resp.status_code == 503 and err["detail"]["resource"] == "memory", err
        assert err["detail"]["free"] == 0 and w.created == 2
        cap = c.get("/status", headers=AUTH).json()["capacity"]
        assert (cap["memory_used_mb"], cap["cpus_used"]) == (2 * (256 + overhead), 2)
        # wider than the widest VM (min(cores, budget)) is refused whatever is free
        assert c.delete("/sandboxes/sb-" + f"{1:020x}", headers=AUTH).status_code == 204
        resp = c.post("/sandboxes", json={"cpus": 64}, headers=AUTH)
        err = resp.json()["error"]
        assert resp.status_code == 503 and err["detail"]["resource"] == "cpus", err
        assert w.created == 2


def test_a_fork_wider_than_the_worker_is_refused_before_anything_is_fetched():
    w = _Worker()
    big = types.SimpleNamespace(manifest=types.SimpleNamespace(
        vm=types.SimpleNamespace(memory_mb=200 * 1024, cpus=1)))
    forks: list[object] = []
    w.checkpoints = types.SimpleNamespace(has=lambda _id: False)  # type: ignore[attr-defined]
    w.resolve_checkpoint = lambda _id: big  # type: ignore[attr-defined]
    w.fork = lambda cp, **_: forks.append(cp)  # type: ignore[attr-defined]
    with _client(w, memory_mb=4096, cpus=4) as c:
        resp = c.post(f"/checkpoints/{'c' * 64}/fork", json={}, headers=AUTH)
    assert resp.status_code == 503, resp.text
    err = resp.json()["error"]
    assert err["type"] == "insufficient_capacity" and err["detail"]["resource"] == "memory"
    assert err["detail"]["needed"] == 200 * 1024 + 448
    assert forks == []  # the library never started the fork (nor fetched its parts)


def test_concurrent_boots_hold_their_memory_until_they_finish():
    w = _Worker()
    cap = Capacity(w, 32, on_release=lambda: None,  # type: ignore[arg-type]
                   budget=host_budget(memory_mb=2 * (256 + 448), cpus=8))
    with cap.slot(memory_mb=256, cpus=1, sandbox_id="sb-a"):
        # the booting sandbox appears in the worker's list: it must not count twice
        w.sandboxes["sb-a"] = _Sandbox("sb-a", ExecResult(0, b"", b""),
                                       state=SandboxState.STARTING)
        with cap.slot(memory_mb=256, cpus=1):
            with pytest.raises(InsufficientCapacity) as e, cap.slot(memory_mb=256, cpus=1):
                pass
            assert e.value.resource == "memory"
    assert cap.report().memory_used_mb == 256 + 448  # sb-a runs; both holds released


def test_wake_of_an_unknown_sandbox_without_a_checkpoint_is_404():
    with _client(_Worker()) as c:
        resp = c.post(f"/sandboxes/{SID}/wake", json={}, headers=AUTH)
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found"


def test_every_route_wants_the_worker_token():
    with _client(_Worker()) as c:
        assert c.get("/status").status_code == 401
        assert c.post(f"/sandboxes/{SID}/exec", json={"cmd": "x"},
                      headers={"authorization": "Bearer nope"}).status_code == 401


def test_shutdown_keeps_heartbeating_as_full_until_it_leaves(monkeypatch):
    # A hibernation at shutdown can outlast the control plane's heartbeat timeout:
    # silence meanwhile would get the worker declared dead and its sandboxes lost.
    from forkyard.worker.daemon import _link

    sent: list[tuple[float, str, dict[str, Any]]] = []

    def post(self: Any, http: Any, path: str, body: dict[str, Any]) -> httpx.Response:
        sent.append((time.monotonic(), path, body))
        return httpx.Response(200, json={"name": "w1", "state": "alive", "destroy": []})

    def leave(url: str, **kw: Any) -> httpx.Response:
        sent.append((time.monotonic(), url, kw["json"]))
        return httpx.Response(200, request=httpx.Request("POST", url))

    monkeypatch.setattr(_link.ControlLink, "_post", post)
    monkeypatch.setattr(_link.httpx, "post", leave)
    w = _Worker()
    sb = w.sandboxes[SID] = _Sandbox(SID, ExecResult(0, b"", b""))
    window: list[float] = []

    def slow_hibernate() -> None:
        window.append(time.monotonic())
        time.sleep(1.0)
        window.append(time.monotonic())
        raise SandboxNotFound(SID)  # a failed hibernate: destroyed instead

    sb.hibernate = slow_hibernate  # type: ignore[attr-defined]
    app = create_app(w, worker_token=TOKEN, server_url="http://cp", public_url="http://w:1",
                     on_shutdown="hibernate", heartbeat_interval=0.1)
    node = app.state.daemon
    node.link.start()
    assert node.link.registered.wait(5)
    node.shutdown()
    start, end = window
    during = [body for t, path, body in sent if start < t < end and path.endswith("/heartbeat")]
    assert during, "no heartbeat while the sandbox was hibernating"
    assert all(b["max_sandboxes"] == 0 for b in during)  # placement looks elsewhere
    assert sent[-1][1].endswith("/internal/workers/w1/leave") and sent[-1][0] > end
    assert sb.state is SandboxState.DESTROYED


def test_metrics_parse_as_prometheus_text_and_count_operations():
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(c: _Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        resp = c.get("/metrics", headers=AUTH)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(resp.text) for s in f.samples}

    created = ("forkyard_worker_operations_total", (("operation", "create"), ("outcome", "ok")))
    worker = _Worker()
    with _client(worker) as c:
        assert c.get("/metrics").status_code == 401
        before = scrape(c)
        assert c.post("/sandboxes", json={"image": "minimal"}, headers=AUTH).status_code == 201
        assert c.post("/sandboxes", json={}).status_code == 401  # not counted
        worker.blobstore.uploaded_bytes += 1234  # a publish went out
        after = scrape(c)
    up = ("forkyard_worker_store_uploaded_bytes_total", ())
    assert after[up] == before[up] + 1234
    assert ("forkyard_worker_store_downloaded_bytes_total", ()) in after
    assert after[created] == before[created] + 1
    count = ("forkyard_worker_operation_seconds_count", (("operation", "create"),))
    assert after[count] == before[count] + 1
    assert after[("forkyard_worker_sandboxes", ())] == before[("forkyard_worker_sandboxes", ())] + 1
    assert after[("forkyard_worker_memory_in_use_mb", ())] == 256
    assert after[("forkyard_worker_cpus_in_use", ())] == 1
    assert ("forkyard_worker_cpus_free", ()) in after
    assert ("forkyard_worker_memory_free_mb", ()) in after

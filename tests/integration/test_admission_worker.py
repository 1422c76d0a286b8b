"""The worker daemon's own admission over a real Worker: a budget it cannot exceed.

Whatever the control plane believes, a worker refuses a sandbox its guest memory
budget cannot hold (503 ``insufficient_capacity``) before QEMU is started.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from forkyard.worker.daemon import create_app
from forkyard.worker.daemon._capacity import VM_OVERHEAD_MB
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm

TOKEN = "worker-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://w",
                                     timeout=120) as c:
            return await c.request(method, path, headers=AUTH, **kw)

    return asyncio.run(go())


def test_a_real_worker_with_room_for_one_vm_refuses_the_second(
        worker_factory: Callable[..., Any]) -> None:
    w = worker_factory("adm")
    overhead = VM_OVERHEAD_MB[w.host.accel]
    app = create_app(w, worker_token=TOKEN, memory_mb=256 + overhead, cpus=4)
    try:
        # larger than the whole budget: refused, nothing booted, no sandbox left behind
        resp = _call(app, "POST", "/sandboxes", json={"memory_mb": 4096})
        assert resp.status_code == 503, resp.text
        err = resp.json()["error"]
        assert err["type"] == "insufficient_capacity" and err["detail"]["resource"] == "memory"
        assert err["detail"]["needed"] == 4096 + overhead
        assert qemu_pids(w.home.root) == [] and w.list() == []

        first = _call(app, "POST", "/sandboxes", json={"memory_mb": 256})
        assert first.status_code == 201, first.text
        assert len(qemu_pids(w.home.root)) == 1
        status = _call(app, "GET", "/status").json()["capacity"]
        assert status["memory_used_mb"] == 256 + overhead and status["cpus_used"] == 1

        resp = _call(app, "POST", "/sandboxes", json={"memory_mb": 64})
        assert resp.status_code == 503, resp.text
        err = resp.json()["error"]
        assert err["type"] == "insufficient_capacity", err
        assert (err["detail"]["resource"], err["detail"]["free"]) == ("memory", 0)
        assert len(qemu_pids(w.home.root)) == 1 and len(w.list()) == 1
    finally:
        app.state.daemon.shutdown()

"""Timeouts, idle hibernation, auto-wake and the metrics that count them, with real VMs.

One control plane and one worker (real processes).  The waits overlap: while
the hibernated sandbox sleeps its 30 s (the guest clock must be right when it
wakes), the kill timeout fires, an idle sandbox is hibernated and a busy one
with the same kind of timer is kept running.  Timeouts are a few seconds: the
timers are what is tested, not their length.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkyard.wire.auth import worker_credential
from tests.integration.test_control_failover import (
    API,
    HEARTBEAT_TIMEOUT,
    WORKER,
    Fleet,
    spawn,
    stop,
    wait_ready,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow]
HIBERNATED_WAIT = 30.0  # the issue's: a wake after 30 s hibernated keeps the host's clock


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("timers")
    store_url = f"file://{root / 'store'}"
    server = spawn("server", (
        "import os\nfrom pathlib import Path\n"
        "from forkyard.control.server import serve\n"
        "serve(Path(os.environ['T_HOME']), api_token=os.environ['T_API'], "
        f"worker_token=os.environ['T_WORKER'], store_url={store_url!r}, "
        f"heartbeat_timeout={HEARTBEAT_TIMEOUT * 3}, ready_file=Path(os.environ['T_READY']))\n"
    ), root=root, home=root / "control")
    url = wait_ready(server)
    api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"}, timeout=300)
    f = Fleet(root, store_url, server, api)
    try:
        f.start_worker("w1")
        yield f
    except BaseException:
        print(f.logs())
        raise
    finally:
        for p in f.workers.values():
            stop(p)
        stop(server)
        api.close()


def _counter(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in the metrics")


def _metrics(f: Fleet) -> tuple[str, str]:
    plane = f.api.get("/metrics")
    assert plane.status_code == 200, plane.text
    w = f.workers["w1"]
    token = worker_credential(WORKER, "w1")
    worker = httpx.get(f"{w.url}/metrics", headers={"authorization": f"Bearer {token}"})
    assert worker.status_code == 200, worker.text
    return plane.text, worker.text


def _create(f: Fleet, **opts: Any) -> str:
    sid: str = f.ok(f.api.post("/v1/sandboxes", json={"worker": "w1", **opts}), 201)["id"]
    return sid


def test_timeouts_idle_hibernation_and_auto_wake(fleet: Fleet) -> None:
    f = fleet
    plane0, worker0 = _metrics(f)
    busy = _create(f, idle_hibernate=5)
    idle = _create(f, idle_hibernate=3)
    sleeper = _create(f, timeout=3, on_timeout="hibernate", auto_wake=True)
    doomed = _create(f, timeout=3, on_timeout="kill")
    f.write(sleeper, "/root/kept", b"through the nap")

    hibernated_at: float | None = None
    deadline = time.monotonic() + 240
    while hibernated_at is None or time.monotonic() - hibernated_at < HIBERNATED_WAIT:
        assert time.monotonic() < deadline, {s: f.sandbox(s)["state"]
                                             for s in (busy, idle, sleeper, doomed)}
        assert f.run(busy, "true")["exit_code"] == 0  # activity: its idle timer restarts
        if hibernated_at is None and f.sandbox(sleeper)["state"] == "hibernated":
            hibernated_at = time.monotonic()
        time.sleep(0.5)

    assert f.sandbox(doomed)["state"] == "destroyed"
    assert f.sandbox(idle)["state"] == "hibernated"
    assert f.sandbox(busy)["state"] == "running"  # busy for 30 s+, never idle for 5 s
    assert f.sandbox(sleeper)["state"] == "hibernated"

    # auto-wake: the exec wakes it, then runs; the woken guest has the host's clock
    before = time.time()
    out = f.run(sleeper, "date +%s")
    after = time.time()
    guest = int(out["stdout"])  # busybox: whole seconds (truncated)
    assert before - 2 <= guest + 0.5 <= after + 2, (before, guest, after)
    assert f.sandbox(sleeper)["state"] == "running"
    assert f.read(sleeper, "/root/kept") == b"through the nap"

    # the counters moved with it: two hibernations (and the template) were published
    plane1, worker1 = _metrics(f)
    assert _counter(plane1, "forkyard_published_bytes_total") > \
        _counter(plane0, "forkyard_published_bytes_total")
    hibernates = {"operation": "hibernate", "outcome": "ok"}
    assert _counter(plane1, "forkyard_operations_total", **hibernates) >= \
        _counter(plane0, "forkyard_operations_total", **hibernates) + 2
    up0 = _counter(worker0, "forkyard_worker_store_uploaded_bytes_total")
    assert _counter(worker1, "forkyard_worker_store_uploaded_bytes_total") > up0
    for sid in (busy, idle, sleeper):
        f.ok(f.api.delete(f"/v1/sandboxes/{sid}"), 204)

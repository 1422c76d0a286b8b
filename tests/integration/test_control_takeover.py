"""Two control planes on one real PostgreSQL: one active, one standing by, and a takeover.

Both are real processes (``forkyard.control.server.serve``) on the same
database; the worker and the SDK are given both URLs.  The active one is
SIGKILLed: the standby must take the lead (its advisory lock is released
when the dead one's session ends), serve the SDK and the worker, never
declare the worker dead, and the sandbox made before keeps working.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forkyard.sdk._http import Call, SyncHTTP, json_body
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import APIError
from tests.fixtures.postgres import PostgresServer, postgres_fixture
from tests.integration.test_control_failover import (
    API,
    Proc,
    spawn,
    stop,
    wait_ready,
)

pytestmark = pytest.mark.vm
postgres_server = postgres_fixture()
HEARTBEAT_TIMEOUT = 3.0
TAKEOVER_BOUND = 30.0  # generous: the load here is noisy; measured value is printed


def _server(name: str, root: Path, db_url: str, store_url: str) -> Proc:
    return spawn(name, (
        "import os\nfrom pathlib import Path\n"
        "from forkyard.control.server import serve\n"
        "serve(Path(os.environ['T_HOME']), api_token=os.environ['T_API'], "
        f"worker_token=os.environ['T_WORKER'], store_url={store_url!r}, db_url={db_url!r}, "
        f"heartbeat_timeout={HEARTBEAT_TIMEOUT}, ready_file=Path(os.environ['T_READY']))\n"
    ), root=root, home=root / name)


def _role(url: str) -> str | None:
    try:
        return str(httpx.get(f"{url}/health", timeout=5).json()["role"])
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def planes(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("takeover")
    db_url = postgres_server.create_database()
    store_url = f"file://{root / 'store'}"
    a = _server("cp-a", root, db_url, store_url)
    procs = [a]
    try:
        wait_ready(a)
        b = _server("cp-b", root, db_url, store_url)
        procs.append(b)
        wait_ready(b)
        code = (
            "import os\nfrom pathlib import Path\n"
            "from forkyard.wire.auth import worker_credential\n"
            "from forkyard.worker.daemon import serve\n"
            f"serve(Path(os.environ['T_HOME']), name='w1', server_url={a.url + ',' + b.url!r}, "
            "worker_token=worker_credential(os.environ['T_WORKER'], 'w1'), "
            f"store_url={store_url!r}, ready_file=Path(os.environ['T_READY']))\n"
        )
        w1 = spawn("w1", code, root=root, home=root / "w1")
        procs.append(w1)
        wait_ready(w1)
        yield {"a": a, "b": b, "w1": w1, "root": root, "db_url": db_url,
               "store_url": store_url, "procs": procs}
    except BaseException:
        for p in procs:
            print(f"--- {p.name} ---\n{p.log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        for p in reversed(procs):
            stop(p)


def _get(http: SyncHTTP, path: str) -> Any:
    return http.call(Call("GET", path, parse=json_body))


def _post(http: SyncHTTP, path: str, body: dict[str, Any]) -> Any:
    return http.call(Call("POST", path, parse=json_body, json=body, timeout=300))


def test_standby_takes_over_when_the_active_plane_dies(planes: dict[str, Any]) -> None:
    a, b, w1 = planes["a"], planes["b"], planes["w1"]
    assert (_role(a.url), _role(b.url)) == ("active", "standby")
    # the standby serves nothing but /health: no second opinion on anything
    resp = httpx.get(f"{b.url}/v1/sandboxes", headers={"authorization": f"Bearer {API}"})
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "standby"

    http = SyncHTTP(ConnectionConfig(f"{a.url},{b.url}", API, request_timeout=300))
    sid = _post(http, "/v1/sandboxes", {"worker": "w1"})["id"]
    assert _post(http, f"/v1/sandboxes/{sid}/exec", {"cmd": "echo before"})["stdout"] == \
        "before\n"

    a.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    a.proc.wait(10)
    while _role(b.url) != "active":
        assert time.monotonic() - killed < TAKEOVER_BOUND, "the standby never took over"
        time.sleep(0.05)
    took = time.monotonic() - killed
    print(f"takeover after {took:.2f}s (heartbeat timeout {HEARTBEAT_TIMEOUT:g}s)")

    # the worker is never declared dead: watched for twice its heartbeat timeout
    until = time.monotonic() + 2 * HEARTBEAT_TIMEOUT + 1
    while time.monotonic() < until:
        [w] = _get(http, "/v1/workers")
        assert w["state"] == "alive", w
        time.sleep(0.2)
    # the SDK (given both URLs) reaches the new active plane; the sandbox kept working
    assert _get(http, f"/v1/sandboxes/{sid}")["state"] == "running"
    assert _post(http, f"/v1/sandboxes/{sid}/exec", {"cmd": "echo after"})["stdout"] == \
        "after\n"
    events = _get(http, "/v1/events")
    assert not [e for e in events if e["kind"] == "lost"], events
    # and new work goes through it too
    sid2 = _post(http, "/v1/sandboxes", {"worker": "w1"})["id"]
    assert _get(http, f"/v1/sandboxes/{sid2}")["state"] == "running"

    # the old one, restarted, stands by: the lead stays where it is
    a2 = _server("cp-a", planes["root"], planes["db_url"], planes["store_url"])
    planes["procs"].append(a2)
    wait_ready(a2)
    assert (_role(a2.url), _role(b.url)) == ("standby", "active")
    with pytest.raises(APIError) as info:
        SyncHTTP(ConnectionConfig(a2.url, API)).call(Call("GET", "/v1/sandboxes",
                                                         parse=json_body))
    assert info.value.type == "standby"
    for s in (sid, sid2):
        http.call(Call("DELETE", f"/v1/sandboxes/{s}", parse=lambda r: None))
    assert w1.proc.poll() is None
    assert json.loads(w1.ready.read_text())["name"] == "w1"

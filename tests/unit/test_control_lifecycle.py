"""Lifecycle features of the control plane over two fake workers (no VM).

Forks waiting for a publish under way, labels, timeouts and idle hibernation,
events and webhooks, metrics.  The fakes (tests/fixtures/fake_worker.py) share
one "store" dict, so a published checkpoint forks on either of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from forkyard.control.server import create_app
from forkyard.wire.auth import worker_credential
from forkyard.wire.serving import bind
from forkyard.wire.worker_models import WorkerCheckpoint
from tests.fixtures.fake_worker import FakeWorker, fake_worker
from tests.fixtures.postgres import PostgresServer, postgres_fixture

API = "api-" + "l" * 40
WORKER = "wrk-" + "m" * 40
TICK = 0.1  # the timer loop's period here (1 s in production)


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


postgres_server = postgres_fixture()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres",
                                                                marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('lcdb')}/control.db"
        return
    pg: PostgresServer = request.getfixturevalue("postgres_server")
    url = pg.create_database()
    yield url
    pg.drop_database(url)


@pytest.fixture(scope="module")
def cluster(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("lc")
    store_url = f"file://{home / 'store'}"
    # the fakes send no heartbeats: they must not be declared dead mid-test
    app = create_app(db_url=db_url, api_token=API,
                     worker_token=WORKER, store_url=store_url, heartbeat_timeout=3600)
    app.state.plane.timer_tick = TICK
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
    cluster.w1.publish_delay = 3600.0  # published below, by hand: no timing to race
    try:
        cp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/checkpoint", json={}).json()
    finally:
        cluster.w1.publish_delay = 0.0
    assert cp["state"] == "publishing"
    with ThreadPoolExecutor(1) as pool:
        fork = pool.submit(cluster.api.post, f"/v1/checkpoints/{cp['id']}/fork",
                           json={"worker": "w2"})
        time.sleep(1.0)
        assert not fork.done(), fork.result().text  # it waits (no 409 "not published")
        cluster.w1.finish_publish(cp["id"])
        resp = fork.result(timeout=60)
    assert resp.status_code == 201, resp.text
    assert resp.json()[0]["worker"] == "w2"
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


# --- labels -------------------------------------------------------------------------------
def _ids(resp: httpx.Response) -> set[str]:
    assert resp.status_code == 200, resp.text
    return {s["id"] for s in resp.json()}


def test_label_filters_over_http_and_forks_inherit_labels(cluster: Cluster) -> None:
    a = cluster.create(labels={"team": "red", "env": "ci"})
    b = cluster.create(labels={"team": "blue", "env": "ci"})
    assert a["labels"] == {"team": "red", "env": "ci"}
    api = cluster.api
    assert _ids(api.get("/v1/sandboxes", params={"label": "team=red"})) == {a["id"]}
    assert _ids(api.get("/v1/sandboxes", params=[("label", "env=ci")])) >= {a["id"], b["id"]}
    assert _ids(api.get("/v1/sandboxes", params=[("label", "env=ci"), ("label", "team=blue")])
                ) == {b["id"]}
    assert _ids(api.get("/v1/sandboxes", params={"label": "team=green"})) == set()
    cp = api.post(f"/v1/sandboxes/{a['id']}/checkpoint", json={"labels": {"stage": "warm"}})
    assert cp.status_code == 201 and cp.json()["labels"] == {"team": "red", "env": "ci",
                                                              "stage": "warm"}
    forks = api.post(f"/v1/checkpoints/{cp.json()['id']}/fork",
                     json={"count": 2, "worker": "w2", "labels": {"env": "prod"}}).json()
    assert all(f["labels"] == {"team": "red", "env": "prod", "stage": "warm"} for f in forks)
    assert _ids(api.get("/v1/sandboxes", params=[("label", "team=red"), ("label", "env=prod")])
                ) == {f["id"] for f in forks}
    # state filter: a destroyed one only shows when asked for
    api.delete(f"/v1/sandboxes/{forks[0]['id']}")
    assert forks[0]["id"] not in _ids(api.get("/v1/sandboxes", params={"label": "env=prod"}))
    gone = _ids(api.get("/v1/sandboxes", params={"label": "env=prod", "state": "destroyed"}))
    assert gone == {forks[0]["id"]}
    assert _ids(api.get("/v1/sandboxes", params={"state": "running", "label": "env=prod"})
                ) == {forks[1]["id"]}


@pytest.mark.parametrize("labels", [
    {"": "x"}, {"-lead": "x"}, {"k": "line\nbreak"}, {"k": "v" * 257}, {"k" * 64: "v"},
    {f"k{i}": "v" for i in range(33)}, {"k": 1}, ["k=v"],
])
def test_bad_labels_are_422(cluster: Cluster, labels: Any) -> None:
    resp = cluster.api.post("/v1/sandboxes", json={"worker": "w1", "labels": labels})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == "invalid"


@pytest.mark.parametrize("params", [
    {"label": "novalue"}, {"label": "=v"}, {"label": "k=\x01"}, {"state": "sleepy"},
    [("label", f"k{i}=v") for i in range(33)],
])
def test_bad_label_filters_are_422(cluster: Cluster, params: Any) -> None:
    resp = cluster.api.get("/v1/sandboxes", params=params)
    assert resp.status_code == 422, resp.text


# --- timeouts, idle hibernation, auto-wake ------------------------------------------------
def _state(cluster: Cluster, sid: str) -> str:
    return str(cluster.api.get(f"/v1/sandboxes/{sid}").json()["state"])


def test_timeout_kill_destroys_it_and_reading_it_does_not_reset_the_timer(
        cluster: Cluster) -> None:
    sb = cluster.create(timeout=2, on_timeout="kill")
    assert sb["timeout"] == 2 and sb["on_timeout"] == "kill" and sb["expires_at"]
    started = time.monotonic()
    # polling get (what `connect` does) all along must not postpone it
    wait_for(lambda: _state(cluster, sb["id"]) == "destroyed", 10, "the timeout")
    assert time.monotonic() - started >= 1.5
    wait_for(lambda: sb["id"] not in cluster.w1.sandboxes, 10, "the worker's destroy")


def test_set_timeout_moves_the_timer(cluster: Cluster) -> None:
    sb = cluster.create(timeout=3600)
    resp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/timeout", json={"timeout": 1})
    assert resp.status_code == 200 and resp.json()["timeout"] == 1
    wait_for(lambda: _state(cluster, sb["id"]) == "destroyed", 10, "the new timeout")
    other = cluster.create(timeout=1)
    assert cluster.api.post(f"/v1/sandboxes/{other['id']}/timeout",
                            json={"timeout": None}).json()["expires_at"] is None
    time.sleep(1.5)
    assert _state(cluster, other["id"]) == "running"
    for bad in ({"timeout": 0}, {"timeout": -1}, {"timeout": 10**9}, {}):
        assert cluster.api.post(f"/v1/sandboxes/{other['id']}/timeout",
                                json=bad).status_code == 422


def test_timeout_hibernate_then_an_exec_wakes_it(cluster: Cluster) -> None:
    sb = cluster.create(timeout=1, on_timeout="hibernate", auto_wake=True)
    wait_for(lambda: _state(cluster, sb["id"]) == "hibernated", 10, "hibernation")
    resp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "true"})
    assert resp.status_code == 200, resp.text
    assert _state(cluster, sb["id"]) == "running"
    # without auto_wake the same request is refused
    plain = cluster.create(timeout=1, on_timeout="hibernate")
    wait_for(lambda: _state(cluster, plain["id"]) == "hibernated", 10, "hibernation")
    resp = cluster.api.post(f"/v1/sandboxes/{plain['id']}/exec", json={"cmd": "true"})
    assert resp.status_code == 409 and "wake it first" in resp.json()["error"]["message"]
    _remove(cluster, sb, plain)  # their timers must not act during later tests


def test_idle_hibernate_takes_the_idle_one_and_not_the_busy_one(cluster: Cluster) -> None:
    idle = cluster.create(idle_hibernate=2)
    busy = cluster.create(idle_hibernate=2)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert cluster.api.put(f"/v1/sandboxes/{busy['id']}/files", params={"path": "/x"},
                                content=b"x").status_code == 200
        time.sleep(0.3)
    assert _state(cluster, idle["id"]) == "hibernated"
    assert _state(cluster, busy["id"]) == "running"
    _remove(cluster, idle, busy)  # busy would hibernate 2 s from now, during later tests


def _remove(cluster: Cluster, *sandboxes: dict[str, Any]) -> None:
    for sb in sandboxes:
        assert cluster.api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204


def test_timers_survive_a_control_plane_restart(tmp_path: Any) -> None:
    db_url = f"sqlite:///{tmp_path}/control.db"
    store_url = f"file://{tmp_path / 'store'}"

    def plane() -> tuple[str, uvicorn.Server, threading.Thread]:
        app = create_app(db_url=db_url, api_token=API, worker_token=WORKER,
                         store_url=store_url, heartbeat_timeout=3600)
        app.state.plane.timer_tick = TICK
        return _serve(app)

    url, srv, thread = plane()
    headers = {"authorization": f"Bearer {API}"}
    with fake_worker("w1", server_url=url, worker_token=WORKER, store_url=store_url) as w1:
        sid = httpx.post(f"{url}/v1/sandboxes", json={"timeout": 3}, headers=headers
                         ).json()["id"]
        srv.should_exit = True
        thread.join(timeout=30)
        assert sid in w1.sandboxes
        time.sleep(3.5)  # it expires while no control plane runs
        url, srv, thread = plane()
        try:
            wait_for(lambda: httpx.get(f"{url}/v1/sandboxes/{sid}", headers=headers
                                       ).json()["state"] == "destroyed", 10, "the timer")
            # destroyed in the books first, then on the worker
            wait_for(lambda: sid not in w1.sandboxes, 10, "the worker's destroy")
        finally:
            srv.should_exit = True
            thread.join(timeout=30)


# --- labels and timeouts through the SDK and the CLI -----------------------------------------
def test_sdk_labels_state_and_timeouts(cluster: Cluster) -> None:
    from forkyard.sdk import Sandbox

    conn = {"url": cluster.url, "token": API}
    sb = Sandbox.create(worker="w1", labels={"owner": "sdk", "n": "1"}, timeout=3600,
                        on_timeout="hibernate", idle_hibernate=600, auto_wake=True, **conn)
    info = sb.info
    assert dict(info.labels) == {"owner": "sdk", "n": "1"}
    assert (info.timeout, info.on_timeout, info.idle_hibernate, info.auto_wake) == \
        (3600, "hibernate", 600, True)
    other = Sandbox.create(worker="w1", labels={"owner": "sdk", "n": "2"}, **conn)
    assert {s.id for s in Sandbox.list(labels={"owner": "sdk"}, **conn)} == {sb.id, other.id}
    assert [s.id for s in Sandbox.list(labels={"owner": "sdk", "n": "2"}, state="running",
                                       **conn)] == [other.id]
    cp = sb.checkpoint(labels={"cp": "yes"})
    assert dict(cp.info.labels) == {"owner": "sdk", "n": "1", "cp": "yes"}
    fork = Sandbox.fork(cp, worker="w2")
    assert dict(fork.info.labels) == {"owner": "sdk", "n": "1", "cp": "yes"}
    before = sb.refresh().expires_at
    assert Sandbox.connect(sb.id, **conn).info.expires_at == before  # connect resets nothing
    assert sb.set_timeout(1).timeout == 1
    wait_for(lambda: sb.refresh().state == "hibernated", 10, "the timeout")
    sb.exec("true")  # auto_wake
    assert sb.refresh().state == "running"
    for s in (sb, other, fork):
        s.kill()


def test_cli_labels_and_state_filter_on_both_paths(cluster: Cluster,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from typer.testing import CliRunner

    from forkyard.cli import _fast, app

    conn = ["--url", cluster.url, "--token", API]
    runner = CliRunner()
    res = runner.invoke(app, ["create", "--worker", "w1", "--label", "cli=yes", "-l", "k=1",
                              "--timeout", "3600", "--on-timeout", "hibernate",
                              "--idle-hibernate", "600", "--auto-wake", "--json", *conn])
    assert res.exit_code == 0, res.output
    made = json.loads(res.stdout)
    assert made["labels"] == {"cli": "yes", "k": "1"} and made["auto_wake"] is True
    assert (made["timeout"], made["on_timeout"], made["idle_hibernate"]) == \
        (3600, "hibernate", 600)
    argv = ["ls", "--label", "cli=yes", "--state", "running", "--json", *conn]
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert [s["id"] for s in json.loads(res.stdout)] == [made["id"]]
    plan = _fast.plan(argv)
    assert plan is not None  # the fast path handles it too
    capsys.readouterr()
    assert _fast._execute(plan) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == [made["id"]]
    res = runner.invoke(app, ["ls", "--label", "cli=yes", "--state", "hibernated", "--json",
                              *conn])
    assert json.loads(res.stdout) == []
    bad = runner.invoke(app, ["ls", "--label", "novalue", *conn])
    assert bad.exit_code == 2 and _fast.plan(["ls", "--label", "novalue"]) is None
    cp = runner.invoke(app, ["checkpoint", made["id"], "--label", "cp=1", "--json", *conn])
    assert json.loads(cp.stdout)["labels"] == {"cli": "yes", "k": "1", "cp": "1"}
    bad = runner.invoke(app, ["create", "--on-timeout", "sleep", *conn])
    assert bad.exit_code == 2


# --- events and webhooks ----------------------------------------------------------------------
class Receiver:
    """A webhook receiver on loopback; fails the first ``fail`` deliveries with a 500."""

    def __init__(self, fail: int = 0) -> None:
        import http.server

        self.got: list[tuple[bytes, str]] = []
        self.calls = 0
        self.fail = fail
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.calls += 1
                if outer.calls <= outer.fail:
                    self.send_response(500)
                else:
                    outer.got.append((body, self.headers.get("x-forkyard-signature", "")))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


SECRET = "hook-secret"


def test_events_arrive_in_order_over_http_cli_and_a_signed_webhook_with_a_retry(
        tmp_path: Any) -> None:
    import hashlib
    import hmac
    import json

    from typer.testing import CliRunner

    from forkyard.cli import app as cli

    receiver = Receiver(fail=1)
    store_url = f"file://{tmp_path / 'store'}"
    app = create_app(db_url=f"sqlite:///{tmp_path}/control.db", api_token=API,
                     worker_token=WORKER, store_url=store_url, heartbeat_timeout=3600,
                     webhook_url=receiver.url, webhook_secret=SECRET)
    app.state.plane.events.backoff = 0.2
    url, srv, thread = _serve(app)
    store: dict[str, WorkerCheckpoint] = {}
    try:
        with (fake_worker("w1", server_url=url, worker_token=WORKER, store_url=store_url,
                          store=store),
              fake_worker("w2", server_url=url, worker_token=WORKER, store_url=store_url,
                          store=store),
              httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"},
                           timeout=30) as api):
            sid = api.post("/v1/sandboxes", json={"worker": "w1"}).json()["id"]
            cp = api.post(f"/v1/sandboxes/{sid}/checkpoint", json={}).json()["id"]
            fork = api.post(f"/v1/checkpoints/{cp}/fork", json={"worker": "w2"}).json()[0]["id"]
            assert api.post(f"/v1/sandboxes/{sid}/hibernate", json={}).status_code == 200
            assert api.post(f"/v1/sandboxes/{sid}/wake", json={}).status_code == 200
            assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
            expected = ["created", "checkpointed", "published", "forked", "hibernated",
                        "woken", "destroyed"]
            events = api.get("/v1/events", params={"limit": 1000}).json()
            assert [e["kind"] for e in events] == expected
            assert [e["id"] for e in events] == sorted(e["id"] for e in events)
            assert events[3]["sandbox"] == fork and events[3]["checkpoint"] == cp
            assert events[3]["worker"] == "w2"
            mine = api.get("/v1/events", params={"sandbox": sid}).json()
            assert [e["kind"] for e in mine] == [k for k in expected if k != "forked"]
            later = api.get("/v1/events", params={"after": events[-1]["id"], "wait": 0.3})
            assert later.status_code == 200 and later.json() == []
            for bad in ({"sandbox": "nope"}, {"kind": "exploded"}, {"limit": 0},
                        {"wait": 3600}, {"after": -1}):
                assert api.get("/v1/events", params=bad).status_code == 422, bad
            # the CLI prints the same, oldest first
            res = CliRunner().invoke(cli, ["events", "--sandbox", sid, "--json", "--url", url,
                                           "--token", API])
            assert res.exit_code == 0, res.output
            lines = [json.loads(line) for line in res.stdout.splitlines()]
            assert [e["kind"] for e in lines] == [k for k in expected if k != "forked"]
            # the webhook: every event, signed; the first delivery failed once and was retried
            wait_for(lambda: len(receiver.got) == len(expected), 15, "webhook deliveries")
            kinds = []
            for body, signature in receiver.got:
                good = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                assert hmac.compare_digest(signature, good)
                kinds.append(json.loads(body)["kind"])
            assert kinds == expected and receiver.calls == len(expected) + 1
            wait_for(lambda: all(e["delivery"] == "delivered" for e in api.get(
                "/v1/events").json()), 10, "delivery states")
            first = api.get("/v1/events").json()[0]
            assert first["attempts"] == 2  # visible in the log: it took a retry
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        receiver.close()


def test_the_event_log_is_capped(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from forkyard.control import _events

    monkeypatch.setattr(_events, "MAX_EVENTS", 50)
    log = cluster.plane.events
    for _ in range(_events._PRUNE_EVERY * 2):
        log.emit("created", sandbox="sb-" + "f" * 20)
    rows = cluster.api.get("/v1/events", params={"limit": 1000}).json()
    assert len(rows) <= 50 + _events._PRUNE_EVERY


# --- metrics --------------------------------------------------------------------------------
def _scrape(cluster: Cluster) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    resp = cluster.api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(resp.text) for s in fam.samples}


def test_metrics_parse_as_prometheus_text_and_move(cluster: Cluster) -> None:
    before = _scrape(cluster)

    def ops(m: dict[Any, float], op: str, outcome: str = "ok") -> float:
        return m.get(("forkyard_operations_total",
                      (("operation", op), ("outcome", outcome))), 0.0)

    sb = cluster.create(memory_mb=512, cpus=2)
    cp = cluster.api.post(f"/v1/sandboxes/{sb['id']}/checkpoint", json={}).json()
    cluster.api.post(f"/v1/checkpoints/{cp['id']}/fork", json={"worker": "w2"})
    cluster.api.post(f"/v1/sandboxes/{sb['id']}/hibernate", json={})
    cluster.api.post(f"/v1/sandboxes/{sb['id']}/wake", json={})
    bad = cluster.api.post("/v1/sandboxes", json={"worker": "no-such-worker"})
    assert bad.status_code == 404
    after = _scrape(cluster)
    for op in ("create", "checkpoint", "fork", "hibernate", "wake"):
        assert ops(after, op) == ops(before, op) + 1, op
        count = ("forkyard_operation_seconds_count", (("operation", op),))
        assert after[count] == before[count] + 1, op
    assert ops(after, "create", "error") == ops(before, "create", "error") + 1
    w1 = (("worker", "w1"),)
    assert after[("forkyard_worker_memory_in_use_mb", w1)] >= 512
    assert after[("forkyard_worker_cpus_in_use", w1)] >= 2
    assert after[("forkyard_worker_alive", w1)] == 1
    assert after[("forkyard_sandboxes", (("state", "running"),))] >= 1
    assert after[("forkyard_stored_bytes", ())] >= 1024
    assert ("forkyard_worker_memory_free_mb", w1) in after


def test_metrics_need_the_api_token(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.url}/metrics").status_code == 401


def test_a_worker_restarting_without_a_sandbox_logs_it_lost(cluster: Cluster) -> None:
    # last in this module: every sandbox w1 still runs is lost by this re-registration
    sb = cluster.create()
    w1 = next(w for w in cluster.api.get("/v1/workers").json() if w["name"] == "w1")
    report = {"name": "w1", "url": w1["url"], "running": 0, "free_memory_mb": 1 << 20,
              "max_sandboxes": 1 << 20, "cached_bases": [], "checkpoints": [],
              "sandboxes": []}
    resp = httpx.post(f"{cluster.url}/internal/workers/register", json=report,
                      headers={"authorization": f"Bearer {worker_credential(WORKER, 'w1')}"})
    assert resp.status_code == 200, resp.text
    events = cluster.api.get("/v1/events", params={"sandbox": sb["id"]}).json()
    assert [e["kind"] for e in events] == ["created", "lost"]
    assert "restarted" in events[-1]["detail"]


def test_a_checkpoint_says_how_much_of_its_ram_it_shares(cluster: Cluster) -> None:
    """What the worker reported (from the manifest) over HTTP, kept by the database,
    and in the SDK's checkpoint object."""
    from forkyard.sdk import Checkpoint

    sb = cluster.create()
    made = cluster.api.post(f"/v1/sandboxes/{sb['id']}/checkpoint", json={}).json()
    assert (made["ram_new_bytes"], made["ram_shared_bytes"]) == (3072, 1024)
    got = cluster.api.get(f"/v1/checkpoints/{made['id']}").json()
    assert (got["ram_new_bytes"], got["ram_shared_bytes"]) == (3072, 1024)
    cp = Checkpoint.get(made["id"], url=cluster.url, token=API)
    assert (cp.ram_new_bytes, cp.ram_shared_bytes) == (3072, 1024)
    assert cp.info.to_json()["ram_shared_bytes"] == 1024

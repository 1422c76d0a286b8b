"""The control plane's HTTP API without any worker daemon: auth, errors, schema, registry.

Runs twice: on SQLite and on a real PostgreSQL server.  Everything that needs
a sandbox is in tests/integration/test_control_cluster.py, on real workers.
A "worker" here is only a registration whose URL nothing listens on: it tests
the registry and the unreachable-worker paths, and pretends no VM.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from forkyard.control.server import create_app
from forkyard.wire.auth import worker_credential
from forkyard.wire.serving import bind
from tests.fixtures.postgres import PostgresServer, postgres_fixture

API = "api-" + "a" * 40
WORKER = "wrk-" + "w" * 40
HEARTBEAT_TIMEOUT = 1.5
NO_SANDBOX = "sb-" + "0" * 20
NO_CHECKPOINT = "0" * 64
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing answers there

postgres_server = postgres_fixture()

# docs/api.md, control plane table + worker registration
DOCUMENTED = {
    ("GET", "/health"),
    ("GET", "/v1/workers"),
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/{sandbox_id}"),
    ("DELETE", "/v1/sandboxes/{sandbox_id}"),
    ("POST", "/v1/sandboxes/{sandbox_id}/exec"),
    ("PUT", "/v1/sandboxes/{sandbox_id}/files"),
    ("GET", "/v1/sandboxes/{sandbox_id}/files"),
    ("GET", "/v1/sandboxes/{sandbox_id}/files/list"),
    ("GET", "/v1/sandboxes/{sandbox_id}/files/stat"),
    ("DELETE", "/v1/sandboxes/{sandbox_id}/files"),
    ("POST", "/v1/sandboxes/{sandbox_id}/checkpoint"),
    ("POST", "/v1/sandboxes/{sandbox_id}/hibernate"),
    ("POST", "/v1/sandboxes/{sandbox_id}/wake"),
    ("GET", "/v1/checkpoints"),
    ("GET", "/v1/checkpoints/{checkpoint_id}"),
    ("DELETE", "/v1/checkpoints/{checkpoint_id}"),
    ("POST", "/v1/checkpoints/{checkpoint_id}/fork"),
    ("POST", "/v1/sandboxes/{sandbox_id}/timeout"),
    ("PUT", "/v1/sandboxes/{sandbox_id}/network"),
    ("POST", "/v1/sandboxes/{sandbox_id}/previews/{port}"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("POST", "/internal/workers/register"),
    ("POST", "/internal/workers/{name}/heartbeat"),
    ("POST", "/internal/workers/{name}/leave"),
}


class AsWorker(httpx.Auth):
    """Each /internal call with the credential of the worker it names (path or report)."""

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        name = request.url.path.split("/")[3]
        if name == "register":
            name = json.loads(request.content)["name"]
        request.headers["authorization"] = f"Bearer {worker_credential(WORKER, name)}"
        yield request


@dataclass
class Server:
    url: str
    app: FastAPI
    api: httpx.Client
    internal: httpx.Client

    @property
    def plane(self) -> Any:
        return self.app.state.plane


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres",
                                                                marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('cp')}/control.db"
        return
    pg: PostgresServer = request.getfixturevalue("postgres_server")
    url = pg.create_database()
    yield url
    pg.drop_database(url)


@pytest.fixture(scope="module")
def server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("store")
    app = create_app(db_url=db_url, api_token=API, worker_token=WORKER,
                     store_url=f"file://{store}", heartbeat_timeout=HEARTBEAT_TIMEOUT)
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    with (httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"},
                       timeout=30) as api,
          httpx.Client(base_url=url, auth=AsWorker(), timeout=30) as internal):
        yield Server(url, app, api, internal)
    srv.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


def report(name: str, *, url: str = NOWHERE, store: str | None = None,
           **extra: Any) -> dict[str, Any]:
    body = {"name": name, "url": url, "max_sandboxes": 4, "free_memory_mb": 2048,
            "running": 0, "cached_bases": ["b" * 64], "checkpoints": []}
    if store is not None:
        body["store_url"] = store
    body.update(extra)
    return body


def assert_error(resp: httpx.Response, status: int, type_: str, match: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["type"] == type_, err
    assert isinstance(err["message"], str) and err["message"]
    if match:
        assert re.search(match, err["message"]), err["message"]
    return err


# ---------------------------------------------------------------------------
# auth
def _routes(app: FastAPI) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute | Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    out.append((method, route.path))
    return out


def _fill(path: str) -> str:
    return (path.replace("{sandbox_id}", NO_SANDBOX)
            .replace("{checkpoint_id}", NO_CHECKPOINT).replace("{name}", "w1")
            .replace("{port}", "8000"))


def test_health_needs_no_token(server: Server) -> None:
    resp = httpx.get(f"{server.url}/health")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok" and resp.json()["version"]


def test_every_route_but_health_refuses_missing_wrong_and_other_tokens(server: Server) -> None:
    routes = _routes(server.app)
    assert set(routes) >= DOCUMENTED, DOCUMENTED - set(routes)  # the doc matches the app
    checked = 0
    for method, path in routes:
        if path == "/health":
            continue
        other = API if path.startswith("/internal/") else WORKER
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": f"Basic {API}"},
                        {"authorization": f"Bearer {other}"}):
            resp = httpx.request(method, server.url + _fill(path), headers=headers, json={},
                                 params={"path": "/x"})
            err = assert_error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer", (method, path)
            assert "token" in err["message"]
        checked += 1
    assert checked >= len(DOCUMENTED) - 1


def test_auth_comes_before_body_validation(server: Server) -> None:
    resp = httpx.post(f"{server.url}/v1/sandboxes", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert_error(resp, 401, "unauthorized")


def test_unknown_routes_are_404_after_auth(server: Server) -> None:
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 401, "unauthorized")
    assert_error(server.api.get("/v1/nothing"), 404, "not_found")
    assert_error(server.api.patch("/v1/sandboxes"), 405, "method_not_allowed")


# ---------------------------------------------------------------------------
# schema
def test_openapi_schema_is_valid_openapi_3(server: Server) -> None:
    from openapi_spec_validator import validate

    resp = server.api.get("/openapi.json")
    assert resp.status_code == 200
    schema = resp.json()
    validate(schema)
    assert schema["openapi"].startswith("3.")
    documented = {p for _, p in DOCUMENTED}
    assert documented <= set(schema["paths"])
    for path, ops in schema["paths"].items():
        for op in ops.values():
            if path == "/health":
                assert "security" not in op
            else:
                want = "workerToken" if path.startswith("/internal/") else "apiToken"
                assert op["security"] == [{want: []}], path
    # raw file bodies are documented as such
    put = schema["paths"]["/v1/sandboxes/{sandbox_id}/files"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]


# ---------------------------------------------------------------------------
# 404 / 422 / 413 / 503
def test_unknown_objects_are_404(server: Server) -> None:
    api = server.api
    assert_error(api.get(f"/v1/sandboxes/{NO_SANDBOX}"), 404, "not_found", "no sandbox")
    assert_error(api.get("/v1/sandboxes/not-an-id"), 404, "not_found", "no sandbox")
    assert_error(api.delete(f"/v1/sandboxes/{NO_SANDBOX}"), 404, "not_found")
    assert_error(api.post(f"/v1/sandboxes/{NO_SANDBOX}/exec", json={"cmd": "true"}), 404,
                 "not_found")
    assert_error(api.get(f"/v1/sandboxes/{NO_SANDBOX}/files", params={"path": "/etc/hostname"}),
                 404, "not_found")
    assert_error(api.put(f"/v1/sandboxes/{NO_SANDBOX}/files", params={"path": "/x"},
                         content=b"data"), 404, "not_found")
    for op in ("checkpoint", "hibernate", "wake"):
        assert_error(api.post(f"/v1/sandboxes/{NO_SANDBOX}/{op}", json={}), 404, "not_found")
    assert_error(api.get(f"/v1/checkpoints/{NO_CHECKPOINT}"), 404, "not_found", "no checkpoint")
    assert_error(api.get("/v1/checkpoints/abc"), 404, "not_found", "6\\+ hex")
    assert_error(api.get("/v1/checkpoints/zzzzzzzz"), 404, "not_found")
    assert_error(api.delete(f"/v1/checkpoints/{NO_CHECKPOINT}"), 404, "not_found")
    assert_error(api.post(f"/v1/checkpoints/{NO_CHECKPOINT}/fork", json={}), 404, "not_found")


@pytest.mark.parametrize(("method", "path", "body", "where"), [
    ("POST", "/v1/sandboxes", {"imag": "minimal"}, "body.imag"),
    ("POST", "/v1/sandboxes", {"memory_mb": 1}, "body.memory_mb"),
    ("POST", "/v1/sandboxes", {"worker": "../x"}, "body.worker"),
    ("POST", "/v1/sandboxes", [1, 2], "body"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {}, "body.cmd"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {"cmd": []}, "body.cmd"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {"cmd": ""}, "body.cmd"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {"cmd": "x", "env": {"A=B": "c"}}, "body.env"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {"cmd": "x", "timeout": 0}, "body.timeout"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {"cmd": "x", "stdin_b64": "!!"},
     "body.stdin_b64"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/exec", {"cmd": "x", "cwd": "rel"}, "body.cwd"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/checkpoint", {"name": "../bad"}, "body.name"),
    ("POST", f"/v1/sandboxes/{NO_SANDBOX}/hibernate", {"wait": "soon"}, "body.wait"),
    ("POST", f"/v1/checkpoints/{NO_CHECKPOINT}/fork", {"count": 0}, "body.count"),
    ("POST", f"/v1/checkpoints/{NO_CHECKPOINT}/fork", {"count": 1000}, "body.count"),
    ("GET", f"/v1/sandboxes/{NO_SANDBOX}/files/stat?path=relative", None, "query.path"),
    ("GET", f"/v1/sandboxes/{NO_SANDBOX}/files/list", None, "query.path"),
    ("PUT", f"/v1/sandboxes/{NO_SANDBOX}/files?path=/x&mode=99999", None, "query.mode"),
])
def test_invalid_requests_are_422_with_the_details(server: Server, method: str, path: str,
                                                   body: Any, where: str) -> None:
    resp = server.api.request(method, path, json=body)
    err = assert_error(resp, 422, "invalid", re.escape(where))
    assert isinstance(err["detail"], list) and err["detail"]
    assert ".".join(map(str, err["detail"][0]["loc"])).startswith(where)


def test_malformed_json_is_422(server: Server) -> None:
    resp = server.api.post("/v1/sandboxes", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert_error(resp, 422, "invalid", "JSON")


@pytest.mark.parametrize(("configured", "limit"), [(None, 16 * 1024**3),
                                                  ("67108864", 64 * 1024 * 1024)])
def test_a_file_over_the_limit_is_413_before_the_body_is_read(
        server: Server, monkeypatch: pytest.MonkeyPatch, configured: str | None,
        limit: int) -> None:
    # A raw socket: the client announces limit + 1 and sends almost nothing.  The
    # answer must come from the Content-Length alone; the operator's limit is per request.
    if configured is not None:
        monkeypatch.setenv("FORKYARD_MAX_FILE_BYTES", configured)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"PUT /v1/sandboxes/{NO_SANDBOX}/files?path=/big HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {API}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {limit + 1}\r\n"
            "\r\nxx".encode())
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    err = json.loads(body)["error"]
    assert err["type"] == "too_large" and "over the limit" in err["message"]
    assert err["detail"] == {"limit": limit}


def test_without_workers_placement_is_503(server: Server) -> None:
    assert_error(server.api.post("/v1/sandboxes", json={}), 503, "unavailable", "no live worker")
    assert_error(server.api.post("/v1/sandboxes", json={"worker": "nobody"}), 404, "not_found",
                 "no worker 'nobody'")


# ---------------------------------------------------------------------------
# registry
def test_register_heartbeat_and_death(server: Server) -> None:
    store = server.plane.store_url
    internal = server.internal
    resp = internal.post("/internal/workers/register", json=report("ghost", store=store))
    assert resp.status_code == 200 and resp.json()["state"] == "alive"
    [w] = [w for w in server.api.get("/v1/workers").json() if w["name"] == "ghost"]
    assert (w["state"], w["url"], w["max_sandboxes"], w["cached_bases"]) == (
        "alive", NOWHERE, 4, ["b" * 64])
    assert w["last_heartbeat"].endswith("Z")

    # heartbeats keep it alive past the timeout and update its capacity
    for _ in range(3):
        time.sleep(HEARTBEAT_TIMEOUT / 2)
        resp = internal.post("/internal/workers/ghost/heartbeat",
                             json=report("ghost", store=store, free_memory_mb=1000))
        assert resp.status_code == 200, resp.text
    [w] = [w for w in server.api.get("/v1/workers").json() if w["name"] == "ghost"]
    assert (w["state"], w["free_memory_mb"]) == ("alive", 1000)

    # placement picks it, cannot reach it: 503, and the sandbox is recorded as failed
    err = assert_error(server.api.post("/v1/sandboxes", json={"worker": "ghost"}), 503,
                       "unavailable", "unreachable")
    assert "ghost" in err["message"]
    failed = [s for s in server.api.get("/v1/sandboxes").json() if s["worker"] == "ghost"]
    assert [s["state"] for s in failed] == ["failed"] and "unreachable" in failed[0]["error"]

    # silence: dead within the timeout (+ the monitor's tick)
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT + 3
    while True:
        [w] = [w for w in server.api.get("/v1/workers").json() if w["name"] == "ghost"]
        if w["state"] == "dead":
            break
        assert time.monotonic() < deadline, "ghost was not declared dead"
        time.sleep(0.1)
    assert_error(server.api.post("/v1/sandboxes", json={"worker": "ghost"}), 503, "unavailable",
                 "dead")
    # a heartbeat brings it back
    resp = internal.post("/internal/workers/ghost/heartbeat", json=report("ghost", store=store))
    assert resp.status_code == 200
    [w] = [w for w in server.api.get("/v1/workers").json() if w["name"] == "ghost"]
    assert w["state"] == "alive"
    resp = internal.post("/internal/workers/ghost/leave", json={"sandboxes": [],
                                                                "checkpoints": []})
    assert resp.status_code == 204
    [w] = [w for w in server.api.get("/v1/workers").json() if w["name"] == "ghost"]
    assert w["state"] == "dead"


def test_registry_refusals(server: Server) -> None:
    store = server.plane.store_url
    internal = server.internal
    assert_error(internal.post("/internal/workers/unknown/heartbeat",
                               json=report("unknown", store=store)), 404, "not_found",
                 "register first")
    assert internal.post("/internal/workers/register",
                         json=report("twin", store=store)).status_code == 200
    assert_error(internal.post("/internal/workers/twin/heartbeat",
                               json=report("other", store=store)), 400, "bad_request")
    # a second live daemon claiming the name from elsewhere
    assert_error(internal.post("/internal/workers/register",
                               json=report("twin", url="http://127.0.0.1:10", store=store)),
                 409, "conflict", "taken")
    # a worker on another store could never fork published checkpoints
    assert_error(internal.post("/internal/workers/register",
                               json=report("stray", store="file:///elsewhere")), 409,
                 "conflict", "store")
    assert_error(internal.post("/internal/workers/register",
                               json=report("bad/name", store=store)), 422, "invalid")
    assert_error(internal.post("/internal/workers/register",
                               json={**report("neg", store=store), "running": -1}), 422,
                 "invalid")


def test_sandboxes_the_database_never_knew_are_adopted_not_destroyed(server: Server) -> None:
    # a new or emptied database must not make workers destroy their VMs (issue 10)
    store = server.plane.store_url
    stray = {"id": "sb-" + "1" * 20, "state": "running", "image": "b" * 64,
             "created": "2026-01-01T00:00:00.000Z", "memory_mb": 256, "cpus": 1,
             "parent_checkpoint": None, "last_checkpoint": None}
    odd = {**stray, "id": "sb-" + "2" * 20, "state": "failed"}
    resp = server.internal.post("/internal/workers/register",
                                json=report("gc", store=store, sandboxes=[stray, odd]))
    assert resp.status_code == 200
    assert resp.json()["destroy"] == []
    adopted = server.api.get(f"/v1/sandboxes/{stray['id']}").json()
    assert (adopted["state"], adopted["worker"]) == ("running", "gc")
    assert "adopted" in adopted["error"]
    # one in another state is left alone: neither adopted nor destroyed
    assert server.api.get(f"/v1/sandboxes/{odd['id']}").status_code == 404
    # once the operator destroys it, the worker is told to drop it
    assert server.api.delete(f"/v1/sandboxes/{stray['id']}").status_code == 204
    again = server.internal.post("/internal/workers/gc/heartbeat",
                                 json=report("gc", store=store, sandboxes=[stray]))
    assert again.json()["destroy"] == [stray["id"]]


# ---------------------------------------------------------------------------
# database
def test_migrations_produce_exactly_the_models(db_url: str, server: Server) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from forkyard.control._db import Base, Database
    from forkyard.control._migrate import alembic_config

    db = Database(db_url)
    try:
        db.migrate()  # a second upgrade to head is a no-op
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert ctx.get_current_revision() == head
    finally:
        db.close()


def test_app_refuses_unsafe_configuration(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(ValueError, match="differ"):
        create_app(db_url=url, api_token="same", worker_token="same", store_url="file:///s")
    with pytest.raises(ValueError, match="empty"):
        create_app(db_url=url, api_token="", worker_token="w", store_url="file:///s")


def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    from forkyard.control._db import DatabaseError

    with pytest.raises(DatabaseError) as e:
        create_app(db_url="postgresql+psycopg://u:s3cret@127.0.0.1:9/x", api_token="a",
                   worker_token="w", store_url="file:///s")
    assert "127.0.0.1" in str(e.value) and "s3cret" not in str(e.value)


# ---------------------------------------------------------------------------
# the schema is the contract (docs/api.md, "The OpenAPI document")
def test_405_allows_every_method_served_at_the_path(server: Server) -> None:
    for method, path, allow in [
        ("PATCH", "/v1/sandboxes", "GET, POST"),
        ("POST", f"/v1/sandboxes/{NO_SANDBOX}", "DELETE, GET"),
        ("PUT", "/v1/checkpoints", "GET"),
        ("POST", f"/v1/sandboxes/{NO_SANDBOX}/files", "DELETE, GET, PUT"),
    ]:
        resp = server.api.request(method, path)
        assert_error(resp, 405, "method_not_allowed")
        assert resp.headers["allow"] == allow, (method, path)


def test_openapi_declares_the_errors_each_route_gives(server: Server) -> None:
    schema = server.api.get("/openapi.json").json()
    ref = "#/components/schemas/ErrorBody"
    assert "ErrorBody" in schema["components"]["schemas"]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if path != "/health":
                assert {"401", "503"} <= codes, (method, path)
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")) and code != "401":
                    assert resp["content"]["application/json"]["schema"] == {"$ref": ref}, (
                        method, path, code)
    exec_ = schema["paths"]["/v1/sandboxes/{sandbox_id}/exec"]["post"]["responses"]
    assert {"200", "400", "404", "409", "413", "422", "502", "503", "504"} <= set(exec_)
    # FastAPI's own validation body is not what the server sends
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_the_schema_states_the_constraints_the_server_enforces(server: Server) -> None:
    schema = server.api.get("/openapi.json").json()
    exec_req = schema["components"]["schemas"]["ExecRequest"]["properties"]
    text, argv = exec_req["cmd"]["anyOf"]
    assert text["minLength"] == 1 and argv["minItems"] == 1
    assert argv["prefixItems"][0]["minLength"] == 1
    params = {p["name"]: p["schema"] for p in
              schema["paths"]["/v1/sandboxes/{sandbox_id}/files"]["put"]["parameters"]}
    file_re = re.compile(params["path"]["pattern"])
    assert file_re.match("/root/x") and not file_re.match("/") and not file_re.match("/a/..")


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/"), ("GET", "/"), ("DELETE", "/"), ("GET", "/tmp/"), ("DELETE", "/root/.."),
    ("PUT", "/a/."),
])
def test_file_operations_need_a_path_below_root(server: Server, method: str, path: str) -> None:
    resp = server.api.request(method, f"/v1/sandboxes/{NO_SANDBOX}/files", params={"path": path},
                              content=b"x" if method == "PUT" else None)
    assert_error(resp, 422, "invalid", "query.path")


def test_lists_and_stats_still_take_any_absolute_path(server: Server) -> None:
    for op in ("list", "stat"):
        resp = server.api.get(f"/v1/sandboxes/{NO_SANDBOX}/files/{op}", params={"path": "/"})
        assert_error(resp, 404, "not_found", "no sandbox")


def test_request_booleans_are_strict(server: Server) -> None:
    resp = server.api.post(f"/v1/sandboxes/{NO_SANDBOX}/hibernate", json={"wait": 0})
    assert_error(resp, 422, "invalid", "body.wait")

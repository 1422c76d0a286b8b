"""Tenants, API keys, worker credentials, body limits and the rate limit of the control plane.

The auth matrix is table-driven over the app's own OpenAPI paths: a route
added later fails :func:`test_every_route_is_in_the_matrix` until it is
classified here, so it cannot be forgotten.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from forkyard.checkpoint import archive
from forkyard.control.server import create_app
from forkyard.wire.auth import worker_credential
from forkyard.wire.serving import bind
from tests.fixtures.fake_worker import fake_worker

ADMIN = "adm-" + "a" * 40
SECRET = "sec-" + "s" * 40
NOWHERE = "http://127.0.0.1:9"
MATRIX_WORKER = "w-matrix"  # /internal cases act as this worker, never placed on (no room)
_seq = itertools.count()


@dataclass
class Plane:
    url: str
    app: FastAPI
    store: str
    home: Path
    keys: dict[str, str]  # caller -> bearer token

    def client(self, who: str) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.keys[who]}"} if who != "none" else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


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
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    home = tmp_path_factory.mktemp("auth")
    store = f"file://{home / 'store'}"
    app = create_app(db_url=f"sqlite:///{home}/control.db", api_token=ADMIN,
                     worker_token=SECRET, store_url=store, heartbeat_timeout=3600, rate=None)
    url, srv, thread = _serve(app)
    keys = {"admin": ADMIN, "worker": worker_credential(SECRET, MATRIX_WORKER)}
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN}"}) as admin:
        for name in ("alice", "bob"):
            resp = admin.post("/v1/keys", json={"name": name})
            assert resp.status_code == 201, resp.text
            keys[name] = resp.json()["key"]
    with fake_worker("fake1", server_url=url, worker_token=SECRET, store_url=store):
        yield Plane(url, app, store, home, keys)
    srv.should_exit = True
    thread.join(timeout=30)


# --- the matrix -----------------------------------------------------------------------
CALLERS = ("none", "bob", "worker", "alice", "admin")  # bob: another tenant than alice


@dataclass
class Objects:
    sandbox: str
    checkpoint: str
    key: str  # an API key's name, for the key routes


def _objects(p: Plane) -> Objects:
    """Fresh objects of alice (and a key) for one request to act on."""
    with p.client("alice") as alice, p.client("admin") as admin:
        sb = alice.post("/v1/sandboxes", json={})
        assert sb.status_code == 201, sb.text
        sid = sb.json()["id"]
        assert alice.put(f"/v1/sandboxes/{sid}/files", params={"path": "/x"},
                         content=b"hi").status_code == 200
        cp = alice.post(f"/v1/sandboxes/{sid}/checkpoint", json={})
        assert cp.status_code == 201, cp.text
        key = f"k{next(_seq)}"
        assert admin.post("/v1/keys", json={"name": key}).status_code == 201
    return Objects(sid, cp.json()["id"], key)


def _report(**extra: Any) -> dict[str, Any]:
    return {"name": MATRIX_WORKER, "url": NOWHERE, "max_sandboxes": 0, "free_memory_mb": 0,
            "running": 0, "cached_bases": [], "checkpoints": [], **extra}


def _register_matrix_worker(p: Plane) -> None:
    with p.client("worker") as worker:
        assert worker.post("/internal/workers/register", json=_report()).status_code == 200


# how each kind of route answers each caller besides its own success status
OWNED = {"none": 401, "bob": 404, "worker": 401}  # alice's objects: bob cannot see them
COLLECTION = {"none": 401, "worker": 401}  # lists and creates: everyone has their own
ADMIN_ONLY = {"none": 401, "bob": 403, "worker": 401, "alice": 403}
INTERNAL = {"none": 401, "bob": 401, "alice": 401, "admin": 401}

SB = "/v1/sandboxes/{sandbox_id}"
CP = "/v1/checkpoints/{checkpoint_id}"
Req = Callable[[Objects], dict[str, Any]]
_FILE: Req = lambda o: {"params": {"path": "/x"}}  # noqa: E731
_NONE: Req = lambda o: {}  # noqa: E731
# (method, path) -> (kind, success status, the request's extras)
MATRIX: dict[tuple[str, str], tuple[dict[str, int], int, Req]] = {
    ("get", "/v1/workers"): (ADMIN_ONLY, 200, _NONE),
    ("get", "/metrics"): (ADMIN_ONLY, 200, _NONE),  # fleet-wide numbers: an operator's
    ("get", "/v1/events"): (COLLECTION, 200, _NONE),  # each tenant sees its own
    ("post", "/v1/workers/{name}/credential"): (ADMIN_ONLY, 201, _NONE),
    ("post", "/v1/keys"): (ADMIN_ONLY, 201, lambda o: {"json": {"name": f"n{next(_seq)}"}}),
    ("get", "/v1/keys"): (ADMIN_ONLY, 200, _NONE),
    ("delete", "/v1/keys/{name}"): (ADMIN_ONLY, 204, _NONE),
    ("post", "/v1/sandboxes"): (COLLECTION, 201, lambda o: {"json": {}}),
    ("get", "/v1/sandboxes"): (COLLECTION, 200, _NONE),
    ("get", SB): (OWNED, 200, _NONE),
    ("delete", SB): (OWNED, 204, _NONE),
    ("post", f"{SB}/exec"): (OWNED, 200, lambda o: {"json": {"cmd": "true"}}),
    ("put", f"{SB}/files"): (OWNED, 200, lambda o: {"params": {"path": "/y"},
                                                    "content": b"x"}),
    ("get", f"{SB}/files"): (OWNED, 200, _FILE),
    ("delete", f"{SB}/files"): (OWNED, 204, _FILE),
    ("get", f"{SB}/files/list"): (OWNED, 200, lambda o: {"params": {"path": "/"}}),
    ("get", f"{SB}/files/stat"): (OWNED, 200, _FILE),
    ("get", f"{SB}/files/exists"): (OWNED, 200, _FILE),
    ("post", f"{SB}/files/mkdir"): (OWNED, 204, lambda o: {"params": {"path": "/d"}}),
    ("post", f"{SB}/files/rename"): (OWNED, 204, lambda o: {"params": {"path": "/x",
                                                                     "to": "/x"}}),
    ("put", f"{SB}/files/tree"): (OWNED, 200, lambda o: {"params": {"path": "/t"},
                                                         "content": b"\0" * 1024}),
    ("get", f"{SB}/files/tree"): (OWNED, 200, lambda o: {"params": {"path": "/"}}),
    ("post", f"{SB}/checkpoint"): (OWNED, 201, lambda o: {"json": {}}),
    ("post", f"{SB}/hibernate"): (OWNED, 200, lambda o: {"json": {}}),
    ("post", f"{SB}/wake"): (OWNED, 200, lambda o: {"json": {}}),
    ("post", f"{SB}/timeout"): (OWNED, 200, lambda o: {"json": {"timeout": 3600}}),
    ("put", f"{SB}/network"): (OWNED, 200, lambda o: {"json": {"deny_out": ["1.2.3.4"]}}),
    ("post", f"{SB}/previews/{{port}}"): (OWNED, 201, lambda o: {"json": {}}),
    ("post", f"{SB}/procs"): (OWNED, 201, lambda o: {"json": {"cmd": "true"}}),
    ("get", f"{SB}/procs"): (OWNED, 200, _NONE),
    ("get", f"{SB}/procs/{{pid}}/output"): (OWNED, 200, _NONE),
    ("get", f"{SB}/procs/{{pid}}/stream"): (OWNED, 200, _NONE),
    ("post", f"{SB}/procs/{{pid}}/stdin"): (OWNED, 200, lambda o: {"content": b"x"}),
    ("post", f"{SB}/procs/{{pid}}/resize"): (OWNED, 204,
                                           lambda o: {"json": {"rows": 30, "cols": 100}}),
    ("post", f"{SB}/procs/{{pid}}/signal"): (OWNED, 204, lambda o: {"json": {"signal": 15}}),
    ("get", "/v1/checkpoints"): (COLLECTION, 200, _NONE),
    ("get", CP): (OWNED, 200, _NONE),
    ("delete", CP): (OWNED, 204, _NONE),
    # the fake worker's checkpoints have no manifest in the real store, so even their
    # owner meets the store's 404 (the 200 is in test_checkpoint_show_goes_through_the_api)
    ("get", f"{CP}/manifest"): (OWNED, 404, _NONE),
    ("post", f"{CP}/fork"): (OWNED, 201, lambda o: {"json": {}}),
    ("post", "/internal/workers/register"): (INTERNAL, 200, lambda o: {"json": _report()}),
    ("post", "/internal/workers/{name}/heartbeat"): (INTERNAL, 200,
                                                     lambda o: {"json": _report()}),
    ("post", "/internal/workers/{name}/leave"): (
        INTERNAL, 204, lambda o: {"json": {"sandboxes": [], "checkpoints": []}}),
}


def test_every_route_is_in_the_matrix(plane: Plane) -> None:
    schema = httpx.get(f"{plane.url}/openapi.json",
                       headers={"authorization": f"Bearer {ADMIN}"}).json()
    ops = {(m, path) for path, item in schema["paths"].items() for m in item
           if path != "/health"}
    assert ops == set(MATRIX), ops ^ set(MATRIX)


@pytest.mark.parametrize("who", CALLERS)
@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
def test_auth_matrix(plane: Plane, method: str, path: str, who: str) -> None:
    kind, success, extra = MATRIX[(method, path)]
    objs = _objects(plane)
    _register_matrix_worker(plane)
    url = (path.replace("{sandbox_id}", objs.sandbox)
           .replace("{checkpoint_id}", objs.checkpoint).replace("{pid}", "2")  # pid 1 is the agent
           .replace("{port}", "8000")
           .replace("{name}", objs.key if path.startswith("/v1/keys/") else MATRIX_WORKER))
    with plane.client(who) as client:
        resp = client.request(method.upper(), url, **extra(objs))
    assert resp.status_code == kind.get(who, success), (who, method, path, resp.text)
    if resp.status_code >= 400:
        assert set(resp.json()) == {"error"}


def test_lists_show_only_the_tenants_own_objects(plane: Plane) -> None:
    objs = _objects(plane)
    with plane.client("bob") as bob, plane.client("alice") as alice, \
            plane.client("admin") as admin:
        mine = bob.post("/v1/sandboxes", json={}).json()["id"]
        bob_sbs = {s["id"] for s in bob.get("/v1/sandboxes").json()}
        alice_sbs = {s["id"] for s in alice.get("/v1/sandboxes").json()}
        all_sbs = {s["id"] for s in admin.get("/v1/sandboxes").json()}
        assert mine in bob_sbs and objs.sandbox not in bob_sbs
        assert objs.sandbox in alice_sbs and mine not in alice_sbs
        assert {mine, objs.sandbox} <= all_sbs
        assert objs.checkpoint not in {c["id"] for c in bob.get("/v1/checkpoints").json()}
        assert objs.checkpoint in {c["id"] for c in alice.get("/v1/checkpoints").json()}
        assert objs.checkpoint in {c["id"] for c in admin.get("/v1/checkpoints").json()}
        # a prefix of another tenant's checkpoint finds nothing either
        assert bob.get(f"/v1/checkpoints/{objs.checkpoint[:8]}").status_code == 404
        assert alice.get(f"/v1/checkpoints/{objs.checkpoint[:8]}").status_code == 200


def test_events_show_only_the_tenants_own_sandboxes(plane: Plane) -> None:
    objs = _objects(plane)
    with plane.client("bob") as bob, plane.client("alice") as alice, \
            plane.client("admin") as admin:
        mine = bob.post("/v1/sandboxes", json={}).json()["id"]

        def seen(client: httpx.Client, **params: str) -> set[str | None]:
            resp = client.get("/v1/events", params={"limit": 1000, **params})
            assert resp.status_code == 200, resp.text
            return {e["sandbox"] for e in resp.json()}

        assert mine in seen(bob) and objs.sandbox not in seen(bob)
        assert objs.sandbox in seen(alice) and mine not in seen(alice)
        assert {mine, objs.sandbox} <= seen(admin)
        # asking for another tenant's sandbox by id finds nothing rather than its events
        assert seen(bob, sandbox=objs.sandbox) == set()
        assert seen(alice, sandbox=objs.sandbox) == {objs.sandbox}
        assert seen(admin, sandbox=objs.sandbox) == {objs.sandbox}


def test_forks_belong_to_the_checkpoints_tenant_even_when_an_admin_forks(plane: Plane) -> None:
    objs = _objects(plane)
    with plane.client("admin") as admin, plane.client("alice") as alice, \
            plane.client("bob") as bob:
        forks = admin.post(f"/v1/checkpoints/{objs.checkpoint}/fork", json={"count": 2})
        assert forks.status_code == 201, forks.text
        for sb in forks.json():
            assert alice.get(f"/v1/sandboxes/{sb['id']}").status_code == 200
            assert bob.get(f"/v1/sandboxes/{sb['id']}").status_code == 404
        own = alice.post(f"/v1/checkpoints/{objs.checkpoint}/fork", json={}).json()[0]
        assert alice.get(f"/v1/sandboxes/{own['id']}").status_code == 200


# --- checkpoint rm --------------------------------------------------------------------
def test_checkpoint_rm_is_404_and_is_not_adopted_back_from_the_store(
    plane: Plane, monkeypatch: pytest.MonkeyPatch,
) -> None:
    objs = _objects(plane)
    manifest = SimpleNamespace(id=objs.checkpoint, created="2026-01-01T00:00:00.000Z",
                               sandbox=objs.sandbox, name=None,
                               base=SimpleNamespace(digest="b" * 64), changed_bytes=1,
                               extra={"ram_new_bytes": "7", "ram_shared_bytes": "5"})
    fetched: list[str] = []

    def fetch(_store: object, ref: str) -> object:
        fetched.append(ref)
        return manifest

    # the store still holds the checkpoint's manifest (objects stay for a GC)
    monkeypatch.setattr(archive, "fetch_manifest", fetch)
    monkeypatch.setattr(archive, "stored_bytes", lambda _store, _m: 1)
    with plane.client("alice") as alice, plane.client("admin") as admin:
        assert alice.delete(f"/v1/checkpoints/{objs.checkpoint}").status_code == 204
        for client in (alice, admin):
            assert client.get(f"/v1/checkpoints/{objs.checkpoint}").status_code == 404
            assert client.post(f"/v1/checkpoints/{objs.checkpoint}/fork",
                               json={}).status_code == 404
            assert client.get(f"/v1/checkpoints/{objs.checkpoint[:10]}").status_code == 404
        assert objs.checkpoint not in {c["id"] for c in alice.get("/v1/checkpoints").json()}
        assert alice.delete(f"/v1/checkpoints/{objs.checkpoint}").status_code == 404
        assert fetched, "the store was asked, so the tombstone is what refused it"
        # an id never known here is still adopted from the store, by its asker
        manifest.id = "c" * 64
        adopted = alice.get(f"/v1/checkpoints/{'c' * 64}")
        assert adopted.status_code == 200
        # with what its manifest says of its RAM chunks
        assert (adopted.json()["ram_new_bytes"], adopted.json()["ram_shared_bytes"]) == (7, 5)
        assert "c" * 64 in {c["id"] for c in alice.get("/v1/checkpoints").json()}


def test_checkpoint_show_goes_through_the_api_for_its_tenant_only(
    plane: Plane, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from forkyard.cli import app
    from forkyard.store import open_store
    from tests.unit.test_cli_checkpoints import _manifest

    m = _manifest(f"shown-{next(_seq)}")
    open_store(plane.store).put_bytes(archive.manifest_key(m.id), m.canonical())
    monkeypatch.setattr(archive, "stored_bytes", lambda _store, _m: 1)  # parts not uploaded
    for var in ("FORKYARD_URL", "FORKYARD_API_TOKEN", "FORKYARD_HOME"):
        monkeypatch.delenv(var, raising=False)

    def show(who: str, ref: str) -> Any:
        return CliRunner().invoke(app, ["checkpoint", "show", ref, "--url", plane.url,
                                        "--token", plane.keys[who], "--json"])

    with plane.client("alice") as alice, plane.client("bob") as bob:
        assert alice.get(f"/v1/checkpoints/{m.id}").status_code == 200  # now alice's
        resp = alice.get(f"/v1/checkpoints/{m.id}/manifest")
        assert resp.status_code == 200 and resp.content == m.canonical()
        assert bob.get(f"/v1/checkpoints/{m.id}/manifest").status_code == 404
        shown = show("alice", m.id[:12])
        assert shown.exit_code == 0, shown.output
        data = json.loads(shown.stdout)
        assert (data["id"], data["name"], data["source"]) == (m.id, m.name, plane.url)
        assert show("bob", m.id).exit_code == 1  # another tenant's: it does not exist
        assert alice.delete(f"/v1/checkpoints/{m.id}").status_code == 204
        # removed: gone for its tenant, though the store still holds the manifest
        assert alice.get(f"/v1/checkpoints/{m.id}/manifest").status_code == 404
        assert alice.post(f"/v1/checkpoints/{m.id}/fork", json={}).status_code == 404
        gone = show("alice", m.id)
        assert gone.exit_code == 1 and "no checkpoint" in gone.output, gone.output


# --- keys -----------------------------------------------------------------------------
def test_keys_are_shown_once_stored_hashed_and_revocable(plane: Plane) -> None:
    with plane.client("admin") as admin:
        made = admin.post("/v1/keys", json={"name": "carol"})
        assert made.status_code == 201
        key = made.json()["key"]
        assert len(key) >= 40 and made.json()["admin"] is False
        again = admin.post("/v1/keys", json={"name": "carol"})
        assert again.status_code == 409  # names are never reused
        listed = {k["name"]: k for k in admin.get("/v1/keys").json()}
        assert "key" not in listed["carol"] and listed["carol"]["revoked"] is None
        db = (plane.home / "control.db").read_bytes() + b"".join(
            f.read_bytes() for f in plane.home.glob("control.db-*"))
        assert key.encode() not in db
        assert hashlib.sha256(key.encode()).hexdigest().encode() in db
        carol = {"authorization": f"Bearer {key}"}
        assert httpx.get(f"{plane.url}/v1/sandboxes", headers=carol).status_code == 200
        assert admin.delete("/v1/keys/carol").status_code == 204
        assert httpx.get(f"{plane.url}/v1/sandboxes", headers=carol).status_code == 401
        assert admin.delete("/v1/keys/nobody").status_code == 404
        assert admin.post("/v1/keys", json={"name": "../x"}).status_code == 422
        assert admin.post("/v1/keys", json={"name": "x", "admin": 1}).status_code == 422


def test_the_last_admin_key_cannot_be_revoked(plane: Plane) -> None:
    with plane.client("admin") as admin:
        live = [k for k in admin.get("/v1/keys").json() if k["admin"] and not k["revoked"]]
        assert [k["name"] for k in live] == ["admin"]
        assert admin.delete("/v1/keys/admin").status_code == 409
        second = admin.post("/v1/keys", json={"name": "root2", "admin": True}).json()["key"]
        root2 = {"authorization": f"Bearer {second}"}
        assert httpx.get(f"{plane.url}/v1/keys", headers=root2).status_code == 200
        # two live admins: either may go, and the revoked one is refused at once
        assert httpx.delete(f"{plane.url}/v1/keys/root2", headers=root2).status_code == 204
        assert httpx.get(f"{plane.url}/v1/keys", headers=root2).status_code == 401
        assert admin.delete("/v1/keys/admin").status_code == 409


# --- worker credentials ---------------------------------------------------------------
def test_a_worker_credential_acts_only_as_its_own_worker(plane: Plane) -> None:
    w1 = {"authorization": f"Bearer {worker_credential(SECRET, 'w1')}"}
    w2 = {"authorization": f"Bearer {worker_credential(SECRET, 'w2')}"}
    base = f"{plane.url}/internal/workers"

    def rep(name: str, url: str = NOWHERE) -> dict[str, Any]:
        return {**_report(), "name": name, "url": url}

    assert httpx.post(f"{base}/register", json=rep("w1"), headers=w1).status_code == 200
    assert httpx.post(f"{base}/register", json=rep("w2"), headers=w2).status_code == 200
    # w1's credential cannot register, heartbeat or leave as w2 ...
    assert httpx.post(f"{base}/register", json=rep("w2", "http://evil:1"),
                      headers=w1).status_code == 403
    assert httpx.post(f"{base}/w2/heartbeat", json=rep("w2"), headers=w1).status_code == 403
    assert httpx.post(f"{base}/w1/heartbeat", json=rep("w2"), headers=w1).status_code == 400
    assert httpx.post(f"{base}/w2/leave", json={"sandboxes": [], "checkpoints": []},
                      headers=w1).status_code == 403
    # ... nor is a forged or other cluster's credential anything
    forged = worker_credential("another-secret", "w2")
    assert httpx.post(f"{base}/w2/heartbeat", json=rep("w2"),
                      headers={"authorization": f"Bearer {forged}"}).status_code == 401
    assert httpx.post(f"{base}/w2/heartbeat", json=rep("w2"),
                      headers={"authorization": f"Bearer {SECRET}"}).status_code == 401
    # w2 is live: even its own credential cannot move the name to another URL
    assert httpx.post(f"{base}/register", json=rep("w2", "http://127.0.0.1:8"),
                      headers=w2).status_code == 409
    with plane.client("admin") as admin:
        urls = {w["name"]: w["url"] for w in admin.get("/v1/workers").json()}
        assert urls["w2"] == NOWHERE
        # enrolment hands out exactly the credential the name is bound to
        enrolled = admin.post("/v1/workers/w3/credential")
        assert enrolled.status_code == 201
        assert enrolled.json() == {"name": "w3", "credential": worker_credential(SECRET, "w3")}
        assert admin.post("/v1/workers/..%2Fx/credential").status_code in (404, 422)


# --- limits ---------------------------------------------------------------------------
def _raw(url: str, head: bytes, body: bytes | Iterator[bytes]) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in [body] if isinstance(body, bytes) else body:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed: what we check below
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(65536)
        head_, _, rest = reply.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head_.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += sock.recv(65536)
        return head_ + b"\r\n\r\n" + rest


def test_bodies_over_the_limit_are_refused_before_parsing(plane: Plane) -> None:
    auth = f"Authorization: Bearer {ADMIN}\r\n".encode()
    big = 2 * 1024 * 1024  # over the JSON limit of 1 MiB
    # a declared length over the limit: refused before a byte is read
    declared = _raw(plane.url, b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\n" + auth +
                    f"Content-Type: application/json\r\nContent-Length: {big}\r\n\r\n".encode(),
                    b"")
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    # chunked, no length at all: cut off at the limit, never buffered whole
    chunk = b"x" * 65536

    def chunks() -> Iterator[bytes]:
        for _ in range(big // len(chunk)):
            yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        yield b"0\r\n\r\n"

    chunked = _raw(plane.url, b"POST /v1/keys HTTP/1.1\r\nHost: x\r\n" + auth +
                   b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                   chunks())
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
    assert b"too_large" in chunked
    # the server still serves
    with plane.client("admin") as admin:
        assert admin.get("/v1/sandboxes").status_code == 200
        resp = admin.post("/v1/sandboxes", content=b"{" + b" " * big + b"}",
                          headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["type"] == "too_large"
        # a file body may be as big as a file (not the JSON limit)
        objs = _objects(plane)
        ok = admin.put(f"/v1/sandboxes/{objs.sandbox}/files", params={"path": "/big"},
                       content=b"y" * big)
        assert ok.status_code == 200, ok.text


def test_a_body_lying_about_its_length_is_cut_at_the_limit(plane: Plane) -> None:
    # Content-Length says small, the bytes keep coming: h11 stops at the declared
    # length, so what the app sees is bounded by the (small) lie and parsed as such
    auth = f"Authorization: Bearer {ADMIN}\r\n".encode()
    body = b'{"name": "liar"}' + b"x" * (4 * 1024 * 1024)
    reply = _raw(plane.url, b"POST /v1/keys HTTP/1.1\r\nHost: x\r\n" + auth +
                 b"Content-Type: application/json\r\nContent-Length: 16\r\n\r\n", body)
    assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
    with plane.client("admin") as admin:
        assert admin.get("/v1/sandboxes").status_code == 200


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    app = create_app(db_url=f"sqlite:///{tmp_path}/control.db", api_token=ADMIN,
                     worker_token=SECRET, store_url=f"file://{tmp_path / 'store'}",
                     rate=0.5, burst=3)
    url, srv, thread = _serve(app)
    try:
        admin = {"authorization": f"Bearer {ADMIN}"}
        other = httpx.post(f"{url}/v1/keys", json={"name": "other"}, headers=admin)
        assert other.status_code == 201
        statuses = [httpx.get(f"{url}/v1/sandboxes", headers=admin) for _ in range(4)]
        assert [r.status_code for r in statuses[:2]] == [200, 200]
        limited = statuses[-1]
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limited"
        # per key: another key is not slowed by this one
        mine = {"authorization": f"Bearer {other.json()['key']}"}
        assert httpx.get(f"{url}/v1/sandboxes", headers=mine).status_code == 200
        # a stranger is refused as before, and counts against no one
        assert httpx.get(f"{url}/v1/sandboxes",
                         headers={"authorization": "Bearer nope"}).status_code == 401
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_rate_limiter_memory_is_bounded() -> None:
    from forkyard.wire.auth import RateLimiter

    limiter = RateLimiter(1.0, 1, max_keys=100)
    for i in range(10_000):
        limiter.take(f"k{i}")
    assert len(limiter._buckets) == 100
    assert limiter.take("fresh") == 0
    assert limiter.take("fresh") > 0


# --- the CLI --------------------------------------------------------------------------
def test_cli_keys_create_ls_revoke_and_worker_enrolment(plane: Plane) -> None:
    from typer.testing import CliRunner

    from forkyard.cli._app import app

    runner = CliRunner()
    conn = ["--url", plane.url, "--token", ADMIN]
    made = runner.invoke(app, ["keys", "create", "dave", "--json", *conn])
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)["key"]
    dave = {"authorization": f"Bearer {key}"}
    assert httpx.get(f"{plane.url}/v1/sandboxes", headers=dave).status_code == 200
    listed = runner.invoke(app, ["keys", "ls", "--json", *conn])
    assert listed.exit_code == 0 and key not in listed.output
    assert "dave" in {k["name"] for k in json.loads(listed.output)}
    # a tenant key cannot manage keys
    refused = runner.invoke(app, ["keys", "ls", "--url", plane.url, "--token", key])
    assert refused.exit_code != 0 and "admin" in refused.output
    enrolled = runner.invoke(app, ["keys", "worker", "w9", *conn])
    assert enrolled.exit_code == 0
    assert enrolled.output.strip() == worker_credential(SECRET, "w9")
    revoked = runner.invoke(app, ["keys", "revoke", "dave", *conn])
    assert revoked.exit_code == 0, revoked.output
    assert httpx.get(f"{plane.url}/v1/sandboxes", headers=dave).status_code == 401


def test_adopted_sandboxes_are_only_the_admins(plane: Plane) -> None:
    stray = {"id": "sb-" + "3" * 20, "state": "hibernated", "image": "b" * 64,
             "created": "2026-01-01T00:00:00.000Z", "memory_mb": 256, "cpus": 1,
             "parent_checkpoint": None, "last_checkpoint": "d" * 64}
    with plane.client("worker") as worker:
        reply = worker.post("/internal/workers/register", json=_report(sandboxes=[stray]))
    assert reply.status_code == 200 and reply.json()["destroy"] == []
    with plane.client("admin") as admin, plane.client("alice") as alice:
        assert admin.get(f"/v1/sandboxes/{stray['id']}").json()["state"] == "hibernated"
        assert alice.get(f"/v1/sandboxes/{stray['id']}").status_code == 404


def test_worker_daemons_cap_bodies_too_after_auth(tmp_path: Path) -> None:
    import anyio

    from forkyard.worker import Worker
    from forkyard.worker.daemon import create_app as daemon_app

    token = worker_credential(SECRET, "lim")
    worker = Worker(tmp_path / "home", name="lim")
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    json_headers = {"content-type": "application/json"}

    async def check() -> None:
        transport = httpx.ASGITransport(app=daemon_app(worker, worker_token=token))
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            stranger = await client.post("/sandboxes", content=big, headers=json_headers)
            assert stranger.status_code == 401
            refused = await client.post("/sandboxes", content=big, headers={
                **json_headers, "authorization": f"Bearer {token}"})
            assert refused.status_code == 413
            assert refused.json()["error"]["type"] == "too_large"

    try:
        anyio.run(check)
    finally:
        worker.close()

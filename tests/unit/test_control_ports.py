"""Networks and guest ports through the control plane, against the fake worker.

The worker here is ``tests.fixtures.fake_worker`` (no VM): its tunnel route is
the real worker daemon's (``worker.daemon._port_routes``), but the "guest
port" it connects to is a local test server.  So this tests the proxy layer
(auth, tokens, streaming, limits), not a guest; the real-VM tests are in
tests/integration/test_ports.py.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import resource
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from forkyard.control.server import create_app
from forkyard.sdk import Sandbox
from forkyard.sdk._forward import Forwarder, open_tunnel, tunnel_error
from forkyard.sdk.config import ConnectionConfig
from forkyard.wire.serving import bind
from tests.fixtures.fake_worker import FakeWorker, fake_worker

API = "api-" + "p" * 40
WORKER = "wrk-" + "p" * 40
MAX_TUNNELS = 4
APPS: list[FastAPI] = []  # the control plane of the module's cluster
FORKYARD = str(Path(sys.executable).with_name("forkyard"))


class _Echo(http.server.BaseHTTPRequestHandler):
    """A "guest" web server: answers with what it was sent."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = (f"{self.server.server_address[1]} {self.path}\n"  # type: ignore[index]
                + "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items())).encode()
        self._send(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length", "0"))
        self._send(self.rfile.read(n)[::-1])

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-guest", "yes")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Discard(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(65536):
            pass


class _Sink(socketserver.BaseRequestHandler):
    """A raw TCP "guest" service: echoes what it reads (for port-forward)."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _ws_echo(conn: ServerConnection) -> None:
    """A "guest" WebSocket server: echoes every message, with the path it was opened on."""
    for message in conn:
        conn.send(message if isinstance(message, bytes)
                  else f"{conn.request.path if conn.request else ''} {message}")


def _serve(handler: type) -> tuple[socketserver.ThreadingTCPServer, int]:
    kind = http.server.ThreadingHTTPServer if issubclass(
        handler, http.server.BaseHTTPRequestHandler) else socketserver.ThreadingTCPServer
    srv = kind(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, httpx.Client, FakeWorker, dict[str, int]]]:
    home = tmp_path_factory.mktemp("ports")
    store = f"file://{home / 'store'}"
    app = create_app(db_url=f"sqlite:///{home}/control.db", api_token=API,
                     worker_token=WORKER, store_url=store, heartbeat_timeout=3600,
                     max_tunnels=MAX_TUNNELS)
    APPS.append(app)
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    wsrv = ws_serve(_ws_echo, "127.0.0.1", 0)
    threading.Thread(target=wsrv.serve_forever, daemon=True).start()
    web, web_port = _serve(_Echo)
    web2, web2_port = _serve(_Echo)
    sink, sink_port = _serve(_Sink)
    discard, discard_port = _serve(_Discard)
    try:
        with fake_worker("fakeports", server_url=url, worker_token=WORKER,
                         store_url=store) as w, \
                httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"},
                             timeout=30) as api:
            yield url, api, w, {"web": web_port, "web2": web2_port, "sink": sink_port,
                                "discard": discard_port, "ws": wsrv.socket.getsockname()[1]}
    finally:
        wsrv.shutdown()
        for s in (web, web2, sink, discard):
            s.shutdown()
        srv.should_exit = True
        thread.join(timeout=30)


def _sandbox(api: httpx.Client, worker: FakeWorker, ports: dict[str, int],
             body: dict[str, object] | None = None, web: str = "web") -> str:
    resp = api.post("/v1/sandboxes", json=body or {})
    assert resp.status_code == 201, resp.text
    sid = str(resp.json()["id"])
    worker.guest_ports[(sid, 8000)] = ("127.0.0.1", ports[web])
    worker.guest_ports[(sid, 7000)] = ("127.0.0.1", ports["sink"])
    worker.guest_ports[(sid, 9000)] = ("127.0.0.1", ports["ws"])
    return sid


def test_network_is_stored_passed_on_and_updated(cluster) -> None:  # type: ignore[no-untyped-def]
    _url, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports, {"network": {"mode": "outbound",
                                                    "allow_out": ["10.1.2.0/24"],
                                                    "deny_out": ["Example.COM"]}})
    out = api.get(f"/v1/sandboxes/{sid}").json()
    assert out["network"] == {"mode": "outbound", "allow_out": ["10.1.2.0/24"],
                              "deny_out": ["example.com"]}
    assert worker.networks[sid] is not None and worker.networks[sid].deny_out == ("example.com",)
    # a rule change reaches the worker and is stored; the list left out stays
    resp = api.put(f"/v1/sandboxes/{sid}/network", json={"deny_out": ["1.2.3.4"]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["network"]["allow_out"] == ["10.1.2.0/24"]
    assert worker.networks[sid].deny_out == ("1.2.3.4/32",)  # type: ignore[union-attr]
    # forks keep the source's network, wakes send the stored one
    cp = api.post(f"/v1/sandboxes/{sid}/checkpoint", json={}).json()["id"]
    fork = api.post(f"/v1/checkpoints/{cp}/fork", json={}).json()[0]
    assert fork["network"]["deny_out"] == ["1.2.3.4/32"]
    assert worker.networks[fork["id"]].deny_out == ("1.2.3.4/32",)  # type: ignore[union-attr]
    assert api.post(f"/v1/sandboxes/{sid}/hibernate", json={}).status_code == 200
    worker.networks.pop(sid)
    assert api.post(f"/v1/sandboxes/{sid}/wake", json={}).status_code == 200
    assert worker.networks[sid].allow_out == ("10.1.2.0/24",)  # type: ignore[union-attr]
    # the default is outbound without rules
    plain = _sandbox(api, worker, ports)
    assert api.get(f"/v1/sandboxes/{plain}").json()["network"]["mode"] == "outbound"


@pytest.mark.parametrize("body", [
    {"network": {"mode": "bridged"}},
    {"network": {"allow_out": ["not a rule!"]}},
    {"network": {"deny_out": ["10.0.0.0/99"]}},
    {"network": {"deny_out": ["x"] * 300}},
    {"network": {"mode": "none", "extra": 1}},
])
def test_bad_network_is_422_naming_the_rule(cluster, body) -> None:  # type: ignore[no-untyped-def]
    _, api, worker, _ = cluster
    before = len(worker.create_requests)
    resp = api.post("/v1/sandboxes", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == "invalid"
    if "not a rule" in str(body):
        assert "not a rule!" in resp.text
    assert len(worker.create_requests) == before


def test_rules_for_network_none_are_a_conflict(cluster) -> None:  # type: ignore[no-untyped-def]
    _, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports, {"network": {"mode": "none"}})
    resp = api.put(f"/v1/sandboxes/{sid}/network", json={"allow_out": ["1.1.1.1"]})
    assert resp.status_code == 409 and resp.json()["error"]["type"] == "conflict"
    bad = api.put(f"/v1/sandboxes/{sid}/network", json={"allow_out": ["bad rule"]})
    assert bad.status_code == 422


def test_preview_url_needs_its_token_or_the_key(cluster) -> None:  # type: ignore[no-untyped-def]
    url, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    prev = api.post(f"/v1/sandboxes/{sid}/previews/8000")
    assert prev.status_code == 201, prev.text
    data = prev.json()
    token = data["token"]
    assert data["url"].endswith(f"/v1/sandboxes/{sid}/ports/8000/?forkyard_token={token}")
    with httpx.Client(base_url=url, timeout=30) as anon:
        ok = anon.get(f"/v1/sandboxes/{sid}/ports/8000/hello?a=1&forkyard_token={token}",
                      headers={"authorization": "Basic guest-own"})
        assert ok.status_code == 200, ok.text
        assert ok.text.startswith(f"{ports['web']} /hello?a=1\n")
        assert ok.headers["x-guest"] == "yes"
        assert token not in ok.text  # the token never reaches the guest ...
        assert "authorization: Basic guest-own" in ok.text  # ... the guest's own auth does
        cookie = ok.headers["set-cookie"]
        assert f"Path=/v1/sandboxes/{sid}/ports/8000/" in cookie and "HttpOnly" in cookie
        # the page's next requests carry it as the cookie
        again = anon.get(f"/v1/sandboxes/{sid}/ports/8000/next",
                         headers={"cookie": f"forkyard_token={token}"})
        assert again.status_code == 200 and token not in again.text
        anon.cookies.clear()  # httpx kept the one the proxy set
        for bad in ({"forkyard_token": token[:-2] + "xx"}, {}):
            resp = anon.get(f"/v1/sandboxes/{sid}/ports/8000/", params=bad)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["type"] == "unauthorized"
        # a token opens only its own port, and only its own sandbox
        other = _sandbox(api, worker, ports)
        assert anon.get(f"/v1/sandboxes/{other}/ports/8000/",
                        params={"forkyard_token": token}).status_code == 401
        assert anon.get(f"/v1/sandboxes/{sid}/ports/7000/",
                        params={"forkyard_token": token}).status_code == 401
        assert anon.get(f"/v1/sandboxes/{sid}/ports/8000/",
                        headers={"authorization": "Bearer nope"}).status_code == 401
    # the API key opens it too, and is not passed to the guest
    keyed = api.post(f"/v1/sandboxes/{sid}/ports/8000/echo", content=b"abc")
    assert keyed.status_code == 200 and keyed.content == b"cba"
    assert API not in api.get(f"/v1/sandboxes/{sid}/ports/8000/").text
    # public ports need the operator's consent
    pub = api.post(f"/v1/sandboxes/{sid}/previews/8000", json={"public": True})
    assert pub.status_code == 403 and pub.json()["error"]["type"] == "forbidden"


def test_guest_errors_are_typed(cluster) -> None:  # type: ignore[no-untyped-def]
    _, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    resp = api.get(f"/v1/sandboxes/{sid}/ports/9999/")  # nothing listens there
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["type"] == "conflict"
    assert api.get(f"/v1/sandboxes/{sid}/ports/70000/").status_code == 422
    assert api.get(f"/v1/sandboxes/sb-{'0' * 20}/ports/8000/").status_code == 404
    # a port speaking no HTTP is a 502, not a hang
    raw = api.get(f"/v1/sandboxes/{sid}/ports/7000/", timeout=30)
    assert raw.status_code == 502, raw.text


def test_two_sandboxes_each_answer_on_their_own_url(cluster) -> None:  # type: ignore[no-untyped-def]
    url, api, worker, ports = cluster
    a = Sandbox.connect(_sandbox(api, worker, ports), url=url, token=API)
    b = Sandbox.connect(_sandbox(api, worker, ports, web="web2"), url=url, token=API)
    ua, ub = a.get_url(8000), b.get_url(8000)
    assert ua != ub
    assert httpx.get(ua).text.startswith(f"{ports['web']} ")
    assert httpx.get(ub).text.startswith(f"{ports['web2']} ")
    # the SDK's network sub-API
    assert a.network.mode == "outbound"
    assert a.network.update(allow_out=["192.168.5.0/24"]).allow_out == ("192.168.5.0/24",)


def test_port_forward_tunnels_raw_tcp(cluster) -> None:  # type: ignore[no-untyped-def]
    url, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    fwd = Forwarder(ConnectionConfig(url=url, token=API), sid, 7000).start()
    try:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=30) as c:
            payload = bytes(range(256)) * 1024  # 256 KiB, several tunnel messages
            threading.Thread(target=c.sendall, args=(payload,), daemon=True).start()
            got = b""
            while len(got) < len(payload):
                chunk = c.recv(65536)
                assert chunk, "tunnel closed early"
                got += chunk
            assert got == payload
    finally:
        fwd.close()
    # without the key: refused with the typed code
    with pytest.raises(ConnectionClosed) as info, \
            open_tunnel(ConnectionConfig(url=url, token="wrong"), sid, 7000) as ws:
        ws.recv(timeout=30)
    err = tunnel_error(info.value)
    assert err is not None and err.status == 401


def _wait_tunnels_free(config: ConnectionConfig, sid: str) -> None:
    """Closed tunnels leave the server's count as their close arrives: wait for that."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with open_tunnel(config, sid, 7000) as ws:
                ws.send(b"x")
                if ws.recv(timeout=30) == b"x":
                    return
        except ConnectionClosed:
            assert time.monotonic() < deadline, "tunnels were not released"
            time.sleep(0.1)


def test_many_tunnels_get_a_typed_refusal_and_memory_stays_bounded(cluster  # type: ignore[no-untyped-def]
                                                                    ) -> None:
    url, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    config = ConnectionConfig(url=url, token=API)
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(open_tunnel(config, sid, 7000)) for _ in range(MAX_TUNNELS)]
        for ws in held:  # each is open (an echo comes back)
            ws.send(b"x")
            assert ws.recv(timeout=30) == b"x"
        with pytest.raises(ConnectionClosed) as info, open_tunnel(config, sid, 7000) as extra:
            extra.recv(timeout=30)
        err = tunnel_error(info.value)
        assert err is not None and (err.status, err.type) == (503, "unavailable")
    _wait_tunnels_free(config, sid)
    # a sender that never stops: 64 MiB through port-forward's tunnel, read back as it
    # comes; this process (it runs the control plane) does not grow by what passed
    forwarded: list[Exception] = []
    fwd = Forwarder(config, sid, 7000, on_error=forwarded.append).start()
    try:
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=60) as c:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            block = b"\0" * 65536
            total = 1024 * len(block)
            received = 0

            def drain() -> None:
                nonlocal received
                while received < total and (chunk := c.recv(1 << 20)):
                    received += len(chunk)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            for _ in range(1024):
                c.sendall(block)
            reader.join(timeout=120)
            assert received == total
            grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            assert grown_kb < 48 * 1024, f"RSS grew {grown_kb} KiB relaying 64 MiB"
    finally:
        fwd.close()
    assert not forwarded
    # port-forward's own refusal is typed too
    refused: list[Exception] = []
    bad = Forwarder(ConnectionConfig(url=url, token="wrong"), sid, 7000,
                    on_error=refused.append).start()
    try:
        with socket.create_connection(("127.0.0.1", bad.port), timeout=30) as c:
            assert c.recv(10) == b""  # closed
    finally:
        bad.close()
    assert refused and getattr(refused[0], "status", None) == 401


def test_websocket_through_the_proxy(cluster) -> None:  # type: ignore[no-untyped-def]
    url, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    sb = Sandbox.connect(sid, url=url, token=API)
    preview = sb.get_url(9000)
    ws_url = "ws" + preview.removeprefix("http").replace("/ports/9000/?", "/ports/9000/chat?q=1&")
    with ws_connect(ws_url, proxy=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=30) == "/chat?q=1 hello"  # the token is not in the guest's path
        ws.send(b"\x00\xffbin")
        assert ws.recv(timeout=30) == b"\x00\xffbin"
        big = "x" * (300 * 1024)  # several tunnel messages, one WebSocket message
        ws.send(big)
        assert ws.recv(timeout=30) == f"/chat?q=1 {big}"
    # a wrong token: refused with 4401 before any guest connection
    bad = ws_url.replace("forkyard_token=", "forkyard_token=x")
    with ws_connect(bad, proxy=None) as ws, pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4401
    # a port that is no WebSocket server: typed 502 close
    plain = ws_url.replace("/ports/9000/", "/ports/8000/")
    plain = plain.split("forkyard_token=")[0] + "forkyard_token=" + sb.get_url(
        8000).split("forkyard_token=")[1]
    with ws_connect(plain, proxy=None) as ws, pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 4502


def test_request_body_over_the_limit_is_413(cluster) -> None:  # type: ignore[no-untyped-def]
    _, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    worker.guest_ports[(sid, 6000)] = ("127.0.0.1", ports["discard"])
    from forkyard.control import _proxy

    # the limit is the proxy's own (64 MiB): a streamed body past it is cut off with 413,
    # to a guest that reads all it is sent and never answers
    def body() -> Iterator[bytes]:
        chunk = b"y" * (1 << 20)
        for _ in range(_proxy.MAX_BODY // len(chunk) + 2):
            yield chunk

    resp = api.post(f"/v1/sandboxes/{sid}/ports/6000/upload", content=body(), timeout=120)
    assert resp.status_code == 413, resp.text[:200]
    assert resp.json()["error"]["type"] == "too_large"


def test_public_ports_only_where_the_operator_allows(cluster) -> None:  # type: ignore[no-untyped-def]
    url, api, worker, ports = cluster
    sid = _sandbox(api, worker, ports)
    plane = APPS[-1].state.plane
    with httpx.Client(base_url=url, timeout=30) as anon:
        assert anon.get(f"/v1/sandboxes/{sid}/ports/8000/").status_code == 401
        plane.public_ports_enabled = True
        try:
            pub = api.post(f"/v1/sandboxes/{sid}/previews/8000", json={"public": True})
            assert pub.status_code == 201 and pub.json()["token"] is None
            assert anon.get(f"/v1/sandboxes/{sid}/ports/8000/").status_code == 200
            assert anon.get(f"/v1/sandboxes/{sid}/ports/7000/").status_code == 401  # not public
        finally:
            plane.public_ports_enabled = False
        # the operator withdrew consent: the port is closed again
        assert anon.get(f"/v1/sandboxes/{sid}/ports/8000/").status_code == 401


def _cli(url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FORKYARD_URL": url, "FORKYARD_API_TOKEN": API}
    proc = subprocess.run([FORKYARD, *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_network_url_and_port_forward(cluster) -> None:  # type: ignore[no-untyped-def]
    url, _, worker, ports = cluster
    sid = _cli(url, "create", "--network", "outbound", "--deny-out", "10.0.0.0/8",
               "--deny-out", "example.com", "--allow-out", "10.9.0.0/16").stdout.strip()
    worker.guest_ports[(sid, 8000)] = ("127.0.0.1", ports["web"])
    worker.guest_ports[(sid, 7000)] = ("127.0.0.1", ports["sink"])
    assert worker.networks[sid].deny_out == ("10.0.0.0/8", "example.com")  # type: ignore[union-attr]
    shown = _cli(url, "network", sid, "--allow-out", "192.168.1.0/24").stdout
    assert "allow_out: 192.168.1.0/24" in shown and "deny_out: 10.0.0.0/8 example.com" in shown
    bad = _cli(url, "network", sid, "--allow-out", "no such rule", check=False)
    assert bad.returncode != 0 and "no such rule" in bad.stderr and "Traceback" not in bad.stderr
    preview = _cli(url, "url", sid, "8000").stdout.strip()
    assert preview.startswith(f"{url}/v1/sandboxes/{sid}/ports/8000/?forkyard_token=fyp_")
    assert httpx.get(preview).text.startswith(f"{ports['web']} /")
    assert httpx.get(preview.split("?")[0]).status_code == 401
    public = _cli(url, "url", sid, "8000", "--public", check=False)
    assert public.returncode != 0 and "public ports are not enabled" in public.stderr
    with socket.socket() as probe:  # a free local port for the forward
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
    env = {**os.environ, "FORKYARD_URL": url, "FORKYARD_API_TOKEN": API}
    fwd = subprocess.Popen([FORKYARD, "port-forward", sid, f"{local}:7000"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fwd.stdout is not None
        assert f"127.0.0.1:{local} -> {sid}:7000" in fwd.stdout.readline()
        with socket.create_connection(("127.0.0.1", local), timeout=30) as c:
            c.sendall(b"ping through the tunnel")
            assert c.recv(100) == b"ping through the tunnel"
    finally:
        fwd.send_signal(signal.SIGINT)
        fwd.wait(timeout=30)
    assert _cli(url, "port-forward", sid, "x:y", check=False).returncode == 2

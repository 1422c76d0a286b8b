"""Port-proxy latency: a request through the control plane's proxy vs the same request direct.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ports.py [--runs 300]

No guest yet (the worker's guest network is separate work): the "guest port"
is a local HTTP server, reached by the real chain -- control plane
(``PortProxy``, preview-token auth, h11) -> a WebSocket tunnel -> the real
worker tunnel route (``worker.daemon._port_routes``) -> TCP.  The worker here
is an app with only that route, registered like a worker, and the sandbox a
database row pointing at it.  Rows: p50/p99 ms of a small GET direct, through
the proxy with a preview token, and with the API key; the ratio to direct.
"""

from __future__ import annotations

import argparse
import http.server
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.table import Table

from forkyard.control._db import SandboxRow, utcnow
from forkyard.control.server import create_app
from forkyard.wire.auth import BearerAuth, worker_credential
from forkyard.wire.serving import bind
from forkyard.worker.daemon._port_routes import add_port_routes

API = "api-" + "b" * 40
SECRET = "wrk-" + "b" * 40
SID = "sb-" + "b" * 20


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # head and body are separate writes: without this, Nagle + delayed ACK add 40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _LocalPort:
    def __init__(self, port: int) -> None:
        self.port = port

    def connect_port(self, port: int, *, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


def _run(app: FastAPI) -> tuple[uvicorn.Server, str]:
    sock, url = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not srv.started:
        time.sleep(0.02)
    return srv, url


def _times(fn: Callable[[], object], runs: int) -> list[float]:
    for _ in range(5):
        fn()  # warm up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    web.daemon_threads = True
    threading.Thread(target=web.serve_forever, daemon=True).start()
    direct_url = f"http://127.0.0.1:{web.server_address[1]}/"
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        store = f"file://{home / 'store'}"
        plane_app = create_app(db_url=f"sqlite:///{home}/control.db", api_token=API,
                               worker_token=SECRET, store_url=store, heartbeat_timeout=3600,
                               rate=None)
        cp_srv, cp_url = _run(plane_app)
        worker_app = FastAPI()
        add_port_routes(worker_app, lambda _sid: _LocalPort(web.server_address[1]))
        cred = worker_credential(SECRET, "bench")
        worker_app.add_middleware(BearerAuth, token_for=lambda _path: cred)
        w_srv, w_url = _run(worker_app)
        httpx.post(f"{cp_url}/internal/workers/register", headers={
            "authorization": f"Bearer {cred}"}, json={
            "name": "bench", "url": w_url, "store_url": store, "running": 1,
            "free_memory_mb": 1 << 20, "max_sandboxes": 64}).raise_for_status()
        plane = plane_app.state.plane
        with plane.db.tx() as s:  # a "running sandbox" on that worker (no VM)
            now = utcnow()
            s.add(SandboxRow(id=SID, state="running", worker="bench", image_ref="minimal",
                             created=now, updated=now, labels={}, tenant="admin",
                             network={"mode": "outbound", "allow_out": [], "deny_out": []}))
        with httpx.Client(timeout=30) as client:
            keyed = {"authorization": f"Bearer {API}"}
            preview = client.post(f"{cp_url}/v1/sandboxes/{SID}/previews/8000",
                                  headers=keyed).json()["url"]
            rows = {
                "direct GET (local server)": _times(lambda: client.get(direct_url), args.runs),
                "proxy GET, preview token": _times(lambda: client.get(preview), args.runs),
                "proxy GET, API key": _times(lambda: client.get(
                    f"{cp_url}/v1/sandboxes/{SID}/ports/8000/", headers=keyed), args.runs),
            }
            assert client.get(preview).text == "hello\n"
        cp_srv.should_exit = w_srv.should_exit = True
    web.shutdown()
    base = statistics.median(rows["direct GET (local server)"])
    table = Table(title=f"port proxy latency ({args.runs} requests each, one run)")
    for col in ("path", "p50 ms", "p99 ms", "p50 / direct"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, times in rows.items():
        times.sort()
        p50 = statistics.median(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        table.add_row(name, f"{p50 * 1e3:.2f}", f"{p99 * 1e3:.2f}", f"{p50 / base:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()

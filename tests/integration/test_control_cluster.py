"""A real cluster through the HTTP API: control plane + 2 worker daemons with their own bases.

The control plane runs in this process (uvicorn in a thread, on PostgreSQL when
the server binaries are installed, else SQLite); the two worker daemons are
real subprocesses started through ``forkyard.worker.daemon.serve`` with
``stock_base=True``, so each built its own ``minimal`` image with a different
digest, and they share only a ``file://`` store.  The tests share the cluster
and run in file order.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from forkyard.config import Home
from forkyard.control.server import create_app
from forkyard.errors import GuestError
from forkyard.guest.client import ExecResult
from forkyard.image import ImageCatalog
from forkyard.verify import verify_files
from forkyard.wire.auth import worker_credential
from forkyard.wire.output import decode_output
from forkyard.wire.serving import bind
from tests.conftest import qemu_pids
from tests.fixtures.postgres import find_bindir, running_postgres

pytestmark = pytest.mark.vm

API = secrets.token_urlsafe(32)
WORKER = secrets.token_urlsafe(32)
START_TIMEOUT = 300  # a cold host cache downloads a kernel


@dataclass
class Daemon:
    name: str
    home: Path
    log: Path
    proc: subprocess.Popen[bytes]
    url: str = ""


@dataclass
class Cluster:
    root: Path
    url: str
    store_url: str
    db: str
    api: httpx.Client
    daemons: dict[str, Daemon] = field(default_factory=dict)

    # --- small API helpers --------------------------------------------------
    def ok(self, resp: httpx.Response, status: int = 200) -> Any:
        assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: " \
                                           f"{resp.status_code} {resp.text}\n{self.logs()}"
        return resp.json() if resp.content else None

    def error(self, resp: httpx.Response, status: int, type_: str) -> dict[str, Any]:
        assert resp.status_code == status, f"{resp.status_code} {resp.text}"
        err: dict[str, Any] = resp.json()["error"]
        assert err["type"] == type_, err
        return err

    def create(self, **body: Any) -> dict[str, Any]:
        sb: dict[str, Any] = self.ok(self.api.post("/v1/sandboxes", json=body), 201)
        return sb

    def run(self, sid: str, cmd: str | list[str], **body: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.ok(self.api.post(f"/v1/sandboxes/{sid}/exec",
                                                   json={"cmd": cmd, **body}))
        return out

    def sandbox(self, sid: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ok(self.api.get(f"/v1/sandboxes/{sid}"))
        return out

    def checkpoint(self, sid: str, **body: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.ok(self.api.post(f"/v1/sandboxes/{sid}/checkpoint",
                                                   json=body), 201)
        return out

    def wait_checkpoint(self, cp: str, state: str = "published",
                        timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.ok(self.api.get(f"/v1/checkpoints/{cp}"))
            if info["state"] != "publishing":
                assert info["state"] == state, info
                return info
            assert time.monotonic() < deadline, f"checkpoint {cp} still publishing"
            time.sleep(0.1)

    def wait_sandbox(self, sid: str, state: str, timeout: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.sandbox(sid)
            if info["state"] == state:
                return info
            assert time.monotonic() < deadline, f"{sid} is {info['state']}, not {state}"
            time.sleep(0.1)

    def fork(self, cp: str, **body: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.ok(self.api.post(f"/v1/checkpoints/{cp}/fork",
                                                         json=body), 201)
        return out

    def destroy(self, sid: str) -> None:
        self.ok(self.api.delete(f"/v1/sandboxes/{sid}"), 204)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in self.ok(self.api.get("/v1/workers"))}

    def checksums(self, worker: str, digest: str) -> dict[str, str]:
        return ImageCatalog(Home.at(self.daemons[worker].home)).file_checksums(digest)

    def logs(self, lines: int = 25) -> str:
        out = []
        for d in self.daemons.values():
            text = d.log.read_text(errors="replace").splitlines() if d.log.exists() else []
            out.append(f"--- {d.name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


class RemoteSandbox:
    """What forkyard.verify needs (``exec``), over the HTTP API."""

    def __init__(self, cluster: Cluster, sid: str) -> None:
        self.cluster = cluster
        self.sid = sid

    def exec(self, cmd: str, *, timeout: float | None = 60.0,
             stdin: bytes | None = None) -> ExecResult:
        body: dict[str, Any] = {"cmd": cmd, "timeout": timeout}
        if stdin is not None:
            body["stdin_b64"] = base64.b64encode(stdin).decode()
        resp = self.cluster.api.post(f"/v1/sandboxes/{self.sid}/exec", json=body,
                                     timeout=(timeout or 600) + 60)
        if resp.status_code == 422 and resp.json()["error"]["type"] == "guest_error":
            raise GuestError("exec", resp.json()["error"]["message"])
        d = self.cluster.ok(resp)
        return ExecResult(d["exit_code"], decode_output(d["stdout"], d["stdout_encoding"]),
                          decode_output(d["stderr"], d["stderr_encoding"]), pid=d["pid"],
                          signal=d["signal"], timed_out=d["timed_out"], truncated=d["truncated"])


def start_daemon(root: Path, name: str, server_url: str, store_url: str,
                 **options: Any) -> Daemon:
    home, ready, log = root / name, root / f"{name}.ready", root / f"{name}.log"
    kwargs = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (
        "from pathlib import Path\n"
        "from forkyard.worker.daemon import serve\n"
        f"serve(Path({str(home)!r}), name={name!r}, server_url={server_url!r}, "
        f"worker_token={worker_credential(WORKER, name)!r}, store_url={store_url!r}, "
        f"ready_file=Path({str(ready)!r}), {kwargs})\n"
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Daemon(name, home, log, proc)


def wait_ready(d: Daemon, timeout: float = START_TIMEOUT) -> None:
    import json

    ready = d.log.with_suffix(".ready")
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon {d.name} exited {d.proc.returncode}:\n"
                                 f"{d.log.read_text(errors='replace')[-3000:]}")
        assert time.monotonic() < deadline, f"daemon {d.name} did not register"
        time.sleep(0.05)
    d.url = json.loads(ready.read_text())["url"]


def stop_daemon(d: Daemon, timeout: float = 60) -> int:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        return d.proc.wait(10)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """PostgreSQL when its binaries are here (the API tests cover both); else SQLite."""
    if find_bindir() is None:
        yield f"sqlite:///{tmp_path_factory.mktemp('cpdb')}/control.db"
        return
    with running_postgres() as pg:
        yield pg.create_database()


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, database: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    store_url = f"file://{root / 'store'}"
    app = create_app(db_url=database, api_token=API, worker_token=WORKER, store_url=store_url,
                     heartbeat_timeout=10.0)
    sock, url = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    failed_before = request.session.testsfailed
    api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"}, timeout=300)
    c = Cluster(root, url, store_url, database.split(":")[0], api)
    try:
        for name in ("w1", "w2"):
            c.daemons[name] = start_daemon(root, name, url, store_url, stock_base=True)
        for d in c.daemons.values():
            wait_ready(d)
        yield c
    finally:
        codes = {d.name: stop_daemon(d) for d in c.daemons.values()}
        if request.session.testsfailed > failed_before:
            print(c.logs(200))
        server.should_exit = True
        thread.join(timeout=30)
        api.close()
        deadline = time.monotonic() + 10
        while qemu_pids(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not qemu_pids(root), "QEMU processes left behind"
        # SIGTERM: a clean shutdown (uvicorn re-raises the signal once it is done)
        assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes


# ---------------------------------------------------------------------------
def test_workers_registered_with_their_own_bases(cluster: Cluster) -> None:
    workers = cluster.workers()
    assert set(workers) == {"w1", "w2"}
    assert all(w["state"] == "alive" for w in workers.values())
    b1, b2 = set(workers["w1"]["cached_bases"]), set(workers["w2"]["cached_bases"])
    assert len(b1) == len(b2) == 1 and b1 != b2, "stock bases must differ per worker"
    assert workers["w1"]["url"] == cluster.daemons["w1"].url


def test_worker_daemon_requires_the_worker_token_on_every_route(
        cluster: Cluster, tmp_path: Path) -> None:
    from fastapi.routing import APIRoute

    from forkyard.worker import Worker
    from forkyard.worker.daemon import create_app as daemon_app

    # the routes of the daemon app (same code the subprocesses run), asked of w1
    app = daemon_app(Worker(tmp_path / "home", name="routes"), worker_token=WORKER)
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute)
              for m in sorted(r.methods) if m != "HEAD"]
    assert len(routes) >= 15
    url = cluster.daemons["w1"].url
    for method, path in routes:
        path = (path.replace("{sandbox_id}", "sb-" + "0" * 20)
                .replace("{checkpoint_id}", "0" * 64))
        # the cluster secret and another worker's credential are no key to w1
        for headers in ({}, {"authorization": "Bearer wrong"},
                        {"authorization": f"Bearer {API}"}, {"authorization": f"Bearer {WORKER}"},
                        {"authorization": f"Bearer {worker_credential(WORKER, 'w2')}"}):
            resp = httpx.request(method, url + path, headers=headers, json={},
                                 params={"path": "/x"})
            if path == "/health":
                assert resp.json() == {"status": "ok", "name": "w1"}
                continue
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json()["error"]["type"] == "unauthorized"
    resp = httpx.get(f"{url}/sandboxes/sb-{'0' * 20}",
                     headers={"authorization": f"Bearer {worker_credential(WORKER, 'w1')}"})
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found"


def test_sandbox_exec_files_and_destroy(cluster: Cluster,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster
    sb = c.create(worker="w1", memory_mb=256)
    sid = sb["id"]
    assert (sb["state"], sb["worker"], sb["memory_mb"]) == ("running", "w1", 256)
    assert sb["image"] in c.workers()["w1"]["cached_bases"]
    assert sid in {s["id"] for s in c.ok(c.api.get("/v1/sandboxes"))}
    try:
        r = c.run(sid, "echo out; echo err >&2; exit 3")
        assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "out\n", "err\n")
        assert r["stdout_encoding"] == "utf-8" and "stdout_b64" not in r  # sent once
        r = c.run(sid, ["sh", "-c", 'printf "%s|" "$@"', "x", "a b", "c"])
        assert r["stdout"] == "a b|c|"
        r = c.run(sid, "echo $FOO; pwd; cat", env={"FOO": "bar"}, cwd="/srv",
                  stdin_b64=base64.b64encode(b"in\x00put").decode())
        assert decode_output(r["stdout"], r["stdout_encoding"]) == b"bar\n/srv\nin\x00put"
        # guest errors and timeouts keep their documented shape through the relay
        err = c.error(c.api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["/no/such"]}),
                      404, "not_found")
        assert err["detail"] == {"kind": "not_found", "errno": 2}
        err = c.error(c.api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/root"}),
                      422, "guest_error")
        assert err["detail"]["errno"] > 0
        err = c.error(c.api.post(f"/v1/sandboxes/{sid}/exec",
                                 json={"cmd": "echo started; sleep 30", "timeout": 1}),
                      504, "timeout")
        assert err["detail"]["stdout"] == "started\n"
        bg = c.run(sid, ["sleep", "300"], background=True)
        assert bg["pid"] > 1 and c.run(sid, f"kill -0 {bg['pid']}")["exit_code"] == 0

        # files: binary round trip, append, mode, list, stat, remove
        data = os.urandom(3 * 1024 * 1024 + 7)
        put = c.ok(c.api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/d/blob"},
                             content=data))
        assert put == {"path": "/root/d/blob", "size": len(data)}
        got = c.api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/root/d/blob"})
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "application/octet-stream"
        c.ok(c.api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/d/t", "mode": 0o600},
                       content=b"hello"))
        c.ok(c.api.put(f"/v1/sandboxes/{sid}/files",
                       params={"path": "/root/d/t", "append": True}, content=b" world"))
        assert c.api.get(f"/v1/sandboxes/{sid}/files",
                         params={"path": "/root/d/t"}).content == b"hello world"
        st = c.ok(c.api.get(f"/v1/sandboxes/{sid}/files/stat", params={"path": "/root/d/t"}))
        assert (st["size"], st["mode"] & 0o777, st["is_dir"]) == (11, 0o600, False)
        names = [(e["name"], e["is_dir"]) for e in
                 c.ok(c.api.get(f"/v1/sandboxes/{sid}/files/list", params={"path": "/root/d"}))]
        assert names == [("blob", False), ("t", False)]
        c.ok(c.api.delete(f"/v1/sandboxes/{sid}/files",
                          params={"path": "/root/d", "recursive": True}), 204)
        c.error(c.api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/root/d/t"}),
                404, "not_found")

        # over the operator's file limit (64 MiB here; the control plane runs in this
        # process and reads it per request), streamed without a length: refused while
        # streaming, and nothing is left in the guest
        monkeypatch.setenv("FORKYARD_MAX_FILE_BYTES", str(64 << 20))

        def big() -> Iterator[bytes]:
            chunk = b"\0" * (1 << 20)
            for _ in range(65):
                yield chunk

        resp = c.api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/big"},
                         content=big())
        c.error(resp, 413, "too_large")
        assert c.run(sid, "test -e /root/big || echo absent")["stdout"] == "absent\n"
    finally:
        c.destroy(sid)
    assert c.sandbox(sid)["state"] == "destroyed"
    assert sid not in {s["id"] for s in c.ok(c.api.get("/v1/sandboxes"))}
    err = c.error(c.api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"}), 409,
                  "conflict")
    assert "destroyed" in err["message"]
    c.ok(c.api.delete(f"/v1/sandboxes/{sid}"), 204)  # idempotent


@pytest.mark.slow
def test_fork_no_corruption_across_workers(cluster: Cluster) -> None:
    """10 rounds of (marker, log line, checkpoint); fork each on alternating workers;
    each fork must see exactly its round and read every base file correctly."""
    c = cluster
    rounds = 10
    src = c.create(worker="w1")["id"]
    base = c.sandbox(src)["image"]
    expected = c.checksums("w1", base)
    assert len(expected) >= 1000
    markers: list[str] = []
    cps: list[str] = []
    for i in range(rounds):
        marker = secrets.token_hex(16)
        markers.append(marker)
        c.ok(c.api.put(f"/v1/sandboxes/{src}/files", params={"path": "/root/marker"},
                       content=marker.encode()))
        c.run(src, f"echo 'round {i}' >> /root/log.txt")
        cps.append(c.checkpoint(src, name=f"round-{i}")["id"])
    for cp in cps:
        info = c.wait_checkpoint(cp)
        assert info["base"] == base and info["stored_bytes"] > 0
    c.destroy(src)

    def check(i: int, cp: str) -> str | None:
        """What is wrong with a fork of round ``i`` (None: nothing)."""
        target = ("w1", "w2")[i % 2]
        [fork] = c.fork(cp, worker=target)
        assert (fork["worker"], fork["parent_checkpoint"], fork["image"]) == (target, cp, base)
        try:
            report = verify_files(RemoteSandbox(c, fork["id"]), expected)  # drops caches first
            marker = c.api.get(f"/v1/sandboxes/{fork['id']}/files",
                               params={"path": "/root/marker"}).content.decode()
            log = c.run(fork["id"], "cat /root/log.txt")["stdout"]
        finally:
            c.destroy(fork["id"])
        problems = []
        if not report.ok:
            problems.append(report.summary())
        if marker != markers[i]:
            problems.append(f"marker {marker!r} != {markers[i]!r}")
        if log != "".join(f"round {j}\n" for j in range(i + 1)):
            problems.append(f"log {log!r}")
        return f"round {i} on {target}: " + "; ".join(problems) if problems else None

    # two at a time: one fork on each worker, each hashing its files in its own VM
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(check, range(rounds), cps))
    corrupt = [r for r in results if r is not None]
    assert corrupt == [], f"{len(corrupt)} corrupt of {rounds}: {corrupt}"


def test_fork_placement_and_unpublished_checkpoints(cluster: Cluster) -> None:
    c = cluster
    src = c.create(worker="w2")["id"]
    made: list[str] = [src]
    try:
        c.ok(c.api.put(f"/v1/sandboxes/{src}/files", params={"path": "/root/who"},
                       content=b"src"))
        local = c.checkpoint(src, publish=False)
        assert local["state"] == "local" and local["worker"] == "w2"
        # by prefix; stays local
        assert c.ok(c.api.get(f"/v1/checkpoints/{local['id'][:8]}"))["id"] == local["id"]
        err = c.error(c.api.post(f"/v1/checkpoints/{local['id']}/fork",
                                 json={"worker": "w1"}), 409, "conflict")
        assert "not published" in err["message"]
        [f] = c.fork(local["id"])  # placed on its own worker
        made.append(f["id"])
        assert f["worker"] == "w2"
        assert c.api.get(f"/v1/sandboxes/{f['id']}/files",
                         params={"path": "/root/who"}).content == b"src"

        published = c.checkpoint(src, name="spread")
        c.wait_checkpoint(published["id"])
        # the origin has it locally: preferred for every fork
        forks = c.fork(published["id"], count=3)
        made += [f["id"] for f in forks]
        assert [f["worker"] for f in forks] == ["w2", "w2", "w2"]
        assert len({f["id"] for f in forks}) == 3
        forks = c.fork(published["id"], count=2, worker="w1")
        made += [f["id"] for f in forks]
        assert [f["worker"] for f in forks] == ["w1", "w1"]
        for f in forks:
            assert c.run(f["id"], "cat /root/who")["stdout"] == "src"
        listed = {cp["id"]: cp for cp in c.ok(c.api.get("/v1/checkpoints"))}
        assert listed[local["id"]]["state"] == "local"
        assert listed[published["id"]]["state"] == "published"
        c.ok(c.api.delete(f"/v1/checkpoints/{local['id']}"), 204)
        c.error(c.api.get(f"/v1/checkpoints/{local['id']}"), 404, "not_found")
    finally:
        for sid in made:
            c.destroy(sid)


def test_hibernate_on_one_worker_and_wake_on_another(cluster: Cluster) -> None:
    c = cluster
    sid = c.create(worker="w1")["id"]
    try:
        pid = int(c.run(sid, "sleep 1000 > /dev/null 2>&1 & echo $!")["stdout"])
        c.ok(c.api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/state"},
                       content=b"kept"))
        hib = c.ok(c.api.post(f"/v1/sandboxes/{sid}/hibernate", json={"wait": True}))
        assert hib["state"] == "hibernated" and hib["last_checkpoint"]
        cp = c.ok(c.api.get(f"/v1/checkpoints/{hib['last_checkpoint']}"))
        assert (cp["state"], cp["sandbox"], cp["worker"]) == ("published", sid, "w1")
        err = c.error(c.api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"}), 409,
                      "conflict")
        assert "wake it first" in err["message"]

        woken = c.ok(c.api.post(f"/v1/sandboxes/{sid}/wake", json={"worker": "w2"}))
        assert (woken["id"], woken["state"], woken["worker"]) == (sid, "running", "w2")
        assert c.run(sid, f"kill -0 {pid}")["exit_code"] == 0
        assert c.run(sid, f"cat /proc/{pid}/cmdline")["stdout"].startswith("sleep")
        assert c.api.get(f"/v1/sandboxes/{sid}/files",
                         params={"path": "/root/state"}).content == b"kept"
        # w1's hibernated copy is garbage now: its next heartbeat is told to drop it
        w1 = httpx.Client(base_url=c.daemons["w1"].url,
                          headers={"authorization":
                                   f"Bearer {worker_credential(WORKER, 'w1')}"})
        deadline = time.monotonic() + 15
        while sid in {s["id"] for s in w1.get("/sandboxes").json()}:
            assert time.monotonic() < deadline, "w1 kept its stale hibernated copy"
            time.sleep(0.2)
    finally:
        c.destroy(sid)


def test_wake_while_hibernate_publishes_is_refused_and_nothing_corrupts(
        cluster: Cluster) -> None:
    c = cluster
    sid = c.create(worker="w2")["id"]
    try:
        # the checkpoint + publish of RAM takes a second or more: the wake below
        # arrives while it is in flight
        want = c.run(sid, "head -c 4000000 /dev/urandom > /root/noise; "
                          "sha256sum /root/noise")["stdout"]
        c.ok(c.api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/state"},
                       content=b"before hibernate"))
        hib = c.ok(c.api.post(f"/v1/sandboxes/{sid}/hibernate", json={"wait": False}))
        assert hib["state"] == "hibernating"
        err = c.error(c.api.post(f"/v1/sandboxes/{sid}/wake", json={}), 409, "conflict")
        assert "hibernating" in err["message"]
        c.error(c.api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"}), 409, "conflict")
        c.error(c.api.delete(f"/v1/sandboxes/{sid}"), 409, "conflict")
        c.wait_sandbox(sid, "hibernated")
        woken = c.ok(c.api.post(f"/v1/sandboxes/{sid}/wake", json={}))
        assert (woken["state"], woken["worker"]) == ("running", "w2")  # its old worker
        assert c.run(sid, "sha256sum /root/noise")["stdout"] == want
        assert c.api.get(f"/v1/sandboxes/{sid}/files",
                         params={"path": "/root/state"}).content == b"before hibernate"
    finally:
        c.destroy(sid)

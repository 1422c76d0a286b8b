"""Workers dying and leaving, with every piece a real process.

The control plane (``forkyard.control.server.serve``, SQLite by default) and
the worker daemons (``forkyard.worker.daemon.serve``) run as subprocesses, so
a worker can be SIGKILLed like a crashed machine and SIGTERMed like a stopped
service.  Heartbeat timeout 3 s.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm

API = secrets.token_urlsafe(32)
WORKER = secrets.token_urlsafe(32)
HEARTBEAT_TIMEOUT = 3.0
START_TIMEOUT = 300


@dataclass
class Proc:
    name: str
    log: Path
    ready: Path
    proc: subprocess.Popen[bytes]
    home: Path
    url: str = ""


def spawn(name: str, code: str, *, root: Path, home: Path) -> Proc:
    """``python -c code`` with the tokens in its environment (argv is world-readable)."""
    log, ready = root / f"{name}.log", root / f"{name}.ready"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "T_API": API, "T_WORKER": WORKER, "T_READY": str(ready),
           "T_HOME": str(home)}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Proc(name, log, ready, proc, home)


def wait_ready(p: Proc) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while not p.ready.exists():
        if p.proc.poll() is not None:
            raise AssertionError(f"{p.name} exited {p.proc.returncode}:\n"
                                 f"{p.log.read_text(errors='replace')[-3000:]}")
        assert time.monotonic() < deadline, f"{p.name} did not get ready"
        time.sleep(0.05)
    p.url = str(json.loads(p.ready.read_text())["url"])
    return p.url


@dataclass
class Fleet:
    root: Path
    store_url: str
    server: Proc
    api: httpx.Client
    workers: dict[str, Proc] = field(default_factory=dict)

    def start_worker(self, name: str, **options: Any) -> Proc:
        opts = "".join(f", {k}={v!r}" for k, v in options.items())
        code = (
            "import os\nfrom pathlib import Path\n"
            "from forkyard.wire.auth import worker_credential\n"
            "from forkyard.worker.daemon import serve\n"
            f"serve(Path(os.environ['T_HOME']), name={name!r}, server_url={self.server.url!r}, "
            f"worker_token=worker_credential(os.environ['T_WORKER'], {name!r}), "
            f"store_url={self.store_url!r}, "
            f"ready_file=Path(os.environ['T_READY']){opts})\n"
        )
        p = spawn(name, code, root=self.root, home=self.root / name)
        self.workers[name] = p
        wait_ready(p)
        return p

    def ok(self, resp: httpx.Response, status: int = 200) -> Any:
        assert resp.status_code == status, (f"{resp.request.method} {resp.request.url}: "
                                            f"{resp.status_code} {resp.text}")
        return resp.json() if resp.content else None

    def sandbox(self, sid: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ok(self.api.get(f"/v1/sandboxes/{sid}"))
        return out

    def worker_state(self, name: str) -> str:
        return next(str(w["state"]) for w in self.ok(self.api.get("/v1/workers"))
                    if w["name"] == name)

    def create(self, worker: str) -> str:
        sid: str = self.ok(self.api.post("/v1/sandboxes", json={"worker": worker}), 201)["id"]
        return sid

    def write(self, sid: str, path: str, data: bytes) -> None:
        self.ok(self.api.put(f"/v1/sandboxes/{sid}/files", params={"path": path},
                             content=data))

    def read(self, sid: str, path: str) -> bytes:
        resp = self.api.get(f"/v1/sandboxes/{sid}/files", params={"path": path})
        assert resp.status_code == 200, resp.text
        return resp.content

    def run(self, sid: str, cmd: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ok(self.api.post(f"/v1/sandboxes/{sid}/exec",
                                                   json={"cmd": cmd}))
        return out

    def published(self, cp: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.ok(self.api.get(f"/v1/checkpoints/{cp}"))["state"]) == "publishing":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state == "published"

    def logs(self) -> str:
        procs = [self.server, *self.workers.values()]
        return "\n".join(f"--- {p.name} ---\n" + "\n".join(
            p.log.read_text(errors="replace").splitlines()[-80:]) for p in procs)


def stop(p: Proc, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
    if p.proc.poll() is None:
        p.proc.send_signal(sig)
    try:
        return p.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        p.proc.kill()
        return p.proc.wait(10)


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    store_url = f"file://{root / 'store'}"
    server = spawn("server", (
        "import os\nfrom pathlib import Path\n"
        "from forkyard.control.server import serve\n"
        "serve(Path(os.environ['T_HOME']), api_token=os.environ['T_API'], "
        f"worker_token=os.environ['T_WORKER'], store_url={store_url!r}, "
        f"heartbeat_timeout={HEARTBEAT_TIMEOUT}, ready_file=Path(os.environ['T_READY']))\n"
    ), root=root, home=root / "control")
    failed_before = request.session.testsfailed
    url = wait_ready(server)
    api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"}, timeout=300)
    fleet = Fleet(root, store_url, server, api)
    try:
        fleet.start_worker("w1")
        fleet.start_worker("w2", on_shutdown="hibernate")
        yield fleet
    finally:
        for p in fleet.workers.values():
            stop(p)
        if request.session.testsfailed > failed_before:
            print(fleet.logs())
        assert stop(server) in (0, -signal.SIGTERM)
        api.close()
        deadline = time.monotonic() + 10
        while qemu_pids(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not qemu_pids(root), "QEMU processes left behind"
    assert (root / "control" / "control.db").exists()  # serve()'s default database


def test_sigkilled_worker_is_dead_its_sandboxes_lost_and_its_archives_live_on(
        fleet: Fleet) -> None:
    f = fleet
    a = f.create("w1")
    f.write(a, "/root/v", b"at checkpoint")
    cp = f.ok(f.api.post(f"/v1/sandboxes/{a}/checkpoint", json={}), 201)["id"]
    f.published(cp)
    f.write(a, "/root/v", b"after checkpoint")
    b = f.create("w1")  # never checkpointed: nothing to recover from
    [child] = f.ok(f.api.post(f"/v1/checkpoints/{cp}/fork", json={"worker": "w1"}), 201)
    survivor = f.create("w2")
    w1 = f.workers["w1"]
    assert qemu_pids(w1.home), "w1 should be running VMs"

    w1.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    w1.proc.wait(10)
    while f.worker_state("w1") != "dead":
        assert time.monotonic() - killed < HEARTBEAT_TIMEOUT + 2.0, "w1 not declared dead"
        time.sleep(0.05)
    # the VMs died with their daemon (pdeathsig), nothing to clean up by hand
    deadline = time.monotonic() + 10
    while qemu_pids(w1.home):
        assert time.monotonic() < deadline, f"orphan QEMU: {qemu_pids(w1.home)}"
        time.sleep(0.1)

    sa, sb, sc = f.sandbox(a), f.sandbox(b), f.sandbox(child["id"])
    assert (sa["state"], sa["recoverable_from"]) == ("lost", cp)
    assert (sb["state"], sb["recoverable_from"]) == ("lost", None)
    assert (sc["state"], sc["recoverable_from"]) == ("lost", cp)  # its published parent
    assert "w1" in sa["error"]
    assert f.sandbox(survivor)["state"] == "running"
    assert f.run(survivor, "echo alive")["stdout"] == "alive\n"

    resp = f.api.post(f"/v1/sandboxes/{a}/exec", json={"cmd": "true"})
    assert resp.status_code == 409 and cp in resp.json()["error"]["message"]
    resp = f.api.post(f"/v1/checkpoints/{cp}/fork", json={"worker": "w1"})
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "unavailable"
    # published: forkable on the surviving worker, which fetches it from the store
    [recovered] = f.ok(f.api.post(f"/v1/checkpoints/{cp}/fork", json={}), 201)
    assert recovered["worker"] == "w2"
    assert f.read(recovered["id"], "/root/v") == b"at checkpoint"
    for sid in (a, b, child["id"], recovered["id"]):
        f.ok(f.api.delete(f"/v1/sandboxes/{sid}"), 204)
    assert f.sandbox(a)["state"] == "destroyed"
    f.ok(f.api.delete(f"/v1/sandboxes/{survivor}"), 204)


def test_worker_stopped_with_hibernate_policy_wakes_on_a_restarted_worker(
        fleet: Fleet) -> None:
    f = fleet
    sid = f.create("w2")
    pid = int(f.run(sid, "sleep 1000 > /dev/null 2>&1 & echo $!")["stdout"])
    f.write(sid, "/root/kept", b"across the shutdown")
    w2 = f.workers["w2"]
    assert stop(w2) in (0, -signal.SIGTERM)
    assert not qemu_pids(w2.home)
    # it told the control plane before leaving: no heartbeat timeout involved
    assert f.worker_state("w2") == "dead"
    info = f.sandbox(sid)
    assert (info["state"], info["worker"]) == ("hibernated", "w2"), info
    cp = f.ok(f.api.get(f"/v1/checkpoints/{info['last_checkpoint']}"))
    assert cp["state"] == "published"

    # w1 comes back (same name, same home) after its crash, and takes the sandbox
    f.start_worker("w1")
    assert f.worker_state("w1") == "alive"
    woken = f.ok(f.api.post(f"/v1/sandboxes/{sid}/wake", json={}))
    assert (woken["id"], woken["state"], woken["worker"]) == (sid, "running", "w1")
    assert f.read(sid, "/root/kept") == b"across the shutdown"
    assert f.run(sid, f"kill -0 {pid} && echo yes")["stdout"] == "yes\n"

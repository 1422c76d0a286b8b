"""Nothing lost in a crash: a worker SIGKILLed at each point of hibernate and publish.

The worker kills itself (``forkyard.worker._faults``: the point named in the
file ``FORKYARD_CRASH_FILE`` points to) while the control plane hibernates or
checkpoints a sandbox; it is then started again on the same home under the
same name.  Every sandbox must then be hibernated and wake with what it held,
or be lost with ``recoverable_from`` naming a published checkpoint that
really forks -- none destroyed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
assert API and WORKER  # the fleet's secrets, from the module that spawns it

# point -> what the control plane then says of the sandbox
HIBERNATE_POINTS = {
    "checkpoint-paused": "lost",
    "checkpoint-saved": "lost",
    "hibernate-recorded": "hibernated",
    "publish-mid": "hibernated",
    "publish-uploaded": "hibernated",
    "hibernate-published": "hibernated",
}


@pytest.fixture(scope="module")
def crashy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Path, str]]:
    """A control plane, a worker that crashes where the crash file says, and a
    published checkpoint (of a sandbox holding ``/root/v = base``) to fork from."""
    import httpx

    root = tmp_path_factory.mktemp("crash")
    crash_file = root / "crash-at"
    store_url = f"file://{root / 'store'}"
    server = spawn("server", (
        "import os\nfrom pathlib import Path\n"
        "from forkyard.control.server import serve\n"
        "serve(Path(os.environ['T_HOME']), api_token=os.environ['T_API'], "
        f"worker_token=os.environ['T_WORKER'], store_url={store_url!r}, "
        f"heartbeat_timeout={HEARTBEAT_TIMEOUT}, ready_file=Path(os.environ['T_READY']))\n"
    ), root=root, home=root / "control")
    url = wait_ready(server)
    api = httpx.Client(base_url=url, headers={"authorization": f"Bearer {API}"}, timeout=300)
    fleet = Fleet(root, store_url, server, api)
    try:
        _start_w1(fleet, crash_file)
        f = fleet
        sid = f.ok(f.api.post("/v1/sandboxes", json={"worker": "w1", "cold": True}), 201)["id"]
        f.write(sid, "/root/v", b"base")
        cp = f.ok(f.api.post(f"/v1/sandboxes/{sid}/checkpoint", json={}), 201)["id"]
        f.published(cp)
        f.ok(f.api.delete(f"/v1/sandboxes/{sid}"), 204)
        yield fleet, crash_file, cp
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        for p in fleet.workers.values():
            stop(p)
        stop(server)
        api.close()


def _start_w1(f: Fleet, crash_file: Path) -> None:
    """Start (or restart: same home, same name) the worker that crashes on demand.

    Only its environment names the crash file: in-process workers of other
    fixtures must never see it.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORKYARD_CRASH_FILE", str(crash_file))
        f.start_worker("w1")


def _crash_and_restart(f: Fleet, crash_file: Path, point: str, op: str, sid: str) -> None:
    w1 = f.workers["w1"]
    crash_file.write_text(point)
    resp = f.api.post(f"/v1/sandboxes/{sid}/{op}", json={})
    assert resp.status_code >= 500, f"{op} survived {point}: {resp.status_code} {resp.text}"
    assert w1.proc.wait(30) == -signal.SIGKILL, f"the worker did not crash at {point}"
    assert not crash_file.exists()
    _start_w1(f, crash_file)


def _settled(f: Fleet, sid: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while (sb := f.sandbox(sid))["state"] in ("hibernating", "starting", "waking"):
        assert time.monotonic() < deadline, sb
        time.sleep(0.2)
    return sb


def _published(f: Fleet, cp: str, timeout: float = 120) -> None:
    """Wait until ``cp`` is published; a checkpoint a crash kept from the control plane
    becomes known a moment after its worker registers again (it asks the worker)."""
    deadline = time.monotonic() + timeout
    while (resp := f.api.get(f"/v1/checkpoints/{cp}")).status_code == 404 or \
            resp.json()["state"] == "publishing":
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.1)
    assert resp.json()["state"] == "published", resp.text


def _recovered(f: Fleet, sb: dict[str, object], published: set[str]) -> bytes:
    """What a fork of the lost sandbox's recoverable_from reads in /root/v."""
    cp = sb["recoverable_from"]
    assert isinstance(cp, str), f"lost with nothing to recover from: {sb}"
    _published(f, cp)
    assert cp in published or f.ok(f.api.get(f"/v1/checkpoints/{cp}"))["state"] == "published"
    [child] = f.ok(f.api.post(f"/v1/checkpoints/{cp}/fork", json={"worker": "w1"}), 201)
    try:
        return f.read(child["id"], "/root/v")
    finally:
        f.ok(f.api.delete(f"/v1/sandboxes/{child['id']}"), 204)


@pytest.mark.parametrize("point", list(HIBERNATE_POINTS))
def test_worker_killed_during_hibernate_loses_nothing(
        crashy: tuple[Fleet, Path, str], point: str) -> None:
    f, crash_file, base_cp = crashy
    [fork] = f.ok(f.api.post(f"/v1/checkpoints/{base_cp}/fork", json={"worker": "w1"}), 201)
    sid = fork["id"]
    f.write(sid, "/root/v", b"before the crash")
    _crash_and_restart(f, crash_file, point, "hibernate", sid)

    sb = _settled(f, sid)
    assert sb["state"] == HIBERNATE_POINTS[point], (point, sb)
    if sb["state"] == "hibernated":
        cp = str(sb["last_checkpoint"])
        _published(f, cp)  # the restarted worker finished (or redid) the publish
        woken = f.ok(f.api.post(f"/v1/sandboxes/{sid}/wake", json={}))
        assert woken["state"] == "running"
        assert f.read(sid, "/root/v") == b"before the crash"
        # and it is wakeable anywhere: the checkpoint forks from the store too
        assert _recovered(f, {"recoverable_from": cp}, set()) == b"before the crash"
    else:
        # the checkpoint never got written: back to the last published state
        assert sb["recoverable_from"] == base_cp, sb
        assert _recovered(f, sb, {base_cp}) == b"base"
    f.ok(f.api.delete(f"/v1/sandboxes/{sid}"), 204)


def test_worker_killed_mid_publish_of_a_checkpoint(crashy: tuple[Fleet, Path, str]) -> None:
    f, crash_file, base_cp = crashy
    [fork] = f.ok(f.api.post(f"/v1/checkpoints/{base_cp}/fork", json={"worker": "w1"}), 201)
    sid = fork["id"]
    f.write(sid, "/root/v", b"checkpointed")
    crash_file.write_text("publish-mid")
    resp = f.api.post(f"/v1/sandboxes/{sid}/checkpoint", json={})
    w1 = f.workers["w1"]
    assert w1.proc.wait(60) == -signal.SIGKILL
    _start_w1(f, crash_file)
    if resp.status_code != 201:
        # the background publish got to its crash before the reply left the worker:
        # the control plane never heard of that checkpoint; the last published one
        # is what the sandbox recovers to
        assert resp.status_code >= 500, resp.text
        sb = _settled(f, sid)
        assert (sb["state"], sb["recoverable_from"]) == ("lost", base_cp), sb
        assert _recovered(f, sb, {base_cp}) == b"base"
        f.ok(f.api.delete(f"/v1/sandboxes/{sid}"), 204)
        return
    cp = resp.json()["id"]
    # the restarted worker publishes it again; the control plane follows
    deadline = time.monotonic() + 120
    while f.ok(f.api.get(f"/v1/checkpoints/{cp}"))["state"] != "published":
        assert time.monotonic() < deadline, f.ok(f.api.get(f"/v1/checkpoints/{cp}"))
        time.sleep(0.2)
    sb = _settled(f, sid)
    assert sb["state"] == "lost", sb  # its VM died with the worker
    deadline = time.monotonic() + 10
    while f.sandbox(sid)["recoverable_from"] != cp:
        assert time.monotonic() < deadline, f.sandbox(sid)
        time.sleep(0.1)
    assert _recovered(f, f.sandbox(sid), {cp}) == b"checkpointed"
    # nothing half-uploaded stays in the store's staging area
    staging = Path(f.store_url.removeprefix("file://")) / ".forkyard-staging"
    assert not list(staging.glob("*.part"))
    f.ok(f.api.delete(f"/v1/sandboxes/{sid}"), 204)

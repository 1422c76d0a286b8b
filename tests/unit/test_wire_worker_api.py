"""The worker calls of the control plane (wire/worker_api) against the worker daemon's routes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, APIWebSocketRoute
from pydantic import ValidationError

from forkyard._digest import resolve_prefix
from forkyard.errors import AmbiguousCheckpoint, CheckpointNotFound
from forkyard.wire import worker_api as api
from forkyard.wire.models import ExecRequest
from forkyard.wire.network import NetworkSpec
from forkyard.wire.procs import ResizeRequest, SignalRequest, SpawnRequest
from forkyard.wire.worker_models import WorkerSandbox

SID = "sb-" + "a" * 20
CP = "c" * 64


def _daemon_routes() -> set[tuple[str, str]]:
    from forkyard.worker.daemon._routes import add_routes

    app = FastAPI()
    add_routes(app, SimpleNamespace(worker=None))  # type: ignore[arg-type]
    return {(m, r.path) for r in app.routes if isinstance(r, APIRoute)
            for m in r.methods if m != "HEAD"}


def test_every_description_is_a_route_of_the_worker_daemon():
    served = _daemon_routes()
    described = {(r.method, r.template) for r in api.ROUTES}
    assert described <= served, described - served
    # and the control plane uses every worker route but the worker's own listings
    assert served - described == {("GET", "/health"), ("GET", "/status"),
                                  ("GET", "/sandboxes")}


def test_every_tunnel_is_a_websocket_of_the_worker_daemon():
    from forkyard.worker.daemon._routes import add_routes

    app = FastAPI()
    add_routes(app, SimpleNamespace(worker=None))  # type: ignore[arg-type]
    served = {r.path for r in app.routes if isinstance(r, APIWebSocketRoute)}
    assert {r.template for r in api.WEBSOCKETS} == served


CALLS = [
    (api.create(SID, "minimal", None, 2), "POST", "/sandboxes"),
    (api.get_sandbox(SID), "GET", f"/sandboxes/{SID}"),
    (api.destroy(SID), "DELETE", f"/sandboxes/{SID}"),
    (api.exec_(SID, ExecRequest(cmd="true", timeout=5)), "POST", f"/sandboxes/{SID}/exec"),
    (api.write_file(SID, "/x", mode=0o600, append=True), "PUT", f"/sandboxes/{SID}/files"),
    (api.read_file(SID, "/x"), "GET", f"/sandboxes/{SID}/files"),
    (api.list_files(SID, "/"), "GET", f"/sandboxes/{SID}/files/list"),
    (api.stat_file(SID, "/"), "GET", f"/sandboxes/{SID}/files/stat"),
    (api.remove_file(SID, "/x", recursive=False), "DELETE", f"/sandboxes/{SID}/files"),
    (api.checkpoint(SID, "n", True), "POST", f"/sandboxes/{SID}/checkpoint"),
    (api.checkpoint_info(CP), "GET", f"/checkpoints/{CP}"),
    (api.publish_status(CP, 10.0), "GET", f"/checkpoints/{CP}"),
    (api.fork(CP, SID), "POST", f"/checkpoints/{CP}/fork"),
    (api.hibernate(SID), "POST", f"/sandboxes/{SID}/hibernate"),
    (api.wake(SID, CP), "POST", f"/sandboxes/{SID}/wake"),
    (api.set_network(SID, NetworkSpec()), "PUT", f"/sandboxes/{SID}/network"),
    (api.spawn(SID, SpawnRequest(cmd="true")), "POST", f"/sandboxes/{SID}/procs"),
    (api.list_procs(SID), "GET", f"/sandboxes/{SID}/procs"),
    (api.proc_output(SID, 42, 0, 0, 5.0, 1024), "GET", f"/sandboxes/{SID}/procs/42/output"),
    (api.proc_stdin(SID, 42, True), "POST", f"/sandboxes/{SID}/procs/42/stdin"),
    (api.proc_resize(SID, 42, ResizeRequest(rows=5, cols=9)), "POST",
     f"/sandboxes/{SID}/procs/42/resize"),
    (api.proc_signal(SID, 42, SignalRequest(signal=9)), "POST",
     f"/sandboxes/{SID}/procs/42/signal"),
]


@pytest.mark.parametrize(("call", "method", "path"), CALLS, ids=[str(c[0]) for c in CALLS])
def test_calls_fill_their_templates(call: api.Call[object], method: str, path: str) -> None:
    assert (call.method, call.path) == (method, path)
    assert call.timeout > 0
    body = call.json()
    assert body is None or isinstance(body, dict)


def test_bodies_and_timeouts():
    assert api.create(SID, "minimal", 256, None).json() == {
        "image": "minimal", "memory_mb": 256, "cpus": None, "sandbox_id": SID,
        "disk": None, "cold": False, "network": None}
    assert api.create(SID, "minimal", None, 2, disk=4 << 30, cold=True).json() == {
        "image": "minimal", "memory_mb": None, "cpus": 2, "sandbox_id": SID,
        "disk": 4 << 30, "cold": True, "network": None}
    assert api.checkpoint(SID, None, False).json() == {"name": None, "publish": False}
    assert api.wake(SID, CP).json() == {"checkpoint_id": CP, "network": None}
    assert api.fork(CP, SID).json() == {"sandbox_id": SID, "network": None}
    assert api.hibernate(SID).json() is None
    # a command's own timeout plus the margin for the agent and the reply
    assert api.exec_(SID, ExecRequest(cmd="x", timeout=7)).timeout == 7 + api.EXEC_MARGIN
    assert api.publish_status(CP, 10.0).timeout == 10.0 + api.QUICK_TIMEOUT
    assert api.write_file(SID, "/x", mode=0o600, append=True).params == {
        "path": "/x", "mode": 0o600, "append": True}


def test_ids_cannot_add_path_segments():
    call = api.get_sandbox("../../checkpoints/x?y")
    assert call.path == "/sandboxes/..%2F..%2Fcheckpoints%2Fx%3Fy"


def test_bodies_are_the_workers_request_models():
    # what the worker would refuse is refused before it is sent
    with pytest.raises(ValidationError):
        api.fork(CP, "not-an-id")
    with pytest.raises(ValidationError):
        api.wake(SID, "short")
    with pytest.raises(ValidationError):
        api.checkpoint(SID, "../bad", True)


def test_replies_parse_into_wire_models():
    info = api.get_sandbox(SID).parse({
        "id": SID, "state": "running", "image": "b" * 64, "created": "x", "memory_mb": 256,
        "cpus": 1, "parent_checkpoint": None, "last_checkpoint": None, "future": 1})
    assert isinstance(info, WorkerSandbox) and info.state == "running"
    with pytest.raises(ValidationError):  # a state outside the lifecycle
        api.get_sandbox(SID).parse({**info.model_dump(), "state": "sleeping"})
    with pytest.raises(ValueError):
        api.list_files(SID, "/").parse({"not": "a list"})
    assert api.destroy(SID).parse(None) is None


# --- the one digest-prefix resolver ------------------------------------------------
IDS = ["abcdef" + "0" * 58, "abcdef" + "1" * 58, "123456" + "f" * 58]


def test_resolve_prefix_finds_the_one_match():
    assert resolve_prefix("123456", IDS) == IDS[2]
    assert resolve_prefix("cp-ABCDEF1", IDS) == IDS[1]  # case and cp- are forgiven
    assert resolve_prefix(f" {IDS[0]} ", IDS) == IDS[0]


def test_resolve_prefix_refuses_none_ambiguous_and_malformed():
    with pytest.raises(AmbiguousCheckpoint) as amb:
        resolve_prefix("abcdef", IDS)
    assert amb.value.prefix == "abcdef" and "ambiguous" in str(amb.value)
    assert isinstance(amb.value, CheckpointNotFound)  # a 404 like any unknown id
    with pytest.raises(CheckpointNotFound) as none:
        resolve_prefix("999999", IDS)
    assert not isinstance(none.value, AmbiguousCheckpoint)
    assert str(none.value) == "no checkpoint '999999'"
    for bad in ("abc", "zzzzzzzz", "a" * 65, "", "abcdef/../x"):
        with pytest.raises(CheckpointNotFound) as e:
            resolve_prefix(bad, IDS)
        assert "6+ hex" in str(e.value)


def test_resolve_prefix_stops_at_the_second_match():
    def endless():
        while True:
            yield "abcdef" + "2" * 58
            yield "abcdef" + "3" * 58

    with pytest.raises(AmbiguousCheckpoint):
        resolve_prefix("abcdef", endless())

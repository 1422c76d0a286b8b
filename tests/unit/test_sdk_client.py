"""The SDK against an in-memory fake of the control-plane API (httpx.MockTransport).

The fake answers the documented shapes of docs/api.md and records each
request, so these tests pin what the SDK sends as much as what it returns.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket

import pytest

from forkyard.errors import CommandFailed
from forkyard.sdk import (
    AsyncSandbox,
    Checkpoint,
    ConflictError,
    NotFoundError,
    PublishFailed,
    Sandbox,
    SandboxTimeout,
    Unavailable,
    _async,
    _sync,
)
from forkyard.sdk._http import SyncHTTP
from forkyard.sdk.config import ConnectionConfig
from tests.fixtures.fake_api import CP_ID, FakeAPI


@pytest.fixture
def api(monkeypatch) -> FakeAPI:
    fake = FakeAPI()
    cfg = ConnectionConfig("http://cp.test", "tok", transport=fake.transport())
    monkeypatch.setattr(_sync, "_http", lambda *a, **k: SyncHTTP(cfg))
    monkeypatch.setattr(_async, "_http", lambda *a, **k: _async.AsyncHTTP(cfg))
    return fake


def test_create_sends_the_documented_body(api):
    sb = Sandbox.create("minimal", worker="w2", memory_mb=512)
    req = api.last("/v1/sandboxes")
    assert json.loads(req.content) == {"image": "minimal", "worker": "w2", "memory_mb": 512,
                                       "cpus": None}
    assert sb.id.startswith("sb-") and sb.worker == "w2" and sb.state == "running"
    # a boot can take minutes on a slow machine: the request must wait for it
    assert req.extensions["timeout"]["read"] == 300.0


def test_exec_string_is_shell_list_is_argv_and_output_is_exact(api):
    sb = Sandbox.create()
    r = sb.exec("echo $HOME", env={"A": "1"}, cwd="/tmp", stdin=b"\x00in")
    body = json.loads(api.last("/exec").content)
    assert body["cmd"] == "echo $HOME"
    assert body["env"] == {"A": "1"} and body["cwd"] == "/tmp"
    assert base64.b64decode(body["stdin_b64"]) == b"\x00in"
    assert r.stdout_bytes == b"\xff\x00in"  # exact, though not valid UTF-8
    assert r.stderr == "e" and r.exit_code == 0 and r.pid == 42 and r.ok
    sb.exec(["ls", "-l", 3])  # type: ignore[list-item]
    assert json.loads(api.last("/exec").content)["cmd"] == ["ls", "-l", "3"]


def test_exec_request_timeout_outlasts_the_command_timeout(api):
    sb = Sandbox.create()
    sb.exec("true", timeout=5)
    assert api.last("/exec").extensions["timeout"]["read"] == 35.0
    sb.exec("true", timeout=None)
    assert api.last("/exec").extensions["timeout"]["read"] is None


def test_exec_check_raises_command_failed_with_the_result(api):
    sb = Sandbox.create()
    api.exit_code = 3
    assert sb.exec("false").exit_code == 3
    with pytest.raises(CommandFailed) as info:
        sb.exec("false", check=True)
    assert info.value.result.exit_code == 3


def test_exec_timeout_is_a_sandbox_timeout_with_output(api):
    sb = Sandbox.create()
    with pytest.raises(SandboxTimeout) as info:
        sb.exec("sleep 100", timeout=1)
    assert info.value.stdout_bytes == b"so far"


def test_files_round_trip_with_progress(api):
    sb = Sandbox.create()
    data = bytes(range(256)) * 4096  # 1 MiB, several chunks
    seen: list[tuple[int, int | None]] = []
    assert sb.files.write("/root/a.bin", data, mode=0o600,
                          progress=lambda d, t: seen.append((d, t))) == len(data)
    put = api.last("/files")
    assert put.url.params["path"] == "/root/a.bin"
    assert put.url.params["mode"] == str(0o600) and put.url.params["append"] == "false"
    assert put.headers["Content-Length"] == str(len(data))
    assert len(seen) > 1 and seen[-1] == (len(data), len(data))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    got: list[tuple[int, int | None]] = []
    assert sb.files.read("/root/a.bin", progress=lambda d, t: got.append((d, t))) == data
    assert got[-1][0] == len(data)
    sb.files.write("/root/t.txt", io.BytesIO(b"from a file"))
    assert sb.files.read_text("/root/t.txt") == "from a file"


def test_files_exists_and_not_found(api):
    sb = Sandbox.create()
    assert not sb.files.exists("/nope")
    sb.files.write("/yes", "x")
    assert sb.files.exists("/yes")
    with pytest.raises(NotFoundError):
        sb.files.read("/nope")


def test_files_refuse_relative_paths_before_sending(api):
    sb = Sandbox.create()
    before = len(api.requests)
    with pytest.raises(ValueError, match="absolute"):
        sb.files.write("relative.txt", "x")
    with pytest.raises(ValueError, match="absolute"):
        sb.files.rename("/a", "b")
    assert len(api.requests) == before


def test_write_streams_iterators_and_make_dir_rename_use_their_routes(api):
    sb = Sandbox.create()
    assert sb.files.write("/root/it", (bytes([i]) * 1000 for i in range(5))) == 5000
    put = api.last("/files")
    assert "Content-Length" not in put.headers  # streamed, chunked
    assert sb.files.read("/root/it") == b"".join(bytes([i]) * 1000 for i in range(5))
    assert b"".join(sb.files.read_stream("/root/it")) == sb.files.read("/root/it")
    sb.files.make_dir("/root/x y", mode=0o700)
    mk = api.last("/files/mkdir")
    assert mk.url.params["path"] == "/root/x y" and mk.url.params["mode"] == str(0o700)
    sb.files.rename("/root/it", "/root/it2", overwrite=False)
    mv = api.last("/files/rename")
    assert mv.url.params["to"] == "/root/it2" and mv.url.params["overwrite"] == "false"


def test_fork_rule_no_count_is_one_sandbox_count_is_a_list(api):
    sb = Sandbox.create()
    cp = sb.checkpoint()
    assert isinstance(cp, Checkpoint) and sb.info.last_checkpoint == CP_ID
    one = Sandbox.fork(cp)
    assert isinstance(one, Sandbox)
    assert json.loads(api.last("/fork").content) == {"count": 1, "worker": None}
    many = Sandbox.fork(CP_ID, count=3, worker="w1")
    assert isinstance(many, list) and len(many) == 3
    assert {s.worker for s in many} == {"w1"}
    assert len(Sandbox.fork(cp, count=1)) == 1
    with pytest.raises(ValueError):
        Sandbox.fork(cp, count=0)


def test_wait_published_polls_until_published(api):
    cp = Sandbox.create().checkpoint()
    assert cp.state == "publishing"
    info = cp.wait_published(timeout=10)
    assert info.state == "published" and cp.stored_bytes == 5


def test_wait_published_raises_when_publishing_failed(api):
    api.publish_states = ["failed"]
    cp = Sandbox.create().checkpoint()
    with pytest.raises(PublishFailed, match="disk full"):
        cp.wait_published(timeout=10)


def test_wait_published_of_a_local_checkpoint_is_a_conflict(api):
    api.publish_states = ["local"]
    cp = Sandbox.create().checkpoint()
    with pytest.raises(ConflictError, match="publish=False"):
        cp.wait_published(timeout=10)


def test_wait_published_times_out(api):
    api.publish_states = ["publishing"]
    cp = Sandbox.create().checkpoint()
    with pytest.raises(SandboxTimeout, match="still publishing"):
        cp.wait_published(timeout=0.3)


def test_hibernate_wake_and_state_conflict(api):
    sb = Sandbox.create()
    assert sb.hibernate().state == "hibernated"
    assert sb.state == "hibernated"
    with pytest.raises(ConflictError) as info:
        sb.hibernate()
    assert info.value.state == "hibernated" and info.value.operation == "hibernate"
    assert sb.wake(worker="w2").worker == "w2"
    assert json.loads(api.last("/wake").content) == {"worker": "w2"}


def test_context_manager_kills_and_kill_is_idempotent(api):
    with Sandbox.create() as sb:
        sid = sb.id
        assert sid in api.sandboxes
    assert sid not in api.sandboxes
    assert sb.kill() is False


def test_connect_list_refresh(api):
    sb = Sandbox.create()
    again = Sandbox.connect(sb.id)
    assert again.info == sb.info
    assert [i.id for i in Sandbox.list()] == [sb.id]
    api.sandboxes[sb.id]["state"] = "hibernated"
    assert sb.state == "running"  # the handle keeps the last known state...
    assert sb.refresh().state == "hibernated"  # ...until asked to refresh
    with pytest.raises(NotFoundError):
        Sandbox.connect("sb-00000000000000000000")


def test_ids_cannot_add_path_segments(api):
    with pytest.raises(NotFoundError):
        Sandbox.connect("../../v1/workers")
    assert api.requests[-1].url.raw_path == b"/v1/sandboxes/..%2F..%2Fv1%2Fworkers"


def test_wrong_token_is_an_authentication_error(api, monkeypatch):
    from forkyard.sdk import AuthenticationError

    cfg = ConnectionConfig("http://cp.test", "wrong", transport=api.transport())
    monkeypatch.setattr(_sync, "_http", lambda *a, **k: SyncHTTP(cfg))
    with pytest.raises(AuthenticationError):
        Sandbox.list()


def test_async_twin_does_the_same(api):
    async def scenario() -> None:
        async with await AsyncSandbox.create(worker="w2") as sb:
            r = await sb.exec("x", stdin="in")
            assert r.stdout_bytes == b"\xffin"
            await sb.files.write("/f", b"data", progress=lambda d, t: None)
            assert await sb.files.read("/f") == b"data"
            assert not await sb.files.exists("/g")
            cp = await sb.checkpoint()
            assert (await cp.wait_published(timeout=10)).state == "published"
            forks = await AsyncSandbox.fork(cp, count=2)
            assert len(forks) == 2
            one = await AsyncSandbox.fork(cp)
            assert isinstance(one, AsyncSandbox)
            assert (await sb.hibernate()).state == "hibernated"
            assert (await sb.wake()).state == "running"
            sid = sb.id
        assert sid not in api.sandboxes

    asyncio.run(scenario())


def test_unreachable_control_plane_is_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = SyncHTTP(ConnectionConfig(f"http://127.0.0.1:{port}", "t"))
    from forkyard.sdk import _ops

    with pytest.raises(Unavailable, match="cannot reach"):
        http.call(_ops.list_sandboxes())


def test_handles_of_one_config_share_a_connection_pool():
    cfg = ConnectionConfig("http://127.0.0.1:1", "t")
    assert SyncHTTP(cfg)._client is SyncHTTP(cfg)._client
    other = ConnectionConfig("http://127.0.0.1:1", "other-token")
    assert SyncHTTP(other)._client is not SyncHTTP(cfg)._client

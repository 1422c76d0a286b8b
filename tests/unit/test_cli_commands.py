"""CLI parsing, exit codes and --json shapes, without a cluster.

Commands that talk to a control plane run against the fake API of
test_sdk_client (httpx.MockTransport) by replacing the CLI's ``connect``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from forkyard.cli import _cluster, _sandboxes, app
from forkyard.sdk._http import SyncHTTP
from forkyard.sdk.cluster import ClusterFile, WorkerRecord, load_cluster, proc_start_time
from forkyard.sdk.config import ConnectionConfig
from tests.fixtures.fake_api import FakeAPI

runner = CliRunner()

SANDBOX_KEYS = {"id", "state", "worker", "image", "memory_mb", "cpus", "created",
                "parent_checkpoint", "last_checkpoint", "error"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for var in ("FORKYARD_URL", "FORKYARD_API_TOKEN", "FORKYARD_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FORKYARD_HOME", str(tmp_path / "home"))


@pytest.fixture
def api(monkeypatch) -> FakeAPI:
    fake = FakeAPI()
    cfg = ConnectionConfig("http://cp.test", "tok", transport=fake.transport())
    monkeypatch.setattr(_sandboxes, "connect", lambda *a: SyncHTTP(cfg))
    return fake


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("up", "down", "status", "demo", "server", "worker", "create", "ls", "exec",
                "files", "checkpoint", "checkpoints", "fork", "hibernate", "wake", "rm",
                "setup", "image"):
        assert f" {cmd} " in res.stdout, cmd


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("forkyard 0.")


def test_without_a_cluster_an_error_is_one_red_line_and_exit_1(tmp_path):
    res = runner.invoke(app, ["ls", "--home", str(tmp_path)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no forkyard control plane")
    assert "Traceback" not in res.output


def test_debug_shows_the_traceback(tmp_path):
    res = runner.invoke(app, ["--debug", "ls", "--home", str(tmp_path)])
    assert res.exit_code == 1
    assert "Traceback" in res.stderr and "ConfigurationError" in res.stderr


def test_multiline_errors_are_cut_to_one_line(api):
    from forkyard.cli._output import error_line

    assert error_line(RuntimeError("first\nsecond")) == "first (more with --debug)"
    assert error_line(RuntimeError("")) == "RuntimeError"


def test_create_and_ls_json_shapes(api):
    res = runner.invoke(app, ["create", "--worker", "w2", "--memory", "512", "--json"])
    assert res.exit_code == 0, res.output
    created = json.loads(res.stdout)
    assert set(created) >= SANDBOX_KEYS and created["worker"] == "w2"
    assert json.loads(api.last("/v1/sandboxes").content)["memory_mb"] == 512
    res = runner.invoke(app, ["ls", "--json"])
    listed = json.loads(res.stdout)
    assert [s["id"] for s in listed] == [created["id"]]
    plain = runner.invoke(app, ["create"])
    assert plain.stdout.strip().startswith("sb-")


def test_exec_passes_bytes_through_and_exits_with_the_guest_code(api):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    api.exit_code = 7
    res = runner.invoke(app, ["exec", sid, "--", "cat"], input=b"")
    assert res.exit_code == 7
    assert res.stdout_bytes == b"\xff" and res.stderr_bytes == b"e"
    # live: started as a process, one arg: shell
    assert json.loads(api.last("/procs").content)["cmd"] == "cat"


def test_exec_argv_env_stdin_and_json(api):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    res = runner.invoke(app, ["exec", "-e", "A=1", "--stdin", "--json", sid, "--", "ls", "-l"],
                        input=b"\x00data")
    assert res.exit_code == 0, res.output
    body = json.loads(api.last("/exec").content)
    assert body["cmd"] == ["ls", "-l"] and body["env"] == {"A": "1"}
    assert base64.b64decode(body["stdin_b64"]) == b"\x00data"
    out = json.loads(res.stdout)
    # the API's ExecResult: not valid UTF-8, so the stream travels once, as base64
    assert out["stdout_encoding"] == "base64" and "stdout_b64" not in out
    assert base64.b64decode(out["stdout"]) == b"\xff\x00data"
    assert {"exit_code", "stdout", "stderr", "pid", "signal", "timed_out"} <= set(out)


def test_exec_killed_by_a_signal_exits_128_plus_n(api, monkeypatch):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    orig = api.handle

    def killed(req: httpx.Request) -> httpx.Response:
        resp = orig(req)
        if req.url.path.endswith(("/exec", "/output", "/stream")):  # buffered or live
            data = json.loads(resp.content)  # (the fake's stream is one NDJSON line)
            data.update(exit_code=-1, signal=9)
            return httpx.Response(200, content=json.dumps(data) + "\n")
        return resp

    cfg = ConnectionConfig("http://cp.test", "tok", transport=httpx.MockTransport(killed))
    monkeypatch.setattr(_sandboxes, "connect", lambda *a: SyncHTTP(cfg))
    assert runner.invoke(app, ["exec", sid, "--", "sleep 9"]).exit_code == 137


def test_exec_timeout_prints_partial_output_and_exits_124(api):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    res = runner.invoke(app, ["exec", "--timeout", "1", sid, "--", "sleep 100"])
    assert res.exit_code == 124
    assert res.stdout_bytes == b"so far"
    assert "timed out" in res.stderr


def test_exec_rejects_a_bad_env_option(api):
    res = runner.invoke(app, ["exec", "-e", "NOEQUALS", "sb-1", "--", "true"])
    assert res.exit_code == 2


def test_files_put_and_get_binary(api, tmp_path):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    src = tmp_path / "in.bin"
    payload = os.urandom(300_000) + b"\x00\xff"
    src.write_bytes(payload)
    assert runner.invoke(app, ["files", "put", "--mode", "600", sid, str(src), "/root/x"]
                         ).exit_code == 0
    assert api.last("/files").url.params["mode"] == str(0o600)
    dst = tmp_path / "out.bin"
    res = runner.invoke(app, ["files", "get", sid, "/root/x", str(dst)])
    assert res.exit_code == 0, res.output
    assert dst.read_bytes() == payload
    res = runner.invoke(app, ["files", "get", sid, "/root/x", "-"])
    assert res.stdout_bytes == payload
    res = runner.invoke(app, ["files", "put", sid, "-", "/root/y"], input=b"\x01stdin")
    assert res.exit_code == 0
    assert api.files[(sid, "/root/y")] == b"\x01stdin"
    missing = runner.invoke(app, ["files", "get", sid, "/nope", str(dst)])
    assert missing.exit_code == 1 and "no such file" in missing.stderr


def test_checkpoint_fork_hibernate_wake_json(api):
    sid = json.loads(runner.invoke(app, ["create", "--json"]).stdout)["id"]
    cp = json.loads(runner.invoke(app, ["checkpoint", sid, "--name", "n", "--json"]).stdout)
    assert {"id", "state", "sandbox", "worker", "stored_bytes", "changed_bytes"} <= set(cp)
    assert json.loads(api.last("/checkpoint").content) == {"name": "n", "publish": True}
    res = runner.invoke(app, ["fork", cp["id"], "--count", "3", "--worker", "w2", "--json"])
    forks = json.loads(res.stdout)
    assert len(forks) == 3 and all(set(f) >= SANDBOX_KEYS for f in forks)
    bare = runner.invoke(app, ["fork", cp["id"], "--count", "2"])
    assert bare.exit_code == 0, bare.output
    ids = bare.stdout.split("\n")[:-1]
    assert len(ids) == 2 and all(re.fullmatch(r"sb-[0-9a-f]{20}", i) for i in ids), ids
    hib = json.loads(runner.invoke(app, ["hibernate", sid, "--json"]).stdout)
    assert hib["state"] == "hibernated"
    again = runner.invoke(app, ["hibernate", sid])
    assert again.exit_code == 1 and again.stderr.startswith("error: not running")
    woke = json.loads(runner.invoke(app, ["wake", sid, "--worker", "w2", "--json"]).stdout)
    assert (woke["state"], woke["worker"]) == ("running", "w2")
    assert runner.invoke(app, ["rm", sid]).exit_code == 0
    assert sid not in api.sandboxes


# --- cluster commands without processes ---------------------------------------------------


def test_status_without_a_cluster(tmp_path):
    res = runner.invoke(app, ["status", "--json", "--home", str(tmp_path)])
    assert res.exit_code == 3
    assert json.loads(res.stdout)["state"] == "not running"


def test_down_without_a_cluster(tmp_path):
    res = runner.invoke(app, ["down", "--home", str(tmp_path)])
    assert res.exit_code == 0 and "no cluster" in res.stdout


def test_up_needs_a_worker(tmp_path):
    assert runner.invoke(app, ["up", "--workers", "0", "--home", str(tmp_path)]).exit_code == 2


def _dead_cluster(home) -> ClusterFile:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    c = ClusterFile(home=home, api_token="a", worker_token="w", store="file:///s",
                    url="http://127.0.0.1:9", state="running", pids={"server": proc.pid},
                    proc_start={"server": 1},
                    workers=[WorkerRecord("w1", str(home / "workers" / "w1"), "")])
    c.save()
    return c


def test_status_and_down_of_a_dead_cluster(tmp_path):
    _dead_cluster(tmp_path)
    res = runner.invoke(app, ["status", "--json", "--home", str(tmp_path)])
    assert res.exit_code == 3
    data = json.loads(res.stdout)
    assert data["state"] == "stopped" and data["processes"]["server"]["alive"] is False
    assert runner.invoke(app, ["down", "--home", str(tmp_path)]).exit_code == 0
    assert load_cluster(tmp_path) is None


def test_down_stops_a_recorded_process_and_spares_a_reused_pid(tmp_path):
    marker = tmp_path / "got-sigterm"
    script = ("import pathlib, signal, sys, time\n"
              "def bye(*_):\n"
              f"    pathlib.Path({str(marker)!r}).write_text('TERM')\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    sleeper = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                               stdout=subprocess.PIPE)
    assert sleeper.stdout is not None and sleeper.stdout.readline() == b"ready\n"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = proc_start_time(sleeper.pid)
        assert start is not None
        ClusterFile(home=tmp_path, api_token="a", worker_token="w", store="s",
                    pids={"server": sleeper.pid, "w1": bystander.pid},
                    proc_start={"server": start, "w1": 12345}).save()
        res = runner.invoke(app, ["down", "--home", str(tmp_path), "--timeout", "5"])
        assert res.exit_code == 0, res.output
        assert marker.read_text() == "TERM"  # asked politely first
        assert proc_start_time(sleeper.pid) is None
        assert bystander.poll() is None  # its pid was recorded, but not its start time
    finally:
        for p in (sleeper, bystander):
            p.kill()
            p.wait()


def test_up_is_idempotent_when_the_cluster_answers(tmp_path, monkeypatch):
    c = _dead_cluster(tmp_path)
    status = _cluster.ClusterStatus(c, {"server": True}, True, [], 0)
    monkeypatch.setattr(_cluster, "cluster_status", lambda home: status)

    def no_launch(*a, **k):
        raise AssertionError("a running cluster must not be started again")

    monkeypatch.setattr(_cluster, "_launch", no_launch)
    res = runner.invoke(app, ["up", "--home", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["started"] is False and out["url"] == c.url and out["api_token"] == "a"


# --- worker-home commands ---------------------------------------------------------------


def test_image_ls_of_an_empty_worker_home(tmp_path):
    res = runner.invoke(app, ["image", "ls", "--json", "--home", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == []


def test_image_commands_on_a_cluster_home_use_its_worker_homes(tmp_path):
    from forkyard.cli._admin import target_homes

    (tmp_path / "workers" / "w2").mkdir(parents=True)
    (tmp_path / "workers" / "w1").mkdir()
    assert target_homes(tmp_path, None) == [("w1", tmp_path / "workers" / "w1"),
                                            ("w2", tmp_path / "workers" / "w2")]
    assert target_homes(tmp_path, "w2") == [("w2", tmp_path / "workers" / "w2")]
    res = runner.invoke(app, ["image", "ls", "--worker", "w9", "--home", str(tmp_path)])
    assert res.exit_code == 2


def test_image_ls_json_shape_with_an_image(tmp_path):
    from forkyard.config import Home
    from forkyard.image import ImageCatalog, ImageMeta

    home = Home.at(tmp_path).ensure()
    blob = tmp_path / "img.ext4"
    blob.write_bytes(b"\0" * 4096 + b"x")
    ImageCatalog(home).add_file(blob, ImageMeta(source="test", e2fsprogs="1.47.0"), name="t")
    res = runner.invoke(app, ["image", "ls", "--json", "--home", str(tmp_path)])
    (img,) = json.loads(res.stdout)
    assert {"digest", "names", "size", "path", "e2fsprogs", "source", "worker"} <= set(img)
    assert img["names"] == ["t"] and img["size"] == 4097 and img["worker"] is None


@pytest.mark.parametrize("args", [
    ["minimal", "--debian"],
    ["--from-dir", "/", "--from-tar", "x.tar"],
    ["--packages", "git"],
    ["nonsense"],
])
def test_image_build_rejects_ambiguous_sources(tmp_path, args):
    res = runner.invoke(app, ["image", "build", *args, "--home", str(tmp_path)])
    assert res.exit_code == 2, res.output


def test_a_missing_local_file_is_a_one_line_error(api, tmp_path):
    res = runner.invoke(app, ["files", "put", "sb-1", str(tmp_path / "nope"), "/root/x"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: [Errno 2]") and "Traceback" not in res.output

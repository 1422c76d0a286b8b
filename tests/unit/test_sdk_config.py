"""Connection resolution order and the cluster.json file that `forkyard up` writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from forkyard.sdk.cluster import ClusterFile, WorkerRecord, load_cluster, proc_start_time
from forkyard.sdk.config import ConnectionConfig
from forkyard.sdk.errors import ConfigurationError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("FORKYARD_URL", "FORKYARD_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # never let a real ~/.forkyard decide a test's outcome
    monkeypatch.setenv("FORKYARD_HOME", str(tmp_path / "default-home"))


def _cluster(home, url: str | None = "http://127.0.0.1:4000", token="cluster-token"
             ) -> ClusterFile:
    c = ClusterFile(home=home, api_token=token, worker_token="wt", store="file:///s", url=url,
                    state="running")
    c.save()
    return c


def test_arguments_win_over_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("FORKYARD_URL", "http://env:1")
    monkeypatch.setenv("FORKYARD_API_TOKEN", "env-token")
    _cluster(tmp_path)
    cfg = ConnectionConfig.resolve(url="http://arg:2/", token="arg-token", home=tmp_path)
    assert (cfg.url, cfg.token, cfg.source) == ("http://arg:2", "arg-token", "argument")


def test_environment_wins_over_the_cluster_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FORKYARD_URL", "http://env:1")
    monkeypatch.setenv("FORKYARD_API_TOKEN", "env-token")
    _cluster(tmp_path)
    cfg = ConnectionConfig.resolve(home=tmp_path)
    assert (cfg.url, cfg.token, cfg.source) == ("http://env:1", "env-token", "$FORKYARD_URL")


def test_cluster_file_of_the_home_argument(tmp_path):
    _cluster(tmp_path)
    cfg = ConnectionConfig.resolve(home=tmp_path)
    assert (cfg.url, cfg.token) == ("http://127.0.0.1:4000", "cluster-token")
    assert cfg.source.endswith("cluster.json")


def test_cluster_file_of_forkyard_home(monkeypatch, tmp_path):
    _cluster(tmp_path / "h", url="http://127.0.0.1:4100")
    monkeypatch.setenv("FORKYARD_HOME", str(tmp_path / "h"))
    assert ConnectionConfig.resolve().url == "http://127.0.0.1:4100"


def test_cluster_token_is_not_sent_to_another_url(tmp_path):
    _cluster(tmp_path)
    cfg = ConnectionConfig.resolve(url="http://elsewhere:9", home=tmp_path)
    assert cfg.token is None


def test_cluster_token_is_used_for_its_own_url_given_explicitly(tmp_path):
    _cluster(tmp_path)
    cfg = ConnectionConfig.resolve(url="http://127.0.0.1:4000/", home=tmp_path)
    assert cfg.token == "cluster-token"


def test_token_argument_with_the_cluster_url(tmp_path):
    _cluster(tmp_path)
    cfg = ConnectionConfig.resolve(token="mine", home=tmp_path)
    assert (cfg.url, cfg.token) == ("http://127.0.0.1:4000", "mine")


def test_nothing_configured_says_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigurationError, match="forkyard up"):
        ConnectionConfig.resolve(home=tmp_path)


def test_a_starting_cluster_has_no_url_yet(tmp_path):
    _cluster(tmp_path, url=None)
    with pytest.raises(ConfigurationError, match="still starting"):
        ConnectionConfig.resolve(home=tmp_path)


def test_url_must_be_http(tmp_path):
    with pytest.raises(ConfigurationError, match="http://"):
        ConnectionConfig.resolve(url="127.0.0.1:4000", home=tmp_path)


def test_bearer_header_only_with_a_token():
    assert ConnectionConfig("http://a").headers.get("Authorization") is None
    assert ConnectionConfig("http://a", "t").headers["Authorization"] == "Bearer t"


# --- cluster.json ------------------------------------------------------------------------


def test_cluster_file_is_private_and_round_trips(tmp_path):
    c = ClusterFile(home=tmp_path, api_token="a", worker_token="w", store="file:///st",
                    url="http://127.0.0.1:1", db="sqlite:///x.db", state="running",
                    pids={"server": 10, "w1": 11}, proc_start={"server": 5, "w1": 6},
                    server_home="/c", server_log="/l",
                    workers=[WorkerRecord("w1", "/h/w1", "/l/w1.log", True)])
    c.save()
    mode = stat.S_IMODE(os.stat(tmp_path / "cluster.json").st_mode)
    assert mode == 0o600
    data = json.loads((tmp_path / "cluster.json").read_text())
    assert {"url", "api_token", "worker_token", "pids", "store", "workers"} <= set(data)
    assert data["pids"] == {"server": 10, "w1": 11}
    back = load_cluster(tmp_path)
    assert back is not None
    assert back.to_json() == c.to_json()
    assert not list(tmp_path.glob(".cluster.json.*"))  # no temp file left


def test_save_keeps_0600_when_rewritten_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        _cluster(tmp_path)
        _cluster(tmp_path, token="again")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "cluster.json").st_mode) == 0o600


def test_missing_cluster_file_is_none(tmp_path):
    assert load_cluster(tmp_path) is None


@pytest.mark.parametrize("text", ["not json", "[]", '{"format": 99}', '{"format": 1}'])
def test_malformed_cluster_file_is_a_configuration_error(tmp_path, text):
    (tmp_path / "cluster.json").write_text(text)
    with pytest.raises(ConfigurationError, match="cluster file"):
        load_cluster(tmp_path)


def test_owns_only_the_process_it_started(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = proc_start_time(proc.pid)
        assert start is not None
        c = ClusterFile(home=tmp_path, api_token="a", worker_token="w", store="s",
                        pids={"mine": proc.pid, "reused": proc.pid, "gone": 2**22 + 7},
                        proc_start={"mine": start, "reused": start + 1, "gone": 1})
        assert c.owns("mine") == proc.pid
        assert c.owns("reused") is None  # same pid, different process start: not ours
        assert c.owns("gone") is None
        assert c.owns("never-started") is None
    finally:
        proc.kill()
        proc.wait()
    assert proc_start_time(proc.pid) is None

"""`forkyard checkpoint ls|show|rm` and `store ls` on a worker home (no cluster, no VM)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from forkyard.checkpoint import BootRef, LocalCheckpoints, Manifest, PartRef, VMInfo
from forkyard.checkpoint.archive import manifest_key
from forkyard.cli import app
from forkyard.config import Home
from forkyard.store import open_store

runner = CliRunner()


def _manifest(name: str) -> Manifest:
    def part(c: str, size: int) -> PartRef:
        return PartRef(c * 64, size)

    return Manifest(
        created="2026-11-29T00:00:00.000Z", base=part("b", 1 << 27),
        layers=(part("1", 4096),), state=part("5", 1 << 20),
        boot=BootRef(part("c", 10), part("d", 10), "console=ttyS0"),
        vm=VMInfo(qemu="7.2.22", machine="pc-q35-7.2", accel="tcg", cpu="qemu64",
                  memory_mb=256, cpus=1, devices="forkyard-v1", disk_size=1 << 27),
        sandbox="sb-" + "0" * 20, name=name,
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in ("FORKYARD_URL", "FORKYARD_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    h = Home.at(tmp_path / "w").ensure()
    monkeypatch.setenv("FORKYARD_HOME", str(h.root))
    return h


def test_checkpoint_ls_show_rm_on_a_worker_home(home):
    local = LocalCheckpoints(home.checkpoints_dir)
    cp = local.add(_manifest("mine"))
    listed = json.loads(runner.invoke(app, ["checkpoint", "ls", "--json"]).stdout)
    assert [c["id"] for c in listed] == [cp.id] and listed[0]["name"] == "mine"
    shown = runner.invoke(app, ["checkpoint", "show", cp.id[:10], "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["id"] == cp.id and data["base"]["digest"] == "b" * 64
    assert runner.invoke(app, ["checkpoint", "rm", cp.id[:10]]).exit_code == 0
    assert json.loads(runner.invoke(app, ["checkpoint", "ls", "--json"]).stdout) == []
    missing = runner.invoke(app, ["checkpoint", "show", "abcdef123456"])
    assert missing.exit_code == 1 and "no checkpoint" in missing.output


def test_show_and_store_ls_read_published_manifests_from_the_store(home):
    m = _manifest("published")
    store = open_store(home.default_store_url())
    store.put_bytes(manifest_key(m.id), m.canonical())
    shown = json.loads(runner.invoke(app, ["checkpoint", "show", m.id, "--json"]).stdout)
    assert shown["id"] == m.id and shown["source"] == store.url
    # store ls sizes each listed part; this one's parts were never uploaded
    result = runner.invoke(app, ["store", "ls", "--json"])
    assert result.exit_code == 1 and "not in the store" in result.output


def test_a_tampered_manifest_in_the_store_is_refused(home):
    m = _manifest("tampered")
    store = open_store(home.default_store_url())
    store.put_bytes(manifest_key(m.id), m.canonical().replace(b"tampered", b"tampere!"))
    result = runner.invoke(app, ["checkpoint", "show", m.id])
    assert result.exit_code == 1 and "expected" in result.output


def test_checkpoint_with_a_sandbox_id_means_create(home):
    """`checkpoint SANDBOX` is the create command: without a cluster it says so."""
    result = runner.invoke(app, ["checkpoint", "sb-" + "1" * 20, "--name", "x"])
    assert result.exit_code == 1
    assert "cluster" in result.output.lower() or "url" in result.output.lower()
    assert "No such command" not in result.output

"""`forkyard demo` in a fresh home: starts its cluster, verifies forks, stops it again."""

from __future__ import annotations

import json

import pytest

from tests.conftest import qemu_pids
from tests.fixtures.cli import fy

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_demo_verifies_forks_on_both_workers_and_cleans_up(tmp_path):
    home = tmp_path / "demo-home"
    proc = fy("demo", "--forks", "2", "--json", home=home, check=False, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["cluster_started"] is True
    checks = report["checks"]
    assert [c["label"] for c in checks] == ["fork 1", "fork 2", "woken on w2"]
    assert [c["worker"] for c in checks] == ["w1", "w2", "w2"]
    assert all(c["verified"] and c["files"] >= 1000 for c in checks)
    # the guest web server of the source answers in every fork and after the wake,
    # through the control plane's port proxy, each on its own network
    assert all(c["web"] for c in checks)
    assert report["checksums_from"] == "image catalog"
    cp, base = report["checkpoint"], report["base_image"]
    assert 0 < cp["stored_bytes"] < cp["changed_bytes"]  # archives are compressed
    assert base["size"] > 0 and report["hibernate"]["stored_bytes"] > 0
    assert 0 < base["stored_bytes"] < base["size"]  # the base travelled once, compressed
    # stock bases: each worker built its own image, so the two catalogs differ
    images = json.loads(fy("image", "ls", "--json", home=home).stdout)
    minimal = {i["worker"]: i["digest"] for i in images if "minimal" in i["names"]}
    assert set(minimal) == {"w1", "w2"} and minimal["w1"] != minimal["w2"]
    # ...and the forks on w2 (verified above) ran on w1's base, not on w2's own
    assert base["digest"] == minimal["w1"]
    assert not (home / "cluster.json").exists()
    assert not qemu_pids(home)

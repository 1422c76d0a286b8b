"""`forkyard up --workers 2` in a tmp home, the CLI end to end, then `forkyard down`.

The CLI runs as real subprocesses (the installed ``forkyard`` console script),
exactly as a user runs it; the cluster it starts is real (control plane, two
worker daemons, QEMU guests).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import qemu_pids
from tests.fixtures.cli import FORKYARD, cluster_pids, fy, readme_example, up_cluster

pytestmark = pytest.mark.vm

# The README's CLI example, read from README.md (run with FORKYARD_HOME set to the test home).
README_CLI = readme_example("cli")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cli-cluster") / "home"
    with up_cluster(root) as info:
        assert info["started"] is True
        yield root


def test_up_again_just_prints_the_running_cluster(home):
    before = cluster_pids(home)
    again = json.loads(fy("up", "--workers", "2", "--json", home=home).stdout)
    assert again["started"] is False
    assert cluster_pids(home) == before
    status = json.loads(fy("status", "--json", home=home).stdout)
    assert status["state"] == "running"
    assert sorted(w["name"] for w in status["workers"]) == ["w1", "w2"]
    assert all(w["state"] == "alive" for w in status["workers"])
    mode = (home / "cluster.json").stat().st_mode & 0o777
    assert mode == 0o600


def test_exec_propagates_exit_code_and_passes_bytes(home):
    sid = json.loads(fy("create", "--json", home=home).stdout)["id"]
    try:
        proc = fy("exec", sid, "--", "printf 'a\\377b'; printf 'err\\n' >&2; exit 42",
                  home=home, check=False)
        assert proc.returncode == 42
        assert proc.stdout == b"a\xffb"
        assert proc.stderr == b"err\n"
        proc = fy("exec", sid, "--", "ls", "-d", "/root", home=home)
        assert proc.stdout == b"/root\n"
        proc = fy("exec", "--stdin", sid, "--", "wc -c", home=home, input=b"\0" * 1000)
        assert proc.stdout.strip() == b"1000"
        proc = fy("exec", "--timeout", "1", sid, "--", "echo started; sleep 30", home=home,
                  check=False)
        assert proc.returncode == 124 and proc.stdout == b"started\n"
        missing = fy("exec", "sb-00000000000000000000", "--", "true", home=home, check=False)
        assert missing.returncode == 1
        assert missing.stderr.startswith(b"error: ") and b"Traceback" not in missing.stderr
    finally:
        fy("rm", sid, home=home)


def test_files_put_get_binary(home, tmp_path):
    sid = fy("create", home=home).stdout.decode().strip()
    try:
        src = tmp_path / "blob.bin"
        payload = os.urandom(3 * 1024 * 1024) + bytes(range(256))
        src.write_bytes(payload)
        fy("files", "put", sid, str(src), "/root/sub/blob.bin", home=home)
        check = fy("exec", sid, "--", "sha256sum /root/sub/blob.bin", home=home)
        import hashlib

        assert check.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
        out = tmp_path / "back.bin"
        fy("files", "get", sid, "/root/sub/blob.bin", str(out), home=home)
        assert out.read_bytes() == payload
        assert fy("files", "get", sid, "/root/sub/blob.bin", "-", home=home).stdout == payload
        gone = fy("files", "get", sid, "/root/nope", str(out), home=home, check=False)
        assert gone.returncode == 1 and out.read_bytes() == payload  # not clobbered
    finally:
        fy("rm", sid, home=home)


def test_json_outputs_parse_through_the_lifecycle(home):
    created = json.loads(fy("create", "--worker", "w1", "--json", home=home).stdout)
    sid = created["id"]
    assert created["state"] == "running" and created["worker"] == "w1"
    listed = json.loads(fy("ls", "--json", home=home).stdout)
    assert sid in {s["id"] for s in listed}
    fy("exec", sid, "--", "echo kept > /root/kept", home=home)
    cp = json.loads(fy("checkpoint", sid, "--wait", "--json", home=home).stdout)
    assert cp["state"] == "published" and cp["stored_bytes"] > 0
    assert cp["id"] in {c["id"] for c in json.loads(fy("checkpoints", "--json",
                                                         home=home).stdout)}
    forks = json.loads(fy("fork", cp["id"][:12], "--count", "2", "--worker", "w2", "--json",
                          home=home).stdout)
    assert [f["worker"] for f in forks] == ["w2", "w2"]
    for f in forks:
        assert fy("exec", f["id"], "--", "cat /root/kept", home=home).stdout == b"kept\n"
    hib = json.loads(fy("hibernate", sid, "--json", home=home).stdout)
    assert hib["state"] == "hibernated"
    woke = json.loads(fy("wake", sid, "--worker", "w2", "--json", home=home).stdout)
    assert (woke["id"], woke["state"], woke["worker"]) == (sid, "running", "w2")
    assert fy("exec", sid, "--", "cat /root/kept", home=home).stdout == b"kept\n"
    fy("rm", sid, *[f["id"] for f in forks], home=home)
    assert not {sid} & {s["id"] for s in json.loads(fy("ls", "--json", home=home).stdout)}


def test_image_build_and_ls_on_the_cluster_home_cover_each_worker(home):
    # a worker builds `minimal` only when a sandbox first needs it: build it
    # for all of them (built once, imported into each worker home)
    fy("image", "build", "minimal", "--json", home=home)
    images = json.loads(fy("image", "ls", "--json", home=home).stdout)
    assert {i["worker"] for i in images} == {"w1", "w2"}
    assert all(len(i["digest"]) == 64 and i["size"] > 0 for i in images)
    assert len({i["digest"] for i in images if "minimal" in i["names"]}) == 1


def test_export_then_import_through_the_cluster(home, tmp_path):
    """`forkyard export` writes a standalone qcow2; `import` makes it forkable again."""
    sid = json.loads(fy("create", "--json", home=home).stdout)["id"]
    fy("exec", sid, "--", "echo exported > /root/x", home=home)
    cp = fy("checkpoint", sid, "--wait", home=home).stdout.decode().strip()
    out = tmp_path / "cp.qcow2"
    exported = json.loads(fy("export", cp, str(out), "--json", home=home).stdout)
    assert exported["snapshot"] == "forkyard" and out.stat().st_size == exported["size"]
    new_cp = fy("import", str(out), "--name", "round-trip", home=home).stdout.decode().strip()
    assert len(new_cp) == 64 and new_cp != cp
    shown = json.loads(fy("checkpoint", "show", new_cp[:12], "--json", home=home).stdout)
    assert shown["name"] == "round-trip" and len(shown["layers"]) == 1
    # the control plane never saw it being made: it finds it in the store
    fork = json.loads(fy("fork", new_cp[:12], "--json", home=home).stdout)[0]
    assert fy("exec", fork["id"], "--", "cat", "/root/x", home=home).stdout == b"exported\n"
    listed = json.loads(fy("checkpoint", "ls", "--json", home=home).stdout)
    assert any(c["id"] == new_cp and c["worker"] is None for c in listed)
    stored = json.loads(fy("store", "ls", "--json", home=home).stdout)
    assert {cp, new_cp} <= {c["id"] for c in stored}
    fy("rm", sid, fork["id"], home=home)


def test_readme_cli_example_runs_unchanged(tmp_path):
    home = tmp_path / "readme-home"
    (tmp_path / "data.bin").write_bytes(os.urandom(4096))
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORKYARD_URL", "FORKYARD_API_TOKEN")}
    env["FORKYARD_HOME"] = str(home)
    env["PATH"] = f"{Path(FORKYARD).parent}:{env.get('PATH', '')}"
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", README_CLI], cwd=tmp_path,
                              env=env, capture_output=True, timeout=600, check=False)
        out = proc.stdout.decode(errors="replace")
        assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
        assert "hi\n" in out and "running on w2" in out
        assert "cluster in" in out and "stopped" in out
        assert not (home / "cluster.json").exists()
        assert not qemu_pids(home)
    finally:
        fy("down", home=home, check=False)


def test_checkpoint_then_fork_on_the_other_worker_at_once(home):
    """No --wait: the fork on w2 waits for the publish under way instead of a 409."""
    sid = fy("create", "--worker", "w1", "--label", "suite=cli", home=home).stdout.decode().strip()
    try:
        fy("exec", sid, "--", "echo now > /root/now", home=home)
        cp = fy("checkpoint", sid, home=home).stdout.decode().strip()
        out = fy("fork", cp[:12], "--worker", "w2", home=home).stdout.decode()
        ids = out.split()
        assert len(ids) == 1 and ids[0].startswith("sb-") and out == f"{ids[0]}\n"
        fork = ids[0]
        assert fy("exec", fork, "--", "cat /root/now", home=home).stdout == b"now\n"
        labelled = json.loads(fy("ls", "--label", "suite=cli", "--state", "running", "--json",
                                 home=home).stdout)
        assert {s["id"] for s in labelled} == {sid, fork}  # the fork inherited the label
        kinds = [json.loads(line)["kind"] for line in fy(
            "events", "--sandbox", sid, "--json", home=home).stdout.splitlines()]
        assert kinds[:2] == ["created", "checkpointed"] and "published" in kinds
        fy("rm", fork, home=home)
    finally:
        fy("rm", sid, home=home)

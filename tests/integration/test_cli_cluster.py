"""`forkyard up --workers 2` in a tmp home, the CLI end to end, then `forkyard down`.

The CLI runs as real subprocesses (the installed ``forkyard`` console script),
exactly as a user runs it; the cluster it starts is real (control plane, two
worker daemons, QEMU guests).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

FORKYARD = str(Path(sys.executable).with_name("forkyard"))

# The README's CLI example, verbatim (run with FORKYARD_HOME set to the test home).
README_CLI = textwrap.dedent("""\
    forkyard up --workers 2                     # control plane + 2 workers, in the background
    SB=$(forkyard create)                       # boot a sandbox, print its id
    forkyard exec $SB -- 'echo hi > /root/hi.txt; uname -r'
    forkyard files put $SB ./data.bin /root/data.bin
    CP=$(forkyard checkpoint $SB --wait)        # published: forkable on any worker
    forkyard fork $CP --count 3                 # three copies of that instant
    forkyard hibernate $SB && forkyard wake $SB --worker w2
    forkyard exec $SB -- cat /root/hi.txt       # same sandbox, now on w2
    forkyard ls && forkyard down
""")


def fy(*args: str, home: Path, input: bytes | None = None, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORKYARD_URL", "FORKYARD_API_TOKEN")}
    env["FORKYARD_HOME"] = str(home)
    proc = subprocess.run([FORKYARD, *args], input=input, capture_output=True, env=env,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"forkyard {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def cluster_pids(home: Path) -> list[int]:
    data = json.loads((home / "cluster.json").read_text())
    return list(data["pids"].values())


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def qemu_of(home: Path) -> list[int]:
    needle = str(home).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if b"qemu-system" in cmd and needle in cmd:
                    out.append(int(entry.name))
    return out


def _logs(home: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace")
                                                    .splitlines()[-20:])
                     for p in sorted((home / "logs").glob("*.log")))


@contextlib.contextmanager
def up_cluster(home: Path) -> Iterator[dict[str, object]]:
    """A 2-worker cluster in ``home`` for a test module; proves `down` leaves nothing."""
    info = json.loads(fy("up", "--workers", "2", "--json", home=home).stdout)
    pids = cluster_pids(home)
    try:
        yield info
    finally:
        down = fy("down", home=home, check=False)
        leftovers = [p for p in pids if running(p)] + qemu_of(home)
        assert down.returncode == 0 and not leftovers, (
            f"down: {down.returncode} {down.stderr!r}; left running: {leftovers}\n"
            + _logs(home))


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


def test_image_ls_on_the_cluster_home_lists_each_worker(home):
    images = json.loads(fy("image", "ls", "--json", home=home).stdout)
    assert {i["worker"] for i in images} == {"w1", "w2"}
    assert all(len(i["digest"]) == 64 and i["size"] > 0 for i in images)


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
        assert not qemu_of(home)
    finally:
        fy("down", home=home, check=False)

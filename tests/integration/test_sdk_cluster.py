"""The Python SDK against a real 2-worker cluster started with `forkyard up`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from forkyard.errors import CommandFailed
from forkyard.sdk import (
    AsyncSandbox,
    ConflictError,
    NotFoundError,
    Sandbox,
    SandboxTimeout,
    list_workers,
)
from tests.fixtures.cli import readme_example, up_cluster

pytestmark = pytest.mark.vm

# The README's SDK example, read from README.md (run with FORKYARD_HOME set to the test home).
README_SDK = readme_example("sdk")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("sdk-cluster") / "home"
    with up_cluster(root):
        yield root


@pytest.fixture
def env_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Connection found the way a user's is: FORKYARD_HOME → cluster.json."""
    for var in ("FORKYARD_URL", "FORKYARD_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FORKYARD_HOME", str(home))
    return home


def test_sdk_lifecycle(env_home):
    assert sorted(w.name for w in list_workers() if w.state == "alive") == ["w1", "w2"]
    with Sandbox.create(worker="w1") as sb:
        assert sb.state == "running" and sb.worker == "w1"
        r = sb.exec(["sh", "-c", "printf 'x\\377'; echo oops >&2; exit 5"])
        assert (r.exit_code, r.stdout_bytes, r.stderr) == (5, b"x\xff", "oops\n")
        with pytest.raises(CommandFailed):
            sb.exec("false", check=True)
        sb.files.make_dir("/root/d/e")
        sb.files.write("/root/d/e/f.bin", bytes(range(256)) * 100, mode=0o600)
        st = sb.files.stat("/root/d/e/f.bin")
        assert st.size == 25600 and st.mode & 0o777 == 0o600 and st.is_file
        assert [e.name for e in sb.files.list("/root/d/e")] == ["f.bin"]
        assert sb.files.read("/root/d/e/f.bin") == bytes(range(256)) * 100
        assert sb.exec("cat", stdin=b"piped").stdout == "piped"
        pid = sb.exec("sleep 1000", background=True).pid
        assert pid > 0

        cp = sb.checkpoint(name="sdk")
        assert cp.id and cp.info.sandbox == sb.id
        # a first checkpoint stores its RAM chunks; the worker's template had some of them
        assert cp.ram_new_bytes is not None and cp.ram_new_bytes > 0
        assert cp.ram_shared_bytes is not None
        again = sb.checkpoint(name="sdk-again")  # little changed: mostly shared
        assert again.ram_shared_bytes is not None and again.ram_new_bytes is not None
        assert again.ram_shared_bytes > again.ram_new_bytes
        sb.files.write("/root/after", "after")
        forks = Sandbox.fork(cp, count=2)
        try:
            for f in forks:
                assert f.info.parent_checkpoint == cp.id
                assert f.files.read("/root/d/e/f.bin") == bytes(range(256)) * 100
                assert not f.files.exists("/root/after")
                assert f.exec(f"kill -0 {pid}").exit_code == 0  # the process lives on
        finally:
            for f in forks:
                f.kill()
        assert cp.wait_published(timeout=300).state == "published"
        other = Sandbox.fork(cp, worker="w2")
        with other:
            assert other.worker == "w2"
            assert other.files.read("/root/d/e/f.bin") == bytes(range(256)) * 100

        assert sb.hibernate().state == "hibernated"
        with pytest.raises(ConflictError):
            sb.exec("true")
        assert sb.wake(worker="w2").worker == "w2"
        assert sb.state == "running" and sb.refresh().worker == "w2"
        assert sb.files.read_text("/root/after") == "after"
        assert sb.exec(f"kill -0 {pid}").exit_code == 0
        with pytest.raises(SandboxTimeout) as info:
            sb.exec("echo partial; sleep 30", timeout=1)
        assert info.value.stdout == "partial\n"
        sid = sb.id
    # the control plane remembers destroyed sandboxes; they are just not listed
    assert Sandbox.connect(sid).state == "destroyed"
    assert sid not in {i.id for i in Sandbox.list()}
    with pytest.raises(NotFoundError):
        Sandbox.connect("sb-00000000000000000000")


def test_async_sdk(env_home):
    async def scenario() -> None:
        async with await AsyncSandbox.create() as sb:
            r = await sb.exec("echo async")
            assert r.stdout == "async\n"
            await sb.files.write("/root/a", b"A")
            cp = await sb.checkpoint()
            fork = await AsyncSandbox.fork(cp)
            async with fork:
                assert await fork.files.read("/root/a") == b"A"
            assert (await cp.wait_published(timeout=300)).state == "published"

    asyncio.run(scenario())


def test_readme_sdk_example_runs_unchanged(env_home):
    env = {k: v for k, v in os.environ.items() if k != "FORKYARD_URL"}
    proc = subprocess.run([sys.executable, "-c", README_SDK], env=env, capture_output=True,
                          timeout=600, check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert out.splitlines() == ["draft 1", "", "w2 draft 1", ""]
    assert Sandbox.list() == []

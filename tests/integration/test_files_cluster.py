"""Files of any size and directory trees through a real cluster (CLI, SDK and raw HTTP)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from forkyard.sdk import Sandbox
from tests.fixtures.cli import fy, up_cluster

pytestmark = pytest.mark.vm

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("files-cluster") / "home"
    with up_cluster(root):
        yield root


@pytest.fixture(scope="module")
def sb(home: Path) -> Iterator[Sandbox]:
    os.environ["FORKYARD_HOME"] = str(home)
    try:
        with Sandbox.create(memory_mb=512, disk="3G") as s:
            yield s
    finally:
        os.environ.pop("FORKYARD_HOME", None)


def _cfg(home: Path) -> dict[str, object]:
    return json.loads((home / "cluster.json").read_text())


def _http(home: Path) -> httpx.Client:
    cfg = _cfg(home)
    return httpx.Client(base_url=str(cfg["url"]), timeout=300,
                        headers={"Authorization": f"Bearer {cfg['api_token']}"})


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def _peak_growth(pids: list[int]) -> Iterator[dict[int, int]]:
    """Sampled RSS growth over the block (peak minus start), per process."""
    start = {p: _rss(p) for p in pids}
    peak = dict(start)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for p in pids:
                with contextlib.suppress(OSError):
                    peak[p] = max(peak[p], _rss(p))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    growth: dict[int, int] = {}
    try:
        yield growth
    finally:
        stop.set()
        t.join()
        growth.update({p: peak[p] - start[p] for p in pids})


def _make(path: Path, size: int) -> str:
    h = hashlib.sha256()
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for i in range(size // MiB):
            chunk = block[i % 251:] + block[: i % 251]
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _round_trip(home: Path, sb: Sandbox, tmp_path: Path, size: int) -> None:
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    want = _make(src, size)
    pids = [int(p) for p in _cfg(home)["pids"].values()]  # type: ignore[attr-defined]
    with _peak_growth(pids) as growth:
        fy("files", "put", sb.id, str(src), "/root/big.bin", home=home, timeout=1800)
        assert sb.files.stat("/root/big.bin").size == size
        fy("files", "get", sb.id, "/root/big.bin", str(back), home=home, timeout=1800)
    assert _sha(back) == want
    # the server and every worker held chunks, never the file: their growth is a fixed
    # overhead (a few 4 MiB chunks and their copies per hop; 46-62 MiB seen under load)
    assert max(growth.values()) < min(size * 9 // 10, 200 * MiB), growth
    sb.files.remove("/root/big.bin")
    src.unlink()
    back.unlink()


def test_100_mib_put_and_get_stream_with_bounded_memory(home, sb, tmp_path):
    _round_trip(home, sb, tmp_path, 100 * MiB)


@pytest.mark.slow
def test_1_gib_put_and_get_stream_with_bounded_memory(home, sb, tmp_path):
    _round_trip(home, sb, tmp_path, 1024 * MiB)


def test_sdk_write_accepts_iterators_and_files_and_reads_a_stream(sb, tmp_path):
    f = sb.files
    f.write("/tmp/sdk/a.bin", (bytes([i]) * 300_000 for i in range(20)))
    data = b"".join(bytes([i]) * 300_000 for i in range(20))
    assert b"".join(f.read_stream("/tmp/sdk/a.bin")) == data
    (tmp_path / "local").write_bytes(b"from a file object\n")
    with (tmp_path / "local").open("rb") as fo:
        f.write("/tmp/sdk/b.txt", fo, mode=0o600)
    assert f.read_text("/tmp/sdk/b.txt") == "from a file object\n"
    f.make_dir("/tmp/sdk/d/e", mode=0o701)
    assert f.stat("/tmp/sdk/d/e").mode & 0o777 == 0o701
    f.rename("/tmp/sdk/b.txt", "/tmp/sdk/d/c.txt")
    assert f.exists("/tmp/sdk/d/c.txt") and not f.exists("/tmp/sdk/b.txt")
    from forkyard.sdk.errors import NotFoundError

    with pytest.raises(NotFoundError):
        f.read_stream("/tmp/sdk/missing")


def test_cli_tree_round_trip_keeps_modes_and_symlinks(home, sb, tmp_path):
    src = tmp_path / "proj"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(src / "bin" / "tool", 0o755)
    (src / "secret").write_bytes(os.urandom(5 * MiB))
    os.chmod(src / "secret", 0o600)
    os.symlink("bin/tool", src / "run")
    os.symlink("/etc/hostname", src / "host")
    os.chmod(src / "bin", 0o750)
    fy("files", "put", "-r", sb.id, str(src), "/srv/proj", home=home)
    assert sb.exec("/srv/proj/run").stdout == "tool\n"
    out = tmp_path / "out"
    fy("files", "get", "-r", sb.id, "/srv/proj", str(out), home=home)
    for rel in ("bin/tool", "secret"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
        assert os.stat(out / rel).st_mode == os.stat(src / rel).st_mode
    assert os.stat(out / "bin").st_mode & 0o777 == 0o750
    assert os.readlink(out / "run") == "bin/tool" and os.readlink(out / "host") == "/etc/hostname"
    fy("files", "mkdir", sb.id, "/srv/m/n", home=home)
    fy("files", "mv", sb.id, "/srv/m/n", "/srv/m/o", home=home)
    assert fy("files", "exists", sb.id, "/srv/m/o", home=home).returncode == 0
    assert fy("files", "exists", sb.id, "/srv/m/n", home=home, check=False).returncode == 1


def _evil(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        i = tarfile.TarInfo(name)
        i.type, i.linkname = kind, link
        i.size = 4 if kind == tarfile.REGTYPE else 0
        tf.addfile(i, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize("tar", [
    _evil("../../pwned"), _evil("/pwned"), _evil("null", tarfile.CHRTYPE),
    _evil("fifo", tarfile.FIFOTYPE), _evil("hl", tarfile.LNKTYPE, "fine.txt"),
], ids=["dotdot", "absolute", "device", "fifo", "hardlink"])
def test_an_evil_tar_upload_is_refused_typed_and_writes_nothing_outside(home, sb, tar):
    with _http(home) as c:
        r = c.put(f"/v1/sandboxes/{sb.id}/files/tree", params={"path": "/tmp/evil/x"},
                  content=tar)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "bad_request"
    assert not sb.files.exists("/pwned") and not sb.files.exists("/tmp/pwned")
    assert {e.name for e in sb.files.list("/tmp/evil/x")} <= {"fine.txt"}


def test_a_cut_upload_through_the_control_plane_leaves_the_target_untouched(home, sb):
    sb.files.write("/tmp/cut/target", b"original\n")

    def body() -> Iterator[bytes]:
        for _ in range(24):
            yield os.urandom(MiB)
        raise RuntimeError("client dies mid-upload")

    with _http(home) as c, pytest.raises((RuntimeError, httpx.HTTPError)):
        c.put(f"/v1/sandboxes/{sb.id}/files", params={"path": "/tmp/cut/target"},
              content=body())
    assert sb.files.read("/tmp/cut/target") == b"original\n"
    deadline = time.monotonic() + 60  # the worker notices the cut and drops its temp file
    while [e for e in sb.files.list("/tmp/cut") if ".fy-up-" in e.name]:
        assert time.monotonic() < deadline, sb.files.list("/tmp/cut")
        time.sleep(1)
    assert [e.name for e in sb.files.list("/tmp/cut")] == ["target"]


def test_the_readme_files_example_runs(home, tmp_path):
    import subprocess

    from tests.fixtures.cli import FORKYARD, readme_example

    env = {k: v for k, v in os.environ.items() if k not in ("FORKYARD_URL", "FORKYARD_API_TOKEN")}
    env["FORKYARD_HOME"] = str(home)
    env["PATH"] = f"{Path(FORKYARD).parent}:{env.get('PATH', '')}"
    cli = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_example("files")],
                         cwd=tmp_path, env=env, capture_output=True, timeout=900, check=False)
    out = cli.stdout.decode(errors="replace")
    assert cli.returncode == 0, out + cli.stderr.decode(errors="replace")
    assert out.splitlines() == ["same", "built", "bin/build"], out
    assert os.access(tmp_path / "copy" / "bin" / "build", os.X_OK)

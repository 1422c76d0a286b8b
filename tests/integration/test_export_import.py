"""Self-contained export (plain QEMU can resume it) and import, and why not `rebase -b ""`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from forkyard._proc import run
from forkyard.checkpoint import Checkpoint
from forkyard.checkpoint.export import export_checkpoint, import_qcow2
from forkyard.errors import CheckpointError, IncompatibleCheckpoint
from forkyard.guest.client import AgentClient
from forkyard.tools import qemu_img
from forkyard.verify import VerifyReport, verify_files
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape
from forkyard.worker import Worker
from tests.conftest import qemu_pids

pytestmark = pytest.mark.vm


@dataclass
class Setup:
    a: Worker
    b: Worker
    cp: Checkpoint
    sleeper: int
    expected: dict[str, str]
    root: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("export")
    a = Worker(root / "a", name="a")
    b = Worker(root / "b", name="b")
    sb = a.create("minimal")
    sb.files.write("/root/marker", "exported\n")
    sleeper = int(sb.exec("sleep 1000 & echo $!").stdout)
    cp = sb.checkpoint()
    sb.destroy()
    yield Setup(a, b, cp, sleeper, a.images.file_checksums("minimal"), root)
    a.close()
    b.close()
    assert not qemu_pids(root)


def _resume_plain(argv: list[str], disk: Path, sock: Path, log: Path,
                  expected: dict[str, str]) -> tuple[str, bool, VerifyReport]:
    """Run a plain QEMU command line (no forkyard VM code) and check the guest."""
    argv = [a.replace("/tmp/forkyard-export.agent", str(sock)) for a in argv]
    drive = argv.index("-drive") + 1
    argv[drive] = f"file={disk},if=none,id=disk0,format=qcow2"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        agent = AgentClient(sock)
        agent.connect(timeout=60)
        marker = agent.read_file("/root/marker").decode()
        alive = agent.exec("kill -0 $(pidof sleep)").exit_code == 0
        report = verify_files(agent, expected)
        agent.close()
        return marker, alive, report
    finally:
        proc.kill()
        proc.wait(10)


def test_export_is_one_standalone_qcow2_that_plain_qemu_resumes(setup: Setup) -> None:
    out = setup.root / "cp.qcow2"
    result = export_checkpoint(setup.a, setup.cp, out)
    info = qemu_img.info(out)
    assert "backing-filename" not in info
    snaps = {s["name"]: s for s in info["snapshots"]}
    assert snaps[result.snapshot]["vm-state-size"] > 0
    assert "-kernel" not in result.argv and "-loadvm" in result.argv
    # resume a copy: -loadvm and the guest's writes change the file
    run_copy = setup.root / "cp-run.qcow2"
    run(["cp", out, run_copy])
    marker, alive, report = _resume_plain(result.argv, run_copy, setup.root / "plain.sock",
                                          setup.root / "plain.log", setup.expected)
    assert marker == "exported\n"
    assert alive
    assert report.ok, report.summary()


def test_import_of_an_export_on_another_worker(setup: Setup) -> None:
    out = setup.root / "roundtrip.qcow2"
    export_checkpoint(setup.a, setup.cp, out)
    cp = import_qcow2(setup.b, out)
    fork = setup.b.fork(cp)
    try:
        assert fork.files.read_text("/root/marker") == "exported\n"
        assert fork.exec(f"kill -0 {setup.sleeper}").exit_code == 0
        report = verify_files(fork, setup.expected)
        assert report.ok, report.summary()
    finally:
        fork.destroy()


@pytest.fixture(scope="module")
def upstream_qcow2(setup: Setup) -> Path:
    """What other QEMU platforms archive: a thin overlay on a base path, with `savevm`."""
    w = setup.a
    base = w.images.get("minimal")
    work = setup.root / "upstream"
    work.mkdir()
    overlay = work / "rootfs.qcow2"
    qemu_img.create(overlay, base.size, backing=base.path, backing_fmt="raw")
    vm = QemuVM("upstream", work, w.home.run_dir / "upstream.agent",
                VMShape(256, 1, w.host.machine_type, w.host.accel),
                BootSpec(w.host.kernel.path, w.host.initrd.path),
                DiskChain(base.path, (), overlay))
    try:
        vm.launch()
        agent = AgentClient(vm.agent_socket)
        agent.connect()
        agent.write_file("/root/marker", b"exported\n")
        agent.exec("sleep 1000 &")
        agent.close()
        assert vm.hmp("savevm cp-1").strip() == ""
        vm.quit()
    finally:
        vm.kill()
    return overlay


def test_import_of_an_upstream_thin_overlay_with_savevm(setup: Setup, upstream_qcow2: Path
                                                        ) -> None:
    cp = import_qcow2(setup.b, upstream_qcow2, snapshot="cp-1")
    # thin in, thin out: the layer holds what the guest wrote, not the base
    assert cp.manifest.layers[0].size < setup.a.images.get("minimal").size // 4
    fork = setup.b.fork(cp)
    try:
        assert fork.files.read_text("/root/marker") == "exported\n"
        assert fork.exec("pidof sleep").exit_code == 0
        report = verify_files(fork, setup.expected)
        assert report.ok, report.summary()
    finally:
        fork.destroy()


def test_rebase_flatten_loses_base_data_under_the_snapshot(setup: Setup, upstream_qcow2: Path
                                                           ) -> None:
    """Regression guard for the detector: the upstream fix is corrupt and we see it."""
    flat = setup.root / "flattened.qcow2"
    run(["cp", upstream_qcow2, flat])
    run(["qemu-img", "rebase", "-b", "", flat], timeout=600)
    assert "backing-filename" not in qemu_img.info(flat)
    marker, _alive, report = _resume_plain(
        _plain_argv(setup, "cp-1"), flat, setup.root / "flat.sock", setup.root / "flat.log",
        setup.expected,
    )
    assert marker == "exported\n"  # what the guest wrote survives, which hides the bug...
    # ...but what came from the base reads back as zeros: wrong checksums, or
    # (when the zeroed file is xargs/sha256sum itself) no output at all
    assert not report.ok, report.summary()


def _plain_argv(setup: Setup, snapshot: str) -> list[str]:
    from forkyard.checkpoint.export import plain_qemu_argv

    return plain_qemu_argv(setup.cp.manifest.vm, Path("/unused"), snapshot=snapshot,
                           agent_socket=Path("/tmp/forkyard-export.agent"))


def test_import_refuses_bad_input(setup: Setup, tmp_path: Path) -> None:
    no_snap = tmp_path / "plain.qcow2"
    qemu_img.create(no_snap, 64 * 1024 * 1024)
    with pytest.raises(CheckpointError, match="no internal snapshot"):
        import_qcow2(setup.b, no_snap)
    with pytest.raises(CheckpointError):
        import_qcow2(setup.b, tmp_path / "missing.qcow2")
    not_qcow = tmp_path / "x.qcow2"
    not_qcow.write_bytes(b"\0" * 4096)
    with pytest.raises(Exception, match="not a qcow2"):
        import_qcow2(setup.b, not_qcow)
    data_file = tmp_path / "ext.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/data.raw",
         data_file, "64M"])
    with pytest.raises(Exception, match="external data file"):
        import_qcow2(setup.b, data_file)


def test_import_with_the_wrong_memory_size_is_a_clear_error(setup: Setup,
                                                            upstream_qcow2: Path) -> None:
    with pytest.raises(IncompatibleCheckpoint):
        import_qcow2(setup.b, upstream_qcow2, snapshot="cp-1", memory_mb=512)
    assert not qemu_pids(setup.b.home.root)

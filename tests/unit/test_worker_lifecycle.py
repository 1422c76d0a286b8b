"""The worker's Sandbox changes state only through the one lifecycle (no VM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkyard.checkpoint import LocalCheckpoints
from forkyard.checkpoint.recorder import Recorder
from forkyard.errors import SandboxStateError
from forkyard.store import BlobCache
from forkyard.wire.lifecycle import SandboxState as S
from forkyard.worker import Sandbox, SandboxSpec

SPEC = SandboxSpec(base_digest="a" * 64, disk_size=1 << 20, memory_mb=256, cpus=1, parent=None)


def _sandbox(tmp_path: Path, state: S = S.STARTING) -> tuple[Sandbox, list[str]]:
    destroyed: list[str] = []
    d = tmp_path / "sb-1"
    d.mkdir()
    sb = Sandbox("sb-1", SPEC, directory=d,
                 recorder=Recorder(BlobCache(tmp_path / "blobs"),
                                   LocalCheckpoints(tmp_path / "cps"), worker="w"),
                 restore_with=lambda _sb, _cp: None,
                 on_destroy=lambda sb: destroyed.append(sb.id), state=state,
                 last_checkpoint="c" * 64)
    return sb, destroyed


def test_guest_calls_need_a_running_sandbox(tmp_path: Path) -> None:
    sb, _ = _sandbox(tmp_path)
    with pytest.raises(SandboxStateError):
        sb.exec("true")
    with pytest.raises(SandboxStateError):
        sb.files.read("/etc/hostname")
    with pytest.raises(SandboxStateError):
        sb.checkpoint()
    with pytest.raises(SandboxStateError):
        sb.hibernate()


def test_destroy_is_terminal(tmp_path: Path) -> None:
    sb, destroyed = _sandbox(tmp_path, S.STOPPED)
    sb.destroy()
    assert sb.state is S.DESTROYED and destroyed == ["sb-1"]
    with pytest.raises(SandboxStateError), sb.restarting(SPEC):
        pass
    with pytest.raises(SandboxStateError):
        sb.prepare((), None)  # type: ignore[arg-type]
    sb.stop()  # stopping a destroyed sandbox changes nothing
    assert sb.state is S.DESTROYED


def test_a_failed_wake_leaves_it_hibernated_with_its_old_spec(tmp_path: Path) -> None:
    sb, _ = _sandbox(tmp_path, S.HIBERNATED)
    other = SandboxSpec(base_digest="b" * 64, disk_size=1 << 21, memory_mb=512, cpus=2,
                        parent="c" * 64)
    seen = []
    with pytest.raises(RuntimeError), sb.restarting(other):
        seen.append(sb.state)
        raise RuntimeError("download failed")
    assert seen == [S.WAKING]
    assert sb.state is S.HIBERNATED and sb.spec == SPEC
    assert '"state": "hibernated"' in (sb.dir / "sandbox.json").read_text()


def test_a_failed_restore_leaves_it_failed(tmp_path: Path) -> None:
    sb, _ = _sandbox(tmp_path, S.STOPPED)
    with pytest.raises(RuntimeError), sb.restarting(SPEC):
        assert sb.state is S.STARTING
        raise RuntimeError("QEMU refused the state")
    assert sb.state is S.FAILED


def test_stop_keeps_a_failed_sandbox_failed(tmp_path: Path) -> None:
    sb, _ = _sandbox(tmp_path, S.FAILED)
    sb.stop()
    assert sb.state is S.FAILED
    sb.abort_start()
    assert sb.state is S.FAILED

"""A state save is over only when QEMU's run state left finish-migrate (a QEMU race)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from forkyard.errors import VMError
from forkyard.vm.machine import BootSpec, DiskChain, QemuVM, VMShape, VMState
from forkyard.vm.qmp import QMPCommandError

SHAPE = VMShape(256, 1, "pc-q35-7.2", "tcg", qemu="7.2.22", disk_size=1 << 30)


class _RacyQemu:
    """QMP of a QEMU that says ``completed`` while its run state is still finish-migrate."""

    def __init__(self, finishing_polls: int) -> None:
        self.finishing = finishing_polls
        self.status_polls = 0

    def send_fd(self, fd: int, name: str) -> None:
        pass

    def execute(self, command: str, args: Any = None, **_: Any) -> dict[str, Any]:
        if command == "query-migrate":
            return {"status": "completed"}
        if command == "query-status":
            self.status_polls += 1
            if self.finishing > 0:
                self.finishing -= 1
                return {"status": "finish-migrate"}
            return {"status": "postmigrate"}
        if command == "cont" and self.finishing > 0:
            raise QMPCommandError("cont", "GenericError", "Migration is not finalized yet")
        return {}


class _Alive:
    returncode = None

    def poll(self) -> None:
        return None


def test_save_state_returns_only_once_cont_is_accepted(tmp_path: Path) -> None:
    vm = QemuVM(name="sb-x", workdir=tmp_path, agent_socket=tmp_path / "a", shape=SHAPE,
                boot=BootSpec(Path("/k"), Path("/i")),
                disk=DiskChain(Path("/b.raw"), (), Path("/a.qcow2")))
    qmp = _RacyQemu(finishing_polls=3)
    vm._qmp = qmp  # type: ignore[assignment]
    vm._proc = _Alive()  # type: ignore[assignment]
    vm.state = VMState.PAUSED
    vm.save_state(tmp_path / "state")
    assert qmp.status_polls == 4 and qmp.finishing == 0
    vm.resume()  # refused if the save had returned while finish-migrate
    assert vm.state is VMState.RUNNING


class _SnapshotQemu:
    """QMP of a QEMU taking a background snapshot: records what it was asked."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[str] = []
        self.polls = 0

    def send_fd(self, fd: int, name: str) -> None:
        self.calls.append(f"getfd {name}")

    def execute(self, command: str, args: Any = None, **_: Any) -> dict[str, Any]:
        caps = args.get("capabilities", []) if isinstance(args, dict) else []
        if any(c["capability"] == "background-snapshot" and c["state"] for c in caps):
            if self.refuse:
                raise QMPCommandError(command, "GenericError",
                                      "Background-snapshot is not supported by host kernel")
            self.calls.append("snapshot on")
            return {}
        if caps:
            self.calls.append("snapshot off")
            return {}
        if command in ("query-status", "query-migrate"):
            self.polls += 1
            if command == "query-status":
                return {"status": "running" if self.polls > 2 else "paused"}
            return {"status": "completed" if self.polls > 4 else "active"}
        self.calls.append(command)
        return {}


def _vm(tmp_path: Path, qmp: object) -> QemuVM:
    vm = QemuVM(name="sb-x", workdir=tmp_path, agent_socket=tmp_path / "a", shape=SHAPE,
                boot=BootSpec(Path("/k"), Path("/i")),
                disk=DiskChain(Path("/b.raw"), (), Path("/a.qcow2")))
    vm._qmp = qmp  # type: ignore[assignment]
    vm._proc = _Alive()  # type: ignore[assignment]
    vm.state = VMState.RUNNING
    return vm


def _fd() -> int:
    import os

    r, w = os.pipe()
    os.close(r)
    return w


def test_a_background_save_stops_freezes_then_saves_and_resets_the_capability(
        tmp_path: Path) -> None:
    qmp = _SnapshotQemu()
    frozen: list[list[str]] = []
    stopped, resumed = _vm(tmp_path, qmp).save_background(
        _fd(), lambda: frozen.append(list(qmp.calls)))
    assert frozen == [["snapshot on", "getfd outgoing", "stop"]]  # in the stop, before the save
    assert qmp.calls[3:] == ["migrate", "snapshot off"]
    assert stopped <= resumed


def test_a_host_without_userfaultfd_stops_nothing(tmp_path: Path) -> None:
    import os

    from forkyard.vm.ram_capture import LiveSaveUnavailable

    qmp = _SnapshotQemu(refuse=True)
    fd = _fd()
    with pytest.raises(LiveSaveUnavailable, match="not supported by host kernel"):
        _vm(tmp_path, qmp).save_background(fd, lambda: None)
    assert "stop" not in qmp.calls and "migrate" not in qmp.calls
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the splitter reading its other end sees the end


def test_a_freeze_that_fails_takes_back_the_pipe_and_the_capability(tmp_path: Path) -> None:
    qmp = _SnapshotQemu()

    def broken() -> None:
        raise VMError("the layer did not freeze")

    with pytest.raises(VMError, match="did not freeze"):
        _vm(tmp_path, qmp).save_background(_fd(), broken)
    # QEMU closes its end of the pipe (else the splitter waits), nothing was migrated
    assert qmp.calls[-2:] == ["closefd", "snapshot off"] and "migrate" not in qmp.calls

"""A state save is over only when QEMU's run state left finish-migrate (a QEMU race)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

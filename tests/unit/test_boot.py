"""Bringing a VM up (worker/_boot.py) when the guest dies as its agent connects."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkyard.errors import AgentDisconnected, VMError
from forkyard.worker import _boot


class FakeVM:
    agent_socket = Path("/nonexistent/agent.sock")

    def __init__(self, *, alive: bool) -> None:
        self._alive = alive
        self.killed = False

    def launch(self, **kwargs: object) -> None:
        pass

    def alive(self) -> bool:
        return self._alive and not self.killed

    @property
    def exit_code(self) -> int | None:
        return None if self._alive else 0

    def log_tail(self) -> str:
        return "[console.log]\nKernel panic - not syncing: Attempted to kill init!"

    def kill(self) -> None:
        self.killed = True


class DroppedAgent:
    def __init__(self, path: Path, *, name: str) -> None:
        pass

    def open(self, *, timeout: float) -> None:
        pass

    def connect(self, *, timeout: float) -> None:
        raise AgentDisconnected("agent connection closed during HELLO")

    def close(self) -> None:
        pass


def test_a_guest_that_ends_qemu_while_its_agent_connects_is_a_vm_error_with_its_console(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_boot, "AgentClient", DroppedAgent)
    vm = FakeVM(alive=False)
    with pytest.raises(VMError) as e:
        _boot.boot_vm(vm, "sb-x", incoming=None, timeout=5)  # type: ignore[arg-type]
    assert "QEMU exited (0) while the guest agent connected" in str(e.value)
    assert "Kernel panic" in e.value.log_tail
    assert isinstance(e.value.__cause__, AgentDisconnected) and vm.killed


def test_an_agent_error_with_qemu_alive_stays_what_it_was(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(_boot, "AgentClient", DroppedAgent)
    vm = FakeVM(alive=True)
    with pytest.raises(AgentDisconnected):
        _boot.boot_vm(vm, "sb-x", incoming=None, timeout=5)  # type: ignore[arg-type]
    assert vm.killed

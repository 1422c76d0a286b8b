"""Bringing one VM up with its guest agent connected: the steps, without the bookkeeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from forkyard.errors import AgentError, ForkyardError, VMError
from forkyard.guest.client import AgentClient
from forkyard.vm.machine import QemuVM

__all__ = ["Chain", "boot_vm"]

Chain = tuple[Path, tuple[Path, ...]]  # base file, layer files (bottom first)


def boot_vm(vm: QemuVM, name: str, *, incoming: Path | int | None, timeout: float,
            pending_chain: Callable[[], Chain] | None = None) -> AgentClient:
    """Launch ``vm`` and return its connected agent; on failure nothing is left running.

    With ``pending_chain`` the VM is loaded paused with nothing under its top
    layer, and runs only once ``pending_chain()`` returned the verified base
    and layers (downloads done) and they were attached.
    """
    agent = AgentClient(vm.agent_socket, name=name)

    def connect_early() -> None:
        agent.open(timeout=timeout)

    try:
        if pending_chain is None:
            vm.launch(incoming_state=incoming, timeout=timeout, on_started=connect_early)
        else:
            try:
                vm.launch(incoming_state=incoming, timeout=timeout, run=False,
                          on_started=connect_early)
            except VMError as exc:
                # a state that fails to load was usually damaged in transit, and
                # the download's verdict says so more precisely than QEMU
                try:
                    pending_chain()
                except ForkyardError as reason:
                    raise reason from exc
                raise
            base, layers = pending_chain()
            vm.attach_backing(base, layers)
            vm.resume()
        try:
            agent.connect(timeout=timeout)
        except AgentError as exc:
            # the channel closes when QEMU exits (a guest that panics or reboots
            # ends QEMU: -no-reboot): then say so, with QEMU's and the console's last lines
            time.sleep(0.2)
            if not vm.alive():
                raise VMError(f"{name}: QEMU exited ({vm.exit_code}) while the guest agent "
                              f"connected: {exc}", log_tail=vm.log_tail()) from exc
            raise
    except BaseException:
        agent.close()
        vm.kill()
        raise
    return agent

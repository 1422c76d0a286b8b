"""A sandbox's network: its spec, live rule changes, connections into the guest.

The part of :class:`~forkyard.worker.Sandbox` that deals with its
:class:`~forkyard.net.SandboxNet` (the VM's namespace, made by the worker
with each VM and removed with it).
"""

from __future__ import annotations

import logging
import socket
import threading
from abc import ABC, abstractmethod
from dataclasses import replace

from forkyard.errors import NetworkConflict
from forkyard.guest.client import AgentClient
from forkyard.net import SandboxNet, rules
from forkyard.wire.lifecycle import Lifecycle, SandboxState
from forkyard.wire.network import NetworkSpec
from forkyard.worker._record import SandboxSpec

__all__ = ["SandboxNetwork"]

S = SandboxState
log = logging.getLogger("forkyard.worker")


class SandboxNetwork(ABC):
    """Network methods of a sandbox (mixed into ``Sandbox``, which sets these fields)."""

    id: str
    spec: SandboxSpec
    lifecycle: Lifecycle
    _lock: threading.RLock
    _net: SandboxNet | None

    @abstractmethod
    def _save_meta(self) -> None:
        ...

    @property
    def network(self) -> NetworkSpec | None:
        """Its network mode and egress rules; None: ``network: none`` (no card)."""
        return self.spec.network

    def set_network(self, spec: NetworkSpec) -> None:
        """Put new egress rules in force on the running VM (one atomic rule change).

        The mode cannot change while a VM runs (a NIC is part of the machine
        a checkpoint records); the rules can, at any time.
        """
        with self._lock:
            current = self.spec.network
            if current is None or spec.mode is not current.mode:
                have = "none" if current is None else current.mode.value
                raise NetworkConflict(f"sandbox {self.id!r} has network {have}; its mode "
                                      f"cannot become {spec.mode.value}")
            if self._net is not None:
                self._net.apply(spec)
            self.spec = replace(self.spec, network=spec)
            self._save_meta()

    def connect_port(self, port: int, *, timeout: float) -> socket.socket:
        """A TCP connection from the worker to ``port`` of the guest (the caller closes it).

        Opened inside the sandbox's own network namespace: nothing of the
        guest is reachable from the host's network.  ``PortUnreachable`` when
        nothing listens there or it does not answer within ``timeout``;
        ``NetworkConflict`` for a sandbox without a network.
        """
        self.lifecycle.require("connect to", S.RUNNING)
        net = self._net
        if net is None:
            raise NetworkConflict(f"sandbox {self.id!r} has no network (mode none)")
        return net.connect(port, timeout=timeout)

    def use_network(self, net: SandboxNet | None) -> None:
        """The namespace the next VM is plugged into (``Worker`` makes it with the VM)."""
        self._net = net

    def _configure_net(self, agent: AgentClient, *, restored: bool) -> None:
        """eth0's address, route and resolver; after a restore, stale connections reset."""
        if self._net is None:
            return
        reset = agent.configure_net(address=rules.GUEST, prefix=rules.GUEST_PREFIX,
                                    gateway=rules.GATEWAY, dns=rules.NAMESERVER,
                                    reset_tcp=restored)
        if reset:
            log.info("sandbox %s: %d TCP connections of its checkpoint reset", self.id, reset)

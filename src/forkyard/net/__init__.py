"""Sandbox networks on the worker: namespaces, TAP, NAT, egress rules, DNS (see plane)."""

from forkyard.net import rules
from forkyard.net.plane import NetPlane, SandboxNet

__all__ = ["NetPlane", "SandboxNet", "rules"]

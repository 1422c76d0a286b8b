"""The worker library: run sandboxes on this machine, checkpoint and fork them.

    from forkyard.worker import Worker

    with Worker() as w:
        sb = w.create("minimal")
        sb.exec("echo hi > /root/x")
        cp = sb.checkpoint()
        fork = w.fork(cp)
"""

from __future__ import annotations

from forkyard.guest.client import EntryInfo, ExecResult
from forkyard.worker._files import Files
from forkyard.worker._record import SandboxInfo, SandboxSpec
from forkyard.worker._sandbox import Sandbox, SandboxState
from forkyard.worker._worker import Worker

__all__ = ["EntryInfo", "ExecResult", "Files", "Sandbox", "SandboxInfo", "SandboxSpec",
           "SandboxState", "Worker"]
